"""Training checkpoints with torch.distributed.checkpoint (DCP), for every strategy and world size.

A checkpoint is a directory `<run_dir>/checkpoints/step-N/`: DCP's files, holding every training state
(model, EMA, optimizer, scheduler, step, codec, head VAE, and each rank's loader position and RNG state,
which that rank writes itself), and `meta.json` (config, step, world size, strategy). It is written under a
hidden temporary name and renamed by rank 0 only when every rank has finished, so a crash never leaves a
directory that looks complete and never harms an earlier one. `latest_checkpoint` therefore only ever
returns complete checkpoints.

When the directory is complete, the ranks hash the files they wrote and rank 0 records the size and sha256
of every file in `meta.json` before the rename. Resuming verifies the newest step and falls back to the newest
one that verifies (logging what it skipped and why); loading a step directory for inference or consolidation
verifies it too, so a truncated or bit-flipped file is reported by name instead of failing deep inside PyTorch
or loading silently.
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
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
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
    raise_interruption,
    read_meta,
    verify_checkpoint,
    write_model_file,
)
from avflow.utils import atomic_path, disk_error

log = logging.getLogger(__name__)

STATE_LAYOUT = 2  # meta.json "layout": every training state is a DCP entry (older steps have no "layout")
PER_RANK_PREFIXES = ("loader_rank", "rng_rank")  # state keys that each rank writes and reads for itself
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_RUNTIME_MODEL_KEYS = {"attention", "dropout"}  # do not change the weights' shapes or meaning
# text2tokens keys that only steer training or inference; the rest fix the network and its input symbols
_RUNTIME_TEXT2TOKENS_KEYS = {"dropout", "nfe", "temperature", "duration_weight", "max_symbols", "max_train_frames",
                             "short_pause_s", "long_pause_s", "duration_rounding"}


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [path for path in _step_directories(run_dir) if (path / META).is_file()]


def _step_directories(run_dir: str | Path) -> list[Path]:
    """Every step-N entry of a run, complete or not, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if _STEP_DIR.match(path.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def newest_verified_checkpoint(run_dir: str | Path) -> Path:
    """The newest step directory of a run that verifies; the newer ones that do not are logged with the reason.
    Collective under a process group: rank 0 verifies, every rank gets its answer (or the same error)."""
    if _world_size() > 1:
        answer = [_newest_verified(run_dir) if _rank() == 0 else None]
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
    for path in reversed(_step_directories(run_dir)):
        try:
            verify_checkpoint(path)  # a step without meta.json (copied in part, or not by avflow) fails here
        except (ValueError, OSError) as error:
            log.warning("skipping checkpoint %s: %s", path.name, error)
            problems.append(f"{path.name}: {error}")
            continue
        if problems:
            log.warning("resuming from %s, the newest checkpoint that verifies", path.name)
        return path
    return (f"{checkpoint_dir(run_dir)}: no checkpoint verifies ({'; '.join(problems) or 'none complete'}); "
            f"start a new trainer.run_dir or restore a checkpoint")


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _in_group() else 0


def _world_size() -> int:
    return dist.get_world_size() if _in_group() else 1


def _barrier() -> None:
    if _in_group():
        dist.barrier()


class RNGState:
    """This rank's torch random state (CPU, and the CUDA device's when training on one): the flow-matching noise
    and dropout continue exactly where they were.

    The CUDA state is stored as bytes, empty when written on CPU: DCP checks a tensor's shape against the
    checkpoint but loads bytes as they are, so a run written on CPU resumes on CUDA and the other way round.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor | bytes]:
        cuda = torch.cuda.get_rng_state(self.device).numpy().tobytes() if self.device.type == "cuda" else b""
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict[str, torch.Tensor | bytes]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type != "cuda":
            return
        if state["cuda"]:
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(state["cuda"]), dtype=torch.uint8), self.device)
        else:
            log.warning("the checkpoint holds no CUDA random state (written on CPU); CUDA noise continues from "
                        "this run's seed, not from the saved run's")


class CheckpointManager:
    """Owns a run's checkpoints: when to save, how many to keep, background writes, and every piece of saved
    state. `states` maps each top-level key to a DCP Stateful (or a state dict filled in place): DCP calls
    their `state_dict()` when saving and `load_state_dict()` when restoring, so each entry restores itself
    and nothing is gathered across ranks by hand. Per-rank state (loader position, RNG) goes under per-rank
    keys, which DCP writes from that rank only. (DCP asks for the same keys on every rank, so that collective
    entries run in the same order; per-rank entries make no collective calls, and the collective ones keep
    one sorted order on every rank, as torchtitan's per-rank loader entries do.) `describe` gives what meta.json
    records beside the step (config, world size, strategy): what inference and tools read without loading DCP.

    save and resume are collective: every rank calls them.
    """

    def __init__(self, run_dir: str | Path, states: dict[str, Any], keep: int, every: int = 0, last_step: int = 0,
                 async_save: bool = False, describe: Callable[[], dict[str, Any]] = dict):
        self.run_dir = Path(run_dir)
        self.folder = checkpoint_dir(run_dir)
        self.states = states
        self.keep, self.every, self.last_step = keep, every, last_step
        self.describe = describe
        self.async_save = async_save and _in_group()
        # Background writes run collectives while training runs its own; on one group their order would
        # interleave differently per rank and deadlock, so async saves get a group of their own.
        self._async_group = dist.new_group(backend="gloo") if self.async_save else None
        self._pending: tuple[Future, Path, Path, dict] | None = None

    def due(self, step: int) -> bool:
        """Whether `step` is a checkpoint step: every `every` steps, and the last step."""
        return (self.every > 0 and step % self.every == 0) or step == self.last_step

    def save(self, step: int) -> Path:
        """Write step-N (collective). With async_save the tensors are written in the background and the
        directory is finalized at the next save, `wait()` or exit."""
        self.wait()
        final = self.folder / f"step-{step:08d}"
        staging = self.folder / f".step-{step:08d}.tmp"
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        meta = {"format": FORMAT, "layout": STATE_LAYOUT, "step": step, **self.describe()}
        if self.async_save:
            future = dcp.async_save(self.states, checkpoint_id=staging, process_group=self._async_group)
            self._pending = (future, staging, final, meta)
            return final
        try:
            with quiet_single_process():
                dcp.save(self.states, checkpoint_id=staging)
        except CheckpointException as error:  # a BaseException: reported as a CheckpointError naming the folder
            raise_interruption(error)
            raise (disk_error(staging, error)
                   or CheckpointError(f"{staging}: writing the checkpoint failed ({error_summary(error)})")) from error
        self._finalize(staging, final, meta)
        return final

    def wait(self) -> None:
        """Finish a background save, if one is running."""
        if self._pending is not None:
            future, staging, final, meta = self._pending
            self._pending = None
            future.result()
            self._finalize(staging, final, meta)

    def _finalize(self, staging: Path, final: Path, meta: dict) -> None:
        _barrier()  # every rank's shards are on disk
        checksums = self._checksums(staging)
        if _rank() == 0:
            meta = {**meta, FILES_KEY: checksums}
            with atomic_path(staging / META) as tmp:
                tmp.write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            for old in list_checkpoints(self.run_dir)[:-self.keep]:
                shutil.rmtree(old)
        _barrier()

    @staticmethod
    def _checksums(staging: Path) -> dict[str, dict[str, Any]]:
        """Every file's size and sha256, for meta.json (collective): each rank hashes the files DCP wrote for it
        (`__<rank>_*.distcp`), in parallel, and rank 0 the rest (.metadata); the result is complete on rank 0."""
        if _world_size() == 1:
            return file_checksums(staging)
        rank = _rank()
        own = sorted(path.name for path in staging.glob(f"__{rank}_*.distcp"))
        gathered: list[dict | None] = [None] * _world_size()
        dist.all_gather_object(gathered, file_checksums(staging, own))
        if rank != 0:
            return {}
        checksums = {name: digest for part in gathered for name, digest in part.items()}
        rest = sorted(path.name for path in staging.iterdir()
                      if path.is_file() and path.name != META and path.name not in checksums)
        return dict(sorted({**checksums, **file_checksums(staging, rest)}.items()))

    def resume(self, world_size: int, check: Callable[[Path, dict[str, Any]], None]) -> Path:
        """Restore every state from the newest checkpoint that verifies (collective) and return its path;
        `check(path, meta)` refuses a checkpoint before anything is loaded (e.g. one of another model)."""
        path = newest_verified_checkpoint(self.run_dir)
        meta = read_meta(path)
        check(path, meta)
        saved_world = meta.get("world_size", len(meta.get("loader", ())))
        if saved_world != world_size:
            raise ValueError(f"{path}: saved by {saved_world} ranks; resume with the same world size "
                             f"(this run has {world_size})")
        layout = meta.get("layout")
        if layout is None:
            self._restore_first_layout(path, meta)
        elif layout == STATE_LAYOUT:
            dcp_load(self.states, path)
        else:
            raise CheckpointError(f"{path}: state layout {layout!r}; this avflow reads layout {STATE_LAYOUT} and the "
                                  f"first one (written by another avflow version?)")
        return path

    def _restore_first_layout(self, path: Path, meta: dict[str, Any]) -> None:
        """Checkpoints written before every state went through DCP kept the scheduler and each rank's loader
        position in meta.json, the step there too, and the CPU RNG state as the tensor `rng_rank<R>`."""
        rank = _rank()
        try:
            scheduler, loader, step = meta["scheduler"], meta["loader"][rank], int(meta["step"])
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: neither a current checkpoint nor a complete earlier one (its "
                                  f"meta.json lacks {error}); start a new trainer.run_dir") from error
        in_meta = {"scheduler", "train_state"} | {key for key in self.states if key.startswith(PER_RANK_PREFIXES)}
        tensors = {key: value for key, value in self.states.items() if key not in in_meta}
        rng_key = f"rng_rank{rank}"
        tensors[rng_key] = torch.get_rng_state()
        dcp_load(tensors, path)
        self.states["scheduler"].load_state_dict(scheduler)
        self.states[f"loader_rank{rank}"].load_state_dict(loader)
        self.states["train_state"].load_state_dict({"step": step})
        torch.set_rng_state(tensors[rng_key])
        log.warning("%s: written before training state moved into DCP; restored from its meta.json (it holds no "
                    "CUDA random state: on CUDA the noise continues from this run's seed)", path)


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
