"""Streaming of packed shards (avflow.data.shards) into training and validation batches.

Training is an infinite stream per rank, a pure function of (seed, rank, worker, position):

- Consumers. Rank r's DataLoader worker w is consumer c = r * W + w of C = world_size * W (W = data.num_workers,
  1 without workers). In epoch e the train shards are permuted with rng(seed, e) and dealt c::C, so consumers
  read disjoint shards; with fewer shards than consumers each consumer draws one shard per epoch with
  rng(seed, e, c) instead, so none runs dry and no rank waits for another.
- Windows. A consumer's samples pass a shuffle buffer (data.shuffle_buffer); each sample gives
  ceil(frames / window) random crops, a shorter one a single zero-padded crop. Crops are drawn from a pool of
  batch_size samples at a time, so a batch mixes several samples even when each sample is a minute long.
  Batches are assembled inside the worker, so every batch comes from one worker and the DataLoader delivers
  the workers' batches round-robin.
- Position. Every random choice is made from tar, JSON and .npy headers only, never from array values, so
  resuming at batch n replays the plan of the batches before n without decoding a single array. A bad sample
  visible in its headers (missing member, wrong shape or dtype) is skipped; one that fails only when its arrays
  are read (bytes that differ from the sha256 its header recorded at pack time, non-finite values, read error)
  keeps its windows in the batch as padding (valid all False), so the batch layout never depends on array values.

Validation is finite: shard i belongs to rank i % world_size, a rank's shards are split across its workers,
and each sample is tiled into consecutive windows, so every validation sample is read exactly once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avflow.config import Config, DataConfig
from avflow.data.shards import MANIFEST, OPTIONAL_STREAMS, REQUIRED_STREAMS, SAMPLE_CHECKSUM, load_manifest

log = logging.getLogger(__name__)

ARRAY_STREAMS = (*REQUIRED_STREAMS, *OPTIONAL_STREAMS)
EXPRESSION_MASK = "expression_valid"
MIN_SAMPLES_FOR_BAD_FRACTION = 20  # a fraction over fewer samples says little about the data
BARREN_SHARDS_PER_SHARD = 20  # consecutive shard reads without a readable sample, per train shard, before giving up
SHARD_ORDER, SAMPLE_ORDER, SHARD_DRAW = 0, 1, 2  # tags that keep the random streams of one seed apart
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class BadDataError(ValueError):
    """More unreadable samples than data.max_bad_fraction allows, or no readable sample left to train on."""


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


@dataclass(frozen=True)
class ShardList:
    """One split's non-empty shards, as the manifest lists them, and the width of every stream."""

    directory: Path
    paths: tuple[str, ...]
    samples: tuple[int, ...]
    dims: dict[str, int]

    @property
    def feature_streams(self) -> tuple[str, ...]:
        return tuple(stream for stream in ARRAY_STREAMS if stream in self.dims)


@dataclass(frozen=True)
class WindowPlan:
    """One training window: which sample, where; a read failure is counted at the sample's first crop, and its
    arrays are dropped after its last."""

    sample: SampleRef
    start: int
    length: int
    first: bool
    last: bool


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
                               f"data.max_bad_fraction={self.max_fraction}; {self.shard_summary()}; "
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
    return ShardList(directory, paths, tuple(int(entry["samples"]) for entry in entries), dims)


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


def scan_shard(path: str, expected_samples: int, dims: dict[str, int], counter: BadSampleCounter) -> list[SampleRef]:
    """Locate every sample of a shard from tar, JSON and .npy headers, skipping (and counting) bad ones.

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
                    refs.append(_locate_sample(path, key, members, tar, handle, dims))
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
                   dims: dict[str, int]) -> SampleRef:
    """The sample's SampleRef, or ValueError saying which member is missing or malformed."""
    if "json" not in members:
        raise ValueError(f"no {key}.json header")
    header = json.loads(tar.extractfile(members["json"]).read())
    frames = header.get("frames") if isinstance(header, dict) else None
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"{key}.json: expected a positive integer 'frames', got {frames!r}")
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
    return SampleRef(path, key, frames, min(start for start, _ in spans), max(end for _, end in spans), arrays)


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


