"""Batch inference as a SLURM job array: `avflow infer` over one manifest, split into --array shards.

    python -m launch.infer --array 8 --gpus-per-node 1 --partition gpu --time 60 -- \\
        --model exports/50h --inputs items.jsonl -o results --no-video

The launcher's own options (the array, its GPUs, SLURM and the job folder) come before `--`; everything
after it is an `avflow infer` command line, handed to every task verbatim and checked by `avflow infer`'s
own parser before anything is submitted, so any `avflow infer` option works and a typo fails at once.
It must name a manifest (--inputs) and no --shard; the launcher adds --device when none is given (cuda
with --gpus-per-node 1, else cpu) and --quiet. Relative paths are relative to the submitting directory,
where every task runs.

Array task I of N runs `avflow infer ... --shard I/N` in-process: the items whose line index % N == I,
recorded in RESULTS/results.shard-I-of-N.jsonl, outputs in RESULTS/<id>/. The job requeues itself on
timeout or preemption, and the requeued task skips every item already recorded, so it only does
what is left. Run it again after it ends to finish (or, with --retry-errors, retry) what failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import submitit

from avflow.cli import main as avflow_main
from avflow.cli import subcommand_parser
from avflow.infer.artifacts import AVATAR_FILE, FACE_DECODER_FILE
from avflow.infer.batch import results_name
from launch.executor import add_slurm_arguments, sbatch_script, slurm_executor, submit_array

log = logging.getLogger(__name__)

DEFAULT_JOB_DIR = "slurm_jobs/infer"


class ShardInference(submitit.helpers.Checkpointable):
    """What array task I runs: the `avflow infer` command line `infer_argv` with `--shard I/shards`.

    The requeued task runs it again; `avflow infer` skips the items its results file already holds.
    """

    def __init__(self, infer_argv: list[str], shards: int, output: Path):
        self.infer_argv = infer_argv
        self.shards = shards
        self.output = output

    def __call__(self, shard: int) -> dict[str, list[str]]:
        # A preempted run may have stored a failure (its requeue kills it mid-call); drop it, so the task
        # only counts as done once this run finishes.
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
        argv = [*self.infer_argv, "--shard", f"{shard}/{self.shards}"]
        status = avflow_main(argv)
        if status != 0:
            raise RuntimeError(f"avflow {shlex.join(argv)} exited with status {status}; "
                               "its error is in this task's stderr log")
        return shard_summary(self.output, shard, self.shards)


def shard_summary(output: Path, shard: int, shards: int) -> dict[str, list[str]]:
    """The ids recorded as ok and as failed in one shard's results file."""
    summary: dict[str, list[str]] = {"ok": [], "error": []}
    path = output / results_name((shard, shards))
    for line in path.read_text().splitlines() if path.is_file() else []:
        entry = json.loads(line)
        summary[entry["status"]].append(entry["id"])
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.infer", description=__doc__.splitlines()[0],
        usage="%(prog)s --array N --partition P --time MIN [launcher options] -- AVFLOW_INFER_ARGUMENTS",
        epilog="AVFLOW_INFER_ARGUMENTS: what `avflow infer` takes (avflow infer --help), with --inputs and without "
               "--shard, e.g. -- --model exports/50h --inputs items.jsonl -o results --no-video")
    parser.add_argument("--array", required=True, type=int, metavar="N",
                        help="array tasks to split the manifest over (at most one per line)")
    parser.add_argument("--gpus-per-node", type=int, default=0, choices=(0, 1),
                        help="GPUs of each array task: an `avflow infer` process uses one device (default 0)")
    parser.add_argument("--job-name", default="avflow-infer")
    add_slurm_arguments(parser, default_job_dir=DEFAULT_JOB_DIR)
    return parser


