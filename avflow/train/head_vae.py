"""Train, save, load and apply the head-pose VAE.

The flow model's head target is the VAE encoder's mu over z-normalized pose, so the pose statistics
are stored in the checkpoint beside the weights: the same numbers must normalize at training time and
denormalize at generation time. Poses of several identities are each normalized with their own identity's
statistics, as the batch encoder normalizes them, so the VAE learns the one normalized space they share; such a
file stores a row of statistics per identity and their names. A published head-VAE file carries only
`model_state_dict`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from avflow.config import HeadVAEConfig
from avflow.model.head_vae import HeadVAE
from avflow.utils import save_torch_atomic

STD_FLOOR = 1e-6  # a pose channel that never moves must not divide by zero
SUMMARY_WINDOW = 50  # steps averaged for the reported final losses, smoothing sampling noise


def train_head_vae(
    poses: list[np.ndarray],
    cfg: HeadVAEConfig,
    out_path: str | os.PathLike,
    *,
    seed: int = 0,
    device: str = "cpu",
    log_dir: str | os.PathLike | None = None,
    progress: bool = True,
    identities: list[str] | None = None,
) -> dict:
    """Fit a HeadVAE on raw per-segment poses (each (T_i, pose_dim)) and write its checkpoint.

    `identities` names each segment's identity; with several, each identity's segments are normalized with
    their own statistics. Crops of cfg.segment_length frames are drawn with each frame equally likely to be
    covered; shorter segments are zero-padded and masked. Returns the final (smoothed) losses and step count.
    """
    segments = _check_poses(poses, cfg.pose_dim)
    names, rows = _identity_rows(identities, len(segments))
    stats = [_pose_stats([segment for segment, row in zip(segments, rows) if row == index])
             for index in range(len(names))]
    normalized = [torch.from_numpy(((segment - stats[row][0]) / stats[row][1]).astype(np.float32))
                  for segment, row in zip(segments, rows)]
    mean, std = (stats[0] if len(names) == 1 else (np.stack([mean for mean, _ in stats]),
                                                   np.stack([std for _, std in stats])))
    lengths = np.array([len(segment) for segment in segments], dtype=np.float64)
    rng = np.random.default_rng(seed)
    torch_device = torch.device(device)

    with _seeded_torch(seed, torch_device):
        vae = HeadVAE(cfg).to(torch_device)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
        writer = _summary_writer(log_dir)
        recent: list[dict[str, float]] = []
        vae.train()
        try:
            bar = tqdm(range(cfg.steps), desc="head VAE", disable=not progress)
            for step in bar:
                pose, mask = _sample_batch(normalized, lengths, cfg, rng)
                total, parts = vae.loss(pose.to(torch_device), mask.to(torch_device))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                values = {name: float(value) for name, value in parts.items()}
                recent = (recent + [values])[-SUMMARY_WINDOW:]
                bar.set_postfix(recon=f"{values['recon']:.4f}", refresh=False)
                if writer is not None:
                    for name, value in values.items():
                        writer.add_scalar(f"head_vae/{name}", value, step)
        finally:
            if writer is not None:
                writer.close()

    save_torch_atomic(
        {
            "model_state_dict": {name: value.detach().cpu() for name, value in vae.state_dict().items()},
            "pose_mean": torch.from_numpy(mean.astype(np.float32)),
            "pose_std": torch.from_numpy(std.astype(np.float32)),
            "config": dataclasses.asdict(cfg),
            **({"identities": names} if len(names) > 1 else {}),
        },
        out_path,
    )
    return {
        "steps": cfg.steps,
        "final_recon_loss": float(np.mean([values["recon"] for values in recent])) if recent else float("nan"),
        "final_kl": float(np.mean([values["kl"] for values in recent])) if recent else float("nan"),
        "frames": int(lengths.sum()),
        "path": str(out_path),
    }


def _check_poses(poses: list[np.ndarray], pose_dim: int) -> list[np.ndarray]:
    if len(poses) == 0:
        raise ValueError("train_head_vae poses: expected at least one (frames, pose_dim) segment, got none")
    checked = []
    for index, pose in enumerate(poses):
        pose = np.asarray(pose, dtype=np.float64)
        if pose.ndim != 2 or pose.shape[1] != pose_dim or pose.shape[0] == 0:
            raise ValueError(f"train_head_vae poses[{index}]: expected shape (frames >= 1, {pose_dim}), "
                             f"got {pose.shape}")
        if not np.isfinite(pose).all():
            raise ValueError(f"train_head_vae poses[{index}]: expected finite values, found NaN or inf")
        checked.append(pose)
    return checked


def _identity_rows(identities: list[str] | None, count: int) -> tuple[list[str], list[int]]:
    """(sorted identity names, each segment's index into them); one unnamed identity when none are given."""
    if identities is None:
        return [""], [0] * count
    if len(identities) != count:
        raise ValueError(f"train_head_vae identities: expected one name per pose segment ({count}), "
                         f"got {len(identities)}")
    names = sorted(set(identities))
    return names, [names.index(name) for name in identities]


def _pose_stats(segments: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    frames = np.concatenate(segments, axis=0)
    return frames.mean(axis=0), np.maximum(frames.std(axis=0), STD_FLOOR)


def _sample_batch(
    segments: list[torch.Tensor], lengths: np.ndarray, cfg: HeadVAEConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops (batch, segment_length, pose_dim) and their real-frame mask."""
    crop = cfg.segment_length
    pose = torch.zeros(cfg.batch_size, crop, cfg.pose_dim)
    mask = torch.zeros(cfg.batch_size, crop, dtype=torch.bool)
    picks = rng.choice(len(segments), size=cfg.batch_size, p=lengths / lengths.sum())
    for row, index in enumerate(picks):
        segment = segments[index]
        start = int(rng.integers(0, len(segment) - crop + 1)) if len(segment) > crop else 0
        piece = segment[start:start + crop]
        pose[row, : len(piece)] = piece
        mask[row, : len(piece)] = True
    return pose, mask


@contextlib.contextmanager
def _seeded_torch(seed: int, device: torch.device) -> Iterator[None]:
    """Seed initialization and latent sampling without disturbing the caller's global RNG state."""
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def _summary_writer(log_dir: str | os.PathLike | None):
    """TensorBoard writer when asked for; imported lazily since most callers do not log."""
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))
