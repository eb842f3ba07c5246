"""The training loop: one loop for every strategy (none, DDP, FSDP2, DeepSpeed), which only wraps.

AdamW with warmup + cosine, bf16 autocast on CUDA, gradient accumulation and clipping, EMA weights,
validation reduced over ranks, DCP checkpoints with the loader position and per-rank RNG states (so a
resumed run continues exactly where an uninterrupted one would be), TensorBoard from rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from avflow.config import Config
from avflow.model.avflow import count_parameters
from avflow.train.checkpoint import (Checkpointer, checkpoint_config, latest_checkpoint, newest_verified_checkpoint,
                                     read_meta, require_same_model)
from avflow.train.distributed import DistInfo, init_distributed
from avflow.train.metrics import gpu_memory_gib, peak_flops
from avflow.train.parallel import bf16_autocast, build_engine
from avflow.train.tasks import VAL_SEED, build_task, resolved_config

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda: no CUDA device is available")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast when asked, or by default on CUDA; FSDP and DeepSpeed follow the same rule."""
    if bf16_autocast(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio (or constant)."""
    t = cfg.trainer
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the parameters, in the same (possibly sharded) layout as training."""

    def __init__(self, weights: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.params = {name: p.detach().clone().float() for name, p in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor], step: int) -> None:
        """A short warmup of its own, so early checkpoints are not dominated by the random init."""
        effective = min(self.decay, (1 + step) / (10 + step))
        for name, param in weights.items():
            self.params[name].lerp_(param.detach().float(), 1 - effective)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (collective under FSDP: every rank must call it)."""
        return {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in self.params.items()}


class Trainer:
    """Trains the network of cfg.task (avflow.train.tasks) under any strategy; the task supplies model, data and loss."""

    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True, info: DistInfo | None = None):
        cfg = resolved_config(cfg)
        self.cfg = cfg
        self.info = info or init_distributed(cfg)
        self.progress = progress and self.info.is_main
        self.run_dir = Path(cfg.trainer.run_dir)
        existing = latest_checkpoint(self.run_dir)
        if existing is not None and not resume:
            raise FileExistsError(f"trainer.run_dir={self.run_dir} already has checkpoints (newest {existing.name}); "
                                  "pass --resume to continue it or choose another trainer.run_dir")
        self.device = self.info.device  # cuda:LOCAL_RANK unless trainer.device=cpu
        torch.manual_seed(cfg.trainer.seed)  # identical initial weights on every rank
        self.task = build_task(cfg, self.info, self.progress)
        model = self.task.build_model().to(self.device)
        self.parameters = count_parameters(model)
        t = cfg.trainer
        self.engine = build_engine(
            model, cfg, self.info,
            lambda params: torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay),
            lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg)))
        self.ema = EMA(self.engine.ema_source(), t.ema_decay) if t.ema_decay > 0 else None
        torch.manual_seed(cfg.trainer.seed + self.info.rank)  # different flow-matching noise per rank
        self.step = 0
        self.task.load_data()
        self.train_batches = self.task.train_batches
        self.checkpointer = Checkpointer(self.run_dir, t.keep_checkpoints, t.async_checkpoint)
        if existing is not None:
            self._restore(newest_verified_checkpoint(self.run_dir))
        self.train_iter = iter(self.train_batches)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")

    def _tensors(self) -> dict:
        """Everything DCP saves and restores, in the engine's (possibly sharded) layout."""
        return {
            **self.engine.state_dict(),
            "ema": self.ema.params if self.ema is not None else self.engine.full_model_state_dict(),
            **self.task.checkpoint_tensors(),
            f"rng_rank{self.info.rank}": torch.get_rng_state(),
        }

    def _restore(self, path: Path) -> None:
        meta = read_meta(path)
        require_same_model(checkpoint_config(meta, path), self.cfg, path)
        loader_states = meta["loader"]
        if len(loader_states) != self.info.world_size:
            raise ValueError(f"{path}: saved by {len(loader_states)} ranks; resume with the same world size "
                             f"(this run has {self.info.world_size})")
        tensors = self._tensors()
        self.checkpointer.load(path, tensors)
        self.engine.load_state_dict(tensors)
        self.engine.scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors[f"rng_rank{self.info.rank}"])
        self.train_batches.load_state_dict(loader_states[self.info.rank])
        self.step = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step)

    def _all_ranks(self, value: object) -> list:
        if not self.info.is_distributed:
            return [value]
        gathered: list = [None] * self.info.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.info.is_distributed:
            dist.all_reduce(values)
        return values

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over parallel.grad_accumulation micro-batches; metrics are means over ranks."""
        self.engine.model.train()
        accumulation = self.cfg.parallel.grad_accumulation
        parts_count = len(self.task.loss_parts)
        sums = torch.zeros(parts_count + 3, dtype=torch.float64)  # loss, its parts, frames, data-wait seconds
        for micro in range(accumulation):
            wait_start = time.perf_counter()
            batch = self.task.prepare(next(self.train_iter))
            waited = time.perf_counter() - wait_start
            sync = contextlib.nullcontext() if micro == accumulation - 1 else self.engine.no_sync()
            with sync:
                with autocast_context(self.cfg.trainer.precision, self.device):
                    loss, parts = self.task.loss(self.engine.model, batch)
                self.engine.backward(loss)
            values = torch.tensor([loss.item(), *(parts[part].item() for part in self.task.loss_parts),
                                   self.task.frames(batch).sum().item(), waited], dtype=torch.float64)
            sums += values
        sums = self._sum_over_ranks(sums)
        frames_index = parts_count + 1
        scale = accumulation * self.info.world_size
        if not math.isfinite(sums[0].item()):
            raise FloatingPointError(f"step {step}: the loss is {sums[0].item() / scale} on at least one rank; "
                                     f"stopping with the last good checkpoint intact in {self.run_dir / 'checkpoints'}")
        grad_norm = self.engine.step()
        if self.ema is not None:
            self.ema.update(self.engine.ema_source(), step)
        metrics = {"loss": sums[0].item() / scale}
        metrics.update({f"loss_{name}": sums[1 + i].item() / scale for i, name in enumerate(self.task.loss_parts)})
        metrics.update(grad_norm=grad_norm, lr=self.engine.scheduler.get_last_lr()[0], frames=sums[frames_index].item(),
                       data_wait_s=sums[frames_index + 1].item() / scale, bad_samples=self.train_batches.bad_samples)
        return metrics

    @torch.no_grad()
    def validate(self, writer=None) -> dict[str, float]:
        """Frame-weighted mean loss over every validation window (each read once across ranks), with the EMA
        weights and fixed noise; with a writer, also one generated sample (audio and plot) for TensorBoard."""
        model = self.ema_model()
        if writer is not None:
            self.task.log_sample(writer, model, self.step)
        generator = torch.Generator(device=self.device).manual_seed(VAL_SEED + self.info.rank)
        names = ["loss", *(f"loss_{part}" for part in self.task.loss_parts)]
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # loss and its parts, each times frames; frames
        for features in self.task.validation_batches():
            batch = self.task.prepare(features)
            with autocast_context(self.cfg.trainer.precision, self.device):
                loss, parts = self.task.loss(model, batch, generator)
            count = self.task.frames(batch).sum().item()
            sums += torch.tensor([loss.item() * count, *(parts[part].item() * count for part in self.task.loss_parts),
                                  count], dtype=torch.float64)
        sums = self._sum_over_ranks(sums)
        if sums[-1] == 0:
            return {}
        return {name: sums[i].item() / sums[-1].item() for i, name in enumerate(names)}

    def ema_model(self) -> nn.Module:
        """An unsharded network with the EMA weights (the training weights without EMA), in eval mode."""
        weights = self.ema.full_state_dict() if self.ema is not None else self.engine.full_model_state_dict()
        model = self.task.build_model().to(self.device)
        model.load_state_dict(weights)
        return model.eval()

    def save(self) -> Path:
        meta = {"config": self.cfg.to_dict(), "scheduler": self.engine.scheduler.state_dict(),
                "loader": self._all_ranks(self.train_batches.state_dict()), "world_size": self.info.world_size,
                "strategy": self.cfg.parallel.strategy}
        return self.checkpointer.save(self.step, self._tensors(), meta)

    def fit(self) -> Path:
        """Train to trainer.steps; returns the newest complete checkpoint."""
        t = self.cfg.trainer
        log.info("model: %.2fM parameters on %s, %d rank(s), strategy %s", self.parameters / 1e6, self.device,
                 self.info.world_size, self.cfg.parallel.strategy)
        writer = None
        if self.info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        flops_per_frame = self.task.flops_per_frame(self.parameters)
        peak = peak_flops(self.device)
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        window_start, window_frames, window_steps = time.perf_counter(), 0.0, 0
        try:
            while self.step < t.steps:
                metrics = self.train_step(self.step)
                self.step += 1
                window_frames += metrics.pop("frames")
                window_steps += 1
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    metrics["frames_per_s"] = window_frames / elapsed
                    metrics["step_time_s"] = elapsed / window_steps
                    if peak is not None:
                        metrics["mfu"] = metrics["frames_per_s"] * flops_per_frame / (peak * self.info.world_size)
                    memory = gpu_memory_gib(self.device)
                    if memory is not None:
                        metrics["gpu_memory_gib"] = memory
                    if writer is not None:
                        for key, value in metrics.items():
                            writer.add_scalar(f"train/{key}", value, self.step)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", fps=f"{metrics['frames_per_s']:.0f}")
                    window_start, window_frames, window_steps = time.perf_counter(), 0.0, 0
                if self.step % t.val_every == 0 or self.step == t.steps:
                    for key, value in self.validate(writer).items():
                        if writer is not None:
                            writer.add_scalar(f"val/{key}", value, self.step)
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save()
            self.checkpointer.wait()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return latest_checkpoint(self.run_dir)
