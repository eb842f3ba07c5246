"""Submit avflow training to SLURM with submitit: one task per GPU, requeued on timeout or preemption.

    python -m launch.train --config configs/50h.yaml trainer.run_dir=runs/50h parallel.strategy=ddp \\
        --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 --cpus-per-task 10

Every task calls `avflow.train.entry.run_training` in-process; it joins the process group from the SLURM
variables of its task (no torchrun) and continues from the newest complete checkpoint in
trainer.run_dir. SLURM sends USR2 `--signal-delay-s` seconds before the time limit, and submitit sends
it on preemption; rank 0 then requeues the job under the same id and the next run resumes. On CPU
clusters pass `--gpus-per-node 0` and choose the processes per node with `--tasks-per-node`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import submitit

from avflow.config import ConfigError, load_config
from launch.executor import add_slurm_arguments, log_to_task_output, sbatch_script, slurm_executor, submit

log = logging.getLogger(__name__)


class Training(submitit.helpers.Checkpointable):
    """What each task runs: avflow training of one config, resumable from trainer.run_dir."""

    def __init__(self, config_path: Path, overrides: list[str]):
        self.config_path = config_path
        self.overrides = overrides

    def __call__(self) -> Any:
        from avflow.train.entry import run_training

        log_to_task_output()
        # At a requeue, rank 0 leaves and the other ranks fail on the closed connection, and submitit stores
        # that failure as their result. Drop it, so the job only counts as done once this run finishes.
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
        return run_training(self.config_path, self.overrides, resume=True)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called on rank 0 alone, from the USR2 handler, before the requeue.

        It must not save anything or run a collective: the other ranks are not in this handler, so a
        collective would hang. The training checkpoints on disk are the state; the requeued job runs
        this same callable, which resumes from the newest complete one.
        """
        log.info("requeueing; the next run resumes from the newest complete checkpoint in trainer.run_dir")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--nodes", required=True, type=int, help="nodes to train on")
    parser.add_argument("--gpus-per-node", required=True, type=int, help="GPUs per node; 0 on CPU clusters")
    parser.add_argument("--tasks-per-node", type=int,
                        help="training processes per node (default: --gpus-per-node, or 1 without GPUs)")
    parser.add_argument("--job-name", default="avflow-train")
    add_slurm_arguments(parser, default_job_dir="<trainer.run_dir>/slurm")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the SLURM options
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        parser.error("expected --nodes >= 1, --gpus-per-node >= 0 and --tasks-per-node >= 1")
    try:
        cfg = load_config(args.config, args.overrides)  # fail here, not after waiting in the queue
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    tasks_per_node = args.tasks_per_node or max(args.gpus_per_node, 1)
    job_dir = args.job_dir or Path(cfg.trainer.run_dir) / "slurm"
    executor = slurm_executor(args, job_dir, args.job_name, nodes=args.nodes, tasks_per_node=tasks_per_node,
                              gpus_per_node=args.gpus_per_node)
    if args.dry_run:
        print(sbatch_script(executor))
        return 0
    submit(executor, Training(args.config.absolute(), args.overrides))
    return 0


if __name__ == "__main__":
    # Run the imported module's main so Training is pickled as launch.train.Training, the code installed on
    # the nodes when a requeued job starts, rather than by value as a class of __main__.
    from launch.train import main as imported_main

    sys.exit(imported_main())
