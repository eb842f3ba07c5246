"""Generation: conditioning (tokens, text or audio) -> N samples -> wav, 30 fps motion .npz and a plot.

The sampler runs at the mel frame rate; motion is resampled to 30 fps for rendering and the mel is
vocoded with BigVGAN when a vocoder checkpoint is given, with Griffin-Lim otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avflow.config import Config, SampleConfig
from avflow.data.asr import ASR_SAMPLE_RATE, CTCTokenizer
from avflow.data.features import audio_seconds, interpolate_frames, load_wav, pose7_to_rigid, resample, save_wav
from avflow.data.plots import sample_figure
from avflow.data.text import text_to_token_logits
from avflow.data.tokens import TOKEN_LABELS
from avflow.infer.artifacts import (
    AVATAR_FILE,
    FACE_DECODER_FILE,
    TEXT2TOKENS_FILE,
    VOCODER_FILE,
    WEIGHTS_FILE,
    CompiledSampler,
    is_model_directory,
    load_compiled_sampler,
    read_export_meta,
)
from avflow.infer.sampler import GraphSampler, PreparedVelocity, length_buckets, row_buckets, sample_sequences
from avflow.infer.vocoder import BigVGAN, load_vocoder_file, vocode
from avflow.model.avflow import AVFlowNet
from avflow.model.flow import FixedStepSampler, guided
from avflow.model.head_vae import HeadVAE, decode_latents
from avflow.model.io import head_vae_from_payload, load_inference_tensors
from avflow.model.state import StateCodec
from avflow.render import Camera, CodecAvatar, FaceDecoder, load_face_decoder, render_mesh, side_by_side, write_video
from avflow.runtime import DTYPES, pick_device
from avflow.utils import atomic_path, load_numeric_array

log = logging.getLogger(__name__)

VISUAL_OUTPUT_FPS = 30.0  # renderers and the capture rate of the published data


@dataclass
class InferenceModel:
    """Everything generation needs, from a training checkpoint, a consolidated file or an export directory."""

    cfg: Config
    net: AVFlowNet | None  # None for a torchscript/aoti export: its compiled loop holds the network
    codec: StateCodec
    head_vae: HeadVAE
    pose_mean: torch.Tensor
    pose_std: torch.Tensor
    device: torch.device
    dtype: torch.dtype = torch.float32
    compiled: CompiledSampler | None = None  # fixed-shape loop of a torchscript/aoti export
    vocoder: BigVGAN | None = None
    text2tokens: Any = None  # TextToTokens of the export directory, when it has one
    face_decoder: FaceDecoder | CodecAvatar | None = None  # the export directory's, when it has one
    batch_rows: int = 12  # sequences (windows x samples) per sampler call
    length_bucket_count: int = 4
    compile_network: bool = False  # compile the eager network whole (fullgraph, one graph per shape)
    samplers: dict = field(default_factory=dict, repr=False)

    def sampler(self, sample_cfg: SampleConfig) -> tuple[GraphSampler, int, list[int], int, list[int]]:
        """(loop runner, window frames, length buckets, rows per call, row counts a call is padded to) for these
        sampler settings. On CUDA every (length bucket, row count) shape is warmed up and captured here, once,
        so no request pays for a compilation or a capture."""
        if self.compiled is not None:
            self.compiled.check_settings(sample_cfg.method, sample_cfg.nfe, sample_cfg.guidance_scale)
            if sample_cfg.num_samples > self.compiled.rows:
                raise ValueError(f"{sample_cfg.num_samples} samples per input do not fit this export's batch of "
                                 f"{self.compiled.rows} sequences; export again with --batch {sample_cfg.num_samples} "
                                 "or more")
            key, frames, rows = "compiled", self.compiled.frames, self.compiled.rows
            buckets, counts = [frames], [rows]
        else:
            key = (sample_cfg.method, sample_cfg.nfe, sample_cfg.guidance_scale, sample_cfg.num_samples)
            frames, rows = sample_cfg.max_frames, max(self.batch_rows, sample_cfg.num_samples)
            buckets = length_buckets(frames, self.length_bucket_count)
            counts = row_buckets(rows, sample_cfg.num_samples)
        if key not in self.samplers:
            if self.compiled is not None:
                loop = self.compiled.loop
            else:
                velocity = PreparedVelocity(self.net, sample_cfg.method, sample_cfg.nfe, self.compile_network,
                                            max_shapes=len(buckets) * len(counts))
                loop = FixedStepSampler(guided(velocity, sample_cfg.guidance_scale), sample_cfg.method,
                                        sample_cfg.nfe, self.dtype)
            runner = GraphSampler(loop, self.device)
            if runner.use_cuda_graph:
                runner.warm_up(buckets, counts, self.cfg.model.state_dim, self.cfg.model.cond_dim, self.device)
            self.samplers[key] = runner
        return self.samplers[key], frames, buckets, rows, counts


def default_dtype(device: torch.device) -> str:
    """The network's precision when none is asked: bf16 on CUDA (tensor cores; the sampler's state stays fp32,
    within 2e-2 of fp32 sampling, see docs/performance.md), fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def load_inference_model(checkpoint: str | Path, device: str = "auto", dtype: str | None = None,
                         batch_rows: int = 12, compile_network: bool = False) -> InferenceModel:
    """The EMA network, normalization and head VAE from a training step directory, a consolidated .safetensors
    file or a `python -m avflow.export` directory (with its compiled sampler, vocoder and text front end).

    `dtype` (fp32 | bf16) is the network's precision, by default bf16 on CUDA (the sampler keeps its state in
    fp32) and fp32 elsewhere; an export directory fixes it at export time. On CUDA, fp32 matmuls use TF32.
    `compile_network` compiles the whole network (fullgraph, static shapes: once per length bucket and row
    count) for the eager sampler, which the CUDA graph then captures.
    """
    target = pick_device(device)
    exported = is_model_directory(checkpoint)
    meta = read_export_meta(checkpoint) if exported else None
    if exported and dtype is not None and dtype != meta["dtype"]:
        raise ValueError(f"{checkpoint} was exported in {meta['dtype']}; --dtype {dtype} needs another export")
    if target.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    dtype = meta["dtype"] if exported else (dtype or default_dtype(target))
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    cfg, tensors = load_inference_tensors(Path(checkpoint) / WEIGHTS_FILE if exported else checkpoint)
    compiled = load_compiled_sampler(checkpoint, meta, target) if exported else None
    net = None
    if compiled is None:  # a compiled export carries its own copy of the network
        net = AVFlowNet(cfg.model)
        net.load_state_dict(tensors["ema"])
        net = net.to(target, DTYPES[dtype]).eval()
    elif compile_network:
        raise ValueError(f"{checkpoint} is a {meta['format']} export, compiled already; --compile applies to "
                         "eager exports and checkpoints")
    head_vae, pose_mean, pose_std = head_vae_from_payload(tensors["head_vae"], cfg.head_vae, f"{checkpoint} [head_vae]")
    codec = StateCodec.from_state_dict(tensors["codec"], cfg.model)
    model = InferenceModel(cfg, net, codec, head_vae.to(target).eval(), pose_mean, pose_std, target, DTYPES[dtype],
                           compiled, batch_rows=batch_rows, compile_network=compile_network)
    if exported:
        directory = Path(checkpoint)
        if (directory / VOCODER_FILE).is_file():
            model.vocoder = load_vocoder_file(directory / VOCODER_FILE, target)
        if (directory / FACE_DECODER_FILE).is_file():
            model.face_decoder = load_face_decoder(directory / FACE_DECODER_FILE)
        if (directory / AVATAR_FILE).is_file():
            model.face_decoder = CodecAvatar.load(directory / AVATAR_FILE, target)
        if (directory / TEXT2TOKENS_FILE).is_file():
            from avflow.infer.text2tokens import load_text2tokens

            model.text2tokens = load_text2tokens(directory / TEXT2TOKENS_FILE)
    return model


