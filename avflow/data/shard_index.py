"""Random access to packed shards (avflow.data.shard_format) from their headers alone.

`open_split` reads a split's shard list from the manifest; `scan_shard` walks one tar's members and reads
each sample's JSON header and the headers of its .npy members, which give every array's offset, dtype and
shape without decoding a value. A `SampleRef` is therefore enough to plan training windows (avflow.data.loader
does, for exact resume) and to read the sample's arrays later with `read_arrays`, which checks them against
the sha256 recorded at pack time. Bad samples are counted by `BadSampleCounter`, which stops a pass once
more than loader.max_bad_fraction of what it read was bad.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

from avflow.config import Config, LoaderConfig
from avflow.data.shard_format import (
    MANIFEST,
    OPTIONAL_STREAMS,
    REQUIRED_STREAMS,
    SAMPLE_CHECKSUM,
    identities,
    load_manifest,
    sample_identity,
)

log = logging.getLogger(__name__)

ARRAY_STREAMS = (*REQUIRED_STREAMS, *OPTIONAL_STREAMS)
EXPRESSION_MASK = "expression_valid"
MIN_SAMPLES_FOR_BAD_FRACTION = 20  # a fraction over fewer samples says little about the data
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class BadDataError(ValueError):
    """More unreadable samples than loader.max_bad_fraction allows, or no readable sample left to train on."""


@dataclass(frozen=True)
class StoredArray:
    """Where one .npy member's values lie in its shard, as its header says."""

    offset: int
    dtype: str
    shape: tuple[int, ...]
    fortran_order: bool
    member: tuple[int, int]  # [start, end) of the whole .npy member in the shard
    sha256: str | None  # of the member's bytes, as recorded at pack time (None in shards packed without it)


@dataclass(frozen=True, eq=False)
class SampleRef:
    """A sample located from its headers alone: enough to plan its windows and to read its arrays later.

    Compared by identity: each read of a shard (one per epoch) makes new SampleRefs.
    """

    shard: str
    key: str
    frames: int
    start: int  # [start, end): the bytes of the shard that hold all its arrays
    end: int
    arrays: dict[str, StoredArray]
    identity: str  # as its header records it (DEFAULT_IDENTITY in shards packed before identities)


@dataclass(frozen=True)
class ShardList:
    """One split's non-empty shards, as the manifest lists them, the width of every stream, and the sorted names
    of the manifest's identities (a batch's "identity" indexes them)."""

    directory: Path
    paths: tuple[str, ...]
    samples: tuple[int, ...]
    dims: dict[str, int]
    identities: tuple[str, ...]

    @property
    def feature_streams(self) -> tuple[str, ...]:
        return tuple(stream for stream in ARRAY_STREAMS if stream in self.dims)

    def identity_index(self, sample: SampleRef) -> int:
        """The sample's identity as an index into `identities` (scan_shard given them skips any other)."""
        return self.identities.index(sample.identity)


class BadSampleCounter:
    """Samples seen and bad for one consumer; raises BadDataError once bad / seen exceeds the allowed fraction."""

    def __init__(self, max_fraction: float, source: str):
        self.max_fraction = max_fraction
        self.source = source
        self.seen = 0
        self.bad = 0
        self.last_problem = ""
        self.bad_per_shard: dict[str, int] = {}

    def record_good(self) -> None:
        self.seen += 1
        self._check()

    def record_bad(self, shard: str, key: str, reason: str, count: int = 1, already_seen: bool = False) -> None:
        """Log and count `count` bad samples; `already_seen` for a sample that passed the header scan earlier."""
        log.warning("%s: skipping sample %s: %s", shard, key, reason)
        self.bad += count
        self.seen += 0 if already_seen else count
        self.last_problem = f"{shard}: {key}: {reason}"
        self.bad_per_shard[shard] = self.bad_per_shard.get(shard, 0) + count
        self._check()

    def _check(self) -> None:
        if self.seen >= MIN_SAMPLES_FOR_BAD_FRACTION and self.bad > self.max_fraction * self.seen:
            raise BadDataError(f"{self.source}: {self.bad} of {self.seen} samples read are bad, more than "
                               f"loader.max_bad_fraction={self.max_fraction}; {self.shard_summary()}; "
                               f"last: {self.last_problem}")

    def shard_summary(self) -> str:
        """Which shards the bad samples came from (what to repack or replace)."""
        if not self.bad_per_shard:
            return "no shard named"
        return "bad samples in " + ", ".join(f"{shard} ({count})"
                                             for shard, count in sorted(self.bad_per_shard.items()))


