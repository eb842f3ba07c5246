"""Sampling speed of the AV-Flow network per execution mode, and the real-time factor of text -> wav + motion.

    python3 benchmarks/sample.py --json sample.json           # full-size model; one GPU, about 4 minutes
    python3 benchmarks/sample.py --quick --json quick.json    # tiny sizes on CPU, about 2 minutes (a smoke run)

Sampling rows: 3 samples (one batch) and 1 sample of `--frames` frames (default 1725, one 20 s pass),
`--nfe` Euler steps (default 16), the whole fixed-step loop (`FixedStepSampler`: state in fp32, network
in the row's precision) on random weights:
- the published way: fp32, eager, the 3 samples one after another, dense T x T masked attention;
- eager fp32 and eager bf16 (bf16 weights, not autocast), batched;
- prepared bf16: the network as inference runs it (`PreparedVelocity`: time embedding and adaLN modulations
  precomputed per step time, the attention mask built once per call), eager;
- compiled: the same, with the whole network compiled (fullgraph, static shapes);
- CUDA graph: the compiled prepared loop captured whole by `GraphSampler` and replayed (CUDA only): the
  sampler `avflow generate --compile` and `avflow infer --compile` use.
Timed calls run with Dynamo's error_on_recompile: a recompilation after warm-up fails the row.
Every row's output is compared with eager fp32 on the same noise, so a fast but wrong mode shows.

Pipeline row: text -> rule-based token logits -> `generate_batch` (3 samples of one 20 s input, model file
of random full-size weights loaded with dtype bf16, CUDA-graph sampler on CUDA) -> BigVGAN (random weights)
on the three mels, back on the CPU. Real-time factor = wall seconds / seconds of audio produced; video is
not rendered.

Times are medians over `--repeats` calls after warm-up calls (which compile and capture), taken with CUDA
events on GPU and the wall clock on CPU; the pipeline's on the wall clock everywhere. A row whose warm-up would
not fit in what is left of `--budget-s` is skipped with a note, so the run ends in time. Each row is printed, and
the JSON rewritten, as soon as it is measured: a run cut short keeps every row it finished.

Every row runs with its fp32 matmul precision set before it and restored after: true fp32 ("ieee") for the
sampling rows, TF32 for the pipeline as `avflow generate` runs it. Dynamo's recompile limit is raised to cover
every shape and precision the rows compile for, so no row falls back to unfused attention.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from avflow.config import Config, ModelConfig, load_config
from avflow.infer.generate import conditioning, generate_batch
from avflow.infer.model import load_inference_model
from avflow.infer.sampler import GraphSampler, cuda_graphs_wanted
from avflow.model.avflow import AVFlowNet, count_parameters
from avflow.model.head_vae import HeadVAE
from avflow.model.io import model_state_tensors, write_model_file
from avflow.model.sampling import FixedStepSampler, PreparedVelocity
from avflow.model.state import StateCodec
from avflow.runtime import fp32_matmul_precision
from avflow.text.token_logits import text_to_token_logits
from avflow.utils import atomic_path
from avflow.vocoder.bigvgan import BigVGAN, BigVGANConfig

# The published code on one H200 (docs/performance.md): 3 x 1725 frames x 16 NFE, fp32 eager, 3 sequential
# samples. One sample of that run is a third of it.
PUBLISHED_MS = 592.0
PUBLISHED_WORK = (1725, 16)  # frames, NFE
TARGET_MS = 30.0  # 3 x 20 s, 20x faster than published
TARGET_RTF = 0.005
WEIGHT_STD = 0.02  # every parameter drawn: zero adaLN gates would leave the sublayers out of the numerics
FULL_BUDGET_S = 240.0  # benchmarks/gpu_check.sh passes its own, fitted into the check's 7 minutes
QUICK_BUDGET_S = 120.0  # enough on 2 CPU cores for one compiled row (about 45 s to compile)
# Compiled shapes: 2 sample counts x (fp32, bf16) x (eager-style flex, whole network) x 2 precisions, and the
# pipeline's; Dynamo's default of 8 per function would leave FlexAttention unfused for the later rows.
RECOMPILE_LIMIT = 64
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back home again. "


@dataclass
class Settings:
    model: dict  # ModelConfig fields that differ from the published network
    frames: int
    nfe: int
    warmup: int
    repeats: int
    vocoder: BigVGANConfig
    head_vae: dict = field(default_factory=dict)  # HeadVAEConfig fields that differ from the published one
    # Guessed warm-up seconds of a kind's first row (later rows use the measured one): what a row must
    # find left of the budget to start.
    first_warmup_s: dict = field(default_factory=dict)


FULL = Settings(model={}, frames=1725, nfe=16, warmup=2, repeats=7, vocoder=BigVGANConfig(),
                first_warmup_s={"eager": 10.0, "compiled": 90.0, "graph": 20.0, "pipeline": 30.0})
QUICK = Settings(model=dict(d_model=32, n_blocks=2, n_heads=2, ffn_hidden=64), frames=128, nfe=4, warmup=1,
                 repeats=3, head_vae=dict(ffn_hidden=8),
                 vocoder=BigVGANConfig(upsample_initial_channel=16, resblock_kernel_sizes=(3,),
                                       resblock_dilation_sizes=((1,),)),
                 first_warmup_s={"eager": 1.0, "compiled": 45.0, "graph": 1.0, "pipeline": 5.0})


class Budget:
    """Wall-clock seconds left to the whole run; a row starts only if its expected warm-up fits."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, wall_clock: bool = False) -> float:
    """Milliseconds of one call: CUDA events around it on a CUDA device (then a sync), else (or with
    `wall_clock`) the host clock until the device is done."""
    if device.type == "cuda" and not wall_clock:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - begin) * 1e3


