"""Each held-out metric against a value worked out by hand on small synthetic inputs."""

import math

import numpy as np
import pytest

from avflow.evaluate import metrics as m

RNG = np.random.default_rng(0)


def test_identical_inputs_give_zero_distances():
    mel, expression = RNG.standard_normal((50, 80)), RNG.standard_normal((50, 256))
    assert m.mel_l1(mel, mel) == 0.0
    assert m.mel_cepstral_distortion(mel, mel) == 0.0
    assert m.mean_abs(expression, expression) == 0.0 and m.mean_squared(expression, expression) == 0.0
    mean, covariance = m.GaussianStats().add(expression).mean_covariance()
    assert m.frechet_distance(mean, covariance, mean, covariance) == pytest.approx(0.0, abs=1e-8)


def test_a_known_offset_gives_the_known_l1_and_l2():
    truth = RNG.standard_normal((20, 7))
    assert m.mean_abs(truth + 0.25, truth) == pytest.approx(0.25)
    assert m.mean_squared(truth - 0.5, truth) == pytest.approx(0.25)
    frames = np.zeros(20, dtype=bool)
    frames[:10] = True
    shifted = truth.copy()
    shifted[:10] += 1.0
    shifted[10:] += 100.0  # excluded frames do not count
    assert m.mean_abs(shifted, truth, frames) == pytest.approx(1.0)


def test_mel_cepstral_distortion_of_a_known_cepstral_offset():
    """Adding a * (the DCT basis vector of c1) to every log-mel frame moves c1 by a and nothing else:
    MCD = 10 sqrt(2) / ln 10 * |a| dB. A constant offset only moves c0, which MCD leaves out."""
    truth = RNG.standard_normal((30, 80))
    k = np.arange(80)
    basis = np.sqrt(2 / 80) * np.cos(np.pi * (2 * k + 1) * 1 / (2 * 80))
    assert (m.mel_cepstral_distortion(truth + 0.3 * basis, truth)
            == pytest.approx(10 * math.sqrt(2) / math.log(10) * 0.3))
    assert m.mel_cepstral_distortion(truth + 2.0, truth) == pytest.approx(0.0, abs=1e-9)


def test_log_f0_rmse_and_voicing_error_by_hand():
    f0_truth = np.array([100.0, 100.0, np.nan, 200.0])
    voiced_truth = np.array([True, True, False, True])
    f0_generated = np.array([100.0 * math.e ** 0.1, np.nan, 150.0, 200.0 * math.e ** -0.1])
    voiced_generated = np.array([True, False, True, True])
    # frames voiced in both: 0 and 3, with ln differences 0.1 and -0.1
    assert m.log_f0_rmse(f0_generated, voiced_generated, f0_truth, voiced_truth) == pytest.approx(0.1)
    assert m.voicing_error(voiced_generated, voiced_truth) == pytest.approx(0.5)


def test_pitch_track_finds_the_frequency_of_a_tone():
    pytest.importorskip("librosa")
    rate, hop = 22050, 256
    audio = 0.5 * np.sin(2 * np.pi * 180.0 * np.arange(rate) / rate)
    f0, voiced = m.pitch_track(audio, rate, hop)
    assert len(f0) == rate // hop + 1
    middle = slice(10, -10)
    assert voiced[middle].all() and np.allclose(f0[middle], 180.0, rtol=0.01)
    assert not m.pitch_track(np.zeros(rate), rate, hop)[1].any()


def test_mean_pitch_averages_voiced_frames_only():
    f0 = np.array([100.0, np.nan, 200.0, 400.0, np.nan])
    voiced = np.array([True, False, True, False, False])
    assert m.mean_pitch(f0, voiced) == 150.0  # (100 + 200) / 2; 400 is unvoiced
    assert np.isnan(m.mean_pitch(f0, np.zeros(5, dtype=bool)))


def test_mouth_range_is_the_percentile_spread_of_one_mouth_control():
    frames = np.linspace(0.0, 1.0, 101)  # 0, 0.01, ..., 1: its 5th and 95th percentiles are 0.05 and 0.95
    expression = np.zeros((101, 8))
    expression[:, 0], expression[:, 1], expression[:, 2] = frames, 2.0 * frames, 0.0
    expression[:, 3] = 100.0 * frames  # blink: not a speech mouth control
    assert [m.mouth_range(expression, control) for control in range(3)] == pytest.approx([0.9, 1.8, 0.0])


def test_jitter_of_a_known_sequence():
    # x = t^2 has second difference 2 everywhere; a constant-velocity ramp has none
    t = np.arange(10, dtype=float)[:, None]
    assert m.jitter(np.hstack([t ** 2, 3 * t])) == pytest.approx((4 + 0) / 2)
    alternating = np.array([[0.0], [1.0], [0.0], [1.0]])  # second differences -2, 2
    assert m.jitter(alternating) == pytest.approx(4.0)


