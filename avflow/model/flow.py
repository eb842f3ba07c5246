"""Conditional optimal-transport flow matching: the path and the per-part L1 loss.

Path x_t = (1 - (1 - sigma_min) t) x0 + t x1 with x0 ~ N(0, I). The network predicts the velocity v;
the loss is L1 on x1_pred = v + (1 - sigma_min) x0, split into expression, head latent and mel parts
with configurable weights (published: 1, 0.2, 3). Sampling (integrating dx/dt = v from t = 0 to 1) lives in
avflow.model.sampling. The published path, loss weights and sampler settings: docs/reference.md, "Flow matching".
"""

from __future__ import annotations

from typing import Callable

import torch

from avflow.config import FlowConfig, ModelConfig

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