@dataclass
class Timing:
    median_ms: float | None
    repeats: int
    warmup_s: float  # wall seconds of the warm-up calls (compilation and capture happen there)
    note: str = ""


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, budget: Budget,
            wall_clock: bool = False) -> Timing:
    """Median of `repeats` timed calls after `warmup` untimed ones; fewer repeats (or none) if the budget ends.

    `wall_clock` times every call on the host clock (with a device sync), as a real-time factor needs."""
    begin = time.perf_counter()
    last_s = 0.0
    for _ in range(warmup):
        call_start = time.perf_counter()
        fn()
        synchronize(device)
        last_s = time.perf_counter() - call_start
    warmup_s = time.perf_counter() - begin
    times: list[float] = []
    next_call_s = last_s  # the last warm-up call at first (pessimistic when it compiled), then the slowest timed one
    with torch._dynamo.config.patch(error_on_recompile=True):  # warm-up compiled every shape the row uses
        while len(times) < repeats and budget.left() >= next_call_s:
            times.append(time_call(fn, device, wall_clock))
            next_call_s = max(times) / 1e3
    if not times:
        return Timing(None, 0, warmup_s, f"not timed: {budget.left():.0f} s of the budget left after warm-up")
    note = f"{len(times)} of {repeats} repeats (budget)" if len(times) < repeats else ""
    return Timing(statistics.median(times), len(times), warmup_s, note)


def random_network(cfg: ModelConfig, device: torch.device) -> AVFlowNet:
    torch.manual_seed(0)
    net = AVFlowNet(cfg)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, WEIGHT_STD)
    return net.to(device).eval()


@dataclass
class Row:
    configuration: str
    samples: int
    kind: str  # eager | compiled | graph | pipeline: which warm-up estimate applies
    ms: float | None = None
    speedup: float | None = None
    frames_per_s: float | None = None
    repeats: int = 0
    warmup_s: float | None = None
    deviation: float | None = None  # max |x1 - x1_fp32| / max |x1_fp32 - x0|
    fp32_matmul: str = "ieee"  # the row's fp32 matmul precision on CUDA
    note: str = ""


def published_work(settings: Settings) -> bool:
    """Whether the run does the published measurement's work: the published network, 1725 frames, 16 NFE."""
    return not settings.model and (settings.frames, settings.nfe) == PUBLISHED_WORK


def published_ms_for(samples: int, settings: Settings) -> float | None:
    """The published time for the same work: 592 ms for 3 samples, a third of it for one; None otherwise."""
    if not published_work(settings) or samples not in (1, 3):
        return None
    return PUBLISHED_MS * samples / 3