def open_split(shard_dir: str | os.PathLike, split: str, cfg: Config | None = None) -> ShardList:
    """The shards of `split` in `shard_dir`, checked to exist and, given `cfg`, to match its stream widths."""
    directory = Path(shard_dir)
    manifest = load_manifest(directory)
    manifest_path = directory / MANIFEST
    dims = {stream: int(width) for stream, width in manifest["dims"].items()}
    missing = [stream for stream in REQUIRED_STREAMS if stream not in dims]
    if missing:
        raise ValueError(f"{manifest_path}: dims lacks {', '.join(missing)}; expected every one of "
                         f"{', '.join(REQUIRED_STREAMS)}")
    if cfg is not None:
        _check_against_config(manifest, dims, manifest_path, cfg)
    entries = [entry for entry in manifest["splits"][split]["shards"] if entry["samples"] > 0]
    paths = tuple(str(directory / entry["file"]) for entry in entries)
    absent = [path for path in paths if not os.path.isfile(path)]
    if absent:
        raise FileNotFoundError(f"{manifest_path} lists {len(absent)} {split} shard(s) that do not exist: "
                                + ", ".join(absent))
    return ShardList(directory, paths, tuple(int(entry["samples"]) for entry in entries), dims,
                     tuple(identities(manifest)))


def _check_against_config(manifest: dict[str, Any], dims: dict[str, int], manifest_path: Path, cfg: Config) -> None:
    expected = {"mel": ("model.mel_dim", cfg.model.mel_dim),
                "expression": ("model.expression_dim", cfg.model.expression_dim),
                "tokens": ("model.token_dim", cfg.model.token_dim),
                "pose": ("head_vae.pose_dim", cfg.head_vae.pose_dim)}
    for stream, (field_name, width) in expected.items():
        if dims[stream] != width:
            raise ValueError(f"{manifest_path}: {stream} has {dims[stream]} dims per frame; {field_name}={width} "
                             f"expects the same (repack the data or change the config)")
    if not math.isclose(float(manifest["frame_rate"]), cfg.mel.frame_rate, rel_tol=1e-9):
        raise ValueError(f"{manifest_path}: frame_rate {manifest['frame_rate']}; the mel config gives "
                         f"{cfg.mel.frame_rate} frames per second (repack with this mel config)")


def scan_shard(path: str, expected_samples: int, dims: dict[str, int], counter: BadSampleCounter,
               identities: tuple[str, ...] | None = None) -> list[SampleRef]:
    """Locate every sample of a shard from tar, JSON and .npy headers, skipping (and counting) bad ones: given
    the manifest's `identities`, a sample of any other identity is bad too.

    A corrupt or truncated tar is logged by path; the samples the manifest lists beyond the readable part count
    as bad.
    """
    refs: list[SampleRef] = []
    groups = 0
    problem = ""
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for key, members in _member_groups(tar):
                groups += 1
                try:
                    refs.append(_locate_sample(path, key, members, tar, handle, dims, identities))
                except ValueError as error:
                    counter.record_bad(path, key, str(error))
                    continue
                counter.record_good()
    except (tarfile.TarError, OSError) as error:
        problem = f"corrupt or truncated shard ({error})"
    if groups < expected_samples and not problem:
        problem = f"corrupt or truncated shard (its tar ends after {groups} samples)"
    if problem:
        log.error("%s: %s; the manifest lists %d samples", path, problem, expected_samples)
    if groups < expected_samples:
        counter.record_bad(path, f"{expected_samples - groups} sample(s) after the first {groups}", problem,
                           count=expected_samples - groups)
    return refs


def _member_groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {suffix: member}) per run of consecutive members sharing a key (WebDataset's sample grouping)."""
    key, members = None, {}
    for info in tar:
        member_key, _, suffix = info.name.partition(".")
        if member_key != key:
            if key is not None:
                yield key, members
            key, members = member_key, {}
        members[suffix] = info
    if key is not None:
        yield key, members


def _locate_sample(path: str, key: str, members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile, handle,
                   dims: dict[str, int], identities: tuple[str, ...] | None) -> SampleRef:
    """The sample's SampleRef, or ValueError saying which member is missing or malformed."""
    if "json" not in members:
        raise ValueError(f"no {key}.json header")
    header = json.loads(tar.extractfile(members["json"]).read())
    frames = header.get("frames") if isinstance(header, dict) else None
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"{key}.json: expected a positive integer 'frames', got {frames!r}")
    identity = sample_identity(header)
    if not isinstance(identity, str) or (identities is not None and identity not in identities):
        expected = "a name" if identities is None else "one the manifest lists (" + ", ".join(identities) + ")"
        raise ValueError(f"{key}.json: identity {identity!r}; expected {expected}")
    wanted = {stream: (frames, width) for stream, width in dims.items() if stream in ARRAY_STREAMS}
    if f"{EXPRESSION_MASK}.npy" in members:
        wanted[EXPRESSION_MASK] = (frames,)
    digests = header.get(SAMPLE_CHECKSUM, {})
    if not isinstance(digests, dict):
        raise ValueError(f"{key}.json: expected '{SAMPLE_CHECKSUM}' to map streams to digests, got {digests!r}")
    arrays, spans = {}, []
    for stream, shape in wanted.items():
        info = members.get(f"{stream}.npy")
        if info is None:
            raise ValueError(f"no {key}.{stream}.npy member")
        arrays[stream] = _locate_array(handle, info, shape, stream, digests.get(stream))
        spans.append((info.offset_data, info.offset_data + info.size))
    return SampleRef(path, key, frames, min(start for start, _ in spans), max(end for _, end in spans), arrays,
                     identity)


