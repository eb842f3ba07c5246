"""Conditional optimal-transport flow matching: the path, the per-part L1 loss, and ODE samplers.

Path x_t = (1 - (1 - sigma_min) t) x0 + t x1 with x0 ~ N(0, I). The network predicts the velocity v;
the loss is L1 on x1_pred = v + (1 - sigma_min) x0, split into expression, head latent and mel parts
with configurable weights (published: 1, 0.2, 3). Sampling integrates dx/dt = v from t = 0 to 1 on a
uniform grid (Euler or midpoint) for all samples of all inputs as one batch; optional classifier-free
guidance mixes conditional and unconditional velocities (the unconditional branch sees zeroed
conditioning, which training produces with `cond_dropout`).
The published path, loss weights and sampler settings: docs/reference.md, "Flow matching".
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from avflow.config import FlowConfig, ModelConfig, SampleConfig

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def ot_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float) -> torch.Tensor:
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return (1 - (1 - sigma_min) * t) * x0 + t * x1


def state_parts(model_cfg: ModelConfig) -> dict[str, slice]:
    """Slices of the state vector: expression, head latent, mel."""
    e, h = model_cfg.expression_dim, model_cfg.head_latent_dim
    return {"expression": slice(0, e), "head": slice(e, e + h), "mel": slice(e + h, e + h + model_cfg.mel_dim)}


def drop_condition(cond: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero the whole conditioning of each sequence with the given probability (CFG training)."""
    if probability <= 0:
        return cond
    keep = torch.rand(cond.shape[0], device=cond.device, generator=generator) >= probability
    return cond * keep.view(-1, 1, 1).to(cond.dtype)


def masked_mean(values: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, T, D) over frames where frame_mask (B, T) is true and all D."""
    weights = frame_mask.to(values.dtype)[..., None]
    return (values * weights).sum() / (weights.sum() * values.shape[-1]).clamp_min(1.0)


def flow_matching_loss(velocity_fn: VelocityFn, x1: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor,
                       flow_cfg: FlowConfig, model_cfg: ModelConfig, expression_valid: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted per-part L1 loss for one batch; returns (total, {part: loss}).

    valid (B, T): real (unpadded) frames. expression_valid (B, T): frames whose expression code is data
    (capture gaps are excluded from the expression term only).
    """
    batch = x1.shape[0]
    t = torch.rand(batch, device=x1.device, generator=generator)
    x0 = torch.randn(x1.shape, device=x1.device, generator=generator, dtype=x1.dtype)
    xt = ot_path(x0, x1, t, flow_cfg.sigma_min)
    cond = drop_condition(cond, flow_cfg.cond_dropout, generator)
    velocity = velocity_fn(xt, t, cond, valid)
    x1_pred = velocity.float() + (1 - flow_cfg.sigma_min) * x0.float()
    error = (x1_pred - x1.float()).abs()
    parts_slices = state_parts(model_cfg)
    expression_mask = valid if expression_valid is None else valid & expression_valid
    parts = {
        "expression": masked_mean(error[..., parts_slices["expression"]], expression_mask),
        "head": masked_mean(error[..., parts_slices["head"]], valid),
        "mel": masked_mean(error[..., parts_slices["mel"]], valid),
    }
    total = (flow_cfg.expression_weight * parts["expression"] + flow_cfg.head_weight * parts["head"]
             + flow_cfg.mel_weight * parts["mel"])
    return total, parts


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


def integrate(velocity_fn: VelocityFn, x0: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor | None,
              method: str, nfe: int) -> torch.Tensor:
    """Integrate from t=0 to 1 with `nfe` network evaluations (midpoint: nfe / 2 steps of 2), in x0's dtype.

    The one fixed-step loop (`FixedStepSampler`) that inference, export, validation samples, evaluation and
    the text-to-tokens decoder all run, here for any callable velocity.
    """
    return FixedStepSampler(velocity_fn, method, nfe, x0.dtype)(x0, cond, valid).to(x0.dtype)


