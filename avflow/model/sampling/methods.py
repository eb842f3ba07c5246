"""Sampling methods, each with its declared time grid, and the one fixed-step loop that runs them.

A method is an explicit Runge-Kutta scheme on a uniform grid of steps over t in [0, 1]: per step of size h
from t, stage i evaluates the velocity at t + nodes[i] * h on x + h * sum_j coupling[i][j] * k_j, and the
step adds h * sum_i weights[i] * k_i. The times at which the network is evaluated (the method's time grid)
follow from its nodes and the step count, so whatever is precomputed per step time (`PreparedVelocity`) is
built from the same grid the loop walks: a new method is one entry in METHODS.
"""

from dataclasses import dataclass
from typing import Callable, List

import torch
from torch import nn

from avflow.model.attention import prepare_key_mask
from avflow.model.avflow import AVFlowNet

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class SamplingMethod:
    """An explicit Runge-Kutta scheme: its Butcher tableau (nodes c, coupling a, weights b)."""

    name: str
    nodes: tuple[float, ...]
    coupling: tuple[tuple[float, ...], ...]  # row i: the weights of stages 0..i-1 in stage i's input
    weights: tuple[float, ...]

    @property
    def evaluations_per_step(self) -> int:
        return len(self.nodes)

    def steps(self, nfe: int) -> int:
        """Steps of the loop for `nfe` network evaluations."""
        per_step = self.evaluations_per_step
        if nfe < per_step or nfe % per_step:
            raise ValueError(f"sampler: {self.name} evaluates the network {per_step} time(s) per step, so nfe must be "
                             f"a positive multiple of {per_step}; got nfe={nfe}")
        return nfe // per_step

    def time_grid(self, nfe: int) -> list[float]:
        """Every time the loop evaluates the network at, ascending and without repeats."""
        steps = self.steps(nfe)
        return sorted({(step + node) / steps for step in range(steps) for node in self.nodes})


METHODS: dict[str, SamplingMethod] = {
    "euler": SamplingMethod("euler", nodes=(0.0,), coupling=((),), weights=(1.0,)),
    "midpoint": SamplingMethod("midpoint", nodes=(0.0, 0.5), coupling=((), (0.5,)), weights=(0.0, 1.0)),
}


def sampling_method(name: str) -> SamplingMethod:
    if name not in METHODS:
        raise ValueError(f"sampler method: expected one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


class Guided(nn.Module):
    """Classifier-free guidance: v = v_uncond + scale * (v_cond - v_uncond), both in one batch.

    The unconditional branch sees zeroed conditioning, which training produces with `cond_dropout`.
    """

    def __init__(self, velocity: VelocityFn, scale: float):
        super().__init__()
        self.velocity = velocity
        self.scale = scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        both = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]),
                             torch.cat([valid, valid]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


def guided(velocity_fn: VelocityFn, scale: float) -> VelocityFn:
    """`velocity_fn` itself without guidance (scale 1, as published), else its guided mixture."""
    return velocity_fn if scale == 1.0 else Guided(velocity_fn, scale)


class FixedStepSampler(nn.Module):
    """The one fixed-step loop (inference, export, validation, evaluation and the text-to-tokens decoder all run
    it): integrates dx/dt = velocity from t = 0 to 1 with a registered method. A module with its schedule
    fixed, so it can be scripted (TorchScript) or captured whole.

    The state is carried in float32 while `velocity` may run in a lower precision (`dtype`): the per-step
    increments are small, and accumulating them in bf16 would lose them.
    """

    # declared for TorchScript, which cannot infer the type of an empty row (and reads no string annotations:
    # this file has no `from __future__ import annotations`)
    nodes: List[float]
    coupling: List[List[float]]
    weights: List[float]

    def __init__(self, velocity: nn.Module, method: str, nfe: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        scheme = sampling_method(method)
        self.velocity = velocity
        self.steps = scheme.steps(nfe)
        self.nodes = list(scheme.nodes)
        self.coupling = [list(row) for row in scheme.coupling]
        self.weights = list(scheme.weights)
        self.dtype = dtype

    def _v(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.velocity(x.to(self.dtype), t.to(self.dtype), cond, valid).float()

    def forward(self, x0: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x0.float()
        cond = cond.to(self.dtype)
        dt = 1.0 / self.steps
        for step in range(self.steps):
            stages: List[torch.Tensor] = []
            for stage in range(len(self.nodes)):
                stage_input = x
                for earlier in range(len(self.coupling[stage])):
                    if self.coupling[stage][earlier] != 0.0:
                        stage_input = stage_input + dt * self.coupling[stage][earlier] * stages[earlier]
                # built on the state's device each step (a CPU buffer would not follow the network to the GPU);
                # dense, as compiled artifacts assume
                t = torch.full([x.shape[0]], (float(step) + self.nodes[stage]) * dt, dtype=torch.float32,
                               device=x.device)
                stages.append(self._v(stage_input, t, cond, valid))
            for stage in range(len(self.weights)):
                if self.weights[stage] != 0.0:
                    x = x + dt * self.weights[stage] * stages[stage]
        return x


def integrate(velocity_fn: VelocityFn, x0: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor | None,
              method: str, nfe: int) -> torch.Tensor:
    """`FixedStepSampler` for any callable velocity, in x0's dtype."""
    return FixedStepSampler(velocity_fn, method, nfe, x0.dtype)(x0, cond, valid).to(x0.dtype)


class PreparedVelocity(nn.Module):
    """An AVFlowNet prepared for a fixed-step sampler: what depends only on the step times or on the padding is
    computed once instead of at every network evaluation.

    - Time conditioning: the time embedding and every block's adaLN modulation for every time of the method's
      time grid are computed here, once; a call looks its time up as the nearest grid time. The loop calls
      with one time for all rows (the same step for every sequence).
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
        parameter = next(net.parameters())
        times = torch.tensor(sampling_method(method).time_grid(nfe), device=parameter.device, dtype=torch.float32)
        self.register_buffer("times", times, persistent=False)
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
        index = (t.float()[:, None] - self.times[None]).abs().argmin(dim=1)
        forward = self.compiled_forward or self.net
        return forward(x, None, cond, self.key_mask(valid), self.modulation[index])
