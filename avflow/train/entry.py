"""The training entry point shared by `avflow train`, `python -m avflow.train`, torchrun and submitit.

It joins the process group (torchrun or SLURM variables, or none), trains, and always leaves the group
cleanly so no rank aborts at exit.
"""

from __future__ import annotations

from pathlib import Path

from avflow.config import load_config
from avflow.train.distributed import init_distributed, shutdown
from avflow.train.loop import Trainer


def run_training(config_path: str | Path | None, overrides: list[str], resume: bool = False,
                 progress: bool = True) -> Path:
    """Train to completion; returns the newest complete checkpoint directory."""
    cfg = load_config(config_path, overrides)
    info = init_distributed(cfg)
    try:
        final = Trainer(cfg, resume=resume, progress=progress, info=info).fit()
    except BaseException:
        shutdown(info, synchronize=False)
        raise
    shutdown(info)
    return final