def manifest_lines(path: Path) -> int:
    """Lines of the manifest, counted as `avflow infer --shard` counts them (blank lines included)."""
    return len(path.read_text().splitlines())


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The launcher's arguments and the `avflow infer` ones after `--`, checked here rather than after waiting
    in the queue.

    Adds `infer_argv` (the `avflow infer` arguments as given) and `infer` (them parsed; `device` is None when
    not given). `args.array` comes back lowered to the manifest's line count: more tasks would have nothing
    to do.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    separator = argv.index("--") if "--" in argv else len(argv)
    args, unknown = parser.parse_known_args(argv[:separator])
    if separator == len(argv):
        missing = "expected `--` and then the `avflow infer` arguments, e.g. -- --model M --inputs items.jsonl -o OUT"
        parser.error(f"{missing}; move {shlex.join(unknown)} after it" if unknown else missing)
    if unknown:
        parser.error(f"unrecognized arguments: {shlex.join(unknown)} (`avflow infer` arguments go after `--`)")
    if args.array < 1:
        parser.error(f"--array: expected at least 1 task, got {args.array}")
    args.infer_argv = argv[separator + 1:]
    # `avflow infer`'s own parser, so its checks and errors are the ones the tasks would meet. A namespace that
    # already holds `device` keeps it unless --device is given: None means "not given".
    args.infer = infer = subcommand_parser("infer").parse_args(args.infer_argv,
                                                               namespace=argparse.Namespace(device=None))
    if infer.shard is not None:
        parser.error(f"--shard {infer.shard}: each array task gets its own --shard I/{args.array}; leave it out")
    if infer.device == "cuda" and not args.gpus_per_node:
        parser.error("--device cuda: the array tasks get no GPU; add --gpus-per-node 1")
    if infer.inputs is None:
        parser.error("--inputs: the array splits a manifest; pass --inputs items.jsonl to avflow infer "
                     "(not --text, --audio or --tokens)")
    for flag, path in (("--model", infer.model), ("--face-decoder", infer.face_decoder), ("--avatar", infer.avatar),
                       ("--vocoder", infer.vocoder), ("--text2tokens", infer.text2tokens),
                       ("--asr-model", infer.asr_model)):
        if path is not None and not path.exists():
            parser.error(f"{flag}: {path} does not exist")
    if not infer.inputs.is_file():
        parser.error(f"--inputs: {infer.inputs} is not a file (expected items.jsonl, one JSON object per line)")
    exported_face = (infer.model / FACE_DECODER_FILE).is_file() or (infer.model / AVATAR_FILE).is_file()
    if not (infer.no_video or infer.procedural_face or infer.face_decoder or infer.avatar or exported_face):
        parser.error(f"videos need a face decoder and {infer.model} has none: pass --avatar DATASET_ROOT, "
                     "--face-decoder FILE, --procedural-face or --no-video")
    lines = manifest_lines(infer.inputs)
    if lines == 0:
        parser.error(f"--inputs: {infer.inputs} is empty (expected one JSON object per line)")
    if args.array > lines:
        log.info(f"--array {args.array}: {infer.inputs} has {lines} lines, so {lines} tasks")
        args.array = lines
    return args


def infer_command(args: argparse.Namespace) -> list[str]:
    """The `avflow infer` command line every task runs (before its --shard): the arguments after `--` as given,
    then --device when none was given and --quiet (a progress bar only clutters the task's log)."""
    argv = ["infer", *args.infer_argv]
    if args.infer.device is None:
        argv += ["--device", "cuda" if args.gpus_per_node else "cpu"]
    if not args.infer.quiet:
        argv.append("--quiet")
    return argv


def task_command_comment(args: argparse.Namespace) -> str:
    """A shell comment with what array task I runs (the sbatch script itself only starts submitit)."""
    return (f"# array task I (0 <= I < {args.array}) runs: "
            f"avflow {shlex.join(infer_command(args))} --shard I/{args.array}")


def shard_task(args: argparse.Namespace) -> ShardInference:
    """What every array task of this launch runs, given its shard index."""
    return ShardInference(infer_command(args), args.array, args.infer.output.absolute())


def submit_inference(args: argparse.Namespace) -> list[submitit.Job]:
    """Submit the array; returns one job per task."""
    executor = slurm_executor(args, args.job_dir or Path(DEFAULT_JOB_DIR), args.job_name,
                              gpus_per_node=args.gpus_per_node)
    log.info(task_command_comment(args).lstrip("# "))
    return submit_array(executor, shard_task(args), list(range(args.array)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_arguments(argv)
    if args.dry_run:
        executor = slurm_executor(args, args.job_dir or Path(DEFAULT_JOB_DIR), args.job_name,
                                  gpus_per_node=args.gpus_per_node)
        print(sbatch_script(executor, array_size=args.array))
        print(task_command_comment(args))
        return 0
    submit_inference(args)
    return 0


if __name__ == "__main__":
    # Run the imported module's main so ShardInference is pickled from launch.infer, not from __main__.
    from launch.infer import main as imported_main

    sys.exit(imported_main())
