"""The state codec: the mel part is normalized with the published constants, and decoding inverts encoding."""

import torch

from avflow.config import MelConfig, ModelConfig
from avflow.model.state import StateCodec


def test_mel_is_normalized_with_the_published_constants_and_decodes_back():
    model_cfg = ModelConfig()
    expression = torch.randn(50, model_cfg.expression_dim) * 3 + 1
    codec = StateCodec(expression.mean(0), expression.std(0), MelConfig().norm_mean, MelConfig().norm_std, model_cfg)
    mel = torch.full((50, model_cfg.mel_dim), -11.0)
    mel[:, 0], mel[:, 1] = -5.5366, -5.5366 + 2.1161  # the published mean, and one published std above it
    latent = torch.randn(50, model_cfg.head_latent_dim)
    state = codec.encode(expression, latent, mel)
    mel_part = state[:, model_cfg.expression_dim + model_cfg.head_latent_dim:]
    torch.testing.assert_close(mel_part[:, :2], torch.tensor([[0.0, 1.0]]).expand(50, 2), rtol=0, atol=1e-5)
    decoded = codec.decode(state)
    torch.testing.assert_close(decoded["mel"], mel, rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded["expression"], expression, rtol=0, atol=1e-4)
    torch.testing.assert_close(decoded["head_latent"], latent)


def two_identity_codec(model_cfg: ModelConfig) -> StateCodec:
    """Identity 0 around 0 with std 1 and the published mel constants; identity 1 shifted and scaled apart."""
    e = model_cfg.expression_dim
    return StateCodec(torch.stack([torch.zeros(e), torch.full((e,), 4.0)]),
                      torch.stack([torch.ones(e), torch.full((e,), 2.0)]),
                      torch.tensor([-5.5366, -3.0]), torch.tensor([2.1161, 0.5]), model_cfg)


def test_each_row_of_a_mixed_batch_is_normalized_with_its_own_identitys_statistics():
    model_cfg = ModelConfig(identities=["alice", "bob"])
    codec = two_identity_codec(model_cfg)
    expression = torch.full((2, 5, model_cfg.expression_dim), 6.0)
    mel = torch.full((2, 5, model_cfg.mel_dim), -2.0)
    latent = torch.zeros(2, 5, model_cfg.head_latent_dim)
    state = codec.encode(expression, latent, mel, torch.tensor([0, 1]))
    e, h = model_cfg.expression_dim, model_cfg.head_latent_dim
    torch.testing.assert_close(state[0, :, :e], torch.full((5, e), 6.0))  # (6 - 0) / 1
    torch.testing.assert_close(state[1, :, :e], torch.full((5, e), 1.0))  # (6 - 4) / 2
    torch.testing.assert_close(state[0, :, e + h:], torch.full((5, 80), (-2.0 + 5.5366) / 2.1161))
    torch.testing.assert_close(state[1, :, e + h:], torch.full((5, 80), 2.0))  # (-2 + 3) / 0.5


def test_per_identity_statistics_round_trip_only_with_the_right_identity():
    model_cfg = ModelConfig(identities=["alice", "bob"])
    codec = two_identity_codec(model_cfg)
    expression = torch.randn(3, 7, model_cfg.expression_dim)
    mel = torch.randn(3, 7, model_cfg.mel_dim) - 5
    latent = torch.randn(3, 7, model_cfg.head_latent_dim)
    identity = torch.tensor([1, 0, 1])
    decoded = codec.decode(codec.encode(expression, latent, mel, identity), identity)
    torch.testing.assert_close(decoded["expression"], expression, rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded["mel"], mel, rtol=0, atol=1e-5)
    wrong = codec.decode(codec.encode(expression, latent, mel, identity), 1 - identity)
    assert (wrong["expression"] - expression).abs().mean() > 1.0
    assert (wrong["mel"] - mel).abs().mean() > 1.0
    one = codec.select(1).decode(codec.encode(expression, latent, mel, 1)[0])  # inference: one identity's codec
    torch.testing.assert_close(one["mel"], mel[0], rtol=0, atol=1e-5)


def test_a_one_identity_codec_keeps_the_published_shapes_on_disk():
    model_cfg = ModelConfig()
    expression = torch.randn(20, model_cfg.expression_dim)
    codec = StateCodec(expression.mean(0), expression.std(0), MelConfig().norm_mean, MelConfig().norm_std, model_cfg)
    state = codec.state_dict()
    assert state["expression_mean"].shape == (model_cfg.expression_dim,) and state["mel_mean"].shape == ()
    assert float(state["mel_mean"]) == torch.tensor(-5.5366).item()
    reloaded = StateCodec.from_state_dict(state, model_cfg)
    assert torch.equal(reloaded.expression_std, codec.expression_std)
    two = two_identity_codec(ModelConfig(identities=["alice", "bob"])).state_dict()
    assert two["expression_mean"].shape == (2, model_cfg.expression_dim) and two["mel_std"].shape == (2,)
