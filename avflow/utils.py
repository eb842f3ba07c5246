"""Small helpers shared by every stage: atomic writes, file digests, safe array and checkpoint loading,
one-line error reporting, full or read-only disks, and one writer per folder (hold_folder)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from avflow.optional import MissingPackageError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A reader therefore never sees a partial file under the final name, and a failed write leaves any
    earlier file at `path` untouched. A write that fails for a full or read-only disk raises DiskError.
    """
    final = Path(path)
    with reporting_disk_errors(final):
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


# errno -> what the one-line error says; the words "no space left" and "read-only" are what users search for
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "no space left (disk quota exceeded)",
               errno.EROFS: "read-only file system"}
LOW_SPACE_BYTES = 1 << 20  # a failed write with less than this free is put down to the full disk


class DiskError(OSError):
    """A write failed because its file system is full or read-only: not the input's fault, so what failed for
    it is done again by a rerun once there is space."""


def disk_error(path: str | os.PathLike, error: BaseException) -> DiskError | None:
    """The DiskError naming `path` to raise instead of `error` when writing `path` failed for its disk, or None.

    Libraries report a full disk in their own words (libsndfile "System error", torch's zip writer "unexpected
    pos", safetensors' I/O errors), so besides the errno of `error` and its causes, the file system holding
    `path` is asked whether it is read-only or (nearly) full.
    """
    if isinstance(error, DiskError):
        return error
    reason = next((DISK_ERRNOS[cause.errno] for cause in _causes(error)
                   if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS), None) or _disk_state(Path(path))
    if reason is None:
        return None
    detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return DiskError(f"{path}: {reason} ({detail}); free space or choose another folder, then run again")


@contextlib.contextmanager
def reporting_disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Run a block that writes `path`; a failure for a full or read-only disk is raised as one DiskError."""
    try:
        yield
    except Exception as error:
        found = disk_error(path, error)
        if found is None or found is error:
            raise
        raise found from error


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _disk_state(path: Path) -> str | None:
    """'read-only file system' or 'no space left on the device' for the file system that holds `path`."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        stats = os.statvfs(existing)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return DISK_ERRNOS[errno.EROFS]
    if stats.f_bavail * stats.f_frsize < LOW_SPACE_BYTES:
        return DISK_ERRNOS[errno.ENOSPC]
    return None


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
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS:  # a write no stage put down to its disk
            detail = f"{error.filename or 'writing'}: {DISK_ERRNOS[error.errno]} ({error.strerror})"
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
    """A plain .npy of real floating-point numbers (never a pickle), or ValueError naming the file and what it
    should have held. Every array avflow reads this way (features, codes, poses, logits) is real-valued: integer
    or complex values mean the wrong file, and casting them would pack or generate from garbage silently."""
    try:
        array = np.load(path, allow_pickle=False)
    except EOFError as error:
        raise ValueError(f"{path}: empty file; expected a .npy of {what}") from error
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a readable .npy of {what} ({error})") from error
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        found = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{path}: expected numeric {what} as real floating-point values, got {found}")
    return array


# One writer per folder: an exclusive lock that a command holds on the folder it writes for its lifetime.
#
#     with hold_folder(output_dir):
#         ...  # write into output_dir
#
# A second process that asks for the same folder is refused at once with FolderInUseError, one line naming the
# folder and the holder's pid and host, before it writes anything.
#
# Why POSIX record locks (fcntl.lockf, F_SETLK) on a file inside the folder:
# - The kernel drops them when the holding process ends, however it ends (SIGKILL, OOM, preemption), so a
#   killed holder never blocks the next run and nothing has to be cleaned up. A SLURM job requeued after its
#   predecessor died gets the lock as soon as that process is gone.
# - They work across nodes on shared file systems: NFSv4 implements them in the protocol (NFSv3 through the
#   NLM lock manager), and on Lustre with the `flock` mount option. flock(2) locks are only emulated with
#   POSIX locks over NFS, and are local to one node on Lustre's default `localflock`. If the holder's node
#   itself dies, the server releases its lock when the client's lease expires (about 90 s on NFSv4).
# - They are not inherited by child processes (pack workers, data-loader workers), so a lock never outlives
#   the command that took it in an orphaned child, as an inherited flock(2) lock would.
# POSIX locks belong to a process, and closing any descriptor of the lock file releases them: this module
# therefore keeps one descriptor per locked folder and refuses a second lock on the same folder in the same
# process instead of opening the file again.
#
# The lock file holds the holder's pid and host, for the refusal message only: the lock, not the file, decides.

LOCK_FILE = ".avflow.lock"
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # a file system mounted without lock support
_held: dict[Path, int] = {}  # lock file -> its open descriptor, for the locks this process holds


class FolderInUseError(OSError):
    """Another process (or another job in this process) writes the folder."""


def _holder(lock_file: Path) -> str:
    """Who holds the lock, as the holder recorded it (it may still be writing: then we do not know)."""
    try:
        info = json.loads(lock_file.read_text())
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid and host not recorded yet"


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold the exclusive lock `name` in `folder` (created if missing) while the block runs; yields the folder.

    Raises FolderInUseError when another process holds it. Commands that share a folder by design (SLURM array
    tasks of one `avflow infer` job) lock one name each.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = (folder / name).resolve()
    if lock_file in _held:
        raise FolderInUseError(f"{folder}: in use by another job of this process (pid {os.getpid()}); "
                               "one writer per folder")
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    if not _lock(descriptor, folder, lock_file):
        os.close(descriptor)
        yield folder
        return
    _held[lock_file] = descriptor
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
        yield folder
    finally:
        del _held[lock_file]
        os.close(descriptor)  # releases the lock; the file stays, so no other process can lock a replaced file


def _lock(descriptor: int, folder: Path, lock_file: Path) -> bool:
    """Take the lock without waiting: True when held, False where the file system has no locks (logged)."""
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in UNSUPPORTED:  # refusing every job there would be worse than one unguarded folder
            log.warning("%s: the file system does not support locks (%s; on Lustre, mount with -o flock); "
                        "nothing stops a second job from writing this folder", folder, error.strerror)
            return False
        os.close(descriptor)
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise FolderInUseError(f"{folder}: in use by another avflow process ({_holder(lock_file)}); wait for it to "
                               f"finish or choose another folder") from None
    return True
