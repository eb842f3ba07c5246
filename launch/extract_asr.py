"""Extract ASR token logits as a SLURM job array: the recordings of a dataset are split over --tasks jobs.

    python -m launch.extract_asr -i /data/50h --model /models/wav2vec2-base-960h --tasks 16 \\
        --partition gpu --time 120 --gpus-per-node 1

Array job i takes every --tasks-th recording of the sorted list, starting at the i-th, and writes the
token files `avflow extract-asr` would write. It skips files that are already complete, so a job that
is requeued on timeout or preemption only does what is left.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import submitit

from avflow.data.asr import CTCTokenizer, extract_recordings, recordings
from avflow.data.layouts import layout_choices, layout_help
from launch.executor import add_slurm_arguments, log_to_task_output, sbatch_script, slurm_executor, submit_array

log = logging.getLogger(__name__)

CHUNK_SECONDS = 100.0  # what `avflow extract-asr` uses, so both write the same files
BATCH_SIZE = 2


class TokenExtraction(submitit.helpers.Checkpointable):
    """What each array job runs: token files for its share of the recordings. The requeued job runs it again."""

    def __init__(self, model_dir: Path, device: str):
        self.model_dir = model_dir
        self.device = device

    def __call__(self, pairs: list[tuple[Path, Path]]) -> dict[str, int]:
        log_to_task_output()
        tokenizer = CTCTokenizer(self.model_dir, device=self.device)
        counts = extract_recordings(pairs, tokenizer, chunk_seconds=CHUNK_SECONDS, batch_size=BATCH_SIZE)
        log.info(f"token logits: {counts['written']} written, {counts['skipped']} already complete")
        return counts


def split_recordings(input_dir: Path, layout: str, tasks: int) -> list[list[tuple[Path, Path]]]:
    """The recordings split over at most `tasks` jobs, round-robin over the sorted list to even out sizes."""
    pairs = recordings(input_dir, layout)
    if not pairs:
        raise FileNotFoundError(f"{input_dir}: no recordings of the {layout} layout")
    tasks = min(tasks, len(pairs))
    return [pairs[task::tasks] for task in range(tasks)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.extract_asr", description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", required=True, type=Path,
                        help="dataset folder of the layout, or the manifest file")
    parser.add_argument("--model", required=True, type=Path, help="local wav2vec2 CTC model directory")
    parser.add_argument("--layout", choices=layout_choices(), default="50h", help=f"{layout_help()} (default: 50h)")
    parser.add_argument("--tasks", required=True, type=int, help="array jobs to split the recordings over")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs of each array job (default 0)")
    parser.add_argument("--device", help="torch device (default: cuda with --gpus-per-node, else cpu)")
    parser.add_argument("--job-name", default="avflow-extract-asr")
    add_slurm_arguments(parser, default_job_dir="slurm_jobs/extract_asr")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error(f"--tasks: expected at least 1, got {args.tasks}")
    if not args.model.is_dir():
        parser.error(f"--model: {args.model} is not a directory")
    try:
        shares = split_recordings(args.input.absolute(), args.layout, args.tasks)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    executor = slurm_executor(args, args.job_dir or Path("slurm_jobs/extract_asr"), args.job_name,
                              gpus_per_node=args.gpus_per_node)
    if args.dry_run:
        print(sbatch_script(executor, array_size=len(shares)))
        return 0
    device = args.device or ("cuda" if args.gpus_per_node else "cpu")
    log.info(f"{sum(map(len, shares))} recordings over {len(shares)} array jobs, on {device}")
    submit_array(executor, TokenExtraction(args.model.absolute(), device), shares)
    return 0


if __name__ == "__main__":
    # Run the imported module's main so TokenExtraction is pickled from launch.extract_asr, not from __main__.
    from launch.extract_asr import main as imported_main

    sys.exit(imported_main())