@torch.no_grad()
def sample(velocity_fn: VelocityFn, cond: torch.Tensor, valid: torch.Tensor | None, state_dim: int,
           sample_cfg: SampleConfig, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draw sample_cfg.num_samples samples for each input as one batch: (B, N, T, state_dim).

    `noise` (B * N, T, state_dim) replaces the drawn unit noise (it is still scaled by the temperature).
    """
    batch, length, _ = cond.shape
    n = sample_cfg.num_samples
    cond_n = cond.repeat_interleave(n, dim=0)
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=cond.device)
    valid_n = valid.repeat_interleave(n, dim=0)
    if noise is None:
        noise = torch.randn(batch * n, length, state_dim, device=cond.device, dtype=cond.dtype, generator=generator)
    x0 = sample_cfg.temperature * noise
    x1 = integrate(guided(velocity_fn, sample_cfg.guidance_scale), x0, cond_n, valid_n, sample_cfg.method,
                   sample_cfg.nfe)
    return x1.view(batch, n, length, state_dim)


def window_spans(frames: int, max_frames: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of at most max_frames covering [0, frames), consecutive ones sharing at least `overlap` frames.

    The last window is shifted back to end at `frames`, so no window is short.
    """
    if not 0 <= overlap < max_frames:
        raise ValueError(f"window overlap: expected 0 <= overlap < {max_frames} (the window), got {overlap}")
    if frames <= max_frames:
        return [(0, frames)]
    step = max_frames - overlap
    starts = list(range(0, frames - max_frames, step)) + [frames - max_frames]
    return [(start, start + max_frames) for start in starts]


def crossfade_weights(spans: list[tuple[int, int]], frames: int) -> list[torch.Tensor]:
    """Per-window frame weights: linear ramps across each overlap (normalized by their sum when stitching,
    since the shifted last window can overlap two earlier ones)."""
    weights = []
    for index, (start, end) in enumerate(spans):
        weight = torch.ones(end - start)
        if index > 0 and spans[index - 1][1] > start:
            shared = spans[index - 1][1] - start
            weight[:shared] = torch.arange(1, shared + 1) / (shared + 1)
        if index + 1 < len(spans) and spans[index + 1][0] < end:
            shared = end - spans[index + 1][0]
            weight[-shared:] = torch.minimum(weight[-shared:], torch.arange(shared, 0, -1) / (shared + 1))
        weights.append(weight)
    return weights


def sampler_steps(method: str, nfe: int) -> int:
    """Steps of the fixed-step loop for `nfe` network evaluations: Euler one per step, midpoint two."""
    steps = nfe if method == "euler" else nfe // 2
    if method not in ("euler", "midpoint") or steps < 1 or (method == "midpoint" and nfe % 2):
        raise ValueError("sampler: expected euler with nfe >= 1 or midpoint with even nfe >= 2, "
                         f"got {method} nfe={nfe}")
    return steps


class FixedStepSampler(nn.Module):
    """`integrate` as a module with its schedule fixed, so it can be scripted (TorchScript) or captured whole.

    The state is carried in float32 while `velocity` may run in a lower precision (`dtype`): the
    per-step increments are small, and accumulating them in bf16 would lose them.
    """

    def __init__(self, velocity: nn.Module, method: str, nfe: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        steps = sampler_steps(method, nfe)
        self.velocity = velocity
        self.midpoint = method == "midpoint"
        self.steps = steps
        self.dtype = dtype

    def _v(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.velocity(x.to(self.dtype), t.to(self.dtype), cond, valid).float()

    def forward(self, x0: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x0.float()
        cond = cond.to(self.dtype)
        dt = 1.0 / self.steps
        for step in range(self.steps):
            # built on the state's device each step (a CPU buffer would not follow the network to the GPU);
            # dense, as compiled artifacts assume
            t = torch.full([x.shape[0]], float(step) * dt, dtype=torch.float32, device=x.device)
            if self.midpoint:
                half = x + 0.5 * dt * self._v(x, t, cond, valid)
                x = x + dt * self._v(half, t + 0.5 * dt, cond, valid)
            else:
                x = x + dt * self._v(x, t, cond, valid)
        return x
