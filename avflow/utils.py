"""Small helpers shared by every stage: atomic writes, file digests, safe array and checkpoint loading,
one-line error reporting."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from avflow.optional import MissingPackageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A reader therefore never sees a partial file under the final name, and a failed write leaves any
    earlier file at `path` untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch_atomic(obj: object, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike) -> dict:
    """Load a checkpoint-like file with weights_only=True (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a loadable torch checkpoint ({error})") from error


# What bad input, bad files, the file system and a missing optional package raise: reported as one line with
# exit status 2. ValueError covers ConfigError and BadDataError (a dataset with too many unreadable samples);
# OSError covers missing, misplaced (an output path under a file) and unreadable files; EOFError a truncated
# file; MissingPackageError names the package a feature needs.
USER_ERRORS = (ValueError, OSError, EOFError, FloatingPointError, MissingPackageError)


def run_reporting_errors(command: str, run: Callable[[], object], verbose: bool) -> int:
    """Run a command's body; any error ends it with one line on stderr and a non-zero exit status: 2 for bad
    input (USER_ERRORS), 1 for anything else. `verbose` lets the traceback through instead."""
    try:
        run()
    except Exception as error:
        if verbose:
            raise
        user_error = isinstance(error, USER_ERRORS)
        detail = str(error) or type(error).__name__
        if not user_error:
            detail = f"{type(error).__name__}: {detail} (an avflow bug or an environment problem; -v shows where)"
        print(f"{command}: error: {detail}", file=sys.stderr)
        return 2 if user_error else 1
    return 0


def file_sha256(path: str | os.PathLike, block_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks so a multi-GB shard or checkpoint file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def load_numeric_array(path: str | os.PathLike, what: str) -> np.ndarray:
    """A plain numeric .npy (never a pickle), or ValueError naming the file and what it should have held."""
    try:
        array = np.load(path, allow_pickle=False)
    except EOFError as error:
        raise ValueError(f"{path}: empty file; expected a .npy of {what}") from error
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a readable .npy of {what} ({error})") from error
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        found = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{path}: expected numeric {what}, got {found}")
    return array
