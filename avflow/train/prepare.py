"""Turn a dataset on disk into per-segment training tensors: align, encode head pose, normalize.

The head-pose VAE is part of data preparation: its latent is the diffusion target for head motion. It is
loaded from `data.head_vae`, or trained once into the run directory when none is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avflow.config import Config
from avflow.data.dataset import AlignedSegment, align_segment
from avflow.data.layouts import list_segment_names, read_segment_record
from avflow.model.state import StateCodec
from avflow.train.head_vae import encode_poses, load_head_vae, train_head_vae

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Per-segment tensors (F, state_dim + cond_dim + 1): state, conditioning, expression-valid flag."""

    train: list[torch.Tensor]
    val: list[torch.Tensor]
    val_names: list[str]
    codec: StateCodec
    head_vae_path: Path


def read_aligned_segments(cfg: Config) -> list[AlignedSegment]:
    names = list_segment_names(cfg.data)
    if not names:
        raise ValueError(f"data.root={cfg.data.root}: no segments found for data.layout={cfg.data.layout}")
    return [align_segment(read_segment_record(cfg.data, name), cfg.mel) for name in names]


def head_vae_path(cfg: Config) -> Path:
    return Path(cfg.data.head_vae) if cfg.data.head_vae else Path(cfg.trainer.run_dir) / "head_vae.pt"


def segment_frames(segment: AlignedSegment, head_latent: np.ndarray, codec: StateCodec) -> torch.Tensor:
    state = codec.encode(torch.from_numpy(segment.expression), torch.from_numpy(head_latent),
                         torch.from_numpy(segment.mel))
    return torch.cat([state, torch.from_numpy(segment.tokens),
                      torch.from_numpy(segment.expression_valid[:, None].astype(np.float32))], dim=-1).float()


def prepare_data(cfg: Config, progress: bool = True) -> PreparedData:
    segments = read_aligned_segments(cfg)
    train_segments = [s for s in segments if not s.is_val]
    val_segments = [s for s in segments if s.is_val]
    if not train_segments:
        raise ValueError(f"data.root={cfg.data.root}: every segment matches data.val_patterns={cfg.data.val_patterns}; "
                         "no training data left")
    vae_path = head_vae_path(cfg)
    if not vae_path.is_file():
        if cfg.data.head_vae:
            raise FileNotFoundError(f"data.head_vae={vae_path}: no such head-VAE checkpoint")
        log.info("training the head-pose VAE into %s", vae_path)
        train_head_vae([s.pose for s in train_segments], cfg.head_vae, vae_path, seed=cfg.trainer.seed,
                       progress=progress)
    vae, pose_mean, pose_std = load_head_vae(vae_path, cfg.head_vae)
    expression_frames = torch.from_numpy(np.concatenate([s.expression[s.expression_valid] for s in train_segments]))
    codec = StateCodec.from_data(expression_frames, cfg.mel, cfg.model)

    def tensors(group: list[AlignedSegment]) -> list[torch.Tensor]:
        return [segment_frames(s, encode_poses(vae, pose_mean, pose_std, s.pose), codec) for s in group]

    return PreparedData(tensors(train_segments), tensors(val_segments), [s.name for s in val_segments], codec, vae_path)
