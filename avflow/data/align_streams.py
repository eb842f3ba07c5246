"""Alignment of a segment's streams to the mel frame rate.

Every stream is brought to one clock here, and only here: the mel frames of the actor's audio
(22050 / 256 = 86.13 fps). Visual streams (30 fps) and ASR tokens (50 Hz) are linearly interpolated
onto the mel frame times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avflow.config import MelConfig
from avflow.data.features import interpolate_frames, log_mel, resample
from avflow.data.records import SegmentRecord


@dataclass
class AlignedSegment:
    """One segment, every stream at the mel frame rate (F frames)."""

    name: str
    is_val: bool
    mel: np.ndarray  # (F, n_mels) natural-log mel
    expression: np.ndarray  # (F, 256)
    pose: np.ndarray  # (F, pose_dim) head pose, as the layout's reader gives it
    tokens: np.ndarray  # (F, 29) actor token logits
    expression_valid: np.ndarray  # (F,) bool: frames whose expression code is data
    participant_tokens: np.ndarray | None = None  # (F, 29) when the recording has a partner channel
    participant_features: np.ndarray | None = None  # (F, D) SMIRK features when the layout has them
    participant_mel: np.ndarray | None = None  # (F, n_mels) of audio channel 1, when asked for

    @property
    def frames(self) -> int:
        return self.mel.shape[0]


def _channel_mel(record: SegmentRecord, channel: int, mel_cfg: MelConfig) -> np.ndarray:
    audio = resample(record.audio[channel], record.sample_rate, mel_cfg.sample_rate)
    return log_mel(torch.from_numpy(np.ascontiguousarray(audio)), mel_cfg).T.numpy().astype(np.float32)


def align_segment(record: SegmentRecord, mel_cfg: MelConfig, participant_mel: bool = False) -> AlignedSegment:
    """Every stream at the actor's mel frames; `participant_mel` adds channel 1's mel (dyadic data)."""
    mel = _channel_mel(record, 0, mel_cfg)
    frames = mel.shape[0]
    fps = mel_cfg.frame_rate

    def visual(values: np.ndarray) -> np.ndarray:
        return interpolate_frames(values, record.visual_fps, frames, fps)

    def tokens(channel: int) -> np.ndarray:
        return interpolate_frames(record.tokens[channel], record.token_fps, frames, fps)

    # A frame is valid expression data only if both visual neighbours it is interpolated from are.
    valid = (np.ones(frames, dtype=bool) if record.expression_valid is None
             else visual(record.expression_valid.astype(np.float32)[:, None])[:, 0] > 0.999)
    return AlignedSegment(
        name=record.name,
        is_val=record.is_val,
        mel=mel,
        expression=visual(record.expression),
        pose=visual(record.head_pose),
        tokens=tokens(0),
        expression_valid=valid,
        participant_tokens=tokens(1) if record.tokens.shape[0] > 1 else None,
        participant_features=None if record.participant_features is None else visual(record.participant_features),
        participant_mel=_channel_mel(record, 1, mel_cfg) if participant_mel and record.audio.shape[0] > 1 else None,
    )
