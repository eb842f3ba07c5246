"""Vocoding a mel that grows chunk by chunk (streaming), with each chunk's audio what the whole mel's would be."""

from __future__ import annotations

import numpy as np
import torch

from avflow.config import MelConfig
from avflow.vocoder.bigvgan import BigVGAN
from avflow.vocoder.vocode import vocode

BIGVGAN_CONTEXT_FRAMES = 16  # the base generator's receptive field is +-13 mel frames (tests/infer/test_stream.py)
GRIFFIN_LIM_CONTEXT_FRAMES = 16
# fewer new frames wait for the next chunk (the stream's end excepted): each vocoder call costs its context too,
# and input fed in real time makes frames final a few at a time
MIN_AUDIO_CHUNK_FRAMES = 43


class ChunkVocoder:
    """Audio of a mel that grows chunk by chunk. Each chunk is vocoded with `context` final mel frames on both
    sides where they exist and cropped, so BigVGAN's chunks are the whole mel's audio. Griffin-Lim reconstructs
    phases, so its chunks keep the audio already out before them fixed (`mel_to_audio`'s prefix) and continue it,
    instead of starting phases of their own."""

    def __init__(self, vocoder: BigVGAN | None, cfg: MelConfig):
        self.vocoder, self.cfg, self.hop = vocoder, cfg, cfg.hop_length
        self.context = BIGVGAN_CONTEXT_FRAMES if vocoder is not None else GRIFFIN_LIM_CONTEXT_FRAMES
        self.done = 0  # mel frames whose audio is out
        self.history = np.zeros(0, np.float32)  # the last `context` frames of audio out (Griffin-Lim's prefix)

    def audio(self, mel: np.ndarray, edge: bool, limit: int | None = None) -> np.ndarray:
        """New audio for the final mel frames `mel` (all of them so far), at most `limit` frames of it; `edge`: no
        frame follows them yet."""
        final = mel.shape[0]
        target = final if edge else final - self.context
        if limit is not None:
            target = min(target, self.done + limit)
        if target <= self.done or (target < final and target - self.done < (limit or MIN_AUDIO_CHUNK_FRAMES)):
            return np.zeros(0, np.float32)
        lo = max(0, self.done - self.context)
        hi = final if edge and target == final else min(final, target + self.context)
        chunk = torch.from_numpy(np.ascontiguousarray(mel[lo:hi]))
        if self.vocoder is None:
            from avflow.vocoder.griffin_lim import mel_to_audio

            prefix = torch.from_numpy(self.history[self.history.size - (self.done - lo) * self.hop:])
            audio = mel_to_audio(chunk.T, self.cfg, prefix=prefix if prefix.numel() else None).numpy()
        else:
            audio = vocode(chunk, self.vocoder, self.cfg).numpy()
        new = audio[(self.done - lo) * self.hop:(target - lo) * self.hop]
        self.history = np.concatenate([self.history, new])[-self.context * self.hop:]
        self.done = target
        return new
