"""Batch inference as a SLURM job array: `avflow infer` over one manifest, split into --array shards.

    python -m launch.infer --model exports/50h --inputs items.jsonl -o results --array 8 --no-video \\
        --partition gpu --time 60 --gpus-per-node 1

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

from avflow.cli import build_parser as avflow_parser
from avflow.cli import main as avflow_main
from avflow.infer.artifacts import FACE_DECODER_FILE
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
    parser = argparse.ArgumentParser(prog="python -m launch.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path,
                        help="an export directory, a .safetensors model or RUN/checkpoints/step-N")
    parser.add_argument("--inputs", required=True, type=Path, help="items.jsonl: one JSON object per line")
    parser.add_argument("-o", "--output", required=True, type=Path, help="results folder shared by all tasks")
    parser.add_argument("--array", required=True, type=int, metavar="N",
                        help="array tasks to split the manifest over (at most one per line)")
    parser.add_argument("--gpus-per-node", type=int, default=0, choices=(0, 1),
                        help="GPUs of each array task: an `avflow infer` process uses one device (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="torch device of each task (default: cuda with --gpus-per-node 1, else cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="network precision (an export fixes its own)")
    video = parser.add_mutually_exclusive_group()
    video.add_argument("--no-video", action="store_true", help="skip the .mp4 renders")
    video.add_argument("--procedural-face", action="store_true", help="render the demo's procedural head")
    video.add_argument("--face-decoder", type=Path, help="TorchScript face decoder for the .mp4 renders")
    parser.add_argument("--vocoder", type=Path, help="BigVGAN generator checkpoint (default: the export's, else "
                                                     "Griffin-Lim)")
    parser.add_argument("--text2tokens", type=Path, help="text-to-tokens .safetensors for text items")
    parser.add_argument("--asr-model", type=Path, help="local wav2vec2 CTC model directory, for audio items")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--nfe", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--retry-errors", action="store_true", help="retry items recorded as failed")
    parser.add_argument("--job-name", default="avflow-infer")
    add_slurm_arguments(parser, default_job_dir=DEFAULT_JOB_DIR)
    return parser


def manifest_lines(path: Path) -> int:
    """Lines of the manifest, counted as `avflow infer --shard` counts them (blank lines included)."""
    return len(path.read_text().splitlines())


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The launcher's arguments, checked here rather than after waiting in the queue.

    `args.array` comes back lowered to the manifest's line count: more tasks would have nothing to do.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.array < 1:
        parser.error(f"--array: expected at least 1 task, got {args.array}")
    for flag, path in (("--model", args.model), ("--face-decoder", args.face_decoder), ("--vocoder", args.vocoder),
                       ("--text2tokens", args.text2tokens), ("--asr-model", args.asr_model)):
        if path is not None and not path.exists():
            parser.error(f"{flag}: {path} does not exist")
    if not args.inputs.is_file():
        parser.error(f"--inputs: {args.inputs} is not a file (expected items.jsonl, one JSON object per line)")
    if not (args.no_video or args.procedural_face or args.face_decoder or (args.model / FACE_DECODER_FILE).is_file()):
        parser.error(f"videos need a face decoder and {args.model} has none: pass --face-decoder FILE, "
                     "--procedural-face or --no-video")
    lines = manifest_lines(args.inputs)
    if lines == 0:
        parser.error(f"--inputs: {args.inputs} is empty (expected one JSON object per line)")
    if args.array > lines:
        log.info(f"--array {args.array}: {args.inputs} has {lines} lines, so {lines} tasks")
        args.array = lines
    try:  # the composed command must be one `avflow infer` accepts
        avflow_parser().parse_args([*infer_command(args), "--shard", f"0/{args.array}"])
    except SystemExit:
        parser.exit(2, f"{parser.prog}: error: the options above do not make a valid `avflow infer` command\n")
    return args


def infer_command(args: argparse.Namespace) -> list[str]:
    """The `avflow infer` arguments every task runs (before its --shard), with absolute paths."""
    device = args.device or ("cuda" if args.gpus_per_node else "cpu")
    argv = ["infer", "--model", str(args.model.absolute()), "--inputs", str(args.inputs.absolute()),
            "-o", str(args.output.absolute()), "--device", device, "--quiet"]
    for flag, path in (("--face-decoder", args.face_decoder), ("--vocoder", args.vocoder),
                       ("--text2tokens", args.text2tokens), ("--asr-model", args.asr_model)):
        if path is not None:
            argv += [flag, str(path.absolute())]
    for flag, value in (("--dtype", args.dtype), ("--num-samples", args.num_samples), ("--nfe", args.nfe),
                        ("--seed", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, given in (("--no-video", args.no_video), ("--procedural-face", args.procedural_face),
                        ("--retry-errors", args.retry_errors)):
        if given:
            argv.append(flag)
    return argv


def task_command_comment(args: argparse.Namespace) -> str:
    """A shell comment with what array task I runs (the sbatch script itself only starts submitit)."""
    return (f"# array task I (0 <= I < {args.array}) runs: "
            f"avflow {shlex.join(infer_command(args))} --shard I/{args.array}")


def shard_task(args: argparse.Namespace) -> ShardInference:
    """What every array task of this launch runs, given its shard index."""
    return ShardInference(infer_command(args), args.array, args.output.absolute())


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