# Speech rarely exceeds ~20 characters per second; text longer than this many characters per second of
# sample.max_input_seconds is refused before its timing is computed.
TEXT_CHARACTERS_PER_SECOND = 40.0


def check_duration(frames: int, cfg: Config, what: str) -> None:
    """Refuse inputs longer than sample.max_input_seconds, so one item cannot hold up a whole batch."""
    seconds = frames / cfg.mel.frame_rate
    if seconds > cfg.sample.max_input_seconds:
        raise ValueError(f"{what}: {seconds:.1f} s long; sample.max_input_seconds="
                         f"{cfg.sample.max_input_seconds:g} (--max-input-seconds) is the limit (split the input, or "
                         f"raise the limit)")


def check_text_length(text: str, rate: float, cfg: Config) -> None:
    """Refuse text far longer than sample.max_input_seconds allows early, before its timing is computed."""
    limit = int(cfg.sample.max_input_seconds * TEXT_CHARACTERS_PER_SECOND * max(rate, 1.0))
    if len(text) > limit:
        raise ValueError(f"text: {len(text)} characters, far more than sample.max_input_seconds="
                         f"{cfg.sample.max_input_seconds:g} (--max-input-seconds) of speech holds (at most {limit}); "
                         f"split the text, or raise the limit")


def tokens_from_file(path: str | Path, token_fps: float, frame_rate: float) -> np.ndarray:
    """Token logits .npy, (M, 29) or (channels, M, 29) with the actor first, at token_fps -> mel frames."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such token file")
    tokens = load_numeric_array(path, f"token logits (M, {len(TOKEN_LABELS)})")
    if tokens.ndim == 3:
        tokens = tokens[0]
    if tokens.ndim != 2 or tokens.shape[1] != len(TOKEN_LABELS):
        raise ValueError(f"{path}: expected token logits of shape (M, {len(TOKEN_LABELS)}) or "
                         f"(channels, M, {len(TOKEN_LABELS)}), got {tokens.shape}")
    if not np.isfinite(tokens).all():
        raise ValueError(f"{path}: token logits contain NaN or inf")
    frames = int(tokens.shape[0] / token_fps * frame_rate)
    if frames < 1:
        raise ValueError(f"{path}: {tokens.shape[0]} token frames are too short to generate from")
    return interpolate_frames(tokens.astype(np.float32), token_fps, frames, frame_rate)


def tokens_for_text(model: InferenceModel, text: str, rate: float = 1.0, pause_scale: float = 1.0,
                    seed: int = 0) -> np.ndarray:
    """Token logits at the mel frame rate from the model's learned text front end when it has one (an export
    with text2tokens, or --text2tokens), else from the rule-based character timing the demo corpus is made
    with (which has no pause control)."""
    if model.text2tokens is not None:
        return model.text2tokens.token_logits(text, rate=rate, pause_scale=pause_scale, seed=seed)
    if pause_scale != 1.0:
        raise ValueError("pause_scale needs a text-to-tokens model (--text2tokens); the rule-based timing has none")
    return text_to_token_logits(text, model.cfg.mel.frame_rate, rate)


def participant_features_from_file(path: str | Path, cfg: Config) -> np.ndarray:
    """The participant's SMIRK features .npy (F, participant_feature_dim), min-max normalized to [-1, 1] as
    in the shards, at the visual frame rate -> mel frames."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such participant feature file")
    width = cfg.model.participant_feature_dim
    features = load_numeric_array(path, f"participant features (frames, {width})")
    if features.ndim != 2 or features.shape[1] != width or not np.isfinite(features).all():
        raise ValueError(f"{path}: expected finite participant features of shape (frames, {width}), got "
                         f"{features.shape}")
    frames = int(features.shape[0] / cfg.data.visual_fps * cfg.mel.frame_rate)
    return interpolate_frames(features.astype(np.float32), cfg.data.visual_fps, frames, cfg.mel.frame_rate)


