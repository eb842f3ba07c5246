"""Time one training step and one 16-NFE sampling pass of the AV-Flow network; print frames/s.

    python benchmarks/step_and_sample.py            # full-size published model, on CUDA if present
    python benchmarks/step_and_sample.py --small    # small model and short inputs (CPU)

Training: batch of `--batch` windows of `--window` frames, AdamW, bf16 autocast on CUDA.
Sampling: `--samples` samples of `--frames` frames drawn as one batch, `--nfe` Euler steps.
Reports the median over `--repeats` timed runs after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from avflow.config import FlowConfig, ModelConfig, SampleConfig
from avflow.model.avflow import AVFlowNet, count_parameters
from avflow.model.flow import flow_matching_loss
from avflow.model.sampling import sample_sequence
from avflow.train.loop import autocast_context

SMALL = dict(d_model=128, n_blocks=4, n_heads=4, ffn_hidden=256)


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small model and short inputs, for CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--window", type=int, default=345)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--nfe", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention", default="auto", choices=("auto", "flex", "banded", "dense"),
                        help="dense is the published T x T masked attention, for comparison")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = ModelConfig(**SMALL, attention=args.attention) if args.small else ModelConfig(attention=args.attention)
    batch = args.batch or (4 if args.small else 16)
    frames = args.frames or (345 if args.small else 1725)
    torch.manual_seed(0)
    net = AVFlowNet(cfg).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    precision = "auto"

    x1 = torch.randn(batch, args.window, cfg.state_dim, device=device)
    cond = torch.randn(batch, args.window, cfg.cond_dim, device=device)
    valid = torch.ones(batch, args.window, dtype=torch.bool, device=device)

    def train_step() -> None:
        with autocast_context(precision, device):
            loss, _ = flow_matching_loss(net, x1, cond, valid, FlowConfig(), cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sample_cond = torch.randn(frames, cfg.cond_dim, device=device)
    sample_cfg = SampleConfig(num_samples=args.samples, nfe=args.nfe)

    def sampling_pass() -> None:
        with autocast_context(precision, device):
            sample_sequence(net, sample_cond, cfg.state_dim, sample_cfg, seed=0)

    train_s = timed(train_step, device, args.repeats)
    sample_s = timed(sampling_pass, device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model: {count_parameters(net) / 1e6:.2f}M parameters; attention: {cfg.attention}")
    print(f"train step, batch {batch} x {args.window}: {train_s * 1e3:.1f} ms, "
          f"{batch * args.window / train_s:,.0f} frames/s")
    print(f"sampling, {args.samples} x {frames} frames x {args.nfe} NFE: {sample_s * 1e3:.1f} ms, "
          f"{args.samples * frames / sample_s:,.0f} frames/s "
          f"(real-time factor {sample_s / (frames / 86.1328125):.4f})")


if __name__ == "__main__":
    main()
