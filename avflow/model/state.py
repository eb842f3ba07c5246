"""The generated state, its normalization, and its decoding into outputs: x = [expression | head latent | mel],
each part scaled; `StateDecoder` turns sampled states into log-mel, expression and head pose for every stage.

Expression codes are z-normalized per dimension with statistics of the training data (stored in every
checkpoint); the mel uses the published constants; the head latent is the VAE's mu, already O(1).
Training encodes with this codec and inference decodes with the same one, so both agree by construction.
The published state layout and mel constants: docs/reference.md, "State and normalization".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avflow.config import MelConfig, ModelConfig
from avflow.model.head_vae import PoseDecoder


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


@dataclass
class Generated:
    """N samples of one input: log-mel (N, T, n_mels), expression (N, T, 256), head pose (N, T, 7), at mel rate."""

    mel: np.ndarray
    expression: np.ndarray
    head_pose: np.ndarray


@dataclass
class StateDecoder:
    """Sampled states -> log-mel, expression and head pose, one way for every stage (generate, infer, evaluate,
    training validation, the stream).

    The head VAE's decoder attends over every frame it is given, so each sampled window's head latents are
    decoded together (`with_poses`, the sampler's window map) and the poses cross-faded with the states: an
    input of one window is decoded whole, and a stream, which samples the same windows, gets the same poses
    as soon as their states are final. `__call__` then splits the cross-faded result.
    """

    codec: StateCodec
    poses: PoseDecoder

    def with_poses(self, states: torch.Tensor) -> torch.Tensor:
        """One window's states (N, frames, state_dim) -> (N, frames, state_dim + pose_dim), float32: the states
        and the head poses their head latents decode to."""
        head_latent = self.codec.decode(states)["head_latent"]
        return torch.cat([states.float(), self.poses(head_latent)], dim=-1)

    def __call__(self, sampled: torch.Tensor) -> Generated:
        """`with_poses` windows cross-faded (N, T, state_dim + pose_dim) -> numpy (N, T, ...) parts."""
        sampled = sampled.float().cpu()
        states, head_pose = sampled[..., :self.codec.model_cfg.state_dim], sampled[..., self.codec.model_cfg.state_dim:]
        parts = self.codec.decode(states)
        return Generated(parts["mel"].numpy(), parts["expression"].numpy(), head_pose.numpy())