def tokens_from_audio(path: str | Path, asr_model: str | Path | None, token_fps: float, frame_rate: float,
                      max_seconds: float | None = None) -> np.ndarray:
    """Speech -> CTC token logits with a local wav2vec2 model -> mel frames. Any sample rate is resampled.
    Audio longer than `max_seconds` is refused from its header, before it is read."""
    if asr_model is None:
        raise ValueError("--audio needs --asr-model: a local wav2vec2 CTC model directory (Wav2Vec2ForCTC)")
    if max_seconds is not None and Path(path).is_file():
        seconds = audio_seconds(path)
        if seconds > max_seconds:
            raise ValueError(f"{path}: {seconds:.1f} s long; sample.max_input_seconds={max_seconds:g} "
                             f"(--max-input-seconds) is the limit (split the input, or raise the limit)")
    audio, sample_rate = load_wav(path)
    speech = resample(audio[0], sample_rate, ASR_SAMPLE_RATE)
    tokens = CTCTokenizer(asr_model).logits(speech)
    frames = int(len(speech) / ASR_SAMPLE_RATE * frame_rate)
    if frames < 1:
        raise ValueError(f"{path}: too short to generate from")
    return interpolate_frames(tokens, token_fps, frames, frame_rate)


@dataclass
class Generated:
    """N samples of one input: log-mel (N, T, n_mels), expression (N, T, 256), head pose (N, T, 7), at mel rate."""

    mel: np.ndarray
    expression: np.ndarray
    head_pose: np.ndarray


