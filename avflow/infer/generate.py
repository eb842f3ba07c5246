"""Generation: conditioning (tokens, text or audio) -> N samples -> wav, 30 fps motion .npz and a plot.

The sampler runs at the mel frame rate; motion is resampled to 30 fps for rendering and the mel is
vocoded with BigVGAN when a vocoder checkpoint is given, with Griffin-Lim otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avflow.config import Config, SampleConfig
from avflow.data.asr import ASR_SAMPLE_RATE, CTCTokenizer
from avflow.data.features import interpolate_frames, load_wav, pose7_to_rigid, resample, save_wav
from avflow.data.plots import sample_figure
from avflow.data.text import text_to_token_logits
from avflow.data.tokens import TOKEN_LABELS
from avflow.model.avflow import AVFlowNet
from avflow.model.flow import sample_long
from avflow.model.head_vae import HeadVAE
from avflow.model.state import StateCodec
from avflow.infer.render import Camera, FaceDecoder, render_mesh, side_by_side, write_video
from avflow.infer.vocoder import BigVGAN, vocode
from avflow.train.checkpoint import load_inference_tensors
from avflow.train.head_vae import decode_latents, head_vae_from_payload
from avflow.train.loop import pick_device
from avflow.utils import atomic_path

log = logging.getLogger(__name__)

VISUAL_OUTPUT_FPS = 30.0  # renderers and the capture rate of the published data


@dataclass
class InferenceModel:
    cfg: Config
    net: AVFlowNet
    codec: StateCodec
    head_vae: HeadVAE
    pose_mean: torch.Tensor
    pose_std: torch.Tensor
    device: torch.device


def load_inference_model(checkpoint: str | Path, device: str = "auto") -> InferenceModel:
    """The EMA network, normalization and head VAE from a training step directory or a consolidated file."""
    cfg, tensors = load_inference_tensors(checkpoint)
    target = pick_device(device)
    net = AVFlowNet(cfg.model)
    net.load_state_dict(tensors["ema"])
    head_vae, pose_mean, pose_std = head_vae_from_payload(tensors["head_vae"], cfg.head_vae, f"{checkpoint} [head_vae]")
    codec = StateCodec.from_state_dict(tensors["codec"], cfg.model)
    return InferenceModel(cfg, net.to(target).eval(), codec, head_vae.eval(), pose_mean, pose_std, target)


def tokens_from_file(path: str | Path, token_fps: float, frame_rate: float) -> np.ndarray:
    """Token logits .npy, (M, 29) or (channels, M, 29) with the actor first, at token_fps -> mel frames."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such token file")
    tokens = np.load(path, allow_pickle=False)
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


def tokens_from_text(text: str, frame_rate: float) -> np.ndarray:
    return text_to_token_logits(text, frame_rate)


def tokens_from_audio(path: str | Path, asr_model: str | Path | None, token_fps: float, frame_rate: float) -> np.ndarray:
    """Speech -> CTC token logits with a local wav2vec2 model -> mel frames. Any sample rate is resampled."""
    if asr_model is None:
        raise ValueError("--audio needs --asr-model: a local wav2vec2 CTC model directory (Wav2Vec2ForCTC)")
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


@torch.no_grad()
def generate(model: InferenceModel, tokens: np.ndarray, sample_cfg: SampleConfig | None = None) -> Generated:
    sample_cfg = sample_cfg or model.cfg.sample
    if model.cfg.model.dyadic:
        raise ValueError("this is a dyadic model: it also needs the participant's tokens and SMIRK features per "
                         "frame, which avflow generate does not take yet; use a monadic model")
    cond = torch.from_numpy(tokens).float()[None].to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(sample_cfg.seed)
    states = sample_long(model.net, cond, model.cfg.model.state_dim, sample_cfg, sample_cfg.window_overlap,
                         generator)[0].float().cpu()
    parts = model.codec.decode(states)
    head_pose = np.stack([decode_latents(model.head_vae, model.pose_mean, model.pose_std, latent.numpy())
                          for latent in parts["head_latent"]])
    return Generated(parts["mel"].numpy(), parts["expression"].numpy(), head_pose.astype(np.float32))


def plot_sample(path: Path, mel: np.ndarray, expression: np.ndarray, head_pose: np.ndarray, frame_rate: float) -> None:
    import matplotlib.pyplot as plt

    figure = sample_figure(mel, expression, head_pose, frame_rate)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)


VIDEO_SIZE = 256


def render_frames(decoder: FaceDecoder, expression: np.ndarray, head_pose: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of the decoder's mesh for 30 fps expression codes and head poses."""
    vertices = decoder(torch.from_numpy(expression).float(), torch.from_numpy(head_pose).float())
    colors = getattr(decoder, "vertex_colors", torch.full((vertices.shape[1], 3), 0.8))
    return render_mesh(vertices, decoder.faces, colors, VIDEO_SIZE, VIDEO_SIZE, Camera()).cpu().numpy()


def write_outputs(generated: Generated, out_dir: str | Path, name: str, cfg: Config,
                  vocoder: BigVGAN | None = None, face_decoder: FaceDecoder | None = None) -> list[Path]:
    """Per sample: {name}_s{i}.wav, .npz (30 fps expression, head pose 7-d and 4x4) and .png; with a face
    decoder also {name}_s{i}.mp4 and {name}_samples.mp4, all samples side by side."""
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
        plot_sample(stem.with_suffix(".png"), generated.mel[index], generated.expression[index],
                    generated.head_pose[index], frame_rate)
        written += [stem.with_suffix(suffix) for suffix in (".wav", ".npz", ".png")]
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
