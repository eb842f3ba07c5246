"""The generated state and its normalization: x = [expression | head latent | mel], each part scaled.

Expression codes are z-normalized per dimension with statistics of the training data (stored in every
checkpoint); the mel uses the published constants; the head latent is the VAE's mu, already O(1).
Training encodes with this codec and inference decodes with the same one, so both agree by construction.
The published state layout and mel constants: docs/reference.md, "State and normalization".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avflow.config import MelConfig, ModelConfig


@dataclass
class StateCodec:
    expression_mean: torch.Tensor  # (expression_dim,)
    expression_std: torch.Tensor
    mel_mean: float
    mel_std: float
    model_cfg: ModelConfig

    @classmethod
    def from_data(cls, expression_frames: torch.Tensor, mel_cfg: MelConfig, model_cfg: ModelConfig) -> "StateCodec":
        """Statistics over all training frames (N, expression_dim); std floored to keep constant dims finite."""
        mean = expression_frames.double().mean(0)
        std = expression_frames.double().std(0).clamp_min(1e-4)
        return cls(mean.float(), std.float(), mel_cfg.norm_mean, mel_cfg.norm_std, model_cfg)

    def to(self, device: torch.device) -> "StateCodec":
        """The codec with its statistics on `device`, moved once rather than copied at every encode."""
        return StateCodec(self.expression_mean.to(device), self.expression_std.to(device), self.mel_mean, self.mel_std,
                          self.model_cfg)

    def encode(self, expression: torch.Tensor, head_latent: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        expression = (expression - self.expression_mean.to(expression)) / self.expression_std.to(expression)
        mel = (mel - self.mel_mean) / self.mel_std
        return torch.cat([expression, head_latent, mel], dim=-1)

    def decode(self, state: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a state (..., state_dim) into denormalized expression, head latent and log-mel."""
        e, h = self.model_cfg.expression_dim, self.model_cfg.head_latent_dim
        expression = state[..., :e] * self.expression_std.to(state) + self.expression_mean.to(state)
        return {"expression": expression, "head_latent": state[..., e:e + h],
                "mel": state[..., e + h:] * self.mel_std + self.mel_mean}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"expression_mean": self.expression_mean, "expression_std": self.expression_std,
                "mel_mean": torch.tensor(self.mel_mean), "mel_std": torch.tensor(self.mel_std)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> "StateCodec":
        return cls(state["expression_mean"].float(), state["expression_std"].float(), float(state["mel_mean"]),
                   float(state["mel_std"]), model_cfg)