def conditioning(model: InferenceModel, tokens: np.ndarray, participant_tokens: np.ndarray | None = None,
                 participant_features: np.ndarray | None = None) -> np.ndarray:
    """Per-frame conditioning at the mel frame rate: the actor's tokens, and for a dyadic model the participant's
    tokens and normalized SMIRK features (all already at the mel frame rate; cut to the shortest)."""
    dyadic = model.cfg.model.dyadic
    given = participant_tokens is not None or participant_features is not None
    if dyadic and (participant_tokens is None or participant_features is None):
        raise ValueError("this is a dyadic model: it needs the participant's tokens and SMIRK features as well as "
                         "the actor's input")
    if given and not dyadic:
        raise ValueError("participant inputs were given, but this model is monadic (model.dyadic=false)")
    parts = [tokens] + ([participant_tokens, participant_features] if dyadic else [])
    frames = min(part.shape[0] for part in parts)
    cond = np.concatenate([part[:frames] for part in parts], axis=1).astype(np.float32)
    if cond.shape[1] != model.cfg.model.cond_dim:
        raise ValueError(f"conditioning has {cond.shape[1]} features per frame; the model expects "
                         f"{model.cfg.model.cond_dim} (tokens {len(TOKEN_LABELS)}"
                         + (f" + participant tokens {len(TOKEN_LABELS)} + features "
                            f"{model.cfg.model.participant_feature_dim})" if dyadic else ")"))
    return cond


@torch.no_grad()
def generate_batch(model: InferenceModel, conds: list[np.ndarray], sample_cfg: SampleConfig | None = None,
                   seeds: list[int] | None = None) -> list[Generated]:
    """N samples for each conditioning sequence (T_i, cond_dim), sampled together in length-bucketed batches.

    Each input's noise comes from its own seed (default sample.seed), so its samples do not depend on
    which other inputs share its batch, on the batch size, or on the device.
    """
    sample_cfg = sample_cfg or model.cfg.sample
    seeds = seeds if seeds is not None else [sample_cfg.seed] * len(conds)
    state_dim, n = model.cfg.model.state_dim, sample_cfg.num_samples
    noises = [sample_cfg.temperature * torch.randn(n, cond.shape[0], state_dim,
                                                   generator=torch.Generator().manual_seed(seed))
              for cond, seed in zip(conds, seeds)]
    runner, frames, buckets, rows, row_counts = model.sampler(sample_cfg)
    states = sample_sequences(runner, [torch.from_numpy(c).to(model.device) for c in conds],
                              [noise.to(model.device) for noise in noises], frames, sample_cfg.window_overlap,
                              buckets, rows, row_counts)
    results = []
    for state in states:
        parts = model.codec.decode(state.float().cpu())
        head_pose = np.stack([decode_latents(model.head_vae, model.pose_mean, model.pose_std, latent.numpy())
                              for latent in parts["head_latent"]])
        results.append(Generated(parts["mel"].numpy(), parts["expression"].numpy(), head_pose.astype(np.float32)))
    return results


