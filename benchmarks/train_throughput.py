"""Training throughput of the full-size AV-Flow network per parallel strategy, on one device.

    python3 benchmarks/train_throughput.py --compile --batch 64 --budget-s 90   # CUDA: none, ddp, fsdp, deepspeed
    python3 benchmarks/train_throughput.py --quick                              # tiny sizes on CPU: a smoke run

A one-process group is created, so DDP and FSDP2 run their real code paths: hooks, sharding and
collectives on a group of size 1. Each strategy is measured twice:
- "loop": `--steps` timed steps of the engine alone on random data after warm-up (same loss, optimizer and
  bf16 autocast on CUDA as `avflow train`): the ceiling;
- "avflow train": the Trainer's own steps on a procedural demo corpus (loader with `--workers` worker
  processes, batch encoding with the head VAE, EMA, on-device metrics with one flush at the end): what a
  training run gets.
Before anything is timed, the corpus is written and packed in a scratch folder and one head VAE is trained on
it, on the training device, and shared by every strategy. Each row is printed as soon as it is measured; a row
whose expected time (the last row of its kind, or a guess for the first) does not fit in what is left of
`--budget-s` is skipped with a note. It prints frames/s and MFU (model FLOPs: 6 x per-frame parameters x frames
plus banded attention, against the card's dense bf16 peak; see avflow.train.metrics).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from avflow.config import Config, load_config
from avflow.model.avflow import AVFlowNet, count_parameters
from avflow.model.flow import flow_matching_loss
from avflow.train.distributed import init_distributed, shutdown
from avflow.train.loop import Trainer, autocast_context
from avflow.train.metrics import peak_flops, training_flops_per_frame
from avflow.train.parallel import build_engine

SMALL = {"d_model": 128, "n_blocks": 4, "n_heads": 4, "ffn_hidden": 256}
QUICK = {"d_model": 32, "n_blocks": 2, "n_heads": 2, "ffn_hidden": 64}
# Corpus segments must be longer than the window, so every trained frame is a real one.
CORPUS = ["corpus.train_segments=64", "corpus.val_segments=2", "corpus.words_per_segment=[14, 18]"]
QUICK_CORPUS = ["corpus.train_segments=6", "corpus.val_segments=1", "corpus.words_per_segment=[4, 5]",
                "head_vae.ffn_hidden=8", "head_vae.segment_length=16", "head_vae.batch_size=2"]
HEAD_VAE_STEPS = 50  # the VAE only has to exist: its quality does not change a step's cost
# Guessed seconds of a kind's first row (later rows use the measured time of the last one), with compilation.
FIRST_ROW_S = {"loop": 30.0, "avflow train": 30.0}
# Per-block compilation: every block shares one code object, and every strategy's wrapping adds guards.
RECOMPILE_LIMIT = 64


def one_process_group_env() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_loop(cfg: Config, info, batch: int, window: int, steps: int) -> float:
    """Seconds per optimizer step: total time of `steps` steps after 3 warm-up steps."""
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
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def prepare_data(scratch: Path, overrides: list[str], device: torch.device) -> list[str]:
    """The corpus written and packed, and one head VAE trained on the training device; returns the data.*
    overrides naming them."""
    from avflow.data.corpus import write_corpus
    from avflow.data.pack import pack
    from avflow.train.batches import train_head_vae_stage

    data = [f"data.root={scratch / 'corpus'}", f"loader.shards={scratch / 'shards'}"]
    cfg = load_config(None, overrides + data + [f"head_vae.steps={HEAD_VAE_STEPS}"])
    write_corpus(Path(cfg.data.root), cfg.corpus)
    pack(cfg, cfg.loader.shards, progress=False)
    train_head_vae_stage(cfg, scratch / "head_vae.pt", progress=False, device=device)
    return data + [f"trainer.head_vae={scratch / 'head_vae.pt'}"]


def measure_trainer(overrides: list[str], info, steps: int) -> float:
    """Seconds per step of the Trainer itself: loader, encoding, loss, optimizer, EMA, device-side metrics."""
    trainer = Trainer(load_config(None, overrides), progress=False, info=info)
    for step in range(3):
        trainer.train_step(step)
    trainer.flush_metrics()
    synchronize(info.device)
    start = time.perf_counter()
    for step in range(3, 3 + steps):
        trainer.train_step(step)
    trainer.flush_metrics()
    synchronize(info.device)
    return (time.perf_counter() - start) / steps


def report(strategy: str, measured: str, seconds: float, frames: int, flops_per_frame: float,
           peak: float | None) -> None:
    frames_per_s = frames / seconds
    mfu = f"{frames_per_s * flops_per_frame / peak:.1%}" if peak else "n/a"
    print(f"| {strategy} | {measured} | {seconds * 1e3:.1f} | {frames_per_s:,.0f} | {mfu} |", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="none,ddp,fsdp,deepspeed")
    parser.add_argument("--batch", type=int, help="sequences per step (default 64; --quick 2)")
    parser.add_argument("--window", type=int, help="frames per sequence (default 345; --quick 48)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default 10; --quick 2)")
    parser.add_argument("--workers", type=int, help="loader worker processes of the `avflow train` rows "
                        "(default 4 on CUDA, 0 elsewhere)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    parser.add_argument("--small", action="store_true", help="the demo-size model (CPU smoke runs)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, corpus and batch: a smoke run on CPU")
    parser.add_argument("--no-trainer", action="store_true", help="only the engine loop, not `avflow train`'s steps")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="seconds for the timed rows; rows that would not fit are skipped")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    batch = args.batch or (2 if args.quick else 64)
    window = args.window or (48 if args.quick else 345)
    steps = args.steps or (2 if args.quick else 10)
    for name, value in (("--batch", batch), ("--window", window), ("--steps", steps)):
        if value < 1:
            raise SystemExit(f"{name}: expected at least 1, got {value}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    one_process_group_env()
    base = Config()
    sizes = QUICK if args.quick else SMALL if args.small else {}
    for key, value in sizes.items():
        setattr(base.model, key, value)
    info = init_distributed(base)
    workers = args.workers if args.workers is not None else (4 if info.device.type == "cuda" else 0)
    parameters = count_parameters(AVFlowNet(base.model))
    flops_per_frame = training_flops_per_frame(base.model, parameters)
    peak = peak_flops(info.device)
    name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    print(f"device: {name}; {parameters / 1e6:.2f}M parameters; batch {batch} x {window} frames; compile "
          f"{args.compile}; loader workers {workers}; torch {torch.__version__}", flush=True)
    scratch = tempfile.TemporaryDirectory()
    model_overrides = [f"model.{key}={value}" for key, value in sizes.items()]
    data_overrides = (QUICK_CORPUS if args.quick else CORPUS) + [f"loader.segment_length={window}"]
    try:
        shards = None
        if not args.no_trainer:
            started = time.perf_counter()
            shards = prepare_data(Path(scratch.name), data_overrides, info.device)
            print(f"data: corpus packed and head VAE trained in {time.perf_counter() - started:.0f} s (not timed)")
        deadline = time.monotonic() + args.budget_s
        print("| strategy | measured | ms/step | frames/s | MFU |")
        print("| --- | --- | --- | --- | --- |", flush=True)
        last_row_s = dict(FIRST_ROW_S)
        for strategy in args.strategies.split(","):
            if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
                print("| deepspeed | | not installed | | |", flush=True)
                continue
            cfg = Config()
            cfg.model = base.model
            cfg.parallel.strategy = strategy
            cfg.parallel.compile = args.compile
            trainer_overrides = None if shards is None else data_overrides + shards + model_overrides + [
                f"parallel.strategy={strategy}", f"parallel.compile={str(args.compile).lower()}",
                f"trainer.batch_size={batch}", f"trainer.run_dir={Path(scratch.name) / strategy}",
                f"loader.num_workers={workers}", "trainer.ema_decay=0.999"]
            rows = [("loop", lambda: measure_loop(cfg.validate(), info, batch, window, steps))]
            if trainer_overrides is not None:
                rows.append(("avflow train", lambda: measure_trainer(trainer_overrides, info, steps)))
            for measured, run in rows:
                left = deadline - time.monotonic()
                if left < last_row_s[measured]:
                    print(f"| {strategy} | {measured} | skipped: {left:.0f} s of the budget left, a row takes "
                          f"~{last_row_s[measured]:.0f} s | | |", flush=True)
                    continue
                row_start = time.perf_counter()
                seconds = run()
                last_row_s[measured] = time.perf_counter() - row_start
                report(strategy, measured, seconds, batch * window, flops_per_frame, peak)
    finally:
        scratch.cleanup()
        shutdown(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
