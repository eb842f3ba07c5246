"""Packing of a dataset layout into WebDataset tar shards (format: avflow.data.shard_format) and their manifest.

Training streams fixed-size tar shards instead of reading thousands of per-segment files: `pack` reads
every segment through the layout reader (once to learn its split for the shard plan, once to write it),
aligns it to the mel clock and writes the streams as .npy members (format: shards/README.md).
Each shard is written by one worker under a temporary name and
renamed only when complete, followed by a `{shard}.json` sidecar with its hash and per-feature
sufficient statistics, so an interrupted pack resumes by skipping shards whose sidecar still matches,
and the train-split normalization statistics are merged from the sidecars without re-reading data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import re
import tarfile
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from avflow.config import Config, DataConfig, MelConfig
from avflow.data.align_streams import AlignedSegment, align_segment
from avflow.data.layouts import layout_named, list_segment_names, read_segment_record
from avflow.data.pack_manifest import accumulate, build_manifest, empty_stats, listed_stats, max_chunk_frames
from avflow.data.shard_format import (
    FORMAT,
    IDENTITY_SEPARATOR,
    MANIFEST,
    OPTIONAL_STREAMS,
    SAMPLE_CHECKSUM,
    SPLITS,
    STORED_DTYPES,
    add_members,
    encode_sample,
    shard_file_name,
)
from avflow.utils import atomic_path, file_sha256, hold_folder, reporting_disk_errors

SIDECAR_FORMAT = "avflow-shard-sidecar-v1"
# What reading one segment's files can raise: a bad segment, counted under pack.skip_bad, not a failed pack
# (the layout readers turn what they anticipate into ValueError naming the file; OSError and EOFError
# cover unreadable and empty files they did not anticipate).
SEGMENT_READ_ERRORS = (ValueError, OSError, EOFError)
PARENT_CHECK_SECONDS = 0.5  # how often a pack worker checks that the packing process still exists


@dataclass(frozen=True)
class PlannedSegment:
    """One segment of the pack: its unique name in the shards, where it is read from, and whose it is."""

    key: str  # the segment name; IDENTITY-SEGMENT in a multi-source pack
    source: int  # index into DataConfig.per_source()
    name: str  # the segment's name in its source
    identity: str


@dataclass(frozen=True)
class ShardJob:
    """One planned shard: which segments go into which file, and what its content depends on."""

    path: Path
    split: str
    entries: tuple[PlannedSegment, ...]
    data_cfg: DataConfig
    mel_cfg: MelConfig
    skip_bad: bool

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(entry.key for entry in self.entries)

    @property
    def max_chunk_frames(self) -> int:
        return max_chunk_frames(self.data_cfg, self.mel_cfg)

    def plan(self) -> dict[str, Any]:
        """Everything besides the input files that the shard's bytes depend on; recorded in its sidecar.

        A shard on disk is reused only when its recorded plan equals this one exactly. The `data` section holds
        exactly what shards are made of (the config's other sections change no shard byte), so the plan is that
        section and `mel` whole: a key added to `data` is in the plan without being listed here.
        """
        return {"format": FORMAT, "split": self.split, "segments": list(self.segments),
                "identities": [entry.identity for entry in self.entries],  # a manifest line's identity may change
                "data": dataclasses.asdict(self.data_cfg), "mel": dataclasses.asdict(self.mel_cfg),
                "sample_checksums": SAMPLE_CHECKSUM}


def chunk_bounds(frames: int, max_frames: int) -> list[tuple[int, int]]:
    """Split `frames` into the fewest near-equal consecutive chunks of at most `max_frames`.

    Equal chunks avoid a short tail chunk that would be too short for a training window.
    """
    count = max(1, math.ceil(frames / max_frames))
    edges = [index * frames // count for index in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def pack(cfg: Config, output_dir: str | os.PathLike, *, workers: int | None = None, skip_bad: bool | None = None,
         progress: bool = True) -> dict[str, Any]:
    """Pack the dataset of `cfg.data` into shards under `output_dir`; return the manifest written there.

    Resumes an interrupted pack: a shard whose tar and sidecar agree (size, sha256, segment plan) is kept.
    Raises ValueError listing every bad segment unless `skip_bad` (default `cfg.pack.skip_bad`).
    `workers` (default `cfg.pack.workers`) > 1 writes shards in that many spawned processes; 1 writes them
    in the calling process.
    """
    workers = cfg.pack.workers if workers is None else workers
    skip_bad = cfg.pack.skip_bad if skip_bad is None else skip_bad
    if workers < 1:
        raise ValueError(f"pack: workers expected at least 1, got {workers}")
    output = Path(output_dir)
    with hold_folder(output):  # one pack writes a shard folder at a time
        return _pack_locked(cfg, output, workers, skip_bad, progress)


def _pack_locked(cfg: Config, output: Path, workers: int, skip_bad: bool, progress: bool) -> dict[str, Any]:
    _remove_stale_temporaries(output, cfg.pack.name)

    sources = cfg.data.per_source()
    names = []
    for index, source in enumerate(sources):
        layout_named(source.layout, f"{_source_name(cfg.data, index)}.layout")  # the error names this source
        found = list_segment_names(source)
        if not found:
            raise ValueError(f"{_source_name(cfg.data, index)}.root={source.root}: no segments found for "
                             f"layout {source.layout}")
        names += [(index, name) for name in found]
    executor = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_init_worker, initargs=(os.getpid(),)) if workers > 1 else None)
    try:
        splits, bad = _plan_splits(cfg.data, names, executor, workers, progress)
        if bad and not skip_bad:
            raise ValueError(_bad_report(cfg, bad))
        jobs = _shard_jobs(cfg, output, splits, skip_bad)
        (output / MANIFEST).unlink(missing_ok=True)  # the folder changes now; it is complete again once rewritten
        _remove_unplanned_shards(output, cfg.pack.name, {job.path.name for job in jobs})
        sidecars = _write_shards(jobs, executor, progress)
    finally:
        if executor is not None:
            executor.shutdown()

    bad += [entry for sidecar in sidecars for entry in sidecar["bad"]]
    if bad and not skip_bad:
        raise ValueError(_bad_report(cfg, bad))
    manifest = build_manifest(cfg, [job.split for job in jobs], sidecars, bad, _dataset_name(cfg.data))
    _write_json(output / MANIFEST, manifest)
    return manifest


def _init_worker(parent_pid: int) -> None:
    """One torch thread per worker process (the pool already uses every core it was given), and a watch on
    the packing process: a worker whose parent is gone (killed) exits instead of packing on for nobody."""
    torch.set_num_threads(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)  # its unfinished temporary shard is removed by the next pack


def _map(function: Callable, items: list, executor: Executor | None, chunksize: int = 1) -> Iterable:
    return map(function, items) if executor is None else executor.map(function, items, chunksize=chunksize)


def _dataset_name(data_cfg: DataConfig) -> str:
    """How errors name the dataset being packed."""
    if data_cfg.sources:
        return "data.sources (" + ", ".join(source.root for source in data_cfg.sources) + ")"
    return f"data.root={data_cfg.root}"


def _source_name(data_cfg: DataConfig, index: int) -> str:
    return f"data.sources[{index}]" if data_cfg.sources else "data"


def _plan_splits(data_cfg: DataConfig, names: list[tuple[int, str]], executor: Executor | None, workers: int,
                 progress: bool) -> tuple[dict[str, list[PlannedSegment]], list[dict[str, str]]]:
    """The segments per split, sorted by key, and the segments that cannot be read.

    The split and the identity are properties of the record (`SegmentRecord.is_val`, `.identity`), so planning
    reads every record once. Keys must be unique: two roots may hold equal segment names under one identity.
    """
    splits: dict[str, list[PlannedSegment]] = {split: [] for split in SPLITS}
    bad = []
    chunksize = max(1, len(names) // (workers * 8))
    sources = data_cfg.per_source()
    results = _map(functools.partial(_segment_plan, sources, bool(data_cfg.sources)), sorted(names), executor,
                   chunksize)
    seen: dict[str, int] = {}
    for entry, split, reason in tqdm(results, total=len(names), desc="plan", unit="segment", disable=not progress):
        if split is None:
            bad.append({"segment": entry.key, "reason": reason})
            continue
        if entry.key in seen:
            raise ValueError(f"{_source_name(data_cfg, entry.source)}: segment {entry.name!r} of identity "
                             f"{entry.identity!r} is also in {_source_name(data_cfg, seen[entry.key])}; expected "
                             f"each identity's segment names to be unique across sources (give the roots "
                             f"different identities, or rename one)")
        seen[entry.key] = entry.source
        splits[split].append(entry)
    for entries in splits.values():
        entries.sort(key=lambda entry: entry.key)
    return splits, bad


def _segment_plan(sources: list[DataConfig], prefixed: bool,
                  item: tuple[int, str]) -> tuple[PlannedSegment, str | None, str | None]:
    """(segment, split, None) for a readable segment, (segment, None, reason) for a bad one."""
    index, name = item
    source = sources[index]
    entry = PlannedSegment(name, index, name, source.default_identity)
    if "." in name or "/" in name:
        return entry, None, f"segment name {name!r} contains '.' or '/'; WebDataset sample keys cannot"
    try:
        record = read_segment_record(source, name)
    except SEGMENT_READ_ERRORS as error:
        if prefixed:
            entry = dataclasses.replace(entry, key=f"{source.root}:{name}")
        return entry, None, str(error) or type(error).__name__
    identity = record.identity or source.default_identity
    key = f"{identity}{IDENTITY_SEPARATOR}{name}" if prefixed else name
    return PlannedSegment(key, index, name, identity), "val" if record.is_val else "train", None


def _shard_jobs(cfg: Config, output: Path, splits: dict[str, list[PlannedSegment]], skip_bad: bool) -> list[ShardJob]:
    per_shard = cfg.data.segments_per_shard
    jobs = []
    for split in SPLITS:
        entries = splits[split]
        for index, start in enumerate(range(0, len(entries), per_shard)):
            jobs.append(ShardJob(output / shard_file_name(cfg.pack.name, split, index), split,
                                 tuple(entries[start:start + per_shard]), cfg.data, cfg.mel, skip_bad))
    return jobs


def _write_shards(jobs: list[ShardJob], executor: Executor | None, progress: bool) -> list[dict[str, Any]]:
    """Sidecars of all jobs in order: reused where the shard on disk is intact, written otherwise."""
    sidecars: list[dict[str, Any] | None] = [_reusable_sidecar(job) for job in jobs]
    pending = [index for index, sidecar in enumerate(sidecars) if sidecar is None]
    results = _map(_write_shard, [jobs[index] for index in pending], executor)
    for index, sidecar in tqdm(zip(pending, results), total=len(pending), desc="shards", unit="shard",
                               disable=not progress):
        sidecars[index] = sidecar
    return sidecars


def _reusable_sidecar(job: ShardJob) -> dict[str, Any] | None:
    """The sidecar of an intact shard written by the same plan without bad segments, else None."""
    sidecar_path = _sidecar_path(job.path)
    if not job.path.is_file() or not sidecar_path.is_file():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("plan") != job.plan():
        return None
    if sidecar.get("bad") or sidecar.get("bytes") != job.path.stat().st_size:
        return None
    return sidecar if sidecar.get("sha256") == file_sha256(job.path) else None


def _write_shard(job: ShardJob) -> dict[str, Any]:
    """Write one shard and its sidecar; without skip_bad a shard with a bad segment is not written at all."""
    temporary = job.path.with_name(f".{job.path.name}.{os.getpid()}.tmp")
    sources = job.data_cfg.per_source()
    identities: dict[str, dict[str, Any]] = {}  # name -> its segments, frames and statistics in this shard
    dims: dict[str, int] = {}
    bad = []
    samples = frames = 0
    try:
        with reporting_disk_errors(job.path), tarfile.open(temporary, "w:", format=tarfile.PAX_FORMAT) as tar:
            for entry in job.entries:
                source = sources[entry.source]
                try:
                    record = read_segment_record(source, entry.name)
                    identity = record.identity or source.default_identity
                    if identity != entry.identity:
                        raise ValueError(f"identity {identity!r}; the pack was planned with {entry.identity!r} "
                                         f"(the data changed while packing)")
                    segment = align_segment(record, job.mel_cfg, job.data_cfg.participant_mel)
                    stored = _stored_streams(segment)
                except SEGMENT_READ_ERRORS as error:
                    bad.append({"segment": entry.key, "reason": str(error) or type(error).__name__})
                    continue
                if bad and not job.skip_bad:
                    continue  # this shard will not be kept; keep reading only to report every bad segment
                bounds = chunk_bounds(segment.frames, job.max_chunk_frames)
                totals = identities.setdefault(identity, {"segments": 0, "frames": 0,
                                                          "stats": empty_stats()})
                totals["segments"] += 1
                for chunk, (start, end) in enumerate(bounds):
                    arrays = {stream: values[start:end] for stream, values in stored.items()}
                    if "expression_valid" in arrays and arrays["expression_valid"].all():
                        del arrays["expression_valid"]
                    add_members(tar, encode_sample(entry.key, chunk, len(bounds), start, arrays,
                                                   frame_rate=job.mel_cfg.frame_rate, layout=source.layout,
                                                   split=job.split, identity=identity))
                    accumulate(totals["stats"], arrays)
                    samples += 1
                    frames += end - start
                    totals["frames"] += end - start
                dims.update({stream: values.shape[1] for stream, values in stored.items() if values.ndim == 2})
        if bad and not job.skip_bad:
            return _sidecar(job, samples, frames, dims, identities, bad, tar=None)
        sidecar = _sidecar(job, samples, frames, dims, identities, bad, tar=temporary)
        os.replace(temporary, job.path)
    finally:
        temporary.unlink(missing_ok=True)
    _write_json(_sidecar_path(job.path), sidecar)
    return sidecar


def _stored_streams(segment: AlignedSegment) -> dict[str, np.ndarray]:
    """The segment's streams in their stored dtypes; raises ValueError when a value overflows float16."""
    streams = {"mel": segment.mel, "expression": segment.expression, "pose": segment.pose,
               "tokens": segment.tokens, "expression_valid": segment.expression_valid}
    streams.update({stream: getattr(segment, stream) for stream in OPTIONAL_STREAMS
                    if getattr(segment, stream) is not None})
    stored = {}
    for stream, values in streams.items():
        with np.errstate(over="ignore"):  # an overflow becomes inf, reported below with the segment's name
            converted = np.ascontiguousarray(values, dtype=STORED_DTYPES[stream])
        if converted.dtype != np.bool_ and not np.isfinite(converted).all():
            raise ValueError(f"segment {segment.name}: {stream} has values beyond the {converted.dtype} range "
                             f"(largest magnitude {np.abs(values).max():.6g}); expected finite values that fit")
        stored[stream] = converted
    return stored


def _sidecar(job: ShardJob, samples: int, frames: int, dims: dict[str, int], identities: dict[str, dict[str, Any]],
             bad: list[dict[str, str]], tar: Path | None) -> dict[str, Any]:
    """The shard's summary, with each identity's segments, frames and sufficient statistics; `tar` None for a
    shard abandoned because of a bad segment."""
    return {
        "format": SIDECAR_FORMAT,
        "file": job.path.name,
        "plan": job.plan(),
        "samples": samples,
        "frames": frames,
        "bytes": tar.stat().st_size if tar is not None else 0,
        "sha256": file_sha256(tar) if tar is not None else "",
        "dims": dims,
        "bad": bad,
        "identities": {name: {"segments": totals["segments"], "frames": totals["frames"],
                              "stats": listed_stats(totals["stats"])} for name, totals in sorted(identities.items())},
    }


def _sidecar_path(shard: Path) -> Path:
    return shard.with_name(f"{shard.name}.json")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1) + "\n")


def _remove_stale_temporaries(output: Path, name: str) -> None:
    """Delete temporary files an interrupted pack left behind (this pack's naming only)."""
    for path in [*output.glob(f".{name}-*.tmp"), *output.glob(f".{MANIFEST}.*.tmp")]:
        path.unlink(missing_ok=True)


def _remove_unplanned_shards(output: Path, name: str, planned: set[str]) -> None:
    """Delete shards of an earlier, larger pack under this name, so a glob over the folder sees only this one."""
    pattern = re.compile(rf"{re.escape(name)}-({'|'.join(SPLITS)})-\d{{6}}\.tar")
    for path in output.glob(f"{name}-*.tar"):
        if pattern.fullmatch(path.name) and path.name not in planned:
            path.unlink()
            _sidecar_path(path).unlink(missing_ok=True)


def _bad_report(cfg: Config, bad: list[dict[str, str]]) -> str:
    lines = [f"{entry['segment']}: {entry['reason']}" for entry in bad]
    return (f"{_dataset_name(cfg.data)}: {len(bad)} bad segment(s) (pack.skip_bad=true skips and counts them):\n"
            + "\n".join(lines))