class SamplingBench:
    """The networks, inputs and fp32 references that every sampling row shares, built (and compiled) once."""

    def __init__(self, settings: Settings, args: argparse.Namespace, device: torch.device):
        self.settings, self.device = settings, device
        self.baseline_attention = args.baseline_attention
        cfg = ModelConfig(**settings.model, attention=args.attention)
        self.net_fp32 = random_network(cfg, device)
        self.net_dense = AVFlowNet(dataclasses.replace(cfg, attention=args.baseline_attention)).to(device).eval()
        self.net_dense.load_state_dict(self.net_fp32.state_dict())
        self.net_bf16 = copy.deepcopy(self.net_fp32).to(torch.bfloat16)
        self.prepared = PreparedVelocity(self.net_bf16, "euler", settings.nfe)
        self.compiled = PreparedVelocity(self.net_bf16, "euler", settings.nfe, compile=True)
        generator = torch.Generator().manual_seed(1)
        self.inputs = {n: (torch.randn(n, settings.frames, cfg.state_dim, generator=generator).to(device),
                           torch.randn(n, settings.frames, cfg.cond_dim, generator=generator).to(device),
                           torch.ones(n, settings.frames, dtype=torch.bool, device=device)) for n in (3, 1)}
        self.references: dict[int, torch.Tensor] = {}
        self.graph_samplers: dict[int, GraphSampler] = {}  # kept, so a fallback to eager can be reported
        print(f"model: {count_parameters(self.net_fp32):,} parameters; attention {cfg.attention} "
              f"(published-style row: {args.baseline_attention})", flush=True)

    def loop(self, net: torch.nn.Module, dtype: torch.dtype) -> FixedStepSampler:
        return FixedStepSampler(net, "euler", self.settings.nfe, dtype).to(self.device)

    def one_at_a_time(self, sampler: FixedStepSampler) -> Callable:
        return lambda x0, cond, valid: torch.cat([sampler(x0[i:i + 1], cond[i:i + 1], valid[i:i + 1])
                                                  for i in range(x0.shape[0])])

    def captured(self, samples: int) -> GraphSampler:
        self.graph_samplers[samples] = GraphSampler(self.loop(self.compiled, torch.bfloat16), self.device,
                                                    use_cuda_graph=True)
        return self.graph_samplers[samples]

    def reference(self, samples: int) -> torch.Tensor:
        if samples not in self.references:
            self.references[samples] = self.loop(self.net_fp32, torch.float32)(*self.inputs[samples]).float()
        return self.references[samples]

    def plans(self, samples: int) -> list[tuple[str, str, Callable[[], Callable], str]]:
        """(configuration, kind, sampler factory, reason to skip) of the rows for `samples` samples."""
        plural = "s" * (samples > 1)
        compiled = "compiled prepared bf16"
        if cuda_graphs_wanted(self.device):
            graph_skip = ""
        elif self.device.type != "cuda":
            graph_skip = "skipped: CUDA graphs need a CUDA device"
        else:
            graph_skip = "skipped: AVFLOW_NO_CUDA_GRAPH is set"
        published = [(f"fp32 eager, 3 sequential samples (published style, {self.baseline_attention} attention)",
                      "eager", lambda: self.one_at_a_time(self.loop(self.net_dense, torch.float32)), "")]
        return (published if samples == 3 else []) + [
            (f"eager fp32, {samples} sample{plural}", "eager", lambda: self.loop(self.net_fp32, torch.float32), ""),
            (f"eager bf16, {samples} sample{plural}", "eager", lambda: self.loop(self.net_bf16, torch.bfloat16), ""),
            (f"prepared bf16, {samples} sample{plural}", "eager", lambda: self.loop(self.prepared, torch.bfloat16), ""),
            (f"{compiled}, {samples} sample{plural}", "compiled", lambda: self.loop(self.compiled, torch.bfloat16), ""),
            (f"CUDA graph of the {compiled} loop, {samples} sample{plural}", "graph",
             lambda: self.captured(samples), graph_skip),
        ]

    def rows(self, samples: int, kinds: tuple[str, ...], budget: Budget, warmup_estimates: dict[str, float],
             report: "Report") -> None:
        """Measure the rows for `samples` samples whose kind is in `kinds`, each reported as soon as it is done."""
        for name, kind, build, skip in self.plans(samples):
            if kind not in kinds:
                continue
            row = Row(name, samples, kind)
            expected_warmup = warmup_estimates.get(kind, self.settings.first_warmup_s.get(kind, 0.0))
            if skip:
                row.note = skip
            elif budget.left() < expected_warmup:
                row.note = (f"skipped: {budget.left():.0f} s of the budget left, its warm-up takes "
                            f"~{expected_warmup:.0f} s")
            else:
                with fp32_matmul_precision(row.fp32_matmul):
                    run_row(row, build(), self.inputs[samples], lambda: self.reference(samples), self.settings,
                            self.device, budget)
                warmup_estimates[kind] = row.warmup_s
                if kind == "graph" and not self.graph_samplers[samples].use_cuda_graph:
                    row.note = "capture failed: this row ran eagerly (see the warning above)"
            report.add(row)


