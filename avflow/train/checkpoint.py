"""Training checkpoints with torch.distributed.checkpoint (DCP), for every strategy and world size.

A checkpoint is a directory `<run_dir>/checkpoints/step-N/`: DCP's sharded tensor files (each rank writes
its own shards: model, EMA, optimizer, its RNG state, codec, head VAE) and `meta.json` (config, step,
scheduler and loader positions). It is written under a hidden temporary name and renamed by rank 0 only
when every rank has finished, so a crash never leaves a directory that looks complete and never harms
an earlier one. `latest_checkpoint` therefore only ever returns complete checkpoints.

When the directory is complete, rank 0 records the size and sha256 of every file in `meta.json` before the
rename. Resuming verifies the newest step and falls back to the newest one that verifies (logging what it
skipped and why); loading a step directory for inference or consolidation verifies it too, so a truncated
or bit-flipped file is reported by name instead of failing deep inside PyTorch or loading silently.
Steps written before checksums were recorded load with a warning.

The DCP metadata file is a pickle written by PyTorch, unpickled when the directory is loaded: load step
directories only from trusted sources, and share models as consolidated single files (`avflow checkpoint
consolidate`), which are safetensors and load without unpickling anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from avflow.config import Config, config_from_dict
from avflow.data.phonemes import front_end_symbols
from avflow.model.avflow import AVFlowNet
from avflow.model.head_vae import HeadVAE
from avflow.model.state import StateCodec
from avflow.model.text2tokens import TextToTokensNet
from avflow.utils import atomic_path

log = logging.getLogger(__name__)

FORMAT = "avflow-checkpoint-v2"
META = "meta.json"
FILES_KEY = "files"  # meta.json: {file name: {"bytes": size, "sha256": hex digest}} of every other file
HASH_BLOCK_BYTES = 1 << 20
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_RUNTIME_MODEL_KEYS = {"attention", "dropout"}  # do not change the weights' shapes or meaning
# text2tokens keys that only steer training or inference; the rest fix the network and its input symbols
_RUNTIME_TEXT2TOKENS_KEYS = {"dropout", "nfe", "temperature", "duration_weight", "max_symbols", "max_train_frames",
                             "short_pause_s", "long_pause_s", "duration_rounding"}


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / META).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used: incomplete, corrupted or unreadable."""


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in a step directory except meta.json, which records them."""
    return {path.name: {"bytes": path.stat().st_size, "sha256": _file_digest(path)}
            for path in sorted(folder.iterdir()) if path.is_file() and path.name != META}


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
        if _file_digest(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the one recorded when it was written (corrupted)")
    return meta


def newest_verified_checkpoint(run_dir: str | Path) -> Path:
    """The newest step directory of a run that verifies; the newer ones that do not are logged with the reason.
    Collective under a process group: rank 0 verifies, every rank gets its answer (or the same error)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        answer = [_newest_verified(run_dir) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(answer, src=0)
        found = answer[0]
    else:
        found = _newest_verified(run_dir)
    if isinstance(found, str):
        raise CheckpointError(found)
    return found


def _newest_verified(run_dir: str | Path) -> Path | str:
    """The path, or the error message when no checkpoint verifies."""
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except (ValueError, OSError) as error:
            log.warning("skipping checkpoint %s: %s", path.name, error)
            problems.append(f"{path.name}: {error}")
            continue
        if problems:
            log.warning("resuming from %s, the newest checkpoint that verifies", path.name)
        return path
    return (f"{checkpoint_dir(run_dir)}: no checkpoint verifies ({'; '.join(problems) or 'none complete'}); "
            f"start a new trainer.run_dir or restore a checkpoint")


def _dcp_load(tensors: dict[str, Any], path: Path) -> None:
    """dcp.load, with its failures (a BaseException among them) reported as one CheckpointError naming the path."""
    try:
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=path)
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"{path}: cannot load the checkpoint's tensors ({_last_line(error)})") from error


