"""Import the released AV-Flow weights (`av_flow_ckpt_50h.pt`, head_vae/, headpose_normstats/).

avflow's network keeps the published module names and tensor layouts (per-head interleaved qkv, adjacent
RoPE pairs, adaLN split as gate/shift/scale, time features sin-then-cos, fusion over concat[audio,
visual]), so importing is a prefix strip plus strict checks. The result is an avflow model file that
every inference path loads, with a config reproducing the published settings.
The released files' keys, shapes and meanings: docs/reference.md, "The AV-Flow checkpoint" and "Head VAE".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avflow.config import Config
from avflow.model.avflow import AVFlowNet
from avflow.model.head_vae import HeadVAE
from avflow.model.io import model_state_tensors, write_model_file
from avflow.model.state import StateCodec
from avflow.utils import load_torch

PUBLISHED_PREFIX = "diffusion_module."
# headpose/headpose_normstats/ of the 50h release: the pose is [quaternion w, x, y, z | translation].
HEADPOSE_STAT_FILES = {"mean": ("head_qvec_mean.npy", "head_translation_mean.npy"),
                       "std": ("head_qvec_std.npy", "head_translation_std.npy")}


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    payload = load_torch(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("model_state_dict"), dict):
        raise ValueError(f"{path}: expected a published checkpoint dict with 'model_state_dict'")
    return payload["model_state_dict"]


def check_keys(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """One error listing every missing, unexpected and mis-shaped key, so a user sees the whole mismatch."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
                       for k in set(found) & set(expected) if found[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        parts = [f"{label}: {', '.join(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise ValueError(f"{path}: does not match the published layout; " + "; ".join(parts))


def published_config(state: dict[str, torch.Tensor], dyadic: bool, pose_dim: int) -> Config:
    """Published defaults; dyadic conditioning width read from the input projection."""
    cfg = Config()
    cfg.model.dyadic = dyadic
    cfg.head_vae.pose_dim = pose_dim
    cfg.data.canonical_quaternion_sign = False  # the published pose pipeline keeps the raw quaternion sign
    if dyadic:
        width = state[PUBLISHED_PREFIX + "input_proj_v.weight"].shape[1]
        cfg.model.participant_feature_dim = width - cfg.model.visual_dim - 2 * cfg.model.token_dim
    return cfg.validate()


def headpose_stats(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    stats = []
    for kind, names in HEADPOSE_STAT_FILES.items():
        arrays = []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing head-pose {kind} (expected {', '.join(names)} in {folder})")
            arrays.append(np.load(path, allow_pickle=False).reshape(-1).astype(np.float32))
        stats.append(torch.from_numpy(np.concatenate(arrays)))
    return stats[0], stats[1]


def import_published(model_path: str | Path, head_vae_path: str | Path, headpose_stats_dir: str | Path,
                     output: str | Path, dyadic: bool = False) -> Path:
    """Write an avflow model file from the released AV-Flow model, head VAE and head-pose statistics."""
    model_path, head_vae_path, stats_dir = Path(model_path), Path(head_vae_path), Path(headpose_stats_dir)
    state = _state_dict(model_path)
    vae_state = _state_dict(head_vae_path)
    if "encoder.0.weight" not in vae_state:
        raise ValueError(f"{head_vae_path}: expected a head VAE with 'encoder.0.weight'")
    pose_dim = vae_state["encoder.0.weight"].shape[1]
    if dyadic and PUBLISHED_PREFIX + "input_proj_v.weight" not in state:
        raise ValueError(f"{model_path}: missing {PUBLISHED_PREFIX}input_proj_v.weight")
    cfg = published_config(state, dyadic, pose_dim)
    net = AVFlowNet(cfg.model)
    expected = {PUBLISHED_PREFIX + k: v for k, v in net.state_dict().items()}
    check_keys(state, expected, model_path)
    vae = HeadVAE(cfg.head_vae)
    check_keys(vae_state, vae.state_dict(), head_vae_path)
    pose_mean, pose_std = headpose_stats(stats_dir)
    if pose_mean.shape[0] != pose_dim:
        raise ValueError(f"{stats_dir}: head-pose statistics have {pose_mean.shape[0]} values; the head VAE "
                         f"expects {pose_dim}")
    # The published model consumes expression codes as they are: an identity normalization.
    codec = StateCodec(torch.zeros(cfg.model.expression_dim), torch.ones(cfg.model.expression_dim),
                       cfg.mel.norm_mean, cfg.mel.norm_std, cfg.model)
    tensors = {"ema": {k[len(PUBLISHED_PREFIX):]: v.float() for k, v in state.items()},
               **model_state_tensors(codec, {k: v.float() for k, v in vae_state.items()}, pose_mean, pose_std)}
    return write_model_file(cfg, tensors, output, str(model_path))