def run_row(row: Row, sampler: Callable, inputs: tuple[torch.Tensor, ...], reference: Callable[[], torch.Tensor],
            settings: Settings, device: torch.device, budget: Budget) -> None:
    """Time one configuration and compare its output with `reference()`, eager fp32 on the same inputs,
    relative to how far that moved from the noise (so a mode that loses the network's steps shows)."""
    with torch.no_grad():
        timing = measure(lambda: sampler(*inputs), device, settings.warmup, settings.repeats, budget)
        output = sampler(*inputs).float()
        expected = reference()
    travelled = (expected - inputs[0].float()).abs().max()
    row.deviation = ((output - expected).abs().max() / travelled).item()
    row.ms, row.repeats, row.warmup_s, row.note = timing.median_ms, timing.repeats, timing.warmup_s, timing.note
    if row.ms is not None:
        row.frames_per_s = row.samples * settings.frames / (row.ms / 1e3)
        published = published_ms_for(row.samples, settings)
        row.speedup = published / row.ms if published else None


def random_model_file(cfg: Config, path: Path) -> Path:
    """A model file of random weights (network, expression/mel normalization, head VAE), as training writes."""
    net = random_network(cfg.model, torch.device("cpu"))
    codec = StateCodec(torch.zeros(cfg.model.expression_dim), torch.ones(cfg.model.expression_dim),
                       cfg.mel.norm_mean, cfg.mel.norm_std, cfg.model)
    pose_dim = cfg.head_vae.pose_dim
    tensors = {"ema": net.state_dict(), **model_state_tensors(codec, HeadVAE(cfg.head_vae).state_dict(),
                                                              torch.zeros(pose_dim), torch.ones(pose_dim))}
    return write_model_file(cfg, tensors, path, "benchmarks/sample.py (random weights)")


def text_for_frames(frames: int, frame_rate: float) -> str:
    """Enough repetitions of one sentence for the rule front end to give at least `frames` frames."""
    text = SENTENCE
    while text_to_token_logits(text, frame_rate).shape[0] < frames:
        text += SENTENCE
    return text.strip()


def pipeline_row(settings: Settings, args: argparse.Namespace, device: torch.device, budget: Budget,
                 report: "Report") -> None:
    samples = 3
    sampler = "CUDA-graph" if cuda_graphs_wanted(device) else "eager"
    row = Row(f"pipeline: text -> {samples} x (wav + motion), {'compiled ' if args.pipeline_compile else ''}bf16 "
              f"network, {sampler} sampler, {args.vocoder_dtype} BigVGAN", samples, "pipeline", fp32_matmul="tf32")
    expected_warmup = settings.first_warmup_s["pipeline"]
    if budget.left() < expected_warmup:
        row.note = f"skipped: {budget.left():.0f} s of the budget left, its set-up takes ~{expected_warmup:.0f} s"
        report.add(row)
        return
    with fp32_matmul_precision(row.fp32_matmul):
        report.pipeline = measure_pipeline(row, settings, args, device, budget)
    report.add(row)


