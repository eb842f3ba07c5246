"""Output writing: generated samples -> wav, 30 fps motion .npz, plot and talking-head videos.

Motion is resampled from the mel frame rate to 30 fps for rendering, and the mel is vocoded with BigVGAN
when a vocoder is given, with Griffin-Lim otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avflow.config import Config
from avflow.data.features import interpolate_frames, pose7_to_rigid, save_wav
from avflow.model.state import Generated
from avflow.render import Camera, CodecAvatar, FaceDecoder, render_mesh, side_by_side, write_video
from avflow.render.plots import sample_figure
from avflow.utils import atomic_path
from avflow.vocoder.bigvgan import BigVGAN
from avflow.vocoder.vocode import vocode

VISUAL_OUTPUT_FPS = 30.0  # renderers and the capture rate of the published data


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
