"""Alignment of every stream to the mel clock."""

import numpy as np
import torch

from avflow.config import MelConfig
from avflow.data.align_streams import align_segment
from avflow.data.features import log_mel, resample, rigid_to_pose7
from avflow.data.records import SegmentRecord


def synthetic_segment(seconds=2.0):
    visual = int(seconds * 30)
    rotation_z = np.linspace(0, 0.2, visual)
    headpose = np.tile(np.eye(4, dtype=np.float32), (visual, 1, 1))
    headpose[:, 0, 0] = headpose[:, 1, 1] = np.cos(rotation_z)
    headpose[:, 0, 1], headpose[:, 1, 0] = -np.sin(rotation_z), np.sin(rotation_z)
    expression = np.zeros((visual, 256), dtype=np.float32)
    expression[:, 0] = np.arange(visual) / 30.0  # value = time in seconds
    tokens = np.zeros((2, int(seconds * 50), 29), dtype=np.float32)
    tokens[0, :, 3] = np.arange(tokens.shape[1]) / 50.0
    audio = np.random.default_rng(0).standard_normal((2, int(seconds * 48000))).astype(np.float32) * 0.1
    return SegmentRecord("x", False, audio, 48000, expression, rigid_to_pose7(headpose), 30.0, tokens, 50.0)


def test_every_stream_lands_on_the_mel_clock():
    aligned = align_segment(synthetic_segment(), MelConfig())
    frames = int(2.0 * 22050) // 256
    assert aligned.mel.shape == (frames, 80)
    for stream in (aligned.expression, aligned.pose, aligned.tokens):
        assert stream.shape[0] == frames
    times = np.arange(frames) / (22050 / 256)
    inside = times <= (59 / 30.0)
    # a stream whose value is its own timestamp must read back the mel frame times
    np.testing.assert_allclose(aligned.expression[inside, 0], times[inside], atol=1e-5)
    np.testing.assert_allclose(aligned.tokens[times <= 99 / 50.0, 3], times[times <= 99 / 50.0], atol=1e-5)
    assert aligned.participant_tokens.shape == (frames, 29) and aligned.expression_valid.all()
    half_angle = aligned.pose[:, 3]  # qz = sin(angle / 2) of the z rotation, angle = 0.2 t / (59/30)
    np.testing.assert_allclose(half_angle[inside], np.sin(0.1 * times[inside] / (59 / 30)), atol=1e-3)


def test_missing_expression_frames_stay_masked_after_interpolation():
    record = synthetic_segment()
    record.expression_valid = np.ones(60, dtype=bool)
    record.expression_valid[20:23] = False  # 0.667 s .. 0.767 s have no face code
    aligned = align_segment(record, MelConfig())
    times = np.arange(aligned.frames) / (22050 / 256)
    touching_gap = (times > 19 / 30) & (times < 23 / 30)
    assert not aligned.expression_valid[touching_gap].any()
    assert aligned.expression_valid[~touching_gap].all()


def test_participant_mel_is_channel_one_on_the_actor_clock():
    record = synthetic_segment()
    aligned = align_segment(record, MelConfig(), participant_mel=True)
    assert align_segment(record, MelConfig()).participant_mel is None
    expected = log_mel(torch.from_numpy(resample(record.audio[1], 48000, 22050)), MelConfig()).T.numpy()
    assert aligned.participant_mel.shape == aligned.mel.shape
    np.testing.assert_allclose(aligned.participant_mel, expected, atol=1e-5)
    assert not np.allclose(aligned.participant_mel, aligned.mel)
