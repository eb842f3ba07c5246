"""The layout-neutral segment record every dataset reader yields, at the streams' native rates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SegmentRecord:
    """One recording as read from disk, before alignment to the mel clock.

    Readers convert layout-specific encodings (rigid transforms, body-pose joints) into `head_pose`, so
    alignment (avflow.data.align_streams.align_segment) treats every layout alike.
    """

    name: str
    is_val: bool
    audio: np.ndarray  # (channels, samples) float32; channel 0 the actor/subject
    sample_rate: int
    expression: np.ndarray  # (N, 256) float32 at visual_fps
    head_pose: np.ndarray  # (N, pose_dim): 7-d quaternion [w, x, y, z] + translation (50h) or 4-d joints (a2p)
    visual_fps: float
    tokens: np.ndarray  # (channels, M, 29) float32 at token_fps; channel 1 the participant when present
    token_fps: float
    expression_valid: np.ndarray | None = None  # (N,) bool; None means every frame is data
    participant_features: np.ndarray | None = None  # (N, D) at visual_fps, min-max normalized to [-1, 1]
    identity: str = ""  # whose voice and face this is (a2p: the subject); empty: the dataset's one identity
