"""The training loop: one loop for every strategy (none, DDP, FSDP2, DeepSpeed), which only wraps.

AdamW with warmup + cosine, bf16 autocast on CUDA, gradient accumulation and clipping, EMA weights,
validation reduced over ranks. The CheckpointManager (avflow.train.checkpoint) decides when to save and
holds every state, the loader position and per-rank RNG states included, so a resumed run continues
exactly where an uninterrupted one would be; the MetricsLogger (avflow.train.metrics) owns TensorBoard.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from avflow.config import Config
from avflow.model.avflow import count_parameters
from avflow.model.io import checkpoint_config
from avflow.train.checkpoint import CheckpointManager, RNGState, latest_checkpoint, require_same_model
from avflow.train.distributed import DistInfo, init_distributed, reduce_over_ranks
from avflow.train.metrics import MetricsLogger, StepMetrics
from avflow.train.parallel import StateView, bf16_autocast, build_engine
from avflow.train.tasks import VAL_SEED, build_task, resolved_config

log = logging.getLogger(__name__)


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
        """A short warmup of its own, so early checkpoints are not dominated by the random init.

        One fused multi-tensor launch for all (local shards of the) parameters, not one per parameter.
        """
        effective = min(self.decay, (1 + step) / (10 + step))
        names = list(self.params)
        torch._foreach_lerp_([self.params[name] for name in names],
                             [weights[name].detach().float() for name in names], 1 - effective)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (collective under FSDP: every rank must call it)."""
        return {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in self.params.items()}


