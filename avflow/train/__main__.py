"""`python -m avflow.train --config FILE [--resume] [section.key=value ...]`, e.g. under torchrun:

    torchrun --nnodes N --nproc_per_node G -m avflow.train --config configs/50h.yaml parallel.strategy=fsdp
"""

import sys

from avflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
