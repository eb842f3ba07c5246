"""Training strategies (none, DDP, FSDP2, DeepSpeed) behind one small engine, so the loop never branches.

The model file knows nothing about parallelism. `parallelize` prepares an AVFlowNet in a fixed order:
activation checkpointing per DiT block, then `torch.compile` per block, then the data-parallel wrapper
(FSDP2 `fully_shard` on every DiT block of both streams and on the root, or DDP). Neither checkpointing
nor compiling changes a parameter name, so state dicts of every strategy share AVFlowNet's keys.

`build_engine` adds the optimizer and scheduler and returns a `TrainEngine`; per optimizer step the loop
runs `parallel.grad_accumulation` micro-batches (all but the last inside `no_sync()`), calls `backward`
on each micro-batch loss and then `step()` once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _init_optim_state,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from avflow.config import Config
from avflow.model.avflow import AVFlowNet
from avflow.model.dit import DiTBlock
from avflow.runtime import DTYPES
from avflow.train.distributed import DistInfo

OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

DEEPSPEED_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def bf16_autocast(precision: str, device: torch.device) -> bool:
    """Whether the loop runs the forward under bf16 autocast (trainer.precision; auto = bf16 on CUDA)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


class CheckpointedDiTBlock(DiTBlock):
    """A DiT block whose activations are recomputed in backward.

    Swapping the class of an existing block (instead of wrapping it in another module) keeps every
    parameter name, so checkpoints with and without activation checkpointing are interchangeable, and
    the block stays picklable and deep-copyable.
    """

    def forward(self, x, time_embedding, valid=None, rope=None, modulation=None) -> torch.Tensor:
        return checkpoint(super().forward, x, time_embedding, valid, rope, modulation, use_reentrant=False)


def dit_blocks(model: nn.Module) -> list[nn.Module]:
    """Every DiT block of the model in registration order (AVFlowNet: the visual stream's, then the audio's)."""
    return [module for module in model.modules() if isinstance(module, DiTBlock)]


def apply_activation_checkpointing(model: AVFlowNet) -> None:
    for block in dit_blocks(model):
        if type(block) is not DiTBlock:
            raise TypeError(f"activation checkpointing: expected plain DiTBlock modules, got {type(block).__name__}")
        block.__class__ = CheckpointedDiTBlock


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (`Module.compile`), which, unlike torch.compile(module), adds no key prefix;
    as one graph (`fullgraph=True`), so a graph break is an error instead of a silent slowdown."""
    for block in dit_blocks(model):
        block.compile(fullgraph=True)


def apply_fsdp(model: AVFlowNet, cfg: Config, info: DistInfo) -> None:
    """fully_shard every DiT block, then the root (which takes the embeddings, fusion and output layers).

    With bf16 autocast in the loop the inputs are not cast, so the residual stream and the timestep stay
    fp32 as under DDP; without autocast FSDP casts each block's (and the root's) floating inputs to the
    param dtype, which with bf16 params also rounds the timestep t to bf16.
    """
    par = cfg.parallel
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[par.fsdp_param_dtype], reduce_dtype=DTYPES[par.fsdp_reduce_dtype],
                                  cast_forward_inputs=not bf16_autocast(cfg.trainer.precision, info.device))
    for block in dit_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=par.fsdp_reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=par.fsdp_reshard_after_forward)


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's weights: FSDP shards whatever each rank holds, so they must agree."""
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def _check_launch(strategy: str, info: DistInfo) -> None:
    if strategy == "none" and info.world_size > 1:
        raise RuntimeError(f"parallel.strategy=none with {info.world_size} processes: every rank would train its "
                           "own copy; expected parallel.strategy ddp, fsdp or deepspeed under torchrun/srun")
    if strategy != "none" and not info.is_distributed:
        raise RuntimeError(f"parallel.strategy={strategy} needs a process group, but this process was not started "
                           "by torchrun or srun; launch with `torchrun --nproc_per_node N ...` (N may be 1) or use "
                           "parallel.strategy=none")


def parallelize(model: AVFlowNet, cfg: Config, info: DistInfo) -> nn.Module:
    """Apply activation checkpointing, compile and the strategy's wrapper to `model`; return what to call.

    none and fsdp return `model` itself (FSDP2 shards it in place), ddp a DistributedDataParallel around
    it, and deepspeed the prepared but unwrapped model (`build_engine` hands it to deepspeed.initialize).
    """
    par = cfg.parallel
    _check_launch(par.strategy, info)
    model.to(info.device)
    if par.activation_checkpointing:
        apply_activation_checkpointing(model)
    if par.compile:
        apply_compile(model)
    if info.is_distributed:
        broadcast_from_rank0(model)
    if par.strategy == "fsdp":
        apply_fsdp(model, cfg, info)
    if par.strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return model


