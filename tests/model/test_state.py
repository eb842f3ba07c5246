"""The state codec: the mel part is normalized with the published constants, and decoding inverts encoding."""

import torch

from avflow.config import MelConfig, ModelConfig
from avflow.model.state import StateCodec


def test_mel_is_normalized_with_the_published_constants_and_decodes_back():
    model_cfg = ModelConfig()
    expression = torch.randn(50, model_cfg.expression_dim) * 3 + 1
    codec = StateCodec.from_data(expression, MelConfig(), model_cfg)
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
