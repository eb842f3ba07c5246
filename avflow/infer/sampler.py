"""The CUDA-graph runner of inference: the whole fixed-step sampling loop (every network evaluation of every step)
captured once per input shape as one CUDA graph and replayed, so a pass costs one launch instead of thousands of
small kernels. The scheduler (avflow.model.sampling) keeps the shapes few. On CPU, or with AVFLOW_NO_CUDA_GRAPH=1,
the same loop runs eagerly.
"""

from __future__ import annotations

import logging
import os

import torch

from avflow.model.sampling import LoopFn

log = logging.getLogger(__name__)

NO_CUDA_GRAPH_ENV = "AVFLOW_NO_CUDA_GRAPH"
GRAPH_WARMUP_RUNS = 3  # lazy work (cuBLAS handles, compiled kernels, TorchScript profiling runs) must precede capture


def cuda_graphs_wanted(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(NO_CUDA_GRAPH_ENV, "").lower() not in ("1", "true", "yes")


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
