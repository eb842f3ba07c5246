"""Training metrics: model FLOPs per frame, MFU, GPU memory, the device-side step window and its logger."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from avflow.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; MFU is reported only for known devices.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def per_sequence_parameters(cfg: ModelConfig) -> int:
    """Parameters applied once per sequence, not per frame: the time embedding MLP and every adaLN Linear
    (they map the time embedding, one vector per sequence). 25.5M of the published 67.9M."""
    d = cfg.d_model
    time_embedding = (2 * cfg.time_freqs * d + d) + (d * d + d)
    ada_ln = 2 * cfg.n_blocks * 2 * (d * 3 * d + 3 * d)  # two streams, two sublayers per block
    return time_embedding + ada_ln


def training_flops_per_frame(cfg: ModelConfig, parameters: int) -> float:
    """Model FLOPs per trained frame: 6 x the per-frame parameters (forward + backward matmuls) plus the banded
    attention scores and mixing. The per-sequence parameters cost 6 x their count per sequence, a negligible
    share per frame (1 / 345 of it at the published window), and are left out.

    Per block and frame, attention forward is 2 matmuls of d x window multiply-adds (4 d w FLOPs);
    backward doubles it again twice, so 12 d w. Two streams of n_blocks blocks each.
    """
    window = cfg.window_back + cfg.window_ahead + 1
    return 6 * (parameters - per_sequence_parameters(cfg)) + 2 * cfg.n_blocks * 12 * cfg.d_model * window


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in PEAK_BF16_FLOPS.items() if fragment in name), None)


def gpu_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class StepMetrics:
    """Loss parts, frames and gradient norms accumulated on the training device between logging steps.

    Adding a step launches device ops only: no host sync, and no host value copied to the device (a pageable
    copy waits for the device too). `flush` reduces the window over ranks with one all-reduce (on the training
    device, as NCCL requires), reads it back once, and resets. A non-finite loss is remembered on the device by
    its micro-batch's place in the window, counted there, and raised at the next flush with that micro-batch's
    step (the loop flushes before every checkpoint, so a checkpoint never holds weights trained on it).
    """

    def __init__(self, loss_parts: tuple[str, ...], device: torch.device, reduce_sum, reduce_min):
        self.names = ("loss", *(f"loss_{part}" for part in loss_parts))
        self.device = device
        self.reduce_sum, self.reduce_min = reduce_sum, reduce_min
        self._reset()

    def _reset(self) -> None:
        # loss and its parts, frames, gradient norm (summed over steps)
        self.sums = torch.zeros(len(self.names) + 2, dtype=torch.float64, device=self.device)
        # place in the window of the first micro-batch with a non-finite loss, and that loss
        self.first_bad = torch.full((2,), math.inf, dtype=torch.float64, device=self.device)
        self.micro_batch_index = torch.zeros((), dtype=torch.float64, device=self.device)  # counted on the device
        self.micro_batch_steps: list[int] = []  # the step of each micro-batch in the window, on the host
        self.steps = 0
        self.data_wait_s = 0.0

    def add_micro_batch(self, step: int, loss: torch.Tensor, parts: list[torch.Tensor], frames: torch.Tensor) -> None:
        values = torch.stack([loss.detach(), *(part.detach() for part in parts)]).double()
        self.sums[:len(self.names)] += values
        self.sums[-2] += frames.sum()
        bad = ~torch.isfinite(values[0]) & torch.isinf(self.first_bad[0])
        self.first_bad.copy_(torch.where(bad, torch.stack([self.micro_batch_index, values[0]]), self.first_bad))
        self.micro_batch_index += 1
        self.micro_batch_steps.append(step)

    def add_step(self, grad_norm: torch.Tensor | float, data_wait_s: float) -> None:
        self.sums[-1] += grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else grad_norm
        self.steps += 1
        self.data_wait_s += data_wait_s

    def flush(self, world_size: int) -> dict[str, float]:
        """Means over this window's steps (loss parts also over ranks), its frames summed over ranks."""
        sums = self.reduce_sum(self.sums.clone()).tolist()
        first_bad = self.reduce_min(self.first_bad.clone()).tolist()
        micro_batch_steps, steps, wait = self.micro_batch_steps, self.steps, self.data_wait_s
        self._reset()
        if math.isfinite(first_bad[0]):
            raise FloatingPointError(f"step {micro_batch_steps[int(first_bad[0])]}: the loss is {first_bad[1]} "
                                     "on at least one rank")
        micro = len(micro_batch_steps)
        metrics = {name: sums[i] / max(1, micro * world_size) for i, name in enumerate(self.names)}
        metrics.update(frames=sums[-2], grad_norm=sums[-1] / max(1, steps), data_wait_s=wait / max(1, steps),
                       steps=steps)
        return metrics


class MetricsLogger:
    """Everything the loop reports: the device-side step window (`StepMetrics`), and at each flush the
    throughput, step time, MFU and GPU memory derived from it, written to TensorBoard by rank 0."""

    def __init__(self, steps: StepMetrics, run_dir: Path, is_main: bool, flops_per_frame: float,
                 device: torch.device, world_size: int):
        self.steps = steps
        self.flops_per_frame, self.device, self.world_size = flops_per_frame, device, world_size
        self.peak = peak_flops(device)
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.window_start = time.perf_counter()

    def flush(self, step: int, **extra: float) -> dict[str, float]:
        """Read the window back (one all-reduce, one host sync), derive its rates, write them under train/."""
        metrics = self.steps.flush(self.world_size)
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        metrics["frames_per_s"] = metrics.pop("frames") / elapsed
        metrics["step_time_s"] = elapsed / max(1, metrics.pop("steps"))
        if self.peak is not None:
            metrics["mfu"] = metrics["frames_per_s"] * self.flops_per_frame / (self.peak * self.world_size)
        memory = gpu_memory_gib(self.device)
        if memory is not None:
            metrics["gpu_memory_gib"] = memory
        metrics.update(extra)
        self.write("train", metrics, step)
        self.window_start = time.perf_counter()
        return metrics

    def write(self, section: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{section}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
