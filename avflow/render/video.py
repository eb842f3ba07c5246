"""Frames -> an H.264 .mp4 with the speech muxed in, and samples placed side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from avflow.optional import require
from avflow.utils import atomic_path


def side_by_side(videos: Sequence[np.ndarray]) -> np.ndarray:
    """Videos (T, H, W_i, 3) placed left to right into one (T, H, sum W_i, 3), for comparing samples."""
    if not videos:
        raise ValueError("videos: expected at least one (T, H, W, 3) video, got none")
    arrays = [np.asarray(video) for video in videos]
    first = arrays[0].shape
    for number, array in enumerate(arrays):
        if array.ndim != 4 or array.shape[-1] != 3 or array.shape[:2] != first[:2]:
            raise ValueError(f"videos[{number}]: expected shape ({first[0]}, {first[1]}, W, 3) like videos[0], "
                             f"got {array.shape}")
    return np.concatenate(arrays, axis=2)


def write_video(path: str | os.PathLike, frames: np.ndarray | torch.Tensor, fps: float,
                audio: np.ndarray | None = None, sample_rate: int | None = None) -> None:
    """An H.264 .mp4 of frames (T, H, W, 3) uint8, with `audio` (samples,) or (samples, channels) muxed in as AAC.

    Uses the ffmpeg bundled with imageio-ffmpeg so no system ffmpeg is needed; odd sizes are padded by one
    black row/column (yuv420p needs even sizes); the file appears under `path` only once complete.
    """
    imageio_ffmpeg = require("imageio_ffmpeg", "writing videos")
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"frames: expected a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    if audio is not None and not sample_rate:
        raise ValueError("sample_rate: expected the audio's sample rate in Hz when audio is given")
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    with tempfile.TemporaryDirectory() as scratch:
        video = Path(scratch) / "video.mp4"
        writer = imageio_ffmpeg.write_frames(str(video), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p", macro_block_size=1, quality=None,
                                             output_params=["-crf", "18"])
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        if audio is not None:
            wav, muxed = Path(scratch) / "audio.wav", Path(scratch) / "muxed.mp4"
            require("soundfile", "a video's audio track").write(wav, np.asarray(audio, dtype=np.float32),
                                                                 int(sample_rate))
            command = [ffmpeg, "-y", "-loglevel", "error", "-i", str(video), "-i", str(wav), "-map", "0:v:0",
                       "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-shortest", str(muxed)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{path}: ffmpeg could not mux the audio in: {result.stderr.strip()}")
            video = muxed
        with atomic_path(path) as tmp:
            shutil.copyfile(video, tmp)
