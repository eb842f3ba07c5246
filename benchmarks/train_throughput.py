"""Training throughput of the full-size AV-Flow network per parallel strategy, on one device.

    python benchmarks/train_throughput.py                       # CUDA: none, ddp, fsdp (+ deepspeed if installed)
    python benchmarks/train_throughput.py --compile --batch 64  # per-block torch.compile
    python benchmarks/train_throughput.py --small --batch 4     # CPU smoke run with the demo-size model

A one-process group is created, so DDP and FSDP2 run their real code paths: hooks, sharding and
collectives on a group of size 1. Each strategy trains `--steps` timed steps on random data after
warm-up, using the same loss, optimizer and bf16 autocast (on CUDA) as `avflow train`. The script prints
frames/s and MFU (model FLOPs: 6 x parameters x frames plus banded attention, against the card's dense
bf16 peak).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import time

import torch

from avflow.config import Config
from avflow.model.avflow import AVFlowNet, count_parameters
from avflow.model.flow import flow_matching_loss
from avflow.train.distributed import init_distributed, shutdown
from avflow.train.loop import autocast_context
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="none,ddp,fsdp,deepspeed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=345)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    parser.add_argument("--small", action="store_true", help="the demo-size model (CPU smoke runs)")
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
    print("| strategy | ms/step | frames/s | MFU |")
    print("| --- | --- | --- | --- |")
    try:
        for strategy in args.strategies.split(","):
            cfg = Config()
            cfg.model = base.model
            cfg.parallel.strategy = strategy
            cfg.parallel.compile = args.compile
            if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
                print("| deepspeed | not installed | | |")
                continue
            seconds = measure(cfg.validate(), info, args.batch, args.window, args.steps)
            frames_per_s = args.batch * args.window / seconds
            mfu = f"{frames_per_s * flops_per_frame / peak:.1%}" if peak else "n/a"
            print(f"| {strategy} | {seconds * 1e3:.1f} | {frames_per_s:,.0f} | {mfu} |")
    finally:
        shutdown(info)


if __name__ == "__main__":
    main()
