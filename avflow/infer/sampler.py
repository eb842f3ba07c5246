"""Inference sampling: the fixed-NFE ODE loop replayed as a CUDA graph, and the scheduler around it.

The published sampler runs one sample at a time in eager mode, launching thousands of small kernels
per pass. Here the whole loop (every network evaluation of every step) is captured once per input
shape as one CUDA graph and replayed, so a pass costs one launch. Shapes are few by design: the
scheduler cuts inputs into windows of at most `max_frames`, rounds each window up to a length bucket,
and packs windows of one bucket into batches, padding frames (masked out of attention) and, for
fixed-shape artifacts, whole rows. On CPU, or with AVFLOW_NO_CUDA_GRAPH=1, the same loop runs eagerly.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import torch
from torch import nn

from avflow.model.attention import prepare_key_mask
from avflow.model.avflow import AVFlowNet
from avflow.model.flow import crossfade_weights, sampler_steps, window_spans

log = logging.getLogger(__name__)

NO_CUDA_GRAPH_ENV = "AVFLOW_NO_CUDA_GRAPH"
GRAPH_WARMUP_RUNS = 3  # lazy work (cuBLAS handles, compiled kernels, TorchScript profiling runs) must precede capture

# x0 (rows, frames, state), cond (rows, frames, cond), valid (rows, frames) -> x1 (rows, frames, state)
LoopFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cuda_graphs_wanted(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(NO_CUDA_GRAPH_ENV, "").lower() not in ("1", "true", "yes")


class PreparedVelocity(nn.Module):
    """An AVFlowNet prepared for a fixed-step sampler: what depends only on the step times or on the padding is
    computed once instead of at every network evaluation.

    - Time conditioning: the time embedding and every block's adaLN modulation for every time on the loop's
      grid (multiples of half a step, which covers Euler and midpoint) are computed here, once; a call looks
      its time up by index. The loop calls with one time for all rows (the same step for every sequence).
    - Attention mask: built once per padding tensor (`valid`) and reused while the same tensor comes back, as
      the static input buffer of a captured CUDA graph does: its FlexAttention block mask reads that buffer,
      so the mask is built at warm-up, outside the graph.
    - `compile`: the whole network is compiled (fullgraph, static shapes), so a graph break is an error, not a
      silent slowdown; `max_shapes` raises Dynamo's recompile limit to the number of (rows, frames) shapes
      the scheduler will use, so none of them falls back to eager.
    """

    def __init__(self, net: AVFlowNet, method: str, nfe: int, compile: bool = False, max_shapes: int = 8):
        super().__init__()
        self.net = net
        self.grid_points = 2 * sampler_steps(method, nfe)
        parameter = next(net.parameters())
        times = torch.arange(self.grid_points, device=parameter.device, dtype=torch.float32) / self.grid_points
        with torch.no_grad():
            self.register_buffer("modulation", net.modulation(times.to(parameter.dtype)), persistent=False)
        self.compiled_forward = torch.compile(net.forward, fullgraph=True, dynamic=False) if compile else None
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, max_shapes)
        self._mask_source: torch.Tensor | None = None
        self._mask = None

    def key_mask(self, valid: torch.Tensor):
        if valid is not self._mask_source:
            cfg = self.net.cfg
            self._mask = prepare_key_mask(valid, cfg.window_back, cfg.window_ahead, cfg.attention, valid.device)
            self._mask_source = valid
        return self._mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        index = (t.float() * self.grid_points).round().long()
        forward = self.compiled_forward or self.net
        return forward(x, None, cond, self.key_mask(valid), self.modulation[index])


class GraphSampler:
    """Runs `loop` eagerly, or on CUDA as one captured graph per input shape, replayed with static buffers.

    Graphs share one memory pool; each replay's output is copied out before the next replay can reuse it.
    If a capture fails (an op that cannot be captured), sampling falls back to eager with a warning
    instead of failing the job: the results are the same, only slower.
    """

    def __init__(self, loop: LoopFn, device: torch.device, use_cuda_graph: bool | None = None):
        self.loop = loop
        self.use_cuda_graph = cuda_graphs_wanted(device) if use_cuda_graph is None else use_cuda_graph
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self.pool = None

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if not self.use_cuda_graph:
            return self.loop(x0, cond, valid)
        key = tuple((tuple(t.shape), t.dtype) for t in (x0, cond, valid))
        if key not in self.graphs:
            inputs = tuple(t.clone() for t in (x0, cond, valid))
            self._warm_up(inputs)  # an error here is the loop's own, not the capture's: it propagates
            try:
                self.graphs[key] = self._capture(inputs)
            except RuntimeError as error:
                log.warning("CUDA graph capture failed (%s); sampling eagerly from now on", error)
                self.use_cuda_graph = False
                return self.loop(x0, cond, valid)
        graph, inputs, output = self.graphs[key]
        for buffer, value in zip(inputs, (x0, cond, valid)):
            buffer.copy_(value)
        graph.replay()
        return output.clone()

    def warm_up(self, lengths: list[int], row_counts: list[int], state_dim: int, cond_dim: int,
                device: torch.device) -> None:
        """Compile and capture every (rows, frames) shape the scheduler will use, before the first request."""
        for length in lengths:
            for rows in row_counts:
                self(torch.zeros(rows, length, state_dim, device=device),
                     torch.zeros(rows, length, cond_dim, device=device),
                     torch.ones(rows, length, dtype=torch.bool, device=device))

    def _warm_up(self, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_RUNS):
                self.loop(*inputs)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, inputs):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.loop(*inputs)
        self.pool = graph.pool()
        return graph, inputs, output


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


def sample_sequences(sampler: LoopFn, conds: list[torch.Tensor], noises: list[torch.Tensor], max_frames: int,
                     overlap: int, buckets: list[int], max_rows: int,
                     row_counts: list[int] | None = None) -> list[torch.Tensor]:
    """Sample every input: conds[i] (T_i, C) with noises[i] (N, T_i, D) (already temperature-scaled) -> (N, T_i, D).

    Inputs longer than max_frames are cut into overlapping windows that share the input's one noise
    sequence and are cross-faded afterwards, so any length works with memory bounded by one batch.
    Windows of one length bucket go through the sampler together, max_rows sequences (windows x N
    samples) at a time; with `row_counts` every batch is padded with empty rows up to the next row count
    in it (fixed-shape artifacts pass [max_rows]), so the sampler sees few distinct shapes.
    """
    if len(conds) != len(noises):
        raise ValueError(f"{len(conds)} conditioning sequences but {len(noises)} noise tensors")
    samples = noises[0].shape[0] if noises else 0
    if samples > max_rows:
        raise ValueError(f"{samples} samples per input do not fit a batch of {max_rows} rows")
    spans = [window_spans(cond.shape[0], max_frames, overlap) for cond in conds]
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
            reference = noises[chunk[0][0]]
            x0 = reference.new_zeros(total_rows, length, reference.shape[-1])
            cond = conds[chunk[0][0]].new_zeros(total_rows, length, conds[chunk[0][0]].shape[-1])
            valid = torch.zeros(total_rows, length, dtype=torch.bool, device=reference.device)
            for slot, (item, window) in enumerate(chunk):
                start, end = spans[item][window]
                rows_of = slice(slot * samples, (slot + 1) * samples)
                x0[rows_of, :end - start] = noises[item][:, start:end]
                cond[rows_of, :end - start] = conds[item][start:end]
                valid[rows_of, :end - start] = True
            x1 = sampler(x0, cond, valid)
            for slot, (item, window) in enumerate(chunk):
                start, end = spans[item][window]
                windows[item, window] = x1[slot * samples:(slot + 1) * samples, :end - start]
    return [stitch(spans[item], [windows[item, w] for w in range(len(spans[item]))], cond.shape[0])
            for item, cond in enumerate(conds)]


def stitch(spans: list[tuple[int, int]], windows: list[torch.Tensor], frames: int) -> torch.Tensor:
    """Cross-fade windows (N, end - start, D) covering [0, frames) into one (N, frames, D) sequence."""
    if len(windows) == 1:
        return windows[0]
    first = windows[0]
    out = first.new_zeros(first.shape[0], frames, first.shape[-1])
    total = first.new_zeros(frames)
    for (start, end), weight, window in zip(spans, crossfade_weights(spans, frames), windows):
        out[:, start:end] += window * weight.to(window).view(1, -1, 1)
        total[start:end] += weight.to(total)
    return out / total.view(1, -1, 1)