def assemble_batch(rows: list[tuple[dict[str, np.ndarray] | None, int, int]], window: int,
                   dims: dict[str, int], streams: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Stack (arrays, start, length) windows into float32 (B, window, D) tensors with frame masks.

    Rows whose arrays are None (a sample that failed to read) stay zero with every frame invalid.
    """
    batch = {stream: np.zeros((len(rows), window, dims[stream]), dtype=np.float32) for stream in streams}
    valid = np.zeros((len(rows), window), dtype=bool)
    expression_valid = np.zeros((len(rows), window), dtype=bool)
    for row, (arrays, start, length) in enumerate(rows):
        if arrays is None:
            continue
        for stream in streams:
            batch[stream][row, :length] = arrays[stream][start:start + length]
        valid[row, :length] = True
        mask = arrays.get(EXPRESSION_MASK)
        expression_valid[row, :length] = True if mask is None else mask[start:start + length]
    tensors = {stream: torch.from_numpy(values) for stream, values in batch.items()}
    return {**tensors, "valid": torch.from_numpy(valid), "expression_valid": torch.from_numpy(expression_valid)}


def _shuffled_forever(items: Iterator[SampleRef], size: int, rng: np.random.Generator) -> Iterator[SampleRef]:
    """Shuffle-buffer an infinite stream: each arrival replaces a uniformly drawn buffered item, which is emitted."""
    buffer: list[SampleRef] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item


def _worker_id_and_count(num_workers: int) -> tuple[int, int]:
    """(this DataLoader worker's id, workers per rank), (0, 1) in a loader without workers."""
    info = get_worker_info()
    workers = max(num_workers, 1)
    if info is None:
        return 0, workers
    if info.num_workers != workers:
        raise RuntimeError(f"shard stream built for data.num_workers={num_workers} runs in a DataLoader with "
                           f"{info.num_workers} workers")
    return info.id, workers


BAD_DATA_KEY = "bad_data_error"


def _passing_bad_data(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield the batches; a BadDataError ends them as one last {BAD_DATA_KEY: message} item instead, so that
    it crosses from a DataLoader worker as its plain message (a raised one would carry the worker's
    traceback text) and `_raising_bad_data` raises it again in the consuming process."""
    try:
        yield from batches
    except BadDataError as error:
        yield {BAD_DATA_KEY: str(error)}


def _raising_bad_data(batch: dict[str, Any]) -> dict[str, Any]:
    if BAD_DATA_KEY in batch:
        raise BadDataError(batch[BAD_DATA_KEY])
    return batch


class TrainingShards(IterableDataset):
    """The infinite window-batch stream of one rank, from `resume_batches` on (see the module docstring)."""

    def __init__(self, shards: ShardList, data_cfg: DataConfig, batch_size: int, seed: int, rank: int, world_size: int):
        if not shards.paths:
            raise ValueError(f"{shards.directory / MANIFEST}: no train shard with samples; expected at least one")
        if seed < 0:
            raise ValueError(f"trainer.seed: expected a non-negative integer for the shard stream, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank}: expected 0 <= rank < world_size={world_size}")
        self.shards = shards
        self.window = data_cfg.segment_length
        self.num_workers = data_cfg.num_workers
        self.consumers_per_rank = max(data_cfg.num_workers, 1)
        self.shuffle_buffer = data_cfg.shuffle_buffer
        self.max_bad_fraction = data_cfg.max_bad_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.resume_batches = 0
        self.resume_bad = [0] * self.consumers_per_rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker_id, workers = _worker_id_and_count(self.num_workers)
        # The DataLoader starts every iteration at worker 0, while batch n of the stream belongs to worker n % W:
        # rotating roles makes worker 0 continue the stream at batch resume_batches.
        return _passing_bad_data(self._role_batches((worker_id + self.resume_batches) % workers))

    def _role_batches(self, role: int) -> Iterator[dict[str, torch.Tensor]]:
        consumer = self.rank * self.consumers_per_rank + role
        already_delivered = max(0, math.ceil((self.resume_batches - role) / self.consumers_per_rank))
        counter = BadSampleCounter(self.max_bad_fraction, f"{self.shards.directory} train stream, consumer {consumer}")
        rng = np.random.default_rng((self.seed, SAMPLE_ORDER, consumer))
        plans = self._window_plans(consumer, self.world_size * self.consumers_per_rank, counter, rng)
        decoded: dict[SampleRef, dict[str, np.ndarray] | None] = {}  # arrays of the pool's samples, read on demand
        for index in itertools.count():
            batch_plans = list(itertools.islice(plans, self.batch_size))
            if index < already_delivered:
                if index == already_delivered - 1:
                    counter.bad = max(counter.bad, self.resume_bad[role])  # read failures the skipped batches hit
                continue
            rows = []
            for plan in batch_plans:
                if plan.sample not in decoded:
                    decoded[plan.sample] = read_or_record_bad(plan.sample, counter, record=plan.first)
                rows.append((decoded.pop(plan.sample) if plan.last else decoded[plan.sample], plan.start, plan.length))
            batch = assemble_batch(rows, self.window, self.shards.dims, self.shards.feature_streams)
            yield {**batch, "bad_samples": torch.tensor(counter.bad, dtype=torch.int64)}

    def _window_plans(self, consumer: int, consumers: int, counter: BadSampleCounter,
                      rng: np.random.Generator) -> Iterator[WindowPlan]:
        samples = _shuffled_forever(self._sample_refs(consumer, consumers, counter), self.shuffle_buffer, rng)
        pool: list[list[WindowPlan]] = []  # the remaining crops of up to batch_size samples
        while True:
            while len(pool) < self.batch_size:
                pool.append(self._crops(next(samples), rng))
            slot = int(rng.integers(len(pool)))
            yield pool[slot].pop(0)
            if not pool[slot]:
                pool.pop(slot)

    def _crops(self, sample: SampleRef, rng: np.random.Generator) -> list[WindowPlan]:
        if sample.frames <= self.window:
            return [WindowPlan(sample, 0, sample.frames, True, True)]
        count = math.ceil(sample.frames / self.window)
        starts = rng.integers(0, sample.frames - self.window + 1, size=count)
        return [WindowPlan(sample, int(start), self.window, crop == 0, crop == count - 1)
                for crop, start in enumerate(starts)]

    def _sample_refs(self, consumer: int, consumers: int, counter: BadSampleCounter) -> Iterator[SampleRef]:
        barren_limit = BARREN_SHARDS_PER_SHARD * len(self.shards.paths)
        barren = 0
        for epoch in itertools.count():
            for index in self.epoch_shards(epoch, consumer, consumers):
                refs = scan_shard(self.shards.paths[index], self.shards.samples[index], self.shards.dims, counter)
                barren = 0 if refs else barren + 1
                if barren >= barren_limit:
                    raise BadDataError(f"{self.shards.directory}: no readable sample in {barren} consecutive train "
                                       f"shard reads; {counter.shard_summary()}; last problem: {counter.last_problem}")
                yield from refs

    def epoch_shards(self, epoch: int, consumer: int, consumers: int) -> list[int]:
        """Indices of the train shards `consumer` reads in `epoch`."""
        count = len(self.shards.paths)
        if count >= consumers:
            order = np.random.default_rng((self.seed, SHARD_ORDER, epoch)).permutation(count)
            return [int(index) for index in order[consumer::consumers]]
        return [int(np.random.default_rng((self.seed, SHARD_DRAW, epoch, consumer)).integers(count))]


class TrainingBatches:
    """One rank's infinite training stream: iterate for batches; state_dict / load_state_dict resume it exactly.

    Each batch also carries "bad_samples", the cumulative count of bad samples of the worker that built it;
    `bad_samples` sums the latest counts of all workers of this rank.
    """

    def __init__(self, dataset: TrainingShards):
        self.dataset = dataset
        self._delivered = 0
        self._bad_per_worker = [0] * dataset.consumers_per_rank
        self._loader: DataLoader | None = None
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self._iterator is None:
                self.dataset.resume_batches = self._delivered
                self.dataset.resume_bad = list(self._bad_per_worker)
                self._loader = _data_loader(self.dataset, self.dataset.num_workers)
                self._iterator = iter(self._loader)
            batch = _raising_bad_data(next(self._iterator))
            self._bad_per_worker[self._delivered % self.dataset.consumers_per_rank] = int(batch["bad_samples"])
            self._delivered += 1
            yield batch

    @property
    def bad_samples(self) -> int:
        return sum(self._bad_per_worker)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._delivered, "bad_samples_per_worker": list(self._bad_per_worker),
                "num_workers": self.dataset.num_workers, "world_size": self.dataset.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at batch state["batches"]; the stream depends on data.num_workers and the world size, so both
        must be what they were when the state was saved."""
        batches = state.get("batches")
        if not isinstance(batches, int) or batches < 0:
            raise ValueError(f"loader state: expected a non-negative integer 'batches', got {batches!r}")
        saved = (state.get("num_workers", self.dataset.num_workers), state.get("world_size", self.dataset.world_size))
        current = (self.dataset.num_workers, self.dataset.world_size)
        if saved != current:
            raise ValueError(f"loader state: saved with data.num_workers={saved[0]} and world size {saved[1]}, this "
                             f"run has {current[0]} and {current[1]}; resume with the same values to continue the "
                             f"same stream")
        workers = self.dataset.consumers_per_rank
        bad = state.get("bad_samples_per_worker", [0] * workers)
        if len(bad) != workers:
            raise ValueError(f"loader state: bad_samples_per_worker has {len(bad)} entries; expected {workers}")
        self._delivered = batches
        self._bad_per_worker = [int(count) for count in bad]
        self._loader = self._iterator = None


def _data_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    # The stream's randomness is its own (seeded per consumer); a private generator keeps the DataLoader
    # from drawing on the global torch RNG, whose state the trainer checkpoints and restores.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))


def training_batches(shard_dir: str | os.PathLike, cfg: Config, rank: int = 0, world_size: int = 1) -> TrainingBatches:
    """The training stream of `rank` of `world_size` over the train shards in `shard_dir`."""
    shards = open_split(shard_dir, "train", cfg)
    return TrainingBatches(TrainingShards(shards, cfg.data, cfg.trainer.batch_size, cfg.trainer.seed, rank, world_size))


class ValidationShards(IterableDataset):
    """A rank's share of the validation samples, each tiled into consecutive windows, in a fixed order."""

    def __init__(self, shards: ShardList, data_cfg: DataConfig, batch_size: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank}: expected 0 <= rank < world_size={world_size}")
        self.shards = shards
        self.window = data_cfg.segment_length
        self.num_workers = data_cfg.num_workers
        self.max_bad_fraction = data_cfg.max_bad_fraction
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return _passing_bad_data(self._batches())

    def _batches(self) -> Iterator[dict[str, Any]]:
        worker_id, workers = _worker_id_and_count(self.num_workers)
        mine = list(range(self.rank, len(self.shards.paths), self.world_size))[worker_id::workers]
        counter = BadSampleCounter(self.max_bad_fraction, f"{self.shards.directory} validation, rank {self.rank} "
                                                          f"worker {worker_id}")
        rows, keys = [], []
        for index in mine:
            for sample in scan_shard(self.shards.paths[index], self.shards.samples[index], self.shards.dims, counter):
                arrays = read_or_record_bad(sample, counter)
                if arrays is None:
                    continue
                for start in range(0, sample.frames, self.window):
                    rows.append((arrays, start, min(self.window, sample.frames - start)))
                    keys.append(sample.key)
                    if len(rows) == self.batch_size:
                        yield self._batch(rows, keys, counter)
                        rows, keys = [], []
        if rows:
            yield self._batch(rows, keys, counter)

    def _batch(self, rows, keys: list[str], counter: BadSampleCounter) -> dict[str, Any]:
        batch = assemble_batch(rows, self.window, self.shards.dims, self.shards.feature_streams)
        return {**batch, "keys": list(keys), "bad_samples": torch.tensor(counter.bad, dtype=torch.int64)}


class ValidationBatches:
    """Re-iterable: each pass yields this rank's validation batches once; "keys" names each row's sample."""

    def __init__(self, dataset: ValidationShards):
        self.dataset = dataset
        self._loader: DataLoader | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._loader is None:
            self._loader = _data_loader(self.dataset, self.dataset.num_workers)
        return map(_raising_bad_data, self._loader)


def validation_batches(shard_dir: str | os.PathLike, cfg: Config, rank: int = 0,
                       world_size: int = 1) -> ValidationBatches:
    """The validation batches of `rank` of `world_size`: val shard i is read by rank i % world_size only.

    Ranks may get different numbers of batches, so reduce validation sums across ranks after the loop.
    """
    shards = open_split(shard_dir, "val", cfg)
    return ValidationBatches(ValidationShards(shards, cfg.data, cfg.trainer.batch_size, rank, world_size))


def iter_split_arrays(shard_dir: str | os.PathLike, split: str, streams: tuple[str, ...] = REQUIRED_STREAMS,
                      max_bad_fraction: float = DataConfig.max_bad_fraction) -> Iterator[dict[str, np.ndarray]]:
    """Every readable sample of `split` in shard order, as {stream: whole-sample array} (float32; bool mask).

    For passes over the data outside training, such as fitting the head-pose VAE.
    """
    shards = open_split(shard_dir, split)
    available = set(shards.feature_streams) | {EXPRESSION_MASK}
    unknown = [stream for stream in streams if stream not in available]
    if unknown:
        raise ValueError(f"{shards.directory / MANIFEST}: no stream {', '.join(unknown)}; expected some of "
                         f"{', '.join(sorted(available))}")
    counter = BadSampleCounter(max_bad_fraction, f"{shards.directory} {split} split")
    for path, samples in zip(shards.paths, shards.samples):
        for sample in scan_shard(path, samples, shards.dims, counter):
            arrays = read_or_record_bad(sample, counter)
            if arrays is not None:
                yield {stream: _whole_stream(arrays, stream, sample.frames) for stream in streams}


def _whole_stream(arrays: dict[str, np.ndarray], stream: str, frames: int) -> np.ndarray:
    if stream == EXPRESSION_MASK:
        return np.array(arrays[stream]) if stream in arrays else np.ones(frames, dtype=bool)
    return arrays[stream].astype(np.float32)
