"""What every launcher shares: the submitit SLURM executor, `--dry-run` scripts, and logged submissions.

The job folder holds one sub-folder per job id with submitit's pickles, the sbatch script and one log per
task. Jobs run `python -m submitit.core._submit` with the submitting interpreter, in the submitting
directory and environment, so that interpreter must see avflow on every node.
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

log = logging.getLogger(__name__)

SIGNAL_DELAY_S = 120  # seconds between SLURM's warning signal (USR2) and the kill: time to requeue


def add_slurm_arguments(parser: argparse.ArgumentParser, default_job_dir: str) -> None:
    """The scheduling options every launcher takes."""
    group = parser.add_argument_group("SLURM")
    group.add_argument("--partition", required=True, help="SLURM partition")
    group.add_argument("--time", required=True, type=int, metavar="MIN", help="time limit of one run, in minutes")
    group.add_argument("--cpus-per-task", type=int, help="CPUs of each task (default: the partition's default)")
    group.add_argument("--job-dir", type=Path,
                       help=f"where submitit writes pickles and logs (default: {default_job_dir})")
    group.add_argument("--signal-delay-s", type=int, default=SIGNAL_DELAY_S,
                       help=f"USR2 this many seconds before the time limit, to requeue (default {SIGNAL_DELAY_S})")
    group.add_argument("--max-timeouts", type=int, default=10,
                       help="requeues after a time limit before giving up; preemptions do not count (default 10)")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting")


class _ScriptOnlyExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that only writes sbatch scripts, so --dry-run works where SLURM is not installed."""

    @classmethod
    def affinity(cls) -> int:
        return 1  # SlurmExecutor refuses to exist without `srun` on the PATH


def slurm_executor(args: argparse.Namespace, job_dir: Path, job_name: str, *, nodes: int = 1,
                   tasks_per_node: int = 1, gpus_per_node: int = 0) -> submitit.SlurmExecutor:
    """An executor for `nodes` x `tasks_per_node` tasks with the options of `add_slurm_arguments`."""
    executor_class = _ScriptOnlyExecutor if args.dry_run else submitit.SlurmExecutor
    try:
        executor = executor_class(folder=Path(job_dir).absolute() / "%j", max_num_timeout=args.max_timeouts)
    except RuntimeError as error:
        raise SystemExit(f"{job_name}: cannot submit: {error} (is SLURM installed and SLURM_CONF set?)") from error
    # --requeue: clusters with JobRequeue=0 refuse `scontrol requeue` for jobs submitted without it.
    parameters: dict[str, Any] = dict(job_name=job_name, partition=args.partition, time=args.time, nodes=nodes,
                                      ntasks_per_node=tasks_per_node, signal_delay_s=args.signal_delay_s,
                                      additional_parameters={"requeue": True})
    if args.cpus_per_task:
        parameters["cpus_per_task"] = args.cpus_per_task
    if gpus_per_node:
        parameters["gpus_per_node"] = gpus_per_node  # left out on CPU clusters, which may have no GPU resource type
    executor.update_parameters(**parameters)
    return executor


def sbatch_script(executor: submitit.SlurmExecutor, array_size: int | None = None) -> str:
    """The sbatch script `submit` (or `submit_array` with `array_size` jobs) would hand to SLURM."""
    if array_size is not None:
        # submitit sets the array size on a copy of the executor at submission time; do the same here.
        executor = copy.copy(executor)
        executor.parameters = {**executor.parameters, "map_count": array_size}
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def log_to_task_output() -> None:
    """In a task: print avflow's and the launchers' INFO messages to its stderr log, as `avflow` does.

    Named loggers rather than the root logger, which would repeat every message of submitit's own logger.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("avflow", "launch"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)


def submit(executor: submitit.SlurmExecutor, function: Callable[..., Any], *args: Any) -> submitit.Job:
    """Submit one job running `function(*args)` in each of its tasks; log its id and where its logs go."""
    job = executor.submit(function, *args)
    tasks = executor._num_tasks()
    log.info(f"submitted job {job.job_id} ({tasks} task{'s' * (tasks > 1)}); logs: {job.paths.folder}")
    log.info(f"follow it with: squeue -j {job.job_id}; tail -f {job.paths.folder}/{job.job_id}_0_log.*")
    return job


def submit_array(executor: submitit.SlurmExecutor, function: Callable[..., Any],
                 arguments: Sequence[Any]) -> list[submitit.Job]:
    """Submit a job array: element i runs `function(arguments[i])`; log the array's id."""
    jobs = executor.map_array(function, arguments)
    array_id = jobs[0].job_id.split("_")[0]
    log.info(f"submitted job array {array_id} ({len(jobs)} jobs); logs: {jobs[0].paths.folder.parent}")
    log.info(f"follow it with: squeue -j {array_id}")
    return jobs
