"""The sections of avflow's one typed configuration, and their validation.

Defaults reproduce the published AV-Flow system (the comment beside a value names its origin). Sections are by
owner (`data`: what packed shards are made of; `loader`: how training reads them; ...); each checks its values in
its `validate`, and `Config.validate` runs them all and checks the keys that relate sections. How files,
overrides and stored configs are read into these sections: avflow.config.loading. The published values behind the
defaults, with their units and layouts: docs/reference.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, key or value that avflow cannot use."""


@dataclass
class MelConfig:
    """Log-mel features; every value is the BigVGAN base 22 kHz 80-band config used by AV-Flow."""

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    norm_mean: float = -5.5366  # AV-Flow reference mel normalization
    norm_std: float = 2.1161

    @property
    def frame_rate(self) -> float:
        """All streams run at this rate: 22050 / 256 = 86.1328125 frames per second."""
        return self.sample_rate / self.hop_length

    def validate(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels"):
            _require(getattr(self, name) >= 1, f"mel.{name}", "a positive integer", getattr(self, name))
        _require(self.win_length <= self.n_fft, "mel.win_length", f"at most mel.n_fft={self.n_fft}", self.win_length)
        _require(0 <= self.fmin < self.fmax <= self.sample_rate / 2, "mel.fmin/fmax",
                 f"0 <= fmin < fmax <= sample_rate / 2 = {self.sample_rate / 2}", (self.fmin, self.fmax))
        _require(self.norm_std > 0, "mel.norm_std", "positive", self.norm_std)


@dataclass
class ModelConfig:
    """The two-stream DiT; defaults are the published monadic network (67,935,576 parameters)."""

    d_model: int = 512
    n_blocks: int = 8  # per stream
    n_heads: int = 4
    ffn_hidden: int = 1024
    dropout: float = 0.0
    window_back: int = 16  # reference: each frame sees 16 frames back ...
    window_ahead: int = 8  # ... and 8 ahead, inclusive
    rope_base: float = 10000.0
    time_freqs: int = 64  # reference: d_model / 8 sinusoid frequencies
    expression_dim: int = 256  # Codec-Avatar expression code
    head_latent_dim: int = 8  # head-pose VAE latent
    mel_dim: int = 80
    token_dim: int = 29  # wav2vec2 character CTC logits
    dyadic: bool = False
    participant_feature_dim: int = 58  # SMIRK expression + head pose of the participant
    attention: Literal["auto", "flex", "banded", "dense"] = "auto"  # auto: flex on CUDA, banded elsewhere
    # The identity names in embedding order: each frame's conditioning ends with a one-hot of its identity, so
    # the input projections' extra columns are a learned identity embedding of each stream. Empty: one identity
    # and no embedding, the published network exactly. Training fills it from a multi-identity shard manifest.
    identities: list[str] = field(default_factory=list)

    @property
    def visual_dim(self) -> int:
        return self.expression_dim + self.head_latent_dim

    @property
    def state_dim(self) -> int:
        """Width of the full generated state x = [expression | head latent | mel]."""
        return self.visual_dim + self.mel_dim

    @property
    def cond_dim(self) -> int:
        """Per-frame conditioning: actor tokens, plus participant tokens and features when dyadic, plus the
        identity one-hot when the model has an identity table."""
        extra = self.token_dim + self.participant_feature_dim if self.dyadic else 0
        return self.token_dim + extra + len(self.identities)

    def validate(self) -> None:
        _require(self.d_model % self.n_heads == 0, "model.d_model", f"divisible by model.n_heads={self.n_heads}",
                 self.d_model)
        _require((self.d_model // self.n_heads) % 2 == 0, "model.d_model",
                 "a per-head size that is even (RoPE pairs)", self.d_model)
        for name in ("d_model", "n_blocks", "n_heads", "ffn_hidden", "time_freqs", "expression_dim", "mel_dim",
                     "token_dim"):
            _require(getattr(self, name) > 0, f"model.{name}", "a positive integer", getattr(self, name))
        for name in ("head_latent_dim", "participant_feature_dim"):
            _require(getattr(self, name) >= 1, f"model.{name}", "a positive integer", getattr(self, name))
        _require(self.rope_base > 1, "model.rope_base", "greater than 1", self.rope_base)
        _require(self.window_back >= 0 and self.window_ahead >= 0, "model.window_back/window_ahead", "non-negative",
                 (self.window_back, self.window_ahead))
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "in [0, 1)", self.dropout)
        _require(all(isinstance(name, str) and name for name in self.identities), "model.identities",
                 "non-empty names", self.identities)
        _require(len(set(self.identities)) == len(self.identities), "model.identities", "distinct names",
                 self.identities)


@dataclass
class FlowConfig:
    """Conditional OT flow matching and its loss."""

    sigma_min: float = 1e-6  # reference
    expression_weight: float = 1.0  # reference loss: expression + 0.2 head + w mel
    head_weight: float = 0.2
    mel_weight: float = 3.0  # what the reference config intends (its code slips to 0.2)
    cond_dropout: float = 0.0  # >0 trains an unconditional branch for classifier-free guidance

    def validate(self) -> None:
        _require(0.0 <= self.sigma_min < 1.0, "flow.sigma_min", "in [0, 1)", self.sigma_min)
        _require(min(self.expression_weight, self.head_weight, self.mel_weight) >= 0, "flow.*_weight",
                 "non-negative", (self.expression_weight, self.head_weight, self.mel_weight))
        _require(0.0 <= self.cond_dropout < 1.0, "flow.cond_dropout", "in [0, 1)", self.cond_dropout)


@dataclass
class SampleConfig:
    """Inference sampler."""

    method: Literal["euler", "midpoint"] = "euler"  # reference: Euler
    nfe: int = 16  # reference: 16 Euler steps
    temperature: float = 1.0
    num_samples: int = 3  # reference draws three samples per input
    guidance_scale: float = 1.0  # 1.0 = no guidance, as published
    seed: int = 0
    max_frames: int = 1725  # reference: one pass covers up to ~20 s
    window_overlap: int = 86  # longer inputs: windows of max_frames overlapping by ~1 s, cross-faded
    max_input_seconds: float = 600.0  # longer inputs fail with a reason, so one item cannot hold up a whole batch

    def validate(self) -> None:
        _require(self.nfe >= 1, "sample.nfe", "at least 1", self.nfe)
        _require(self.method != "midpoint" or self.nfe % 2 == 0, "sample.nfe",
                 "even for the midpoint sampler (2 evaluations per step)", self.nfe)
        _require(self.temperature >= 0, "sample.temperature", "non-negative", self.temperature)
        _require(self.num_samples >= 1, "sample.num_samples", "at least 1", self.num_samples)
        _require(self.guidance_scale >= 0, "sample.guidance_scale", "non-negative", self.guidance_scale)
        _require(self.seed >= 0, "sample.seed", "a non-negative integer", self.seed)
        _require(self.max_frames >= 1, "sample.max_frames", "at least 1", self.max_frames)
        _require(self.max_input_seconds > 0, "sample.max_input_seconds", "positive", self.max_input_seconds)
        _require(0 <= self.window_overlap < self.max_frames // 2, "sample.window_overlap",
                 f"in [0, sample.max_frames / 2 = {self.max_frames // 2})", self.window_overlap)


@dataclass
class HeadVAEConfig:
    """Head-pose VAE (7-d pose on 50h, 4-d on Audio2Photoreal) -> 8-d latent."""

    pose_dim: int = 7
    hidden: int = 16  # reference
    latent_dim: int = 8
    n_layers: int = 1
    n_heads: int = 1
    ffn_hidden: int = 2048  # torch.nn.TransformerEncoderLayer default, kept by the reference
    dropout: float = 0.1
    kl_weight: float = 1e-4  # reference
    steps: int = 2000
    batch_size: int = 32
    segment_length: int = 345
    lr: float = 1e-3

    def validate(self) -> None:
        _require(self.pose_dim in (4, 7), "head_vae.pose_dim",
                 "7 (50h quaternion + translation) or 4 (Audio2Photoreal)", self.pose_dim)
        for name in ("hidden", "latent_dim", "n_layers", "n_heads", "ffn_hidden", "steps", "batch_size",
                     "segment_length"):
            _require(getattr(self, name) >= 1, f"head_vae.{name}", "at least 1", getattr(self, name))
        _require(0.0 <= self.dropout < 1.0, "head_vae.dropout", "in [0, 1)", self.dropout)
        _require(self.kl_weight >= 0, "head_vae.kl_weight", "non-negative", self.kl_weight)
        _require(self.lr > 0, "head_vae.lr", "positive", self.lr)
        _require(self.hidden % self.n_heads == 0, "head_vae.hidden", f"divisible by head_vae.n_heads={self.n_heads}",
                 self.hidden)


DEFAULT_IDENTITY = "default"  # the identity of a dataset that names none (data.identity empty), and of old shards


def _identity_name_problem(name: str) -> str | None:
    """Why `name` cannot name an identity (it prefixes WebDataset keys and is a manifest key), or None."""
    if "." in name or "/" in name or any(character.isspace() for character in name):
        return f"a name without '.', '/' or whitespace (it prefixes sample keys), got {name!r}"
    return None


@dataclass
class SourceConfig:
    """One dataset root of a multi-source pack (data.sources): read like data.layout/root/subject/identity."""

    layout: str = "50h"  # a name in avflow.data.layouts.LAYOUTS, checked when data is read
    root: str = ""
    subject: str = ""  # a2p: the subject folder under root
    identity: str = ""  # the identity of this root's segments whose layout names none (50h); empty: default

    def validate(self, where: str) -> None:
        _require(bool(self.root), f"{where}.root", "the dataset folder (or manifest file) of this source", self.root)
        problem = _identity_name_problem(self.identity)
        _require(problem is None, f"{where}.identity", problem or "", self.identity)


@dataclass
class DataConfig:
    """What a packed shard's bytes are made of: `avflow pack` keeps a shard exactly while this section and `mel`
    are unchanged (its plan, avflow.data.pack), so a key that changes no shard byte belongs elsewhere."""

    layout: str = "50h"  # a name in avflow.data.layouts.LAYOUTS (50h | a2p | manifest), checked when data is read
    root: str = "data/demo"
    subject: str = ""  # a2p: the subject folder under root (PXB184, RLW104, TXB805, GQS883)
    # The identity of the segments whose layout names none (a 50h root); empty: DEFAULT_IDENTITY. The a2p layout
    # names the subject, the manifest layout each line's identity.
    identity: str = ""
    # Several dataset roots packed into one shard folder; empty: the one source layout/root/subject/identity.
    # Their sample keys are prefixed by each segment's identity, so equal segment names of two roots stay apart.
    sources: list[SourceConfig] = field(default_factory=list)
    val_patterns: list[str] = field(default_factory=lambda: ["20240408", "20240509"])  # 50h validation sessions
    visual_fps: float = 30.0
    token_fps: float = 50.0  # wav2vec2 20 ms stride
    val_last_scenes: int = 2  # a2p: the last N scenes (sorted) are held out, as published
    participant_mel: bool = False  # dyadic: also pack the participant's mel (audio channel 1)
    canonical_quaternion_sign: bool = True  # 50h: continuous quaternion sign; the published code does not
    segments_per_shard: int = 32  # with max_chunk_seconds, bounds a shard's size
    max_chunk_seconds: float = 60.0  # longer segments are stored as consecutive chunks

    def validate(self) -> None:
        _require(self.val_last_scenes >= 0, "data.val_last_scenes", "non-negative", self.val_last_scenes)
        _require(self.visual_fps > 0 and self.token_fps > 0, "data.visual_fps/token_fps", "positive",
                 (self.visual_fps, self.token_fps))
        _require(self.segments_per_shard >= 1, "data.segments_per_shard", "at least 1", self.segments_per_shard)
        _require(self.max_chunk_seconds >= 1.0, "data.max_chunk_seconds", "at least 1 second", self.max_chunk_seconds)
        problem = _identity_name_problem(self.identity)
        _require(problem is None, "data.identity", problem or "", self.identity)
        for index, source in enumerate(self.sources):
            source.validate(f"data.sources[{index}]")

    def per_source(self) -> list["DataConfig"]:
        """One data section per dataset root, each with a single source, as the layout readers take it."""
        if not self.sources:
            return [self]
        return [dataclasses.replace(self, layout=source.layout, root=source.root, subject=source.subject,
                                    identity=source.identity, sources=[]) for source in self.sources]

    @property
    def default_identity(self) -> str:
        """What a segment whose layout names no identity is stored under."""
        return self.identity or DEFAULT_IDENTITY


@dataclass
class LoaderConfig:
    """How training and validation stream the packed shards (avflow.data.loader); no shard depends on it."""

    shards: str = "shards/demo"  # folder of packed shards + manifest.json that training streams from
    segment_length: int = 345  # reference training window, ~4.0 s
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle_buffer: int = 32  # samples held per worker for shuffling
    max_bad_fraction: float = 0.01  # the loader fails when more than this fraction of samples is unreadable

    def validate(self) -> None:
        _require(self.segment_length >= 8, "loader.segment_length", "at least 8 frames", self.segment_length)
        _require(self.num_workers >= 0 and self.shuffle_buffer >= 1, "loader.num_workers/shuffle_buffer",
                 "num_workers >= 0 and shuffle_buffer >= 1", (self.num_workers, self.shuffle_buffer))
        _require(0.0 <= self.max_bad_fraction <= 1.0, "loader.max_bad_fraction", "in [0, 1]", self.max_bad_fraction)


@dataclass
class PackConfig:
    """How `avflow pack` runs (dataset layout -> WebDataset tar shards); what the shards hold is `data`."""

    name: str = "demo"  # shard file prefix: NAME-train-000000.tar, NAME-val-000000.tar
    workers: int = 1
    skip_bad: bool = False  # skip (and count) unreadable segments instead of failing

    def validate(self) -> None:
        _require(self.workers >= 1, "pack.workers", "at least 1", self.workers)
        _require(bool(self.name) and "/" not in self.name, "pack.name", "a non-empty file prefix without '/'",
                 self.name)


@dataclass
class ParallelConfig:
    """How training is spread over processes; the loop itself does not depend on it."""

    # none | ddp | fsdp (FSDP2 fully_shard per DiT block + root) | deepspeed
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # process group: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    init_timeout_s: float = 300.0  # first collective (rendezvous) timeout
    train_timeout_s: float = 1800.0  # collective timeout once training runs
    fsdp_param_dtype: Literal["bf16", "fp32"] = "bf16"  # bf16 | fp32: FSDP2 MixedPrecisionPolicy param dtype
    fsdp_reduce_dtype: Literal["bf16", "fp32"] = "fp32"  # bf16 | fp32: gradient reduction dtype
    fsdp_reshard_after_forward: bool = True  # False keeps gathered params between forward and backward
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    compile: bool = False  # torch.compile each DiT block
    activation_checkpointing: bool = False  # recompute each DiT block in backward
    grad_accumulation: int = 1  # micro-batches per optimizer step

    def validate(self) -> None:
        _require(self.grad_accumulation >= 1, "parallel.grad_accumulation", "at least 1", self.grad_accumulation)
        _require(self.init_timeout_s > 0 and self.train_timeout_s > 0, "parallel.init_timeout_s/train_timeout_s",
                 "positive", (self.init_timeout_s, self.train_timeout_s))


@dataclass
class TrainerConfig:
    run_dir: str = "runs/demo"
    steps: int = 1000
    batch_size: int = 16  # reference
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables EMA
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoint: bool = False  # write checkpoints in the background (torch.distributed.checkpoint)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The head-VAE checkpoint this run uses; empty: <run_dir>/head_vae.pt, trained first if missing. With the
    # trainer, not head_vae.*: those describe the network and are recorded inside every head-VAE file, where a
    # path would say nothing; this says where this run finds (or writes) that file.
    head_vae: str = ""
    # A trained model (step directory, model file or export directory) whose network and head VAE this run starts
    # from (`avflow train --init-from`); identities the shards add get new embedding columns.
    init_from: str = ""
    # With init_from: `all` trains every weight; `identity` only the identity embedding columns of the input
    # projections (a new identity onto a trained model; every other weight stays bit-identical).
    finetune: Literal["all", "identity"] = "all"

    def validate(self) -> None:
        _require(self.steps >= 1, "trainer.steps", "at least 1", self.steps)
        _require(self.batch_size >= 1, "trainer.batch_size", "at least 1", self.batch_size)
        _require(self.lr > 0, "trainer.lr", "positive", self.lr)
        _require(self.weight_decay >= 0, "trainer.weight_decay", "non-negative", self.weight_decay)
        _require(self.warmup_steps >= 0, "trainer.warmup_steps", "non-negative", self.warmup_steps)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "trainer.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _require(self.grad_clip > 0, "trainer.grad_clip", "positive (the largest gradient norm kept)", self.grad_clip)
        _require(self.seed >= 0, "trainer.seed", "a non-negative integer", self.seed)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "trainer.betas",
                 "two values in [0, 1)", self.betas)
        _require(0.0 <= self.ema_decay < 1.0, "trainer.ema_decay", "in [0, 1)", self.ema_decay)
        for name in ("log_every", "val_every", "checkpoint_every", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, f"trainer.{name}", "at least 1", getattr(self, name))
        _require(self.finetune == "all" or bool(self.init_from), "trainer.finetune",
                 "'all' unless trainer.init_from names the model to fine-tune", self.finetune)