def generate(model: InferenceModel, tokens: np.ndarray, sample_cfg: SampleConfig | None = None) -> Generated:
    """N samples for one monadic input's token logits (T, 29) at the mel frame rate."""
    return generate_batch(model, [conditioning(model, tokens)], sample_cfg)[0]


def plot_sample(path: Path, mel: np.ndarray, expression: np.ndarray, head_pose: np.ndarray, frame_rate: float) -> None:
    import matplotlib.pyplot as plt

    figure = sample_figure(mel, expression, head_pose, frame_rate)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)


VIDEO_SIZE = 256


def render_frames(decoder: FaceDecoder | CodecAvatar, expression: np.ndarray, head_pose: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 frames for 30 fps expression codes and 7-d head poses: the Codec Avatar by its
    published camera (1024 x 1024), a mesh decoder Lambert-shaded (VIDEO_SIZE)."""
    if isinstance(decoder, CodecAvatar):
        return decoder.render_pose7(expression, head_pose)
    vertices = decoder(torch.from_numpy(expression).float(), torch.from_numpy(head_pose).float())
    colors = getattr(decoder, "vertex_colors", torch.full((vertices.shape[1], 3), 0.8))
    return render_mesh(vertices, decoder.faces, colors, VIDEO_SIZE, VIDEO_SIZE, Camera()).cpu().numpy()


def write_outputs(generated: Generated, out_dir: str | Path, name: str, cfg: Config,
                  vocoder: BigVGAN | None = None, face_decoder: FaceDecoder | CodecAvatar | None = None,
                  plot: bool = True) -> list[Path]:
    """Per sample: {name}_s{i}.wav, .npz (30 fps expression, head pose 7-d and 4x4) and with `plot` a .png;
    with a face decoder or Codec Avatar also {name}_s{i}.mp4 and {name}_samples.mp4, all samples side by side."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame_rate = cfg.mel.frame_rate
    written: list[Path] = []
    videos: list[np.ndarray] = []
    audios: list[np.ndarray] = []
    for index in range(generated.mel.shape[0]):
        stem = out_dir / f"{name}_s{index}"
        audio = vocode(torch.from_numpy(generated.mel[index]), vocoder, cfg.mel).numpy()
        save_wav(stem.with_suffix(".wav"), audio, cfg.mel.sample_rate)
        frames_30 = max(1, round(generated.mel.shape[1] / frame_rate * VISUAL_OUTPUT_FPS))
        expression_30 = interpolate_frames(generated.expression[index], frame_rate, frames_30, VISUAL_OUTPUT_FPS)
        pose_30 = interpolate_frames(generated.head_pose[index], frame_rate, frames_30, VISUAL_OUTPUT_FPS)
        with atomic_path(stem.with_suffix(".npz")) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, expression=expression_30, head_pose=pose_30, head_transform=pose7_to_rigid(pose_30),
                         fps=np.float32(VISUAL_OUTPUT_FPS))
        written += [stem.with_suffix(".wav"), stem.with_suffix(".npz")]
        if plot:
            plot_sample(stem.with_suffix(".png"), generated.mel[index], generated.expression[index],
                        generated.head_pose[index], frame_rate)
            written.append(stem.with_suffix(".png"))
        if face_decoder is not None:
            videos.append(render_frames(face_decoder, expression_30, pose_30))
            write_video(stem.with_suffix(".mp4"), videos[-1], VISUAL_OUTPUT_FPS, audio, cfg.mel.sample_rate)
            written.append(stem.with_suffix(".mp4"))
            audios.append(audio)
    if len(videos) > 1:
        together = out_dir / f"{name}_samples.mp4"
        write_video(together, side_by_side(videos), VISUAL_OUTPUT_FPS, audios[0], cfg.mel.sample_rate)
        written.append(together)
    return written