class Trainer:
    """Trains the network of cfg.task (avflow.train.tasks) under any strategy; the task supplies model, data and
    loss."""

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
        # One fused kernel for all parameters, with its step counters on the device (the unfused CPU path reads
        # each parameter's counter back to the host); DeepSpeed brings its own optimizer wrapper.
        fused = cfg.parallel.strategy != "deepspeed"
        # Fine-tuning the identity columns alone: no weight decay, which would shrink the frozen columns beside them.
        weight_decay = 0.0 if t.finetune == "identity" else t.weight_decay
        self.engine = build_engine(
            model, cfg, self.info,
            lambda params: torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=weight_decay,
                                             fused=fused or None),
            lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg)))
        self.ema = EMA(self.engine.ema_source(), t.ema_decay) if t.ema_decay > 0 else None
        torch.manual_seed(cfg.trainer.seed + self.info.rank)  # different flow-matching noise per rank
        self.step = 0
        self.task.load_data()
        self.train_batches = self.task.train_batches
        self.checkpoints = CheckpointManager(self.run_dir, self._states(), t.keep_checkpoints, t.checkpoint_every,
                                             t.steps, t.async_checkpoint, self._describe)
        self.metrics = StepMetrics(self.task.loss_parts, self.device,
                                   lambda values: reduce_over_ranks(values, self.info),
                                   lambda values: reduce_over_ranks(values, self.info, "min"))
        self.logger: MetricsLogger | None = None  # opened by fit
        if existing is not None:
            path = self.checkpoints.resume(
                self.info.world_size, lambda path, meta: require_same_model(checkpoint_config(meta, path), cfg, path))
            log.info("resumed from %s at step %d", path, self.step)
        self.train_iter = iter(self.train_batches)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")

    def _states(self) -> dict:
        """Everything a checkpoint saves and restores, each entry a DCP Stateful or a state dict filled in place
        (in the engine's possibly sharded layout); the loader position and RNG under this rank's own keys."""
        return {
            **self.engine.checkpoint_states(),
            # without EMA, inference reads the training weights from the same key
            "ema": self.ema.params if self.ema is not None else StateView(self.engine.full_model_state_dict,
                                                                          lambda state: None),
            **self.task.checkpoint_tensors(),
            "train_state": self,
            f"loader_rank{self.info.rank}": self.train_batches,
            f"rng_rank{self.info.rank}": RNGState(self.device),
        }

    def _describe(self) -> dict:
        """What meta.json records beside the step: read by inference and tools without loading DCP."""
        return {"config": self.cfg.checkpoint_dict(), "world_size": self.info.world_size,
                "strategy": self.cfg.parallel.strategy}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def train_step(self, step: int) -> None:
        """One optimizer step over parallel.grad_accumulation micro-batches. Its metrics stay on the device in
        `self.metrics` until the next `flush_metrics`: a step makes no host sync of its own."""
        self.engine.model.train()
        accumulation = self.cfg.parallel.grad_accumulation
        waited = 0.0
        for micro in range(accumulation):
            wait_start = time.perf_counter()
            batch = self.task.prepare(next(self.train_iter))
            waited += time.perf_counter() - wait_start
            sync = contextlib.nullcontext() if micro == accumulation - 1 else self.engine.no_sync()
            with sync:
                with autocast_context(self.cfg.trainer.precision, self.device):
                    loss, parts = self.task.loss(self.engine.model, batch)
                self.engine.backward(loss)
            self.metrics.add_micro_batch(step, loss, [parts[part] for part in self.task.loss_parts],
                                         self.task.frames(batch))
        grad_norm = self.engine.step()
        if self.ema is not None:
            self.ema.update(self.engine.ema_source(), step)
        self.metrics.add_step(grad_norm, waited / accumulation)

    def flush_metrics(self) -> dict[str, float]:
        """The metrics of the steps since the last flush (one all-reduce, one host sync), logged when `fit` runs;
        a non-finite loss among them stops the run here, before anything is saved."""
        extra = {"lr": self.engine.scheduler.get_last_lr()[0], "bad_samples": self.train_batches.bad_samples}
        try:
            if self.logger is not None:
                return self.logger.flush(self.step, **extra)
            return {**self.metrics.flush(self.info.world_size), **extra}
        except FloatingPointError as error:
            raise FloatingPointError(f"{error}; stopping with the last good checkpoint intact in "
                                     f"{self.run_dir / 'checkpoints'}") from None

    @torch.no_grad()
    def validate(self, writer=None) -> dict[str, float]:
        """Frame-weighted mean loss over every validation window (each read once across ranks), with the EMA
        weights and fixed noise; with a writer, also one generated sample (audio and plot) for TensorBoard."""
        model = self.ema_model()
        if writer is not None:
            self.task.log_sample(writer, model, self.step)
        generator = torch.Generator(device=self.device).manual_seed(VAL_SEED + self.info.rank)
        names = ["loss", *(f"loss_{part}" for part in self.task.loss_parts)]
        # loss and its parts, each times frames; frames. On the training device: NCCL reduces CUDA tensors only.
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        for features in self.task.validation_batches():
            batch = self.task.prepare(features)
            with autocast_context(self.cfg.trainer.precision, self.device):
                loss, parts = self.task.loss(model, batch, generator)
            count = self.task.frames(batch).sum()
            values = torch.stack([loss.detach(), *(parts[part].detach() for part in self.task.loss_parts)]).double()
            sums += torch.cat([values * count, count.double()[None]])
        sums = reduce_over_ranks(sums, self.info).tolist()
        if sums[-1] == 0:
            return {}
        return {name: sums[i] / sums[-1] for i, name in enumerate(names)}

    def ema_model(self) -> nn.Module:
        """An unsharded network with the EMA weights (the training weights without EMA), in eval mode."""
        weights = self.ema.full_state_dict() if self.ema is not None else self.engine.full_model_state_dict()
        model = self.task.build_model().to(self.device)
        model.load_state_dict(weights)
        return model.eval()

    def save(self) -> Path:
        return self.checkpoints.save(self.step)

    def fit(self) -> Path:
        """Train to trainer.steps; returns the newest complete checkpoint."""
        t = self.cfg.trainer
        log.info("model: %.2fM parameters on %s, %d rank(s), strategy %s", self.parameters / 1e6, self.device,
                 self.info.world_size, self.cfg.parallel.strategy)
        self.logger = MetricsLogger(self.metrics, self.run_dir, self.info.is_main,
                                    self.task.flops_per_frame(self.parameters), self.device, self.info.world_size)
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        try:
            while self.step < t.steps:
                self.train_step(self.step)
                self.step += 1
                bar.update(1)
                saving = self.checkpoints.due(self.step)
                if self.step % t.log_every == 0 or saving:
                    metrics = self.flush_metrics()
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", fps=f"{metrics['frames_per_s']:.0f}")
                if self.step % t.val_every == 0 or self.step == t.steps:
                    self.logger.write("val", self.validate(self.logger.writer), self.step)
                if saving:
                    self.save()
            self.checkpoints.wait()
        finally:
            bar.close()
            self.logger.close()
            self.logger = None
        return latest_checkpoint(self.run_dir)
