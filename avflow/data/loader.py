"""The stream plan: packed shards, located by avflow.data.shard_index, into training and validation batches.

Training is an infinite stream per rank, a pure function of (seed, rank, worker, position):

- Consumers. Rank r's DataLoader worker w is consumer c = r * W + w of C = world_size * W (W = loader.num_workers,
  1 without workers). In epoch e the train shards are permuted with rng(seed, e) and dealt c::C, so consumers
  read disjoint shards; with fewer shards than consumers each consumer draws one shard per epoch with
  rng(seed, e, c) instead, so none runs dry and no rank waits for another.
- Windows. A consumer's samples pass a shuffle buffer (loader.shuffle_buffer); each sample gives
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

import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avflow.config import Config, LoaderConfig
from avflow.data.shard_format import MANIFEST
from avflow.data.shard_index import (
    EXPRESSION_MASK,
    BadDataError,
    BadSampleCounter,
    SampleRef,
    ShardList,
    open_split,
    read_or_record_bad,
    scan_shard,
)

BARREN_SHARDS_PER_SHARD = 20  # consecutive shard reads without a readable sample, per train shard, before giving up
SHARD_ORDER, SAMPLE_ORDER, SHARD_DRAW = 0, 1, 2  # tags that keep the random streams of one seed apart


@dataclass(frozen=True)
class WindowPlan:
    """One training window: which sample, where; a read failure is counted at the sample's first crop, and its
    arrays are dropped after its last."""

    sample: SampleRef
    start: int
    length: int
    first: bool
    last: bool


def assemble_batch(rows: list[tuple[dict[str, np.ndarray] | None, int, int]], window: int,
                   dims: dict[str, int], streams: tuple[str, ...],
                   identities: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Stack (arrays, start, length) windows into float32 (B, window, D) tensors with frame masks, and each row's
    identity index (`identities`, default all 0) as the LongTensor "identity" (B,).

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
    identity = torch.tensor([0] * len(rows) if identities is None else identities, dtype=torch.int64)
    return {**tensors, "valid": torch.from_numpy(valid), "expression_valid": torch.from_numpy(expression_valid),
            "identity": identity}


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
        raise RuntimeError(f"shard stream built for loader.num_workers={num_workers} runs in a DataLoader with "
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

    def __init__(self, shards: ShardList, loader: LoaderConfig, batch_size: int, seed: int, rank: int, world_size: int):
        if not shards.paths:
            raise ValueError(f"{shards.directory / MANIFEST}: no train shard with samples; expected at least one")
        if seed < 0:
            raise ValueError(f"trainer.seed: expected a non-negative integer for the shard stream, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank}: expected 0 <= rank < world_size={world_size}")
        self.shards = shards
        self.window = loader.segment_length
        self.num_workers = loader.num_workers
        self.consumers_per_rank = max(loader.num_workers, 1)
        self.shuffle_buffer = loader.shuffle_buffer
        self.max_bad_fraction = loader.max_bad_fraction
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
            batch = assemble_batch(rows, self.window, self.shards.dims, self.shards.feature_streams,
                                   [self.shards.identity_index(plan.sample) for plan in batch_plans])
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
                refs = scan_shard(self.shards.paths[index], self.shards.samples[index], self.shards.dims, counter,
                                  self.shards.identities)
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
        """Continue at batch state["batches"]; the stream depends on loader.num_workers and the world size, so both
        must be what they were when the state was saved."""
        batches = state.get("batches")
        if not isinstance(batches, int) or batches < 0:
            raise ValueError(f"loader state: expected a non-negative integer 'batches', got {batches!r}")
        saved = (state.get("num_workers", self.dataset.num_workers), state.get("world_size", self.dataset.world_size))
        current = (self.dataset.num_workers, self.dataset.world_size)
        if saved != current:
            raise ValueError(f"loader state: saved with loader.num_workers={saved[0]} and world size {saved[1]}, this "
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
    return TrainingBatches(TrainingShards(shards, cfg.loader, cfg.trainer.batch_size, cfg.trainer.seed, rank,
                                          world_size))


class ValidationShards(IterableDataset):
    """A rank's share of the validation samples, each tiled into consecutive windows, in a fixed order."""

    def __init__(self, shards: ShardList, loader: LoaderConfig, batch_size: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank}: expected 0 <= rank < world_size={world_size}")
        self.shards = shards
        self.window = loader.segment_length
        self.num_workers = loader.num_workers
        self.max_bad_fraction = loader.max_bad_fraction
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
        rows, samples = [], []
        for index in mine:
            for sample in scan_shard(self.shards.paths[index], self.shards.samples[index], self.shards.dims, counter,
                                     self.shards.identities):
                arrays = read_or_record_bad(sample, counter)
                if arrays is None:
                    continue
                for start in range(0, sample.frames, self.window):
                    rows.append((arrays, start, min(self.window, sample.frames - start)))
                    samples.append(sample)
                    if len(rows) == self.batch_size:
                        yield self._batch(rows, samples, counter)
                        rows, samples = [], []
        if rows:
            yield self._batch(rows, samples, counter)

    def _batch(self, rows, samples: list[SampleRef], counter: BadSampleCounter) -> dict[str, Any]:
        batch = assemble_batch(rows, self.window, self.shards.dims, self.shards.feature_streams,
                               [self.shards.identity_index(sample) for sample in samples])
        return {**batch, "keys": [sample.key for sample in samples],
                "bad_samples": torch.tensor(counter.bad, dtype=torch.int64)}


class ValidationBatches:
    """Re-iterable: each pass yields this rank's validation batches once; "keys" names each row's sample and
    "identity" indexes its identity in the manifest's sorted identity names."""

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
    return ValidationBatches(ValidationShards(shards, cfg.loader, cfg.trainer.batch_size, rank, world_size))