@dataclass
class CorpusConfig:
    """The procedural demo corpus (see avflow.data.corpus)."""

    train_segments: int = 48
    val_segments: int = 6
    seed: int = 0
    words_per_segment: list[int] = field(default_factory=lambda: [4, 9])
    identity: str = "demo"  # the synthetic person (avflow.data.corpus.PERSONAS): voice, face style, head motion

    def validate(self) -> None:
        _require(self.seed >= 0, "corpus.seed", "a non-negative integer", self.seed)
        _require(self.train_segments >= 1 and self.val_segments >= 1, "corpus.train_segments/val_segments",
                 "at least 1 each", (self.train_segments, self.val_segments))
        _require(len(self.words_per_segment) == 2 and 1 <= self.words_per_segment[0] <= self.words_per_segment[1],
                 "corpus.words_per_segment", "[min, max] with 1 <= min <= max", self.words_per_segment)


@dataclass
class Text2TokensConfig:
    """Text -> frame-level ASR token logits, the model AV-Flow's text input goes through (`task: text2tokens`).

    The published system predicts the tokens with a separate model whose training code was never
    released; the architecture values below are the ones it documents (see docs/text2tokens.md).
    """

    # reference: espeak-ng IPA phonemes; auto = phoneme if espeak-ng is installed, else character
    front_end: Literal["auto", "phoneme", "character"] = "auto"
    language: str = "en-us"  # reference espeak voice
    d_model: int = 192  # reference: 192-channel encoder
    encoder_layers: int = 6  # reference: 6-layer RoPE transformer encoder
    n_heads: int = 2
    ffn_hidden: int = 768
    dropout: float = 0.1
    duration_hidden: int = 256
    duration_kernel: int = 3
    # reference: durations are exp then ceil | cumulative (total = round(sum))
    duration_rounding: Literal["ceil", "cumulative"] = "ceil"
    # reference: flow-matching decoder | regression (one pass, same network)
    decoder: Literal["flow", "regression"] = "flow"
    decoder_layers: int = 4
    decoder_window: int = 32  # decoder attention: frames seen back and ahead
    nfe: int = 10  # reference: 10 Euler steps
    temperature: float = 0.667  # reference
    duration_weight: float = 1.0
    max_symbols: int = 400  # longer input is split into sentences (then at words), generated in turn, concatenated
    max_train_frames: int = 1000  # training crops longer segments at symbol boundaries
    short_pause_s: float = 0.15  # added to a word gap at , ; : and brackets (times the pause scale)
    long_pause_s: float = 0.35  # added at sentence ends

    def validate(self) -> None:
        for name in ("d_model", "encoder_layers", "n_heads", "ffn_hidden", "duration_hidden", "decoder_layers", "nfe",
                     "max_symbols", "max_train_frames"):
            _require(getattr(self, name) >= 1, f"text2tokens.{name}", "at least 1", getattr(self, name))
        _require(self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0, "text2tokens.d_model",
                 f"divisible by text2tokens.n_heads={self.n_heads} into even per-head sizes (RoPE pairs)",
                 self.d_model)
        _require(self.duration_kernel >= 1 and self.duration_kernel % 2 == 1, "text2tokens.duration_kernel",
                 "an odd kernel size", self.duration_kernel)
        _require(0.0 <= self.dropout < 1.0, "text2tokens.dropout", "in [0, 1)", self.dropout)
        _require(self.decoder_window >= 1, "text2tokens.decoder_window", "at least 1", self.decoder_window)
        _require(self.temperature >= 0, "text2tokens.temperature", "non-negative", self.temperature)
        _require(self.duration_weight >= 0, "text2tokens.duration_weight", "non-negative", self.duration_weight)
        _require(min(self.short_pause_s, self.long_pause_s) >= 0, "text2tokens.short_pause_s/long_pause_s",
                 "non-negative", (self.short_pause_s, self.long_pause_s))


