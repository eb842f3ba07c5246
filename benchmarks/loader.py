"""Training windows per second from packed shards vs. from the raw dataset layout, and packing speed, per CPU core.

    python benchmarks/loader.py                  # window 345 frames, batch 16, as in training
    python benchmarks/loader.py --seconds 20     # longer timing runs

Writes the demo corpus (default CorpusConfig) into a temporary folder and packs it with one worker (timed:
hours of audio per minute). Then times, in one process with one torch thread (so per core):
- shards: `training_batches` with loader.num_workers=0, the packed path training uses;
- raw: per window, `read_segment_record` + `align_segment` of a random train segment and a random crop,
  stacked into the same batch tensors: what a loader without packing has to do.
Both read files the corpus writer just wrote, so both are served from the page cache.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from avflow.config import Config, CorpusConfig
from avflow.data.align_streams import align_segment
from avflow.data.corpus import write_corpus
from avflow.data.layouts import read_segment_record
from avflow.data.layouts.fifty_h import is_validation
from avflow.data.loader import assemble_batch, training_batches
from avflow.data.pack import pack


def windows_per_second(next_batch, batch_size: int, seconds: float) -> float:
    """Windows per second over whole batches for at least `seconds`, after one warm-up batch."""
    next_batch()
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next_batch()
        batches += 1
    return batches * batch_size / (time.perf_counter() - start)


def raw_batch_maker(cfg: Config, names: list[str], dims: dict[str, int], rng: np.random.Generator):
    """A function building one batch the unpacked way: read + align one random segment per window."""
    window, batch_size = cfg.loader.segment_length, cfg.trainer.batch_size
    streams = tuple(dims)

    def next_batch() -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(batch_size):
            aligned = align_segment(read_segment_record(cfg.data, names[rng.integers(len(names))]), cfg.mel)
            arrays = {stream: getattr(aligned, stream) for stream in streams}
            arrays["expression_valid"] = aligned.expression_valid
            start = int(rng.integers(0, max(aligned.frames - window, 0) + 1))
            rows.append((arrays, start, min(window, aligned.frames)))
        return assemble_batch(rows, window, dims, streams)

    return next_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=345, help="frames per training window")
    parser.add_argument("--batch", type=int, default=16, help="windows per batch")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing run length per path")
    parser.add_argument("--pack-repeats", type=int, default=3, help="packing runs; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Config()
    cfg.loader.segment_length = args.window
    cfg.trainer.batch_size = args.batch
    cfg.pack.workers = 1

    with tempfile.TemporaryDirectory(prefix="avflow-loader-bench-") as scratch:
        cfg.data.root = str(Path(scratch) / "corpus")
        names = write_corpus(cfg.data.root, CorpusConfig())
        pack_minutes = []
        for repeat in range(args.pack_repeats):  # each into a fresh folder: pack reuses intact shards
            shard_dir = Path(scratch) / f"shards{repeat}"
            start = time.perf_counter()
            manifest = pack(cfg, shard_dir, workers=1, progress=False)
            pack_minutes.append((time.perf_counter() - start) / 60)
        splits = manifest["splits"]
        hours = splits["train"]["hours"] + splits["val"]["hours"]

        shard_stream = iter(training_batches(shard_dir, cfg))
        from_shards = windows_per_second(lambda: next(shard_stream), args.batch, args.seconds)
        train_names = [name for name in names if not is_validation(name, cfg.data.val_patterns)]
        raw_next = raw_batch_maker(cfg, train_names, dict(manifest["dims"]), np.random.default_rng(0))
        from_raw = windows_per_second(raw_next, args.batch, args.seconds)

    print(f"$ python {shlex.join(sys.argv)}")
    train = splits["train"]
    print(f"demo corpus: {len(names)} segments, {hours * 60:.1f} min of audio; {train['samples']} train samples "
          f"(mean {train['frames'] / train['samples']:.0f} frames) in {len(train['shards'])} shards; "
          f"window {args.window} frames, batch {args.batch}; torch threads 1, torch {torch.__version__}")
    print("| path | windows/s per core |")
    print("|---|---|")
    print(f"| shards (training_batches, num_workers=0) | {from_shards:.0f} |")
    print(f"| raw layout (read_segment_record + align_segment per window) | {from_raw:.1f} |")
    print(f"| speed-up of shards | {from_shards / from_raw:.1f}x |")
    minutes = statistics.median(pack_minutes)
    print(f"packing: {hours * 60:.1f} min of audio in {minutes * 60:.2f} s (median of {args.pack_repeats}) with 1 "
          f"worker = {hours / minutes:.2f} h of audio per minute per core")


if __name__ == "__main__":
    main()