def test_resampling_to_the_motion_rate_interpolates_at_its_frame_times():
    """A stream that moves linearly in time is reproduced exactly at j / 30 s; a 1 s stream gives 30 frames."""
    mel_rate = 86.1328125
    offset, velocity = RNG.standard_normal(3), RNG.standard_normal(3)
    stream = offset + velocity * (np.arange(86) / mel_rate)[:, None]
    back = m.resample(stream, mel_rate, 30.0)
    assert back.shape == (30, 3)
    assert np.allclose(back, offset + velocity * (np.arange(30) / 30.0)[:, None])


def test_diversity_is_the_mean_pairwise_frame_distance():
    samples = np.zeros((3, 5, 2))
    samples[1, :, 0] = 3.0  # distance 3 from sample 0
    samples[2, :, 1] = 4.0  # distance 4 from sample 0, 5 from sample 1
    assert m.diversity(samples) == pytest.approx(4.0)
    assert math.isnan(m.diversity(samples[:1]))


def test_frechet_distance_of_known_gaussians():
    """Diagonal covariances commute: FD = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2."""
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])  # rank-deficient b
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 3 ** 2
    assert m.frechet_distance(mean_a, np.diag(var_a), mean_b, np.diag(var_b)) == pytest.approx(expected)
    rotation = np.linalg.qr(RNG.standard_normal((3, 3)))[0]  # the same Gaussians rotated: distance unchanged
    assert m.frechet_distance(rotation @ mean_a, rotation @ np.diag(var_a) @ rotation.T, rotation @ mean_b,
                              rotation @ np.diag(var_b) @ rotation.T) == pytest.approx(expected)


def test_gaussian_stats_merge_equals_one_pass():
    frames = RNG.standard_normal((40, 4))
    merged = m.GaussianStats().add(frames[:15]).merge(m.GaussianStats().add(frames[15:]))
    mean, covariance = merged.mean_covariance()
    assert np.allclose(mean, frames.mean(0)) and np.allclose(covariance, np.cov(frames.T))


def test_a_known_shift_gives_the_known_lag():
    leader = RNG.standard_normal(200)
    follower = np.concatenate([np.zeros(7), leader[:-7]])  # follower[t + 7] = leader[t]
    lag, correlation = m.best_lag(leader, follower, max_lag=20)
    assert lag == 7 and correlation == pytest.approx(1.0)
    assert m.best_lag(follower, leader, max_lag=20)[0] == -7


def test_synchrony_of_motion_that_follows_speech_energy_by_five_frames():
    frame_rate = 86.1328125
    energy = np.repeat(RNG.uniform(0, 1, 40), 5)  # piecewise-constant energy, 200 frames
    mel = np.repeat(energy[:, None], 80, axis=1)  # ln sqrt(80 exp(2 e)) = e + ln(80) / 2
    assert np.allclose(m.speech_energy(mel), energy + 0.5 * math.log(80))
    speed = np.concatenate([np.zeros(5), energy[:-5]]) + 0.1
    expression = np.cumsum(np.hstack([speed[:, None], np.zeros((200, 3))]), axis=0)  # ||x[t] - x[t-1]|| = speed[t]
    lag_ms, correlation = m.synchrony(mel, expression, frame_rate)
    assert lag_ms == pytest.approx(1000 * 5 / frame_rate) and correlation > 0.99


def test_segment_scores_average_over_samples():
    truth = m.Segment(mel=np.zeros((30, 80)), expression=np.zeros((30, 256)), head_pose=np.zeros((30, 7)))
    generated = m.Segment(mel=np.stack([np.full((30, 80), 1.0), np.full((30, 80), 3.0)]),
                          expression=np.zeros((2, 30, 256)), head_pose=np.zeros((2, 30, 7)))
    generated.head_pose[1] += 2.0
    scores = m.segment_scores(generated, truth, ["mel_l1", "head_pose_l1", "head_pose_diversity", "expression_jitter"],
                              86.13)
    assert scores == pytest.approx({"mel_l1": 2.0, "head_pose_l1": 1.0, "head_pose_diversity": 2 * math.sqrt(7),
                                    "expression_jitter": 0.0})
    generated.expression[:, ::2] += 1.0  # alternating at the mel rate; at 30 fps: every ~2.9th frame
    expected = m.jitter(m.resample(generated.expression[0], 86.13, 30.0))
    assert expected > 0
    assert (m.segment_scores(generated, truth, ["expression_jitter"], 86.13)["expression_jitter"]
            == pytest.approx(expected))


def test_mean_scores_skip_undefined_values():
    assert m.mean_scores([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": 2.0}]) == {"a": 2.0, "b": 2.0}


def test_unknown_metric_names_are_refused():
    with pytest.raises(ValueError, match="unknown metrics mel_l3"):
        m.check_metric_names(["mel_l1", "mel_l3"], "--metrics")