def _last_line(error: BaseException) -> str:
    """The last line of an error's message: where DCP's per-rank reports name the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it saves/loads in a single process; that is intended when there is no group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Checkpointer:
    """Saves and restores step directories; every rank calls save/load (they are collective)."""

    def __init__(self, run_dir: str | Path, keep: int, async_save: bool = False):
        self.folder = checkpoint_dir(run_dir)
        self.keep = keep
        self.async_save = async_save and dist.is_available() and dist.is_initialized()
        # Background writes run collectives while training runs its own; on one group their order would
        # interleave differently per rank and deadlock, so async saves get a group of their own.
        self._async_group = dist.new_group(backend="gloo") if self.async_save else None
        self._pending: tuple[Future, Path, Path, dict] | None = None

    def save(self, step: int, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write step-N (collective). With async_save the tensors are written in the background and the
        directory is finalized at the next save, `wait()` or exit."""
        self.wait()
        final = self.folder / f"step-{step:08d}"
        staging = self.folder / f".step-{step:08d}.tmp"
        if _is_main():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        meta = {"format": FORMAT, "step": step, **meta}
        if self.async_save:
            future = dcp.async_save(tensors, checkpoint_id=staging, process_group=self._async_group)
            self._pending = (future, staging, final, meta)
            return final
        try:
            with _quiet_single_process():
                dcp.save(tensors, checkpoint_id=staging)
        except CheckpointException as error:  # a BaseException: reported as a CheckpointError naming the folder
            raise CheckpointError(f"{staging}: writing the checkpoint failed ({_last_line(error)})") from error
        self._finalize(staging, final, meta)
        return final

    def wait(self) -> None:
        if self._pending is not None:
            future, staging, final, meta = self._pending
            self._pending = None
            future.result()
            self._finalize(staging, final, meta)

    def _finalize(self, staging: Path, final: Path, meta: dict) -> None:
        _barrier()  # every rank's shards are on disk
        if _is_main():
            meta = {**meta, FILES_KEY: file_checksums(staging)}
            with atomic_path(staging / META) as tmp:
                tmp.write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            for old in list_checkpoints(self.folder.parent)[:-self.keep]:
                shutil.rmtree(old)
        _barrier()

    @staticmethod
    def load(path: str | Path, tensors: dict[str, Any]) -> dict[str, Any]:
        """Fill `tensors` (a state-dict template, possibly sharded) in place; return the meta."""
        meta = read_meta(path)
        _dcp_load(tensors, Path(path))
        return meta


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
        return config_from_dict(meta["config"])
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: its stored config is unusable ({error})") from error


def require_same_model(saved: Config, current: Config, path: str | Path) -> None:
    """Refuse to resume a run whose network differs from the checkpoint's (weights would not fit)."""
    if saved.task != current.task:
        raise ValueError(f"{path}: checkpoint of task {saved.task!r}, but the config trains task {current.task!r}")
    section, runtime = ("text2tokens", _RUNTIME_TEXT2TOKENS_KEYS) if current.task == "text2tokens" else ("model", _RUNTIME_MODEL_KEYS)
    saved_model, current_model = saved.to_dict()[section], current.to_dict()[section]
    differing = [k for k in saved_model if k not in runtime and saved_model[k] != current_model.get(k)]
    if differing:
        details = ", ".join(f"{section}.{k}: checkpoint {saved_model[k]!r} vs config {current_model.get(k)!r}"
                            for k in differing)
        raise ValueError(f"{path}: checkpoint of another model config ({details})")


INFERENCE_GROUPS = ("ema", "codec", "head_vae")  # what generation needs from a training checkpoint
MODEL_FILE_FORMAT = "avflow-model-v1"


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
    pose_dim = cfg.head_vae.pose_dim
    codec = StateCodec(torch.zeros(cfg.model.expression_dim), torch.zeros(cfg.model.expression_dim), 0.0, 0.0, cfg.model)
    return {"ema": AVFlowNet(cfg.model).state_dict(),
            **model_state_tensors(codec, HeadVAE(cfg.head_vae).state_dict(), torch.zeros(pose_dim), torch.zeros(pose_dim))}


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
        _dcp_load(tensors, path)
        return cfg, tensors
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (expected a step directory or a .safetensors model)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            flat = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not an avflow checkpoint (neither a step directory nor a readable safetensors "
                         f"model: {error})") from error
    if metadata.get("format") != MODEL_FILE_FORMAT:
        raise ValueError(f"{path}: not an avflow model file (expected format '{MODEL_FILE_FORMAT}')")
    cfg = _require_task(checkpoint_config({"config": json.loads(metadata["config"])}, path), task, path)
    return cfg, _unflatten(flat)


def _require_task(cfg: Config, task: str | None, path: Path) -> Config:
    if task is not None and cfg.task != task:
        raise ValueError(f"{path}: a model of task {cfg.task!r}; expected a {task!r} model")
    return cfg


def write_model_file(cfg: Config, tensors: dict[str, Any], output: str | Path, source: str) -> Path:
    """The single-file inference format: safetensors of the inference groups with the config as metadata."""
    from safetensors.torch import save_file

    metadata = {"format": MODEL_FILE_FORMAT, "config": json.dumps(cfg.to_dict()), "source": source}
    with atomic_path(output) as tmp:
        save_file(_flatten(tensors), str(tmp), metadata=metadata)
    return Path(output)


def consolidate(path: str | Path, output: str | Path) -> Path:
    """One safetensors file with the EMA weights, normalization (and head VAE) and config, from any strategy."""
    cfg, tensors = load_inference_tensors(path)
    return write_model_file(cfg, tensors, output, str(path))
