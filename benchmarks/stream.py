"""Streaming latency: first audio, first motion frame, per-chunk latency and real-time factor of `avflow stream`
against the input's length, for the demo network and the published-size network.

    python benchmarks/stream.py --json stream.json              # demo and published networks, 5/20/60/300 s
    python benchmarks/stream.py --quick --json quick.json       # tiny network, 2 and 5 s, CPU: under a minute

Each row streams text of about the given length through `InferenceModel.stream` as `avflow stream` does by
default (windows of STREAM_WINDOW_SECONDS, one sample, 16 Euler steps unless --nfe), from random weights (the
speed does not depend on them): rule-based text timing -> windowed sampling -> head pose -> Griffin-Lim on the
CPU or BigVGAN (random weights) on CUDA. The model is loaded and warmed up before the clock starts, as a
serving process would be; the text's timing is on the clock. first_audio_s / first_motion_s: from the request
to the first chunk holding audio / 30 fps motion (the median over --repeats runs stopped once both came and the
whole run); chunk latency: from the request (the input is all there at the start) to each chunk; real-time
factor: wall seconds over seconds of audio; stall: how long playback started at
the first audio would pause, waiting for chunks. No frames are rendered here.

Rows are printed and written to --json as each is measured, so a run stopped by a time limit keeps what it
measured; a row whose expected time does not fit what is left of --budget-s is skipped with a note.
Only torch and numpy are imported before the run starts (avflow is imported inside functions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "the quick brown fox jumps over the lazy dog and then it runs back home again "
NETWORKS = {"demo": str(ROOT / "configs" / "demo.yaml"), "published": None}


def build_model(network: str, device: torch.device, quick: bool, vocoder: str):
    """An InferenceModel of random weights with the network's config, on `device`, in its default precision."""
    from avflow.config import load_config
    from avflow.infer.model import InferenceModel, default_dtype
    from avflow.model.avflow import AVFlowNet
    from avflow.model.head_vae import HeadVAE
    from avflow.model.state import StateCodec
    from avflow.runtime import DTYPES

    tiny = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=64"] if quick else []
    cfg = load_config(NETWORKS[network], tiny)
    dtype = DTYPES[default_dtype(device)]
    torch.manual_seed(0)
    net = AVFlowNet(cfg.model).to(device, dtype).eval()
    codec = StateCodec(torch.zeros(cfg.model.expression_dim), torch.ones(cfg.model.expression_dim),
                       cfg.mel.norm_mean, cfg.mel.norm_std, cfg.model)
    pose = cfg.head_vae.pose_dim
    model = InferenceModel(cfg, net, codec, HeadVAE(cfg.head_vae).to(device).eval(), torch.zeros(pose),
                           torch.ones(pose), device, dtype)
    if vocoder == "bigvgan":
        from avflow.vocoder.bigvgan import BigVGAN

        model.vocoder = BigVGAN().to(device).eval().requires_grad_(False)
    parameters = sum(p.numel() for p in net.parameters())
    return model, parameters


def text_of(seconds: float, frame_rate: float) -> str:
    """Text whose rule-based timing lasts about `seconds`: SENTENCE's words, repeated."""
    from avflow.text.token_logits import text_to_token_logits

    words = SENTENCE.split()
    per_word = text_to_token_logits(SENTENCE, frame_rate).shape[0] / frame_rate / len(words)
    count = max(1, round(seconds / per_word))
    return " ".join(words[index % len(words)] for index in range(count))