class StateView:
    """One part of an engine's state as a DCP Stateful, so each part is saved under its own top-level key."""

    def __init__(self, read: Callable[[], dict[str, Any]], restore: Callable[[dict[str, Any]], None]):
        self._read = read
        self._restore = restore

    def state_dict(self) -> dict[str, Any]:
        return self._read()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore(state)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to max_norm by the total 2-norm over all ranks' shards (FSDP2 grads are DTensors)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


class TrainEngine:
    """Forward, backward, optimizer step and state of one strategy (this class: none and DDP).

    model: what to call for the training forward (the DDP wrapper under ddp).
    module: the AVFlowNet itself, for evaluation and EMA (under fsdp its parameters are DTensor shards).
    `checkpoint_states()` hands model, optimizer and scheduler to DCP as separate Stateful entries.
    """

    def __init__(self, model: nn.Module, module: AVFlowNet, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: Config, info: DistInfo):
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = cfg
        self.info = info

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss, scaled so accumulated gradients average the micro-batches."""
        (loss / self.cfg.parallel.grad_accumulation).backward()

    def step(self) -> torch.Tensor | float:
        """Clip, step optimizer and scheduler, zero the gradients; returns the pre-clip gradient norm (a device
        tensor: reading it would be a host sync)."""
        grad_norm = clip_gradients(list(self.module.parameters()), self.cfg.trainer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the gradient all-reduce for micro-batches before the last one of a step."""
        sync_off = self.model.no_sync() if isinstance(self.model, DistributedDataParallel) else contextlib.nullcontext()
        with sync_off:
            yield

    def checkpoint_states(self) -> dict[str, Any]:
        """Model, optimizer and scheduler as DCP Stateful entries. DCP restores entries in the sorted order of their
        keys, so "model" comes before "optimizer": DeepSpeed restores its fp32 masters from the optimizer state
        after the module weights."""
        return {"model": StateView(self.model_state_dict, self.load_model_state_dict),
                "optimizer": StateView(self.optimizer_state_dict, self.load_optimizer_state_dict),
                "scheduler": self.scheduler}

    def model_state_dict(self) -> dict[str, Any]:
        """AVFlowNet keys (DTensor shards under fsdp, so each rank writes its own part)."""
        return get_model_state_dict(self.model)

    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """FQN-keyed optimizer state, sharded like the parameters."""
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)

    def ema_source(self) -> dict[str, torch.Tensor]:
        """The weights an EMA should follow, in the layout it can keep locally (DTensor shards under fsdp)."""
        return dict(self.module.named_parameters())

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the unsharded fp32 weights with AVFlowNet keys, on every rank and the training device.

        Collective under fsdp (an all-gather): every rank must call it.
        """
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {key: value.detach().clone() for key, value in full.items()}


class FSDPEngine(TrainEngine):
    """FSDP2: the model is the sharded AVFlowNet itself."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


