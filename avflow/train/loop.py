"""The training loop: AdamW with warmup + cosine, autocast, clipping, EMA, validation, checkpoints.

Batches stream from the packed shards. The checkpoint carries model, EMA, optimizer, scheduler, RNG
state and the loader's position, so `--resume` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from avflow.config import Config
from avflow.data.loader import training_batches, validation_batches
from avflow.model.avflow import AVFlowNet, count_parameters
from avflow.model.flow import flow_matching_loss
from avflow.train.batches import build_batch_encoder
from avflow.train.checkpoint import (checkpoint_config, latest_checkpoint, load_checkpoint, require_same_model,
                                     save_checkpoint)
from avflow.utils import load_torch

log = logging.getLogger(__name__)

VAL_SEED = 1234  # fixed noise and times, so validation losses are comparable across steps and runs


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda: no CUDA device is available")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
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


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA with a short warmup of its own, so early checkpoints are not dominated by the random init."""
    effective = min(decay, (1 + step) / (10 + step))
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1 - effective)


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.trainer.run_dir)
        existing = latest_checkpoint(self.run_dir)
        if existing is not None and not resume:
            raise FileExistsError(f"trainer.run_dir={self.run_dir} already has checkpoints (newest {existing.name}); "
                                  "pass --resume to continue it or choose another trainer.run_dir")
        self.device = pick_device(cfg.trainer.device)
        torch.manual_seed(cfg.trainer.seed)
        self.model = AVFlowNet(cfg.model).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.trainer.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.trainer.lr, betas=tuple(cfg.trainer.betas),
                                           weight_decay=cfg.trainer.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(s, cfg))
        self.step = 0
        self.encoder, self.head_vae_path = build_batch_encoder(cfg, self.device, progress)
        self.train_batches = training_batches(cfg.data.shards, cfg)
        if existing is not None:
            self._restore(existing)
        self.train_iter = iter(self.train_batches)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(self.run_dir / "config.yaml")

    def _payload(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": (self.ema or self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "loader": self.train_batches.state_dict(),
            "codec": self.encoder.codec.state_dict(),
            "head_vae": load_torch(self.head_vae_path),
        }

    def _restore(self, path: Path) -> None:
        payload = load_checkpoint(path)
        require_same_model(checkpoint_config(payload, path), self.cfg, path)
        self.model.load_state_dict(payload["model"])
        if self.ema is not None:
            self.ema.load_state_dict(payload["ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["torch_rng"])
        self.train_batches.load_state_dict(payload["loader"])
        self.step = int(payload["step"])
        log.info("resumed from %s at step %d", path, self.step)

    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        batch = self.encoder(next(self.train_iter))
        with autocast_context(self.cfg.trainer.precision, self.device):
            loss, parts = flow_matching_loss(self.model, batch.state, batch.cond, batch.valid, self.cfg.flow,
                                             self.cfg.model, batch.expression_valid)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}; stopping with the last good checkpoint "
                                     f"intact in {self.run_dir / 'checkpoints'}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            update_ema(self.ema, self.model, self.cfg.trainer.ema_decay, step)
        metrics = {"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in parts.items()}}
        metrics.update(grad_norm=grad_norm.item(), lr=self.scheduler.get_last_lr()[0],
                       frames=batch.valid.sum().item(), bad_samples=self.train_batches.bad_samples)
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Frame-weighted mean loss over every validation window, with the EMA weights and fixed noise."""
        model = self.ema or self.model
        model.eval()
        generator = torch.Generator(device=self.device).manual_seed(VAL_SEED)
        totals: dict[str, float] = {}
        frames = 0
        for features in validation_batches(self.cfg.data.shards, self.cfg):
            batch = self.encoder(features)
            with autocast_context(self.cfg.trainer.precision, self.device):
                loss, parts = flow_matching_loss(model, batch.state, batch.cond, batch.valid, self.cfg.flow,
                                                 self.cfg.model, batch.expression_valid, generator)
            count = batch.valid.sum().item()
            frames += count
            for key, value in {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}.items():
                totals[key] = totals.get(key, 0.0) + value.item() * count
        return {key: value / max(frames, 1) for key, value in totals.items()}

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self._payload(), self.cfg.trainer.keep_checkpoints)

    def fit(self) -> Path:
        """Train to trainer.steps; returns the final checkpoint."""
        from torch.utils.tensorboard import SummaryWriter

        t = self.cfg.trainer
        log.info("model: %.2fM parameters on %s", count_parameters(self.model) / 1e6, self.device)
        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        window_start, window_frames = time.perf_counter(), 0
        try:
            while self.step < t.steps:
                metrics = self.train_step(self.step)
                self.step += 1
                window_frames += metrics.pop("frames")
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    metrics["frames_per_s"] = window_frames / max(elapsed, 1e-9)
                    for key, value in metrics.items():
                        writer.add_scalar(f"train/{key}", value, self.step)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", fps=f"{metrics['frames_per_s']:.0f}")
                    window_start, window_frames = time.perf_counter(), 0
                if self.step % t.val_every == 0 or self.step == t.steps:
                    for key, value in self.validate().items():
                        writer.add_scalar(f"val/{key}", value, self.step)
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save()
        finally:
            bar.close()
            writer.close()
        return latest_checkpoint(self.run_dir)
