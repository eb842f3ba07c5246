"""Model files and checkpoint payloads on disk, read and written by training, inference and export alike.

- Training step directories (`<run_dir>/checkpoints/step-N/`, written by avflow.train.checkpoint): their
  `meta.json` (format, config, step, and the size and sha256 of every other file) and their tensors, read with
  torch.distributed.checkpoint after every file is verified. A step's DCP metadata file is a pickle that
  PyTorch unpickles: load step directories only from trusted sources.
- Model files (`.safetensors`): the EMA weights, the codec's statistics and the head VAE with its pose
  statistics, plus the config as metadata; they hold tensors only and execute nothing when loaded. The
  metadata also holds a sha256 of every tensor (name, dtype, shape, bytes) and of the rest of the metadata,
  checked on load, so a damaged copy is refused by name instead of generating with changed weights. Files
  written before the digest load unchecked, with a warning.
- Head-VAE checkpoints (avflow's and the published `head_vae/iter-*.pt`), loaded with weights_only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from avflow.config import Config, HeadVAEConfig, config_from_dict
from avflow.model.avflow import AVFlowNet
from avflow.model.head_vae import HeadVAE
from avflow.model.state import StateCodec
from avflow.model.text2tokens import TextToTokensNet
from avflow.text.phonemes import front_end_symbols
from avflow.utils import atomic_path, file_sha256, load_torch

log = logging.getLogger(__name__)

FORMAT = "avflow-checkpoint-v2"
META = "meta.json"
FILES_KEY = "files"  # meta.json: {file name: {"bytes": size, "sha256": hex digest}} of every other file
MODEL_FILE_FORMAT = "avflow-model-v1"
MODEL_DIGEST_KEY = "sha256"  # model file metadata: tensors_digest of its tensors and other metadata


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used: incomplete, corrupted or unreadable."""


def file_checksums(folder: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the named files of a step directory, by default every file except meta.json, which
    records them."""
    if names is None:
        names = sorted(path.name for path in folder.iterdir() if path.is_file() and path.name != META)
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names}


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The meta of a complete step directory whose files all match the checksums recorded when it was written;
    CheckpointError naming the first file that is missing, of another size or of another sha256."""
    path = Path(path)
    meta = read_meta(path)
    recorded = meta.get(FILES_KEY)
    if recorded is None:
        log.warning("%s: written before checkpoints recorded checksums; loading it unverified", path)
        return meta
    for name, expected in sorted(recorded.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the checkpoint lists it)")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, {expected['bytes']} when written (truncated or replaced)")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the one recorded when it was written (corrupted)")
    return meta


def dcp_load(tensors: dict[str, Any], path: Path) -> None:
    """dcp.load, with its failures (a BaseException among them) reported as one CheckpointError naming the path."""
    try:
        with quiet_single_process():
            dcp.load(tensors, checkpoint_id=path)
    except (Exception, CheckpointException) as error:
        raise_interruption(error)
        raise CheckpointError(f"{path}: cannot load the checkpoint's tensors ({error_summary(error)})") from error


def raise_interruption(error: BaseException) -> None:
    """Raise again a SystemExit or KeyboardInterrupt that DCP caught on some rank and wrapped in its
    CheckpointException: a preemption (submitit exits for its requeue) or Ctrl-C during a save or load must stop
    the process as such, not turn into a checkpoint error that marks the job failed."""
    for exception, _ in getattr(error, "failures", {}).values():
        if isinstance(exception, (SystemExit, KeyboardInterrupt)):
            raise exception from None


