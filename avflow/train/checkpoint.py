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

import json
import logging
import re
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from avflow.config import Config
from avflow.model.io import (
    FILES_KEY,
    FORMAT,
    META,
    CheckpointError,
    dcp_load,
    error_summary,
    file_checksums,
    load_inference_tensors,
    quiet_single_process,
    read_meta,
    verify_checkpoint,
    write_model_file,
)
from avflow.utils import atomic_path

log = logging.getLogger(__name__)

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
            with quiet_single_process():
                dcp.save(tensors, checkpoint_id=staging)
        except CheckpointException as error:  # a BaseException: reported as a CheckpointError naming the folder
            raise CheckpointError(f"{staging}: writing the checkpoint failed ({error_summary(error)})") from error
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
        dcp_load(tensors, Path(path))
        return meta


def require_same_model(saved: Config, current: Config, path: str | Path) -> None:
    """Refuse to resume a run whose network differs from the checkpoint's (weights would not fit)."""
    if saved.task != current.task:
        raise ValueError(f"{path}: checkpoint of task {saved.task!r}, but the config trains task {current.task!r}")
    section, runtime = (("text2tokens", _RUNTIME_TEXT2TOKENS_KEYS) if current.task == "text2tokens"
                        else ("model", _RUNTIME_MODEL_KEYS))
    saved_model, current_model = saved.to_dict()[section], current.to_dict()[section]
    differing = [k for k in saved_model if k not in runtime and saved_model[k] != current_model.get(k)]
    if differing:
        details = ", ".join(f"{section}.{k}: checkpoint {saved_model[k]!r} vs config {current_model.get(k)!r}"
                            for k in differing)
        raise ValueError(f"{path}: checkpoint of another model config ({details})")


def consolidate(path: str | Path, output: str | Path) -> Path:
    """One safetensors file with the EMA weights, normalization (and head VAE) and config, from any strategy."""
    cfg, tensors = load_inference_tensors(path)
    return write_model_file(cfg, tensors, output, str(path))
