"""`python -m avflow.train --config FILE [--resume] [-v] [section.key=value ...]`, e.g. under torchrun:

    torchrun --nnodes N --nproc_per_node G -m avflow.train --config configs/50h.yaml parallel.strategy=fsdp

The same training as `avflow train`, without loading the command-line tool's other subcommands.
"""

import argparse
import logging
import sys
from pathlib import Path

from avflow.train.entry import run_training
from avflow.utils import run_reporting_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avflow.train", description="train AV-Flow on every rank")
    parser.add_argument("--config", type=Path, help="YAML config")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in trainer.run_dir")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks instead of one line")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")

    def train() -> None:
        print(f"final checkpoint: {run_training(args.config, args.overrides, resume=args.resume)}")

    return run_reporting_errors("python -m avflow.train", train, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