def error_summary(error: BaseException) -> str:
    """The last line of an error's message: where DCP's per-rank reports name the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns that it saves/loads in a single process; that is intended when there is no group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not meta_file.is_file():
        raise ValueError(f"{path}: not a complete avflow checkpoint (no {META}; an interrupted save?)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_file}: not valid JSON ({error})") from error
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an avflow checkpoint (expected format '{FORMAT}', got {meta.get('format')!r})")
    return meta


def checkpoint_config(meta: dict[str, Any], path: str | Path) -> Config:
    try:
        return config_from_dict(meta["config"], str(path))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: its stored config is unusable ({error})") from error


def model_state_tensors(codec: StateCodec, head_vae_state: dict[str, torch.Tensor], pose_mean: torch.Tensor,
                        pose_std: torch.Tensor) -> dict[str, Any]:
    """What an AV-Flow model needs besides its network weights ("ema"), in the layout checkpoints and model
    files share: the expression/mel normalization and the head VAE with its pose statistics."""
    return {"codec": codec.state_dict(),
            "head_vae": {"model_state_dict": head_vae_state, "pose_mean": pose_mean, "pose_std": pose_std}}


def inference_template(cfg: Config) -> dict[str, Any]:
    """Empty tensors of the right shapes for the inference groups of cfg.task, for DCP to fill."""
    if cfg.task == "text2tokens":
        symbols = front_end_symbols(cfg.text2tokens.front_end)
        token_dim = cfg.model.token_dim
        return {"ema": TextToTokensNet(cfg.text2tokens, len(symbols), token_dim).state_dict(),
                "token_stats": {"mean": torch.zeros(token_dim), "std": torch.zeros(token_dim)}}
    count, pose_shape = identity_count(cfg), pose_stats_shape(cfg)
    codec = StateCodec(torch.zeros(count, cfg.model.expression_dim), torch.zeros(count, cfg.model.expression_dim),
                       torch.zeros(count), torch.zeros(count), cfg.model)
    return {"ema": AVFlowNet(cfg.model).state_dict(),
            **model_state_tensors(codec, HeadVAE(cfg.head_vae).state_dict(), torch.zeros(pose_shape),
                                  torch.zeros(pose_shape))}


def identity_count(cfg: Config) -> int:
    """Identities a model's statistics describe: its table's, or the one of a model without a table."""
    return max(len(cfg.model.identities), 1)


def pose_stats_shape(cfg: Config) -> tuple[int, ...]:
    """The head-pose statistics' shape: (pose_dim,) as published for one identity, else (identities, pose_dim)."""
    pose_dim = cfg.head_vae.pose_dim
    return (pose_dim,) if identity_count(cfg) == 1 else (identity_count(cfg), pose_dim)


def model_weights(path: str | Path) -> Path:
    """The file or step directory that holds a model's weights: an export directory's model file, else `path`."""
    path = Path(path)
    exported = path / "model.safetensors"
    return exported if path.is_dir() and not (path / META).is_file() and exported.is_file() else path


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value.contiguous()
    return flat


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *groups, key = name.split("/")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[key] = value
    return tree


def load_inference_tensors(path: str | Path, task: str | None = None) -> tuple[Config, dict[str, Any]]:
    """(config, tensors) from a training checkpoint directory or a consolidated file: {ema, codec, head_vae}
    for task avflow, {ema, token_stats} for task text2tokens. With `task`, a checkpoint of another task is
    refused."""
    path = Path(path)
    if path.is_dir():
        meta = verify_checkpoint(path)
        cfg = _require_task(checkpoint_config(meta, path), task, path)
        tensors = inference_template(cfg)
        dcp_load(tensors, path)
        return cfg, tensors
    metadata, flat = _read_model_file(path, with_tensors=True)
    recorded = metadata.get(MODEL_DIGEST_KEY)
    if recorded is None:
        log.warning("%s: written before model files recorded a digest; loading it unverified", path)
    elif tensors_digest(flat, metadata) != recorded:
        raise CheckpointError(f"{path}: tensors differ from the sha256 recorded when the file was written (damaged "
                              "or altered); restore the file or write it again")
    return _require_task(_model_file_config(metadata, path), task, path), _unflatten(flat)


def stored_config(path: str | Path) -> Config:
    """The config a training checkpoint directory or model file was written with, read without its weights."""
    path = Path(path)
    if path.is_dir():
        return checkpoint_config(read_meta(path), path)
    metadata, _ = _read_model_file(path, with_tensors=False)
    return _model_file_config(metadata, path)


def _read_model_file(path: Path, with_tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A file's safetensors metadata, checked to be an avflow model file's, and with_tensors its tensors."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (expected a step directory or a .safetensors model)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            flat = {name: handle.get_tensor(name) for name in handle.keys()} if with_tensors else {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not an avflow checkpoint (neither a step directory nor a readable safetensors "
                         f"model: {error})") from error
    if metadata.get("format") != MODEL_FILE_FORMAT:
        raise ValueError(f"{path}: not an avflow model file (expected format '{MODEL_FILE_FORMAT}')")
    return metadata, flat


def _model_file_config(metadata: dict[str, str], path: Path) -> Config:
    return checkpoint_config({"config": json.loads(metadata["config"])}, path)


def _require_task(cfg: Config, task: str | None, path: Path) -> Config:
    if task is not None and cfg.task != task:
        raise ValueError(f"{path}: a model of task {cfg.task!r}; expected a {task!r} model")
    return cfg


def write_model_file(cfg: Config, tensors: dict[str, Any], output: str | Path, source: str) -> Path:
    """The single-file inference format: safetensors of the inference groups with the config as metadata."""
    from safetensors.torch import save_file

    metadata = {"format": MODEL_FILE_FORMAT, "config": json.dumps(cfg.checkpoint_dict()), "source": source}
    flat = _flatten(tensors)
    metadata[MODEL_DIGEST_KEY] = tensors_digest(flat, metadata)
    with atomic_path(output) as tmp:
        save_file(flat, str(tmp), metadata=metadata)
    return Path(output)