def measure_pipeline(row: Row, settings: Settings, args: argparse.Namespace, device: torch.device,
                     budget: Budget) -> dict:
    """Fill in `row` with the timed text -> wav + motion calls; returns the real-time factor and stage times."""
    samples = row.samples
    details: dict = {}
    overrides = [f"model.{key}={value}" for key, value in settings.model.items()]
    overrides += [f"head_vae.{key}={value}" for key, value in settings.head_vae.items()]
    # One pass of exactly `frames` frames: one window, so no overlap (and no padding to a larger length bucket).
    overrides += [f"model.attention={args.attention}", f"sample.num_samples={samples}", f"sample.nfe={settings.nfe}",
                  f"sample.max_frames={settings.frames}", "sample.window_overlap=0"]
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as scratch:
        model_file = random_model_file(cfg, Path(scratch) / "model.safetensors")
        model = load_inference_model(model_file, device=str(device), dtype="bf16", batch_rows=samples,
                                     compile_network=args.pipeline_compile)
    torch.manual_seed(0)
    vocoder_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.vocoder_dtype]
    vocoder = BigVGAN(settings.vocoder).to(device, vocoder_dtype).eval()
    text = text_for_frames(settings.frames, cfg.mel.frame_rate)
    stage_s: dict[str, list[float]] = {"text": [], "sample": [], "vocoder": []}
    audio_seconds = []

    def text_to_outputs() -> None:
        begin = time.perf_counter()
        tokens = text_to_token_logits(text, cfg.mel.frame_rate)[:settings.frames]
        cond = conditioning(model, tokens)
        after_text = time.perf_counter()
        generated = generate_batch(model, [cond])[0]  # ends with the motion and mel on the CPU
        after_sample = time.perf_counter()
        with torch.inference_mode():
            mel = torch.from_numpy(generated.mel).to(device, vocoder_dtype).transpose(1, 2)
            audio = vocoder(mel)[:, 0].float().cpu().numpy()
        end = time.perf_counter()
        for stage, seconds in zip(stage_s, (after_text - begin, after_sample - after_text, end - after_sample)):
            stage_s[stage].append(seconds)
        audio_seconds.append(audio.size / cfg.mel.sample_rate)

    timing = measure(text_to_outputs, device, settings.warmup, settings.repeats, budget, wall_clock=True)
    row.repeats, row.warmup_s, row.note = timing.repeats, timing.warmup_s, timing.note
    if timing.median_ms is not None:
        row.ms = timing.median_ms
        produced = audio_seconds[-1]
        row.frames_per_s = samples * settings.frames / (row.ms / 1e3)
        timed = slice(settings.warmup, None)
        details = {"audio_seconds": produced, "rtf": row.ms / 1e3 / produced, "text_chars": len(text),
                   "stage_ms": {stage: statistics.median(values[timed]) * 1e3 for stage, values in stage_s.items()}}
    if cuda_graphs_wanted(device) and not all(runner.use_cuda_graph for runner in model.samplers.values()):
        row.note = "; ".join(filter(None, [row.note,
                                           "capture failed: the sampler ran eagerly (see the warning above)"]))
    return details


def cell(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


TABLE_HEADER = ("| configuration | ms per call | speedup vs published 592 ms | frames/s |\n"
                "| --- | ---: | ---: | ---: |")


def markdown_row(row: Row) -> str:
    speedup = f"{row.speedup:.1f}x" if row.speedup is not None else ("n/a" if row.ms is not None else "-")
    return f"| {row.configuration} | {cell(row.ms, '.2f')} | {speedup} | {cell(row.frames_per_s, ',.0f')} |"


def notes(rows: list[Row]) -> list[str]:
    lines = []
    for row in rows:
        parts = [row.note] if row.note else []
        if row.deviation is not None:
            parts.append(f"max |x1 - x1_eager_fp32| / max |x1_eager_fp32 - x0| = {row.deviation:.2e}")
        if row.warmup_s is not None:
            parts.append(f"warm-up {row.warmup_s:.1f} s, {row.repeats} timed calls")
        parts.append(f"fp32 matmuls {row.fp32_matmul}")
        lines.append(f"- {row.configuration}: {'; '.join(parts)}")
    return lines


def verdicts(rows: list[Row], pipeline: dict, settings: Settings) -> dict:
    """Whether the issue's two targets are met, or why they cannot be judged from this run."""
    full_work = published_work(settings)
    three = [row.ms for row in rows if row.samples == 3 and row.kind != "pipeline" and row.ms is not None
             and "sequential" not in row.configuration]
    best = min(three) if three else None
    if not full_work:
        sampling = "not judged: not the published network at 3 x 1725 frames x 16 NFE"
    elif best is None:
        sampling = "not measured"
    else:
        sampling = f"{'met' if best <= TARGET_MS else 'not met'}: best {best:.2f} ms (target {TARGET_MS:.0f} ms)"
    rtf = pipeline.get("rtf")
    if not full_work:
        pipeline_verdict = "not judged: not the published network at 3 x 1725 frames x 16 NFE"
    elif rtf is None:
        pipeline_verdict = "not measured"
    else:
        pipeline_verdict = f"{'met' if rtf < TARGET_RTF else 'not met'}: RTF {rtf:.5f} (target < {TARGET_RTF})"
    return {"sampling_3x20s_ms": sampling, "pipeline_rtf": pipeline_verdict}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, vocoder and inputs: a smoke run (on CPU with one thread)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--frames", type=int, help="frames per sample (default 1725; --quick 128)")
    parser.add_argument("--nfe", type=int, help="network evaluations per sample (default 16; --quick 4)")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default 7; --quick 3)")
    parser.add_argument("--attention", default="auto", choices=("auto", "flex", "banded", "dense"),
                        help="attention of every row but the published-style one (auto: flex on CUDA, banded on CPU)")
    parser.add_argument("--baseline-attention", default="dense", choices=("auto", "flex", "banded", "dense"),
                        help="attention of the published-style row (default dense, the published T x T mask)")
    parser.add_argument("--pipeline-compile", action="store_true", help="compile the pipeline's network too")
    parser.add_argument("--vocoder-dtype", choices=("bf16", "fp32"),
                        help="BigVGAN precision (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--no-pipeline", action="store_true", help="only the sampling rows")
    parser.add_argument("--budget-s", type=float,
                        help="seconds for the run; rows that would not fit are skipped (default 240, --quick 120)")
    parser.add_argument("--json", type=Path, help="write every number and setting to this JSON file")
    return parser


