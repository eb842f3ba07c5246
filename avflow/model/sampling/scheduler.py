"""The batched scheduler: the windows of many inputs packed into few shapes for one sampling loop.

The published sampler runs one sample at a time. Here the scheduler cuts inputs into windows (`WindowPlan`),
rounds each window up to a length bucket, and packs windows of one bucket into batches, padding frames (masked
out of attention) and, for fixed-shape artifacts, whole rows. Few shapes are what let inference capture the
loop once per shape as a CUDA graph (avflow.infer.sampler.GraphSampler) and replay it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from avflow.config import SampleConfig
from avflow.model.sampling.methods import FixedStepSampler, guided
from avflow.model.sampling.windows import WindowPlan, sequence_noise, stitch

# x0 (rows, frames, state), cond (rows, frames, cond), valid (rows, frames) -> x1 (rows, frames, state)
LoopFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# one window's samples (N, frames, D) -> what is cross-faded in their place (N, frames, D')
WindowMap = Callable[[torch.Tensor], torch.Tensor]


def length_buckets(max_frames: int, count: int) -> list[int]:
    """`count` window lengths evenly spaced up to max_frames: every window is padded to the next one."""
    if count < 1:
        raise ValueError(f"length buckets: expected at least 1, got {count}")
    return sorted({max(1, math.ceil(max_frames * k / count)) for k in range(1, count + 1)})


def bucket_for(frames: int, buckets: list[int]) -> int:
    for bucket in buckets:
        if frames <= bucket:
            return bucket
    raise ValueError(f"a window of {frames} frames is longer than the largest bucket ({buckets[-1]})")


def row_buckets(max_rows: int, samples: int) -> list[int]:
    """Batch row counts a sampler call is padded up to: the samples of 1, 2, 4, ... inputs, and max_rows.

    Few shapes (one compiled graph and one CUDA graph each) without padding one input's samples to a full batch.
    """
    if not 1 <= samples <= max_rows:
        raise ValueError(f"{samples} samples per input do not fit a batch of {max_rows} rows")
    counts, rows = [], samples
    while rows < max_rows:
        counts.append(rows)
        rows *= 2
    return counts + [max_rows - max_rows % samples]


def sample_windows(sampler: LoopFn, jobs: list[tuple[torch.Tensor, torch.Tensor]], length: int,
                   total_rows: int | None = None) -> list[torch.Tensor]:
    """One sampler call for windows of at most `length` frames: jobs of (noise (N, frames, D), cond (frames, C))
    padded to `length` frames (masked out of attention) and to `total_rows` rows -> each window's (N, frames, D)."""
    samples = jobs[0][0].shape[0]
    rows = len(jobs) * samples
    total_rows = total_rows or rows
    noise, cond = jobs[0]
    x0 = noise.new_zeros(total_rows, length, noise.shape[-1])
    conds = cond.new_zeros(total_rows, length, cond.shape[-1])
    valid = torch.zeros(total_rows, length, dtype=torch.bool, device=noise.device)
    for slot, (noise, cond) in enumerate(jobs):
        rows_of = slice(slot * samples, (slot + 1) * samples)
        x0[rows_of, :cond.shape[0]] = noise
        conds[rows_of, :cond.shape[0]] = cond
        valid[rows_of, :cond.shape[0]] = True
    x1 = sampler(x0, conds, valid)
    return [x1[slot * samples:(slot + 1) * samples, :cond.shape[0]] for slot, (_, cond) in enumerate(jobs)]


def sample_sequences(sampler: LoopFn, conds: list[torch.Tensor], noises: list[torch.Tensor], max_frames: int,
                     overlap: int, buckets: list[int], max_rows: int, row_counts: list[int] | None = None,
                     window_map: WindowMap | None = None) -> list[torch.Tensor]:
    """Sample every input: conds[i] (T_i, C) with noises[i] (N, T_i, D) (already temperature-scaled) -> (N, T_i, D).

    Inputs longer than max_frames are cut into overlapping windows that share the input's one noise
    sequence and are cross-faded afterwards, so any length works with memory bounded by one batch.
    `window_map` turns each window's samples into what is cross-faded instead (N, frames, D'): what depends on
    a whole window, such as the head poses its head latents decode to (avflow.model.state.StateDecoder).
    Windows of one length bucket go through the sampler together, max_rows sequences (windows x N
    samples) at a time; with `row_counts` every batch is padded with empty rows up to the next row count
    in it (fixed-shape artifacts pass [max_rows]), so the sampler sees few distinct shapes.
    """
    if len(conds) != len(noises):
        raise ValueError(f"{len(conds)} conditioning sequences but {len(noises)} noise tensors")
    samples = noises[0].shape[0] if noises else 0
    if samples > max_rows:
        raise ValueError(f"{samples} samples per input do not fit a batch of {max_rows} rows")
    plan = WindowPlan(max_frames, overlap)
    spans = [plan.spans(cond.shape[0]) for cond in conds]
    by_bucket: dict[int, list[tuple[int, int]]] = {}
    for item, item_spans in enumerate(spans):
        for window, (start, end) in enumerate(item_spans):
            by_bucket.setdefault(bucket_for(end - start, buckets), []).append((item, window))
    windows: dict[tuple[int, int], torch.Tensor] = {}
    per_batch = max_rows // samples if samples else 1
    for length, jobs in sorted(by_bucket.items()):
        for first in range(0, len(jobs), per_batch):
            chunk = jobs[first:first + per_batch]
            rows = len(chunk) * samples
            total_rows = rows if row_counts is None else min(count for count in row_counts if count >= rows)
            inputs = []
            for item, window in chunk:
                start, end = spans[item][window]
                inputs.append((noises[item][:, start:end], conds[item][start:end]))
            for (item, window), result in zip(chunk, sample_windows(sampler, inputs, length, total_rows)):
                windows[item, window] = result if window_map is None else window_map(result)
    return [stitch(spans[item], [windows[item, w] for w in range(len(spans[item]))], 0, cond.shape[0])
            for item, cond in enumerate(conds)]


def sample_sequence(velocity: Callable, cond: torch.Tensor, state_dim: int, sample_cfg: SampleConfig,
                    seed: int, window_map: WindowMap | None = None) -> torch.Tensor:
    """sample_cfg.num_samples samples (N, T, state_dim) of one conditioning sequence (T, C) with any velocity
    function, windowed, from the noise of `seed` and cross-faded as inference samples it: training validation
    sees what `avflow evaluate` and `generate` produce for the same weights and seed."""
    loop = FixedStepSampler(guided(velocity, sample_cfg.guidance_scale), sample_cfg.method, sample_cfg.nfe)
    noise = sample_cfg.temperature * sequence_noise(seed, sample_cfg.num_samples, cond.shape[0], state_dim)
    with torch.no_grad():
        return sample_sequences(loop, [cond], [noise.to(cond.device)], sample_cfg.max_frames,
                                sample_cfg.window_overlap, [sample_cfg.max_frames], sample_cfg.num_samples,
                                window_map=window_map)[0]