def tensors_digest(flat: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of a model file's content as loaded: each tensor's name, dtype, shape and bytes in name order, then
    the metadata other than the digest itself. Independent of the order safetensors lays them out in."""
    digest = hashlib.sha256()
    for name in sorted(flat):
        tensor = flat[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    digest.update(json.dumps({key: value for key, value in sorted(metadata.items()) if key != MODEL_DIGEST_KEY},
                             sort_keys=True).encode())
    return digest.hexdigest()


def load_head_vae(
    path: str | os.PathLike, cfg: HeadVAEConfig | None = None
) -> tuple[HeadVAE, torch.Tensor, torch.Tensor]:
    """Load (vae in eval mode, pose_mean, pose_std) from an avflow head-VAE checkpoint.

    The architecture comes from the file's 'config' when present, else from `cfg` (default
    HeadVAEConfig). Raises ValueError naming every missing, unexpected or mis-shaped weight, and when
    the file has no pose statistics (as published files do not). A VAE trained on several identities (its
    'identities' names) returns their statistics a row each, (identities, pose_dim).
    """
    checkpoint = load_torch(path)
    names = checkpoint.get("identities") if isinstance(checkpoint, dict) else None
    return head_vae_from_payload(checkpoint, cfg, path, len(names) if names else 1)


def head_vae_from_payload(
    checkpoint: dict, cfg: HeadVAEConfig | None, path: str | os.PathLike, identities: int = 1
) -> tuple[HeadVAE, torch.Tensor, torch.Tensor]:
    """`load_head_vae` for a checkpoint dict already in memory (e.g. embedded in a model checkpoint); a model of
    several `identities` holds pose statistics (identities, pose_dim), one row each."""
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise ValueError(f"{path}: expected a head-VAE checkpoint dict with 'model_state_dict'")
    cfg = _config_from_checkpoint(checkpoint, cfg, path)
    vae = HeadVAE(cfg)
    state = checkpoint["model_state_dict"]
    _check_state_dict(state, vae.state_dict(), cfg, path)
    if "pose_mean" not in checkpoint or "pose_std" not in checkpoint:
        raise ValueError(
            f"{path}: no pose_mean/pose_std in this head-VAE checkpoint; a published head-VAE file carries "
            "only model_state_dict, so its head-pose normalization statistics must be given with --headpose-stats"
        )
    mean, std = checkpoint["pose_mean"], checkpoint["pose_std"]
    shape = (cfg.pose_dim,) if identities == 1 else (identities, cfg.pose_dim)
    for name, stat in (("pose_mean", mean), ("pose_std", std)):
        if not isinstance(stat, torch.Tensor) or tuple(stat.shape) != shape:
            got = tuple(stat.shape) if isinstance(stat, torch.Tensor) else type(stat).__name__
            raise ValueError(f"{path}: {name} expected a tensor of shape {shape}, got {got}")
    vae.load_state_dict(state, strict=True)
    vae.eval()
    return vae, mean.float(), std.float()


def _config_from_checkpoint(checkpoint: dict, cfg: HeadVAEConfig | None, path: str | os.PathLike) -> HeadVAEConfig:
    stored = checkpoint.get("config")
    if stored is None:
        return cfg if cfg is not None else HeadVAEConfig()
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: 'config' expected a dict of HeadVAEConfig fields, got {type(stored).__name__}")
    unknown = sorted(set(stored) - {field.name for field in dataclasses.fields(HeadVAEConfig)})
    if unknown:
        raise ValueError(f"{path}: 'config' expected HeadVAEConfig fields only, got unknown keys {unknown}")
    return HeadVAEConfig(**stored)


def _check_state_dict(
    state: dict, expected: dict[str, torch.Tensor], cfg: HeadVAEConfig, path: str | os.PathLike
) -> None:
    """Raise one ValueError listing every difference, so a wrong file or config is diagnosed at once."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: model_state_dict expected a dict of tensors, got {type(state).__name__}")
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    misshaped = [
        f"{name} {tuple(state[name].shape) if isinstance(state[name], torch.Tensor) else type(state[name]).__name__}"
        f" (expected {tuple(tensor.shape)})"
        for name, tensor in expected.items()
        if name in state and not (isinstance(state[name], torch.Tensor) and state[name].shape == tensor.shape)
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{label}: {', '.join(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if names
        ]
        raise ValueError(f"{path}: head-VAE weights do not match {cfg}; " + "; ".join(problems))
