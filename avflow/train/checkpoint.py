"""Single-file training checkpoints: atomic save, keep-last-K, newest-complete lookup, safe load.

A checkpoint is written under a hidden temporary name and renamed when complete, so a crash never
leaves a partial `step-*.pt` and never harms an earlier one. Files hold only tensors and plain
containers and are read with weights_only=True.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from avflow.config import Config, config_from_dict
from avflow.utils import load_torch, save_torch_atomic

FORMAT = "avflow-checkpoint-v1"
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
_RUNTIME_MODEL_KEYS = {"attention", "dropout"}  # do not change the weights' shapes or meaning


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_FILE.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    path = checkpoint_dir(run_dir) / f"step-{step:08d}.pt"
    save_torch_atomic({"format": FORMAT, "step": step, **payload}, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    payload = load_torch(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an avflow checkpoint (expected a '{FORMAT}' file; "
                         "published AV-Flow weights must be imported first)")
    return payload


def checkpoint_config(payload: dict[str, Any], path: str | Path) -> Config:
    try:
        return config_from_dict(payload["config"])
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: its stored config is unusable ({error})") from error


def require_same_model(saved: Config, current: Config, path: str | Path) -> None:
    """Refuse to resume a run whose network differs from the checkpoint's (weights would not fit)."""
    saved_model, current_model = saved.to_dict()["model"], current.to_dict()["model"]
    differing = [k for k in saved_model if k not in _RUNTIME_MODEL_KEYS and saved_model[k] != current_model.get(k)]
    if differing:
        details = ", ".join(f"model.{k}: checkpoint {saved_model[k]!r} vs config {current_model.get(k)!r}" for k in differing)
        raise ValueError(f"{path}: checkpoint of another model config ({details})")
