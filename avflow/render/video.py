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


class VideoWriter:
    """An H.264 .mp4 written as frames come: each `append` goes straight to ffmpeg (the one bundled with
    imageio-ffmpeg, so no system ffmpeg is needed), which encodes into a scratch folder beside `path`; `close`
    finishes the file, muxes the speech in as AAC and only then puts it under `path`, complete. `discard` (or a
    failed `close`) removes the scratch and leaves `path` untouched. Odd sizes are padded by one black row or
    column (yuv420p needs even sizes)."""

    def __init__(self, path: str | os.PathLike, fps: float):
        self.imageio_ffmpeg = require("imageio_ffmpeg", "writing videos")
        self.path, self.fps = Path(path), fps
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        self.writer = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def append(self, frames: np.ndarray | torch.Tensor) -> None:
        """Frames (T, H, W, 3) uint8, all of one size."""
        frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames: expected a (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
        if self.size is not None and frames.shape[1:3] != self.size:
            raise ValueError(f"frames: expected {self.size[0]} x {self.size[1]} like the video's first frames, got "
                             f"{frames.shape[1]} x {frames.shape[2]}")
        if frames.shape[0] == 0:
            return
        self.size = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
        if self.writer is None:
            self.writer = self.imageio_ffmpeg.write_frames(
                str(self.scratch / "video.mp4"), (frames.shape[2], frames.shape[1]), fps=self.fps, codec="libx264",
                pix_fmt_out="yuv420p", macro_block_size=1, quality=None, output_params=["-crf", "18"])
            self.writer.send(None)
        for frame in frames:
            self.writer.send(np.ascontiguousarray(frame))
        self.frames += frames.shape[0]

    def close(self, audio: np.ndarray | None = None, sample_rate: int | None = None) -> None:
        """Finish the video with `audio` (samples,) or (samples, channels) muxed in, and put it under `path`."""
        try:
            if audio is not None and not sample_rate:
                raise ValueError("sample_rate: expected the audio's sample rate in Hz when audio is given")
            if self.writer is None:
                raise ValueError(f"{self.path}: no frames were given to write")
            self.writer.close()
            self.writer = None
            video = self.scratch / "video.mp4"
            if audio is not None:
                wav, muxed = self.scratch / "audio.wav", self.scratch / "muxed.mp4"
                require("soundfile", "a video's audio track").write(wav, np.asarray(audio, dtype=np.float32),
                                                                     int(sample_rate))
                command = [self.imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(video),
                           "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac",
                           str(muxed)]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"{self.path}: ffmpeg could not mux the audio in: {result.stderr.strip()}")
                video = muxed
            with atomic_path(self.path) as tmp:
                os.replace(video, tmp)
        finally:
            self.discard()

    def discard(self) -> None:
        """Stop ffmpeg if it runs and remove the scratch folder; `path` is left as it was."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        shutil.rmtree(self.scratch, ignore_errors=True)


def write_video(path: str | os.PathLike, frames: np.ndarray | torch.Tensor, fps: float,
                audio: np.ndarray | None = None, sample_rate: int | None = None) -> None:
    """An H.264 .mp4 of frames (T, H, W, 3) uint8, with `audio` (samples,) or (samples, channels) muxed in as AAC
    (a `VideoWriter` given every frame at once); the file appears under `path` only once complete."""
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"frames: expected a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    if audio is not None and not sample_rate:
        raise ValueError("sample_rate: expected the audio's sample rate in Hz when audio is given")
    writer = VideoWriter(path, fps)
    try:
        writer.append(frames)
    except BaseException:
        writer.discard()
        raise
    writer.close(audio, sample_rate)
