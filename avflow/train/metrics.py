"""Training throughput metrics: model FLOPs per frame, model FLOPs utilization (MFU), GPU memory."""

from __future__ import annotations

import torch

from avflow.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; MFU is reported only for known devices.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def training_flops_per_frame(cfg: ModelConfig, parameters: int) -> float:
    """6 x parameters (forward + backward matmuls) plus the banded attention scores and mixing.

    Per block and frame, attention forward is 2 matmuls of d x window multiply-adds (4 d w FLOPs);
    backward doubles it again twice, so 12 d w. Two streams of n_blocks blocks each.
    """
    window = cfg.window_back + cfg.window_ahead + 1
    return 6 * parameters + 2 * cfg.n_blocks * 12 * cfg.d_model * window


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in PEAK_BF16_FLOPS.items() if fragment in name), None)


def gpu_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
