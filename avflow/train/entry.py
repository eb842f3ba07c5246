"""The training entry point shared by `avflow train`, `python -m avflow.train`, torchrun and submitit.

It joins the process group (torchrun or SLURM variables, or none), holds the run directory's lock (one
training job per trainer.run_dir), trains, and always leaves the group cleanly so no rank aborts at exit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from avflow.config import load_config
from avflow.train.distributed import DistInfo, init_distributed, shutdown
from avflow.train.loop import Trainer
from avflow.utils import hold_folder, reporting_disk_errors


def run_training(config_path: str | Path | None, overrides: list[str], resume: bool = False,
                 progress: bool = True) -> Path:
    """Train to completion; returns the newest complete checkpoint directory."""
    cfg = load_config(config_path, overrides)
    info = init_distributed(cfg)
    try:
        run_dir = Path(cfg.trainer.run_dir)
        with holding_run_dir(run_dir, info), reporting_disk_errors(run_dir):  # TensorBoard's writes name no file
            final = Trainer(cfg, resume=resume, progress=progress, info=info).fit()
    except BaseException:
        shutdown(info, synchronize=False)
        raise
    shutdown(info)
    return final


@contextlib.contextmanager
def holding_run_dir(run_dir: Path, info: DistInfo) -> Iterator[None]:
    """The run directory's lock, held by rank 0 for the whole job (the other ranks of the job write there too,
    under it). Rank 0's answer goes to every rank, so when another job holds the folder all ranks stop with the
    same error (another job's lock, a read-only disk) instead of waiting for rank 0 in a collective."""
    with contextlib.ExitStack() as stack:
        refusal: OSError | None = None
        if info.is_main:
            try:
                stack.enter_context(hold_folder(run_dir))
            except OSError as error:
                refusal = error
        if info.is_distributed:
            answer = [refusal]
            dist.broadcast_object_list(answer, src=0)
            refusal = answer[0]
        if refusal is not None:
            raise refusal
        yield