def _locate_array(handle, info: tarfile.TarInfo, shape: tuple[int, ...], stream: str,
                  sha256: str | None) -> StoredArray:
    """Read one .npy member's header and check its shape, dtype and size against what the sample needs."""
    handle.seek(info.offset_data)
    version = np.lib.format.read_magic(handle)
    if version not in NPY_HEADER_READERS:
        raise ValueError(f"{info.name}: .npy format version {version}; expected 1.0 or 2.0")
    stored_shape, fortran_order, dtype = NPY_HEADER_READERS[version](handle)
    wanted_kind = "b" if stream == EXPRESSION_MASK else "f"
    if stored_shape != shape or dtype.kind != wanted_kind:
        raise ValueError(f"{info.name}: {dtype} {stored_shape}; expected {'bool' if wanted_kind == 'b' else 'float'} "
                         f"{shape}")
    offset = handle.tell()
    if offset + math.prod(shape) * dtype.itemsize != info.offset_data + info.size:
        raise ValueError(f"{info.name}: member holds {info.size} bytes, its header implies "
                         f"{offset - info.offset_data + math.prod(shape) * dtype.itemsize}")
    return StoredArray(offset, dtype.str, shape, fortran_order, (info.offset_data, info.offset_data + info.size),
                       sha256)


def read_arrays(sample: SampleRef) -> dict[str, np.ndarray]:
    """Decode a located sample's arrays; ValueError or OSError when they cannot be read, differ from their
    recorded checksum or are not finite."""
    with open(sample.shard, "rb") as handle:
        handle.seek(sample.start)
        data = handle.read(sample.end - sample.start)
    expected = sample.end - sample.start
    if len(data) != expected:
        raise ValueError(f"read {len(data)} of {expected} bytes (the shard was shortened after it was scanned)")
    arrays = {}
    for stream, stored in sample.arrays.items():
        if stored.sha256 is not None:
            member = memoryview(data)[stored.member[0] - sample.start:stored.member[1] - sample.start]
            if hashlib.sha256(member).hexdigest() != stored.sha256:
                raise ValueError(f"{stream} bytes differ from their {SAMPLE_CHECKSUM} recorded at pack time "
                                 f"(the shard is corrupted)")
        values = np.frombuffer(data, dtype=stored.dtype, count=math.prod(stored.shape),
                               offset=stored.offset - sample.start)
        values = values.reshape(stored.shape[::-1]).T if stored.fortran_order else values.reshape(stored.shape)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"{stream} has non-finite values")
        arrays[stream] = values
    return arrays


def read_or_record_bad(sample: SampleRef, counter: BadSampleCounter,
                       record: bool = True) -> dict[str, np.ndarray] | None:
    """The sample's arrays, or None (logged and counted when `record`) when they cannot be read."""
    try:
        return read_arrays(sample)
    except (ValueError, OSError) as error:
        if record:
            counter.record_bad(sample.shard, sample.key, str(error), already_seen=True)
        return None


class StoredSample(NamedTuple):
    """One whole sample read outside training: its key, its identity and {stream: array}."""

    key: str
    identity: str
    arrays: dict[str, np.ndarray]


def iter_split_arrays(shard_dir: str | os.PathLike, split: str, streams: tuple[str, ...] = REQUIRED_STREAMS,
                      max_bad_fraction: float = LoaderConfig.max_bad_fraction) -> Iterator[dict[str, np.ndarray]]:
    """Every readable sample of `split` in shard order, as {stream: whole-sample array} (float32; bool mask).

    For passes over the data outside training, such as fitting the head-pose VAE; `iter_split_samples` also
    names each sample's identity.
    """
    return (sample.arrays for sample in iter_split_samples(shard_dir, split, streams, max_bad_fraction))


def iter_split_samples(shard_dir: str | os.PathLike, split: str, streams: tuple[str, ...] = REQUIRED_STREAMS,
                       max_bad_fraction: float = LoaderConfig.max_bad_fraction) -> Iterator[StoredSample]:
    """Every readable sample of `split` in shard order with its key and identity (to group results by identity)."""
    shards = open_split(shard_dir, split)
    available = set(shards.feature_streams) | {EXPRESSION_MASK}
    unknown = [stream for stream in streams if stream not in available]
    if unknown:
        raise ValueError(f"{shards.directory / MANIFEST}: no stream {', '.join(unknown)}; expected some of "
                         f"{', '.join(sorted(available))}")
    counter = BadSampleCounter(max_bad_fraction, f"{shards.directory} {split} split")
    for path, samples in zip(shards.paths, shards.samples):
        for sample in scan_shard(path, samples, shards.dims, counter, shards.identities):
            arrays = read_or_record_bad(sample, counter)
            if arrays is not None:
                yield StoredSample(sample.key, sample.identity,
                                   {stream: _whole_stream(arrays, stream, sample.frames) for stream in streams})


def _whole_stream(arrays: dict[str, np.ndarray], stream: str, frames: int) -> np.ndarray:
    if stream == EXPRESSION_MASK:
        return np.array(arrays[stream]) if stream in arrays else np.ones(frames, dtype=bool)
    return arrays[stream].astype(np.float32)
