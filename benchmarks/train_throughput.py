"""Training throughput of the full-size AV-Flow network per parallel strategy, on one device.

    python benchmarks/train_throughput.py                       # CUDA: none, ddp, fsdp (+ deepspeed if installed)
    python benchmarks/train_throughput.py --compile --batch 64  # per-block torch.compile
    python benchmarks/train_throughput.py --small --batch 4     # CPU smoke run with the demo-size model

A one-process group is created, so DDP and FSDP2 run their real code paths: hooks, sharding and
collectives on a group of size 1. Each strategy is measured twice:
- "loop": `--steps` timed steps of the engine alone on random data after warm-up (same loss, optimizer and
  bf16 autocast on CUDA as `avflow train`): the ceiling;
- "avflow train": the Trainer's own steps on a procedural demo corpus written and packed into shards in a
  scratch folder (loader, batch encoding with the head VAE, EMA, on-device metrics with one flush at the
  end): what a training run gets.
It prints frames/s and MFU (model FLOPs: 6 x per-frame parameters x frames plus banded attention, against
the card's dense bf16 peak; see avflow.train.metrics).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from avflow.config import Config, load_config
from avflow.data.corpus import write_corpus
from avflow.data.shards import pack
from avflow.model.avflow import AVFlowNet, count_parameters
from avflow.model.flow import flow_matching_loss
from avflow.train.distributed import init_distributed, shutdown
from avflow.train.loop import Trainer, autocast_context
from avflow.train.metrics import peak_flops, training_flops_per_frame
from avflow.train.parallel import build_engine

SMALL = {"d_model": 128, "n_blocks": 4, "n_heads": 4, "ffn_hidden": 256}


def one_process_group_env() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def measure(cfg: Config, info, batch: int, window: int, steps: int) -> float:
    """Seconds per optimizer step (median-free: total time of `steps` steps after 3 warm-up steps)."""
    torch.manual_seed(0)
    model = AVFlowNet(cfg.model)
    engine = build_engine(model, cfg, info, lambda p: torch.optim.AdamW(p, lr=1e-4),
                          lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
    device = info.device
    x1 = torch.randn(batch, window, cfg.model.state_dim, device=device)
    cond = torch.randn(batch, window, cfg.model.cond_dim, device=device)
    valid = torch.ones(batch, window, dtype=torch.bool, device=device)

    def step() -> None:
        with autocast_context(cfg.trainer.precision, device):
            loss, _ = flow_matching_loss(engine.model, x1, cond, valid, cfg.flow, cfg.model)
        engine.backward(loss)
        engine.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def demo_shards(scratch: Path, window: int) -> list[str]:
    """Overrides naming a packed procedural corpus whose segments are longer than `window` frames."""
    overrides = [f"data.root={scratch / 'corpus'}", f"data.shards={scratch / 'shards'}", "corpus.train_segments=64",
                 "corpus.val_segments=2", "corpus.words_per_segment=[14, 18]", f"data.segment_length={window}"]
    cfg = load_config(None, overrides)
    write_corpus(Path(cfg.data.root), cfg.corpus)
    pack(cfg, cfg.data.shards)
    return overrides


def measure_trainer(overrides: list[str], info, steps: int) -> float:
    """Seconds per step of the Trainer itself: loader, encoding, loss, optimizer, EMA, device-side metrics."""
    trainer = Trainer(load_config(None, overrides), progress=False, info=info)
    synchronize = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    for step in range(3):
        trainer.train_step(step)
    trainer.flush_metrics()
    synchronize()
    start = time.perf_counter()
    for step in range(3, 3 + steps):
        trainer.train_step(step)
    trainer.flush_metrics()
    synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="none,ddp,fsdp,deepspeed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=345)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    parser.add_argument("--small", action="store_true", help="the demo-size model (CPU smoke runs)")
    parser.add_argument("--no-trainer", action="store_true", help="only the engine loop, not `avflow train`'s steps")
    args = parser.parse_args()
    one_process_group_env()
    base = Config()
    if args.small:
        for key, value in SMALL.items():
            setattr(base.model, key, value)
    info = init_distributed(base)
    parameters = count_parameters(AVFlowNet(base.model))
    flops_per_frame = training_flops_per_frame(base.model, parameters)
    peak = peak_flops(info.device)
    name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    print(f"device: {name}; {parameters / 1e6:.2f}M parameters; batch {args.batch} x {args.window} frames; "
          f"compile {args.compile}; torch {torch.__version__}")
    print("| strategy | measured | ms/step | frames/s | MFU |")
    print("| --- | --- | --- | --- | --- |")
    scratch = tempfile.TemporaryDirectory()
    shards = None if args.no_trainer else demo_shards(Path(scratch.name), args.window)
    model_overrides = [f"model.{key}={value}" for key, value in SMALL.items()] if args.small else []
    try:
        for strategy in args.strategies.split(","):
            cfg = Config()
            cfg.model = base.model
            cfg.parallel.strategy = strategy
            cfg.parallel.compile = args.compile
            if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
                print("| deepspeed | | not installed | | |")
                continue
            seconds = measure(cfg.validate(), info, args.batch, args.window, args.steps)
            report(strategy, "loop", seconds, args.batch * args.window, flops_per_frame, peak)
            if shards is not None:
                trainer_overrides = shards + model_overrides + [
                    f"parallel.strategy={strategy}", f"parallel.compile={str(args.compile).lower()}",
                    f"trainer.batch_size={args.batch}", f"trainer.run_dir={Path(scratch.name) / strategy}",
                    "trainer.ema_decay=0.999", "head_vae.steps=50"]  # the head VAE only has to exist
                seconds = measure_trainer(trainer_overrides, info, args.steps)
                # windows are cropped from segments longer than the window, so every frame is a real one
                report(strategy, "avflow train", seconds, args.batch * args.window, flops_per_frame, peak)
    finally:
        scratch.cleanup()
        shutdown(info)


def report(strategy: str, measured: str, seconds: float, frames: int, flops_per_frame: float,
           peak: float | None) -> None:
    frames_per_s = frames / seconds
    mfu = f"{frames_per_s * flops_per_frame / peak:.1%}" if peak else "n/a"
    print(f"| {strategy} | {measured} | {seconds * 1e3:.1f} | {frames_per_s:,.0f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