def measure(model, text: str, nfe: int, repeats: int) -> dict:
    """One whole stream (chunk latency, real-time factor), and the median first audio and first motion over
    `repeats` streams stopped once both came (the CPU is shared: single timings scatter)."""
    import statistics

    from avflow.infer.stream import stream_sample_config

    cfg = stream_sample_config(model.cfg.sample, model.cfg.mel.frame_rate, windows_given=False)
    cfg.nfe, cfg.method = nfe, "euler"
    firsts = []
    for _ in range(repeats):
        stream = model.stream(text, sample_cfg=cfg)
        audio = motion = False
        for chunk in stream:  # a chunk may hold audio and no 30 fps frame yet
            audio, motion = audio or chunk.audio.size > 0, motion or chunk.expression.shape[0] > 0
            if audio and motion:
                break
        firsts.append((stream.summary()["first_audio_s"], stream.summary()["first_motion_s"]))
    started = time.perf_counter()
    stream = model.stream(text, sample_cfg=cfg)
    for _ in stream:
        pass
    summary = stream.summary()
    summary["wall_s"] = time.perf_counter() - started
    summary["first_audio_runs_s"] = [audio for audio, _ in firsts] + [summary["first_audio_s"]]
    summary["first_audio_s"] = statistics.median(summary["first_audio_runs_s"])
    summary["first_motion_s"] = statistics.median([motion for _, motion in firsts] + [summary["first_motion_s"]])
    summary["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return summary


def write_json(path: Path | None, report: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny network, 2 and 5 s, 4 NFE: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--networks", default="demo,published", help="comma-separated: demo, published")
    parser.add_argument("--lengths", help="input seconds, comma-separated (default 5,20,60,300; --quick 2,5)")
    parser.add_argument("--nfe", type=int, help="network evaluations per sample (default 16; --quick 4)")
    parser.add_argument("--vocoder", choices=("griffin-lim", "bigvgan"),
                        help="default: BigVGAN (random weights) on CUDA, Griffin-Lim on the CPU")
    parser.add_argument("--repeats", type=int, help="runs stopped once audio and motion came, besides the whole "
                                                    "run, for the median first audio and motion (default 4; --quick 1)")
    parser.add_argument("--budget-s", type=float, help="skip rows that would not finish within this many seconds")
    parser.add_argument("--json", type=Path, help="write the settings and every row here, after each row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lengths = [float(x) for x in (args.lengths or ("2,5" if args.quick else "5,20,60,300")).split(",")]
    networks = ["demo"] if args.quick else [name.strip() for name in args.networks.split(",")]
    nfe = args.nfe or (4 if args.quick else 16)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 4)
    vocoder = args.vocoder or ("bigvgan" if device.type == "cuda" else "griffin-lim")
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    report = {"benchmark": "stream", "command": " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "nfe": nfe, "vocoder": vocoder,
              "rows": [], "skipped": []}
    print(f"{'network':>9} {'params':>10} {'input s':>8} {'first audio s':>13} {'first motion s':>14} "
          f"{'chunk p50 s':>11} {'chunk p90 s':>11} {'RTF':>6} {'stall s':>7} {'windows':>7}", flush=True)
    for network in networks:
        model, parameters = build_model(network, device, args.quick, vocoder)
        rtf = None
        for seconds in lengths:
            expected = (2.0 + seconds * (rtf if rtf is not None else 1.0)) * (1 + 0.1 * repeats)
            if deadline is not None and time.perf_counter() + expected > deadline:
                report["skipped"].append(f"{network} {seconds:g} s: expected ~{expected:.0f} s, over --budget-s")
                print(f"{network:>9} {parameters:>10,} {seconds:>8g} skipped: would not fit --budget-s", flush=True)
                write_json(args.json, report)
                continue
            row = measure(model, text_of(seconds, model.cfg.mel.frame_rate), nfe, repeats)
            rtf = row["real_time_factor"]
            row.update(network=network, parameters=parameters, input_s=seconds)
            report["rows"].append(row)
            latency = row["chunk_latency_s"]
            step = row["window_frames"] - row["overlap_frames"]
            windows = max(1, round(row["audio_seconds"] * model.cfg.mel.frame_rate / step))
            print(f"{network:>9} {parameters:>10,} {row['audio_seconds']:>8.1f} {row['first_audio_s']:>13.3f} "
                  f"{row['first_motion_s']:>14.3f} {latency['p50']:>11.3f} {latency['p90']:>11.3f} {rtf:>6.3f} "
                  f"{row['playback_stall_s']:>7.3f} {windows:>7}", flush=True)
            write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
