"""`avflow stream`'s outputs, written as chunks come: stream.wav (a valid wav after every chunk), stream.mp4 with a
face decoder (its frames encoded as they come, the file finished with the speech muxed in at the end), and at
the end stream.npz (30 fps motion, as `generate` writes it) and latency.json."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np

from avflow.config import Config
from avflow.infer.stream import VISUAL_OUTPUT_FPS, StreamChunk
from avflow.utils import atomic_path

OUTPUT_NAMES = ("stream.wav", "stream.npz", "stream.mp4", "latency.json")


class GrowingWav:
    """A mono 16-bit PCM wav whose header is rewritten after every append: a player or a reader that opens it at
    any moment finds a valid file holding every sample appended so far. (The one output that lives under its
    final name while it is written: being readable before the end is its purpose.)"""

    def __init__(self, path: Path, sample_rate: int):
        self.handle = open(path, "wb")
        self.wav = wave.open(self.handle, "wb")
        self.wav.setnchannels(1)
        self.wav.setsampwidth(2)
        self.wav.setframerate(sample_rate)
        self.append(np.zeros(0, np.float32))

    def append(self, audio: np.ndarray) -> None:
        pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
        self.wav.writeframes(pcm.tobytes())  # samples first, then the header's sizes: valid at every point
        self.handle.flush()

    def close(self) -> None:
        self.wav.close()
        self.handle.close()


class StreamWriter:
    def __init__(self, out_dir: str | Path, cfg: Config, video: bool):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = [name for name in OUTPUT_NAMES if (self.out_dir / name).exists()]
        if existing:
            raise FileExistsError(f"{self.out_dir}: holds a previous stream's {', '.join(existing)}; use another -o "
                                  "or remove them")
        self.cfg = cfg
        self.wav = GrowingWav(self.out_dir / "stream.wav", cfg.mel.sample_rate)
        self.video = None
        if video:
            from avflow.render import VideoWriter

            self.video = VideoWriter(self.out_dir / "stream.mp4", VISUAL_OUTPUT_FPS)
        self.audio: list[np.ndarray] = []
        self.expression: list[np.ndarray] = []
        self.head_pose: list[np.ndarray] = []

    def add(self, chunk: StreamChunk) -> None:
        if chunk.audio.size:
            self.wav.append(chunk.audio)
            self.audio.append(chunk.audio)
        self.expression.append(chunk.expression)
        self.head_pose.append(chunk.head_pose)
        if chunk.frames is not None and self.video is not None:
            self.video.append(chunk.frames)

    def close(self, summary: dict) -> list[Path]:
        """Finish stream.wav and write the rest from whatever arrived; returns the files written."""
        from avflow.data.features import pose7_to_rigid

        self.wav.close()
        written = [self.out_dir / "stream.wav"]
        expression = np.concatenate(self.expression) if self.expression else np.zeros((0, 0), np.float32)
        if expression.shape[0]:
            pose = np.concatenate(self.head_pose)
            with atomic_path(self.out_dir / "stream.npz") as tmp, open(tmp, "wb") as handle:
                np.savez(handle, expression=expression, head_pose=pose, head_transform=pose7_to_rigid(pose),
                         fps=np.float32(VISUAL_OUTPUT_FPS))
            written.append(self.out_dir / "stream.npz")
        if self.video is not None and self.video.frames:
            audio = np.concatenate(self.audio) if self.audio else None
            self.video.close(audio, self.cfg.mel.sample_rate)
            written.append(self.out_dir / "stream.mp4")
        elif self.video is not None:
            self.video.discard()
        with atomic_path(self.out_dir / "latency.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
        return written + [self.out_dir / "latency.json"]