class Report:
    """The run's rows, each printed as a table line and saved (the JSON rewritten whole) the moment it is added."""

    def __init__(self, path: Path | None, header: dict, settings: Settings, budget: Budget):
        self.path, self.header, self.settings, self.budget = path, header, settings, budget
        self.rows: list[Row] = []
        self.pipeline: dict = {}
        print(TABLE_HEADER, flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(markdown_row(row), flush=True)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        report = {**self.header, "rows": [dataclasses.asdict(row) for row in self.rows], "pipeline": self.pipeline,
                  "targets": verdicts(self.rows, self.pipeline, self.settings),
                  "seconds": self.header["arguments"]["budget_s"] - self.budget.left()}
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=str))

    def summary(self) -> None:
        print()
        print("\n".join(notes(self.rows)))
        if self.pipeline:
            stages = ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in self.pipeline["stage_ms"].items())
            print(f"\npipeline: {self.pipeline['audio_seconds']:.2f} s of audio in total, real-time factor "
                  f"{self.pipeline['rtf']:.5f} ({stages})")
        targets = verdicts(self.rows, self.pipeline, self.settings)
        print(f"target 3 x 20 s in <= {TARGET_MS:.0f} ms: {targets['sampling_3x20s_ms']}")
        print(f"target pipeline RTF < {TARGET_RTF}: {targets['pipeline_rtf']}")
        if self.path is not None:
            print(f"wrote {self.path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.budget_s = args.budget_s or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    base = QUICK if args.quick else FULL
    settings = dataclasses.replace(base, frames=args.frames or base.frames, nfe=args.nfe or base.nfe,
                                   repeats=args.repeats or base.repeats)
    for name, value in (("--frames", settings.frames), ("--nfe", settings.nfe), ("--repeats", settings.repeats)):
        if value < 1:
            raise SystemExit(f"{name}: expected at least 1, got {value}")
    if args.quick and device.type == "cpu":
        # A smoke run on shared CI machines: one thread, so competing processes do not stall its OpenMP barriers.
        torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    args.vocoder_dtype = args.vocoder_dtype or ("bf16" if device.type == "cuda" else "fp32")
    command = "python3 benchmarks/sample.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"device: {device_name(device)}; torch {torch.__version__}; {started:%Y-%m-%d %H:%M} UTC")
    print(f"work: {settings.frames} frames x {settings.nfe} NFE per sample; {settings.warmup} warm-up and "
          f"{settings.repeats} timed calls per row; budget {args.budget_s:.0f} s", flush=True)

    warmup_estimates: dict[str, float] = {}
    bench = SamplingBench(settings, args, device)
    header = {"command": command, "date_utc": started.isoformat(timespec="seconds"), "device": device_name(device),
              "torch": torch.__version__, "settings": dataclasses.asdict(settings), "arguments": vars(args),
              "published_ms": PUBLISHED_MS}
    report = Report(args.json, header, settings, budget)
    # The two targets first: 3 samples eagerly, the pipeline (which compiles nothing unless asked), then the
    # compiled and captured 3-sample rows; a tight budget drops 1-sample rows instead.
    bench.rows(3, ("eager",), budget, warmup_estimates, report)
    if not args.no_pipeline:
        pipeline_row(settings, args, device, budget, report)
    bench.rows(3, ("compiled", "graph"), budget, warmup_estimates, report)
    bench.rows(1, ("eager", "compiled", "graph"), budget, warmup_estimates, report)
    report.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