# The metrics avflow.evaluate.metrics defines (docs/evaluation.md); named here so the config stays the bottom stage
MetricName = Literal["mel_l1", "mel_cepstral_distortion", "log_f0_rmse", "voicing_error", "cer", "expression_l1",
                     "expression_l2", "head_pose_l1", "head_pose_l2", "expression_frechet", "expression_jitter",
                     "head_pose_jitter", "expression_diversity", "head_pose_diversity", "sync_lag_ms",
                     "sync_peak_correlation", "mouth_correlation", "pitch_hz", "jaw_open_range",
                     "lip_round_range", "lip_close_range"]


@dataclass
class EvaluateConfig:
    """What training validation reports: held-out metrics (avflow.evaluate.metrics, docs/evaluation.md) and,
    with `avatar`, a rendered clip of the generated motion."""

    val_metrics: list[MetricName] = field(default_factory=lambda: [
        "mel_l1", "mel_cepstral_distortion", "expression_l1", "head_pose_l1", "expression_jitter",
        "sync_lag_ms", "sync_peak_correlation"])  # cheap ones: no vocoding or pitch tracking at every validation
    val_items: int = 2  # held-out segments generated whole (one sample each) at every trainer.val_every
    mouth_controls: bool = False  # the demo corpus: expression components 0-2 are its mouth controls
    avatar: str = ""  # released 50h dataset root with the Codec Avatar: validation logs a rendered clip
    # camera: head poses are the capture camera's (50h, mm) | relative: rotation only
    avatar_pose: Literal["camera", "relative"] = "camera"

    def validate(self) -> None:
        _require(self.val_items >= 0, "evaluate.val_items", "non-negative (0: no generated metrics)", self.val_items)



