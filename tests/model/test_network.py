"""The two-stream network: published size, shapes, and the published math re-stated independently."""

import math

import torch
from helpers import published_velocity, randomized

from avflow.config import ModelConfig
from avflow.model.avflow import AVFlowNet, count_parameters
from avflow.model.dit import TimestepEmbedding, apply_rope, rope_angles

TINY = dict(d_model=32, n_blocks=2, n_heads=2, ffn_hidden=48, time_freqs=8, expression_dim=12, head_latent_dim=3,
            mel_dim=10, token_dim=5, participant_feature_dim=4)


def test_published_parameter_count():
    assert count_parameters(AVFlowNet(ModelConfig())) == 67_935_576


def test_published_input_widths_monadic_and_dyadic():
    monadic = AVFlowNet(ModelConfig())
    assert monadic.input_proj_v.weight.shape == (512, 264 + 29)
    assert monadic.input_proj_a.weight.shape == (512, 80 + 29)
    dyadic = AVFlowNet(ModelConfig(dyadic=True))
    assert dyadic.input_proj_v.weight.shape == (512, 264 + 29 + 29 + 58)
    assert dyadic.input_proj_a.weight.shape == (512, 80 + 29 + 29 + 58)


def test_output_shape_and_padding_does_not_leak():
    cfg = ModelConfig(**TINY)
    net = randomized(AVFlowNet(cfg))
    x, cond = torch.randn(2, 40, cfg.state_dim), torch.randn(2, 40, cfg.cond_dim)
    t = torch.rand(2)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    out = net(x, t, cond, valid)
    assert out.shape == (2, 40, cfg.state_dim)
    x2 = x.clone()
    x2[1, 30:] = 1e3  # garbage in padded frames must not reach real ones
    assert torch.allclose(net(x2, t, cond, valid)[1, :30], out[1, :30], atol=1e-5)


def test_fresh_blocks_are_identity_adaln_zero():
    cfg = ModelConfig(**TINY)
    net = AVFlowNet(cfg)
    block = net.transformer_blocks_v[0]
    h, emb = torch.randn(2, 9, cfg.d_model), torch.randn(2, cfg.d_model)
    assert torch.equal(block(h, emb), h)


def test_time_embedding_features_hand_computed():
    embed = TimestepEmbedding(4, 6)
    captured = {}
    embed.mlp[0].register_forward_hook(lambda m, inputs, out: captured.update(x=inputs[0]))
    embed(torch.tensor([0.5]))
    freqs = [math.exp(-k * math.log(10000.0) / 3) for k in range(4)]
    expected = [math.sin(0.5 * f) for f in freqs] + [math.cos(0.5 * f) for f in freqs]
    assert torch.allclose(captured["x"][0], torch.tensor(expected), atol=1e-6)


def test_rope_rotates_adjacent_pairs():
    x = torch.zeros(1, 1, 3, 4)
    x[..., 2] = 1.0  # pair k=1 at position p rotates by p * base^(-2/4)
    cos, sin = rope_angles(3, 4, 100.0, x.device)
    out = apply_rope(x, cos, sin)
    angle = 2 * 100.0 ** -0.5
    assert torch.allclose(out[0, 0, 2], torch.tensor([0.0, 0.0, math.cos(angle), math.sin(angle)]), atol=1e-6)


def test_matches_published_math_monadic_and_dyadic():
    for dyadic in (False, True):
        cfg = ModelConfig(**TINY, dyadic=dyadic, attention="banded")
        net = randomized(AVFlowNet(cfg))
        x, cond = torch.randn(2, 70, cfg.state_dim), torch.randn(2, 70, cfg.cond_dim)
        t = torch.rand(2)
        expected = published_velocity(net, cfg, x, t, cond)
        assert torch.allclose(net(x, t, cond).double(), expected, atol=1e-5, rtol=1e-5)