class DeepSpeedEngine(TrainEngine):
    """DeepSpeed: its engine scales, reduces, accumulates, clips and steps (per its JSON config).

    `backward` runs DeepSpeed's backward and its per-micro-batch step (which only updates the weights at
    the accumulation boundary); `step` checks that the boundary was reached and returns the norm.
    The model state is the module's weights (gathered under ZeRO-3); the optimizer state is this rank's
    ZeRO optimizer partition (fp32 masters and Adam moments) keyed by rank ("rank_0", ...):
    torch.distributed.checkpoint writes each rank's part, and it can only be loaded back with the same
    world size and ZeRO stage.
    """

    def __init__(self, ds_engine: Any, cfg: Config, info: DistInfo):
        super().__init__(ds_engine, ds_engine.module, ds_engine.optimizer, ds_engine.lr_scheduler, cfg, info)
        self.micro_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()
        self.micro_steps += 1

    def step(self) -> float:
        expected = self.cfg.parallel.grad_accumulation
        if self.micro_steps != expected:
            raise RuntimeError(f"DeepSpeed step after {self.micro_steps} backward calls; expected "
                               f"parallel.grad_accumulation={expected} per optimizer step")
        self.micro_steps = 0
        grad_norm = self.model.get_global_grad_norm()
        return float("nan") if grad_norm is None else float(grad_norm)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        yield

    def model_state_dict(self) -> dict[str, Any]:
        return self._module_weights()

    def optimizer_state_dict(self) -> dict[str, Any]:
        self._materialize_optimizer_state()
        return {f"rank_{self.info.rank}": self.optimizer.state_dict()}

    def _module_weights(self) -> dict[str, torch.Tensor]:
        """The module's own weights in its compute dtype (bf16 under DeepSpeed bf16), gathered under ZeRO-3."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return {key: value.detach().clone() for key, value in self.module.state_dict().items()}

    def _materialize_optimizer_state(self) -> None:
        """Create the Adam moments of a fresh engine, so its state dict can serve as a DCP load template.

        DCP only fills entries the template already has. torch's get_state_dict does the same with one
        zero-lr step (`_init_optim_state`); here it runs on ZeRO's inner optimizer, whose fp32 partitions
        ZeRO-3 only attaches to the param groups around its own step.
        """
        zero_optimizer = self.optimizer
        detaches_groups = hasattr(zero_optimizer, "_set_fp32_optimizer_param_groups")
        if detaches_groups:
            zero_optimizer._set_fp32_optimizer_param_groups()
        try:
            _init_optim_state(zero_optimizer.optimizer)
        finally:
            if detaches_groups:
                zero_optimizer._clear_fp32_optimizer_param_groups()

    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0):
            self.module.load_state_dict(state)

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        key = f"rank_{self.info.rank}"
        if key not in state:
            raise KeyError(f"DeepSpeed optimizer state: expected an entry {key!r} (saved with the same world size), "
                           f"got {sorted(state)}")
        # ZeRO indexes the list by data-parallel rank; fp32 weights restore the masters without bf16 rounding
        self.optimizer.load_state_dict([state[key]] * self.info.world_size, load_from_fp32_weights=True)

    def ema_source(self) -> dict[str, torch.Tensor]:
        """The fp32 masters (module parameters are bf16 copies, or empty placeholders under ZeRO-3)."""
        return self.full_model_state_dict()

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights from the ZeRO optimizer, unsharded, on every rank (collective).

        AVFlowNet has parameters only, so named_parameters gives exactly its state-dict keys.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(param).detach().clone()
                for name, param in self.module.named_parameters()}


def deepspeed_config(cfg: Config, info: DistInfo) -> dict[str, Any]:
    """The JSON at parallel.deepspeed_config with batch sizes from the trainer and "auto" values filled in.

    gradient_clipping "auto" takes trainer.grad_clip; bf16.enabled "auto" follows trainer.precision.
    """
    path = Path(cfg.parallel.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"parallel.deepspeed_config={path}: no such file; expected a DeepSpeed JSON config "
                                "such as configs/deepspeed/zero2.json")
    try:
        ds_config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"parallel.deepspeed_config={path}: not valid JSON ({error})") from error
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(f"parallel.deepspeed_config={path}: zero_optimization.stage is {stage!r}; expected 1, 2 or 3 "
                         "(for plain data parallelism use parallel.strategy=ddp)")
    if stage == 3 and cfg.parallel.compile:
        raise ValueError(f"parallel.deepspeed_config={path}: ZeRO-3 gathers parameters through hooks that would run "
                         "inside every compiled block (a graph break at each Linear); expected parallel.compile=false "
                         "with ZeRO-3, or ZeRO-1/2, or parallel.strategy=fsdp")
    for key in ("optimizer", "scheduler", *DEEPSPEED_BATCH_KEYS):
        if key in ds_config:
            raise ValueError(f"parallel.deepspeed_config={path}: remove {key!r}; avflow sets the optimizer and "
                             "scheduler from trainer.* and the batch sizes from trainer.batch_size (per rank), the "
                             "world size and parallel.grad_accumulation")
    accumulation = cfg.parallel.grad_accumulation
    ds_config.update(train_micro_batch_size_per_gpu=cfg.trainer.batch_size, gradient_accumulation_steps=accumulation,
                     train_batch_size=cfg.trainer.batch_size * info.world_size * accumulation)
    if ds_config.get("gradient_clipping") == "auto":
        ds_config["gradient_clipping"] = cfg.trainer.grad_clip
    bf16 = ds_config.get("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_autocast(cfg.trainer.precision, info.device)
    return ds_config


def _build_deepspeed(module: AVFlowNet, cfg: Config, info: DistInfo, optimizer_factory: OptimizerFactory,
                     scheduler_factory: SchedulerFactory) -> DeepSpeedEngine:
    ds_config = deepspeed_config(cfg, info)
    if info.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed picks its accelerator
    try:
        import deepspeed
    except ImportError as error:
        raise RuntimeError(f"parallel.strategy=deepspeed: the deepspeed package cannot be imported ({error}); "
                           "expected `pip install deepspeed`") from error
    ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer_factory(module.parameters()),
                                              lr_scheduler=scheduler_factory, config=ds_config,
                                              dist_init_required=False)
    return DeepSpeedEngine(ds_engine, cfg, info)


def build_engine(model: AVFlowNet, cfg: Config, info: DistInfo, optimizer_factory: OptimizerFactory,
                 scheduler_factory: SchedulerFactory) -> TrainEngine:
    """Parallelize `model` per parallel.strategy, then create the optimizer over the (possibly sharded)
    parameters and the scheduler over the optimizer."""
    wrapped = parallelize(model, cfg, info)
    if cfg.parallel.strategy == "deepspeed":
        return _build_deepspeed(model, cfg, info, optimizer_factory, scheduler_factory)
    optimizer = optimizer_factory(wrapped.parameters())
    engine_class = FSDPEngine if isinstance(wrapped, FSDPModule) else TrainEngine
    return engine_class(wrapped, model, optimizer, scheduler_factory(optimizer), cfg, info)
