"""python -m avflow.export --checkpoint CKPT -o OUT_DIR [--format torchscript|aoti|eager] [--dtype bf16|fp32] ...
(the same command as `avflow export`)."""

import sys

from avflow.export.command import main

if __name__ == "__main__":
    sys.exit(main())