TOOL_SECTIONS = ("pack", "corpus")  # options of `avflow pack` and the demo corpus writer


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    mel: MelConfig = field(default_factory=MelConfig)
    head_vae: HeadVAEConfig = field(default_factory=HeadVAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    text2tokens: Text2TokensConfig = field(default_factory=Text2TokensConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # what `avflow train` trains: avflow (the AV-Flow network) | text2tokens
    task: Literal["avflow", "text2tokens"] = "avflow"

    def validate(self) -> "Config":
        """Check every value once; raise ConfigError naming the field and what was expected.

        The types (finite numbers, allowed choices) are checked over the whole tree, each section checks its own
        values, and what is left here relates keys of different sections."""
        self._require_finite()
        _check_choices(self)
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            if dataclasses.is_dataclass(values):
                values.validate()
        m, h = self.model, self.head_vae
        _require(m.head_latent_dim == h.latent_dim, "model.head_latent_dim",
                 f"equal to head_vae.latent_dim={h.latent_dim}", m.head_latent_dim)
        _require(m.mel_dim == self.mel.n_mels, "model.mel_dim", f"equal to mel.n_mels={self.mel.n_mels}", m.mel_dim)
        _require(self.sample.guidance_scale == 1.0 or self.flow.cond_dropout > 0, "sample.guidance_scale",
                 "1.0 unless the model was trained with flow.cond_dropout > 0", self.sample.guidance_scale)
        _require(self.trainer.finetune == "all" or self.parallel.strategy in ("none", "ddp"), "trainer.finetune",
                 "'all' under parallel.strategy=fsdp/deepspeed (only the identity columns train with none or ddp)",
                 self.trainer.finetune)
        _require(not self.evaluate.avatar or h.pose_dim == 7, "evaluate.avatar", "empty unless head poses are 7-d "
                 "(the 50h subject's avatar; Audio2Photoreal subjects need the ca_body renderer)", self.evaluate.avatar)
        return self

    def _require_finite(self) -> None:
        """No key takes inf or NaN: each would pass a range check and fail later, far from its cause."""
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            if not dataclasses.is_dataclass(values):
                continue
            for item in dataclasses.fields(values):
                value = getattr(values, item.name)
                numbers = value if isinstance(value, list) else [value]
                if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
                    raise ConfigError(f"{section.name}.{item.name}: expected a finite number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checkpoint_dict(self) -> dict[str, Any]:
        """What checkpoints, model files and exports record: the config without the sections of data-making tools,
        which describe no model or run (loading fills them with their defaults)."""
        return {name: value for name, value in self.to_dict().items() if name not in TOOL_SECTIONS}

    def save(self, path: str | os.PathLike, tools: bool = True) -> None:
        """YAML, with or without the sections of data-making tools (see `checkpoint_dict`)."""
        from avflow.utils import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict() if tools else self.checkpoint_dict(), sort_keys=False))


def _require(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, got {got!r}")


def _check_choices(section: Any, where: str = "") -> None:
    """Every `Literal` field of a config tree holds one of its allowed values (fields set in code included)."""
    for name, hint in typing.get_type_hints(type(section)).items():
        value, full = getattr(section, name), f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            _check_choices(value, full)
        elif typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            _require(value in choices, full, "one of " + ", ".join(choices), value)
        elif typing.get_origin(hint) is list and typing.get_origin(typing.get_args(hint)[0]) is Literal:
            choices = typing.get_args(typing.get_args(hint)[0])
            unknown = [item for item in value if item not in choices]
            _require(not unknown, full, "names among " + ", ".join(choices), unknown)
