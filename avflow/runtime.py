"""Device and precision choices shared by every stage (training, inference, export), defined once."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA when available, else the CPU; `cuda` fails clearly where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available")
    return torch.device(name)


@contextlib.contextmanager
def fp32_matmul_precision(precision: str) -> Iterator[None]:
    """fp32 matmuls on CUDA in `precision` ("ieee": true fp32; "tf32") inside the block, the previous setting after.

    A process-wide switch: library code never flips it for good, so a caller's fp32 stays fp32 (and compiled
    functions, which guard on it, do not recompile behind the caller's back).
    """
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
