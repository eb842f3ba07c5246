"""From loader batches (features at the mel frame rate) to model inputs: state, conditioning, masks.

The head-pose VAE is part of this step: its latent of each window's normalized pose is the diffusion
target for head motion. Expression statistics come from the shard manifest (computed while packing),
so every rank normalizes identically without a pass over the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from avflow.config import Config
from avflow.data.shard_format import load_manifest
from avflow.data.shard_index import iter_split_arrays
from avflow.model.head_vae import HeadVAE
from avflow.model.io import load_head_vae
from avflow.model.state import StateCodec
from avflow.train.head_vae import train_head_vae

log = logging.getLogger(__name__)


@dataclass
class Batch:
    state: torch.Tensor  # (B, T, state_dim)
    cond: torch.Tensor  # (B, T, cond_dim)
    valid: torch.Tensor  # (B, T) real frames
    expression_valid: torch.Tensor  # (B, T) frames whose expression code is data


class BatchEncoder:
    """Encodes feature batches into the model's normalized state and per-frame conditioning."""

    def __init__(self, cfg: Config, codec: StateCodec, head_vae: HeadVAE, pose_mean: torch.Tensor,
                 pose_std: torch.Tensor, device: torch.device):
        self.cfg = cfg
        self.codec = codec.to(device)
        self.head_vae = head_vae.to(device).eval()
        self.pose_mean, self.pose_std = pose_mean.to(device), pose_std.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> Batch:
        moved = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        valid = moved["valid"]
        pose = (moved["pose"] - self.pose_mean) / self.pose_std
        head_latent, _ = self.head_vae.encode(pose, valid)
        state = self.codec.encode(moved["expression"], head_latent * valid[..., None], moved["mel"])
        cond_parts = [moved["tokens"]]
        if self.cfg.model.dyadic:
            missing = [k for k in ("participant_tokens", "participant_features") if k not in moved]
            if missing:
                raise ValueError(f"model.dyadic=true needs participant streams in the shards; missing {missing}")
            cond_parts += [moved["participant_tokens"], moved["participant_features"]]
        cond = torch.cat(cond_parts, dim=-1)
        if cond.shape[-1] != self.cfg.model.cond_dim:
            raise ValueError(f"conditioning has {cond.shape[-1]} features per frame; model.cond_dim expects "
                             f"{self.cfg.model.cond_dim} (check model.participant_feature_dim)")
        return Batch(state * valid[..., None], cond, valid, moved["expression_valid"] & valid)


def head_vae_path(cfg: Config) -> Path:
    return Path(cfg.trainer.head_vae) if cfg.trainer.head_vae else Path(cfg.trainer.run_dir) / "head_vae.pt"


def codec_from_manifest(manifest: dict, cfg: Config) -> StateCodec:
    stats = manifest["stats"]["expression"]
    return StateCodec(torch.tensor(stats["mean"]).float(), torch.tensor(stats["std"]).float().clamp_min(1e-4),
                      cfg.mel.norm_mean, cfg.mel.norm_std, cfg.model)


def train_head_vae_stage(cfg: Config, output: Path, progress: bool = True, device: str | torch.device = "cpu") -> dict:
    """The head-pose VAE stage: a VAE trained on the poses of loader.shards' train split, written to `output`.
    `avflow train-head-vae` runs it alone; `avflow train` runs it first, on its training device, when it has no VAE
    yet."""
    split = iter_split_arrays(cfg.loader.shards, "train", ("pose",), cfg.loader.max_bad_fraction)
    poses = [arrays["pose"] for arrays in split]
    return train_head_vae(poses, cfg.head_vae, output, seed=cfg.trainer.seed, device=str(device), progress=progress)


def ensure_head_vae(cfg: Config, progress: bool = True, is_main: bool = True,
                    device: str | torch.device = "cpu") -> Path:
    """The head VAE the batch encoder needs, as an explicit step of training that says in the log what it does:
    trainer.head_vae when set (it must exist), else <run_dir>/head_vae.pt, reused when there (a resumed run)
    and otherwise trained once by rank 0 while the other ranks wait."""
    vae_path = head_vae_path(cfg)
    if cfg.trainer.head_vae:
        if not vae_path.is_file():
            raise FileNotFoundError(f"trainer.head_vae={vae_path}: no such head-VAE checkpoint")
        log.info("head-pose VAE: %s (trainer.head_vae)", vae_path)
    elif vae_path.is_file():
        log.info("head-pose VAE: reusing %s", vae_path)
    elif is_main:
        try:  # before training, not after: a run_dir that cannot be written fails in seconds
            vae_path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            raise NotADirectoryError(f"trainer.run_dir={cfg.trainer.run_dir}: cannot be a folder ({error})") from None
        log.info("head-pose VAE stage: training it into %s first (`avflow train-head-vae` runs this stage alone)",
                 vae_path)
        train_head_vae_stage(cfg, vae_path, progress, device)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's VAE
    return vae_path


def build_batch_encoder(cfg: Config, vae_path: Path, device: torch.device) -> BatchEncoder:
    """The batch encoder from the head VAE at `vae_path` and the normalization statistics of the shard manifest."""
    head_vae, pose_mean, pose_std = load_head_vae(vae_path, cfg.head_vae)
    return BatchEncoder(cfg, codec_from_manifest(load_manifest(cfg.loader.shards), cfg), head_vae, pose_mean, pose_std,
                        device)
