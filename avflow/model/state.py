"""The generated state, its normalization, and its decoding into outputs: x = [expression | head latent | mel],
each part scaled; `StateDecoder` turns sampled states into log-mel, expression and head pose for every stage.

Expression codes are z-normalized per dimension with statistics of the training data (stored in every
checkpoint); the mel uses the published constants; the head latent is the VAE's mu, already O(1).
A multi-identity model (model.identities) keeps these statistics per identity, since each person's Codec
Avatar latent space and voice differ: row i of every statistic is identity i's, and its mel statistics are the
identity's own instead of the published constants. One identity keeps the published shapes on disk.
Training encodes with this codec and inference decodes with the same one, so both agree by construction.
The published state layout and mel constants: docs/reference.md, "State and normalization".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avflow.config import ModelConfig
from avflow.model.head_vae import PoseDecoder

Identity = int | torch.Tensor | None  # an index, indices (B,) of a batch's rows, or None for a one-identity codec


@dataclass
class StateCodec:
    expression_mean: torch.Tensor  # (identities, expression_dim); (expression_dim,) is read as one identity
    expression_std: torch.Tensor
    mel_mean: torch.Tensor | float  # (identities,); a float is read as one identity
    mel_std: torch.Tensor | float
    model_cfg: ModelConfig

    def __post_init__(self):
        self.expression_mean = torch.atleast_2d(self.expression_mean)
        self.expression_std = torch.atleast_2d(self.expression_std)
        self.mel_mean = torch.as_tensor(self.mel_mean, dtype=torch.float32).reshape(-1)
        self.mel_std = torch.as_tensor(self.mel_std, dtype=torch.float32).reshape(-1)
        counts = {len(self.expression_mean), len(self.expression_std), len(self.mel_mean), len(self.mel_std)}
        if len(counts) != 1:
            raise ValueError(f"normalization statistics disagree on the number of identities: {sorted(counts)}")

    @property
    def identity_count(self) -> int:
        return len(self.expression_mean)

    def to(self, device: torch.device) -> "StateCodec":
        """The codec with its statistics on `device`, moved once rather than copied at every encode."""
        return StateCodec(self.expression_mean.to(device), self.expression_std.to(device), self.mel_mean.to(device),
                          self.mel_std.to(device), self.model_cfg)

    def select(self, identity: int) -> "StateCodec":
        """The one-identity codec of identity `identity` (what inference decodes one identity's output with)."""
        rows = slice(identity, identity + 1)
        return StateCodec(self.expression_mean[rows], self.expression_std[rows], self.mel_mean[rows],
                          self.mel_std[rows], self.model_cfg)

    def _rows(self, statistic: torch.Tensor, identity: Identity, like: torch.Tensor) -> torch.Tensor:
        """`statistic`'s row of `identity`, or with indices (B,) each batch row's, shaped to broadcast against
        `like` (B, ..., width)."""
        if identity is None:
            if self.identity_count != 1:
                raise ValueError(f"this codec holds {self.identity_count} identities' statistics; name the identity")
            identity = 0
        statistic = statistic.to(like)
        if isinstance(identity, int):
            return statistic[identity]  # a view: no host value reaches the device
        rows = statistic[identity.to(like.device)]
        return rows.reshape(rows.shape[0], *[1] * (like.dim() - 2), -1)

    def encode(self, expression: torch.Tensor, head_latent: torch.Tensor, mel: torch.Tensor,
               identity: Identity = None) -> torch.Tensor:
        """The normalized state of (B, T, ·) features; `identity` (B,) normalizes each row with its identity's."""
        expression = ((expression - self._rows(self.expression_mean, identity, expression))
                      / self._rows(self.expression_std, identity, expression))
        mel = (mel - self._rows(self.mel_mean, identity, mel)) / self._rows(self.mel_std, identity, mel)
        return torch.cat([expression, head_latent, mel], dim=-1)

    def decode(self, state: torch.Tensor, identity: Identity = None) -> dict[str, torch.Tensor]:
        """Split a state (..., state_dim) into denormalized expression, head latent and log-mel; `identity` as in
        `encode`, or one index for the whole state."""
        e, h = self.model_cfg.expression_dim, self.model_cfg.head_latent_dim
        expression = state[..., :e]
        mel = state[..., e + h:]
        expression = expression * self._rows(self.expression_std, identity, expression) + self._rows(
            self.expression_mean, identity, expression)
        return {"expression": expression, "head_latent": state[..., e:e + h],
                "mel": mel * self._rows(self.mel_std, identity, mel) + self._rows(self.mel_mean, identity, mel)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """One identity in the published shapes ((expression_dim,), scalars), so its files are as before."""
        if self.identity_count == 1:
            return {"expression_mean": self.expression_mean[0], "expression_std": self.expression_std[0],
                    "mel_mean": self.mel_mean[0], "mel_std": self.mel_std[0]}
        return {"expression_mean": self.expression_mean, "expression_std": self.expression_std,
                "mel_mean": self.mel_mean, "mel_std": self.mel_std}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> "StateCodec":
        return cls(state["expression_mean"].float(), state["expression_std"].float(), state["mel_mean"].float(),
                   state["mel_std"].float(), model_cfg)


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
        and the z-normalized head poses their head latents decode to. Nothing in it depends on the identity, so
        windows of inputs of different identities are mapped alike; `__call__` applies each one's statistics
        (an affine map, which commutes with the cross-fade's weights that sum to one)."""
        cfg = self.codec.model_cfg
        head_latent = states[..., cfg.expression_dim:cfg.visual_dim]
        return torch.cat([states.float(), self.poses.normalized(head_latent)], dim=-1)

    def __call__(self, sampled: torch.Tensor) -> Generated:
        """`with_poses` windows cross-faded (N, T, state_dim + pose_dim) -> numpy (N, T, ...) parts."""
        sampled = sampled.float().cpu()
        state_dim = self.codec.model_cfg.state_dim
        parts = self.codec.decode(sampled[..., :state_dim])
        head_pose = self.poses.denormalize(sampled[..., state_dim:])
        return Generated(parts["mel"].numpy(), parts["expression"].numpy(), head_pose.numpy())
