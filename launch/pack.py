"""Pack a dataset into shards as one SLURM job: `avflow pack` with one worker process per CPU of the task.

    python -m launch.pack --config configs/50h.yaml --layout 50h -i /data/50h -o shards/50h \\
        --partition cpu --time 240 --cpus-per-task 32

Packing continues where it stopped, so on timeout or preemption the job requeues itself and the next run
finishes the shards that are missing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import submitit

from avflow.cli import apply_pack_data_options
from avflow.cli import main as avflow_main
from avflow.config import ConfigError, load_config
from avflow.data.layouts import layout_choices, layout_help
from launch.executor import add_slurm_arguments, sbatch_script, slurm_executor, submit

log = logging.getLogger(__name__)


class Packing(submitit.helpers.Checkpointable):
    """What the task runs: the `avflow pack` command line `pack_argv`. The requeued job runs it again."""

    def __init__(self, pack_argv: list[str]):
        self.pack_argv = pack_argv

    def __call__(self) -> None:
        status = avflow_main(self.pack_argv)
        if status != 0:
            raise RuntimeError(f"avflow {' '.join(self.pack_argv)} exited with status {status}; "
                               "its error is in this task's stderr log")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.pack", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--layout", choices=layout_choices(), help=f"{layout_help()} (default: data.layout)")
    parser.add_argument("-i", "--input", type=Path,
                        help="dataset folder of the layout, or the manifest file (default: data.root)")
    parser.add_argument("-o", "--output", type=Path, help="shard folder, e.g. shards/NAME (default: loader.shards)")
    parser.add_argument("--subject", help="Audio2Photoreal subject (with --layout a2p)")
    parser.add_argument("--identity", help="whose data it is, where the layout names nobody (a 50h root)")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count unreadable segments")
    parser.add_argument("--job-name", default="avflow-pack")
    add_slurm_arguments(parser, default_job_dir="slurm_jobs/pack")
    return parser


def pack_command(args: argparse.Namespace, workers: int) -> list[str]:
    """The `avflow pack` arguments of this launch, with absolute paths and `workers` packing processes."""
    argv = ["pack", *args.overrides, "--workers", str(workers)]
    if args.config:
        argv += ["--config", str(args.config.absolute())]
    for flag, path in (("--input", args.input), ("--output", args.output)):
        if path:
            argv += [flag, str(path.absolute())]
    if args.layout:
        argv += ["--layout", args.layout]
    if args.subject:
        argv += ["--subject", args.subject]
    if args.identity:
        argv += ["--identity", args.identity]
    if args.skip_bad:
        argv.append("--skip-bad")
    return argv


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the other options
    try:  # fail here, not after waiting in the queue
        apply_pack_data_options(load_config(args.config, args.overrides), args.layout, args.input, args.subject,
                                args.identity)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    executor = slurm_executor(args, args.job_dir or Path("slurm_jobs/pack"), args.job_name)
    if args.dry_run:
        print(sbatch_script(executor))
        return 0
    pack_argv = pack_command(args, workers=args.cpus_per_task or 1)
    log.info(f"the job runs: avflow {' '.join(pack_argv)}")
    submit(executor, Packing(pack_argv))
    return 0


if __name__ == "__main__":
    # Run the imported module's main so Packing is pickled as launch.pack.Packing, not by value from __main__.
    from launch.pack import main as imported_main

    sys.exit(imported_main())
