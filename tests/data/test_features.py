"""Audio/motion features against independent statements: librosa, hand-computed Slaney values, a numpy
re-statement of the BigVGAN recipe, and known rotations."""

import math

import numpy as np
import pytest
import soundfile
import torch

from avflow.config import MelConfig
from avflow.data.features import (
    complex_stft,
    hz_to_slaney_mel,
    interpolate_frames,
    load_wav,
    log_mel,
    mel_filterbank,
    pose7_to_rigid,
    resample,
    rigid_to_pose7,
    save_wav,
    slaney_mel_to_hz,
)

CFG = MelConfig()
SR = CFG.sample_rate
BIN_HZ = SR / CFG.n_fft


def hand_band_edges_hz(cfg: MelConfig) -> np.ndarray:
    """The n_mels + 2 band edges written out from the Slaney definition, independently of the module."""
    def to_mel(hz):
        return hz / (200 / 3) if hz < 1000 else 15 + math.log(hz / 1000) / (math.log(6.4) / 27)

    def to_hz(mel):
        return mel * 200 / 3 if mel < 15 else 1000 * math.exp((mel - 15) * math.log(6.4) / 27)

    low, high = to_mel(cfg.fmin), to_mel(cfg.fmax)
    return np.array([to_hz(low + (high - low) * i / (cfg.n_mels + 1)) for i in range(cfg.n_mels + 2)])


def periodic_hann(length: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)


def numpy_log_mel(audio: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """The BigVGAN recipe restated with numpy only (reflect pad, manual framing, rfft)."""
    pad = (cfg.n_fft - cfg.hop_length) // 2
    padded = np.pad(audio.astype(np.float64), pad, mode="reflect")
    n_frames = 1 + (len(padded) - cfg.n_fft) // cfg.hop_length
    frames = np.stack([padded[i * cfg.hop_length:i * cfg.hop_length + cfg.n_fft] for i in range(n_frames)])
    spectrum = np.fft.rfft(frames * periodic_hann(cfg.n_fft), axis=1)
    magnitude = np.sqrt(spectrum.real ** 2 + spectrum.imag ** 2 + 1e-9)
    mel = mel_filterbank(cfg).numpy().astype(np.float64) @ magnitude.T
    return np.log(np.maximum(mel, 1e-5))


def test_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000)
    got = mel_filterbank(CFG)
    assert got.dtype == torch.float32 and got.shape == (80, 513)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_slaney_scale_known_values():
    np.testing.assert_allclose(hz_to_slaney_mel(np.array([0.0, 200 / 3, 500.0, 1000.0, 6400.0])),
                               [0.0, 1.0, 7.5, 15.0, 42.0], atol=1e-9)  # 6400 Hz: 15 + ln(6.4)/(ln(6.4)/27)
    np.testing.assert_allclose(hz_to_slaney_mel(2000.0), 15 + math.log(2) * 27 / math.log(6.4), atol=1e-9)
    hz = np.array([10.0, 999.0, 1000.0, 1234.5, 7999.0])
    np.testing.assert_allclose(slaney_mel_to_hz(hz_to_slaney_mel(hz)), hz, rtol=1e-12)


def test_filterbank_triangles_peak_at_hand_computed_centres_with_unit_area():
    weights = mel_filterbank(CFG).numpy().astype(np.float64)
    edges = hand_band_edges_hz(CFG)
    bins_hz = np.arange(CFG.n_fft // 2 + 1) * BIN_HZ
    for band in range(CFG.n_mels):
        lower, centre, upper = edges[band], edges[band + 1], edges[band + 2]
        height = 2 / (upper - lower)
        assert np.all(weights[band][(bins_hz <= lower) | (bins_hz >= upper)] == 0)
        assert abs(bins_hz[np.argmax(weights[band])] - centre) <= BIN_HZ
        assert weights[band].max() <= height * (1 + 1e-6)
        assert weights[band].max() >= height * (1 - BIN_HZ / min(centre - lower, upper - centre))
        if upper - lower > 20 * BIN_HZ:  # wide enough for the bin sum to approximate the integral
            assert weights[band].sum() * BIN_HZ == pytest.approx(1.0, rel=0.01)


def test_filterbank_cached_per_config_values():
    assert mel_filterbank(MelConfig()) is mel_filterbank(MelConfig())
    assert mel_filterbank(MelConfig(n_mels=40)).shape == (40, 513)
    with pytest.raises(ValueError, match="fmax"):
        mel_filterbank(MelConfig(fmax=20000.0))


@pytest.mark.parametrize("samples", [385, 511, 512, 1000, 22050, 44117])
def test_log_mel_frame_count_is_floor_of_samples_over_hop(samples):
    audio = torch.randn(samples, generator=torch.Generator().manual_seed(samples))
    assert log_mel(audio, CFG).shape == (80, samples // 256)


def test_log_mel_batched_equals_per_item():
    audio = torch.randn(2, 3, 5000, generator=torch.Generator().manual_seed(1))
    batched = log_mel(audio, CFG)
    assert batched.shape == (2, 3, 80, 5000 // 256)
    torch.testing.assert_close(batched[1, 2], log_mel(audio[1, 2], CFG), rtol=0, atol=1e-5)


@pytest.mark.parametrize("samples", [0, 100, 384])
def test_log_mel_rejects_audio_too_short_to_pad(samples):
    with pytest.raises(ValueError, match=f"length {samples} samples"):
        log_mel(torch.zeros(samples), CFG)


@pytest.mark.parametrize("band", [5, 26, 60])
def test_log_mel_of_sine_peaks_in_its_band(band):
    centre_hz = hand_band_edges_hz(CFG)[band + 1]
    t = torch.arange(SR, dtype=torch.float64) / SR
    mel = log_mel((0.5 * torch.sin(2 * math.pi * centre_hz * t)).float(), CFG)
    assert int(mel.mean(dim=1).argmax()) == band


def test_log_mel_matches_numpy_restatement():
    rng = np.random.default_rng(0)
    t = np.arange(7000) / SR
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    expected = numpy_log_mel(audio, CFG)
    got = log_mel(torch.from_numpy(audio), CFG).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_first_frame_sees_reflected_samples():
    """An impulse at sample 100 is mirrored to -100 by the reflect padding; the DC bin of frame 0 (window
    start at -384) then sums the window at both positions. An impulse at 600 has no mirror inside frame 0."""
    window = periodic_hann(1024)
    for position, expected_dc in [(100, window[384 + 100] + window[384 - 100]), (600, window[384 + 600])]:
        audio = torch.zeros(4096, dtype=torch.float64)
        audio[position] = 1.0
        dc = complex_stft(audio, CFG)[0, 0]
        assert abs(dc.imag) < 1e-12
        assert dc.real == pytest.approx(expected_dc, abs=1e-12)


def dominant_frequency(audio: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * sample_rate / len(audio))


def test_resample_48k_to_22050_keeps_length_ratio_and_frequency():
    t = np.arange(48000) / 48000
    sine = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = resample(sine, 48000, 22050)
    assert out.shape == (22050,) and out.dtype == np.float32
    assert dominant_frequency(out, 22050) == pytest.approx(1000, abs=1.0)
    stereo = np.stack([sine, 0.5 * sine])
    out_stereo = resample(stereo, 48000, 22050)
    assert out_stereo.shape == (2, 22050)
    np.testing.assert_allclose(out_stereo[0], out, atol=1e-6)
    np.testing.assert_allclose(out_stereo[1], 0.5 * out, atol=1e-6)
    assert resample(sine, 22050, 22050) is sine


def test_wav_round_trip_within_16_bit_quantization_and_atomic(tmp_path):
    t = np.arange(3000) / SR
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 300 * t), 0.25 * np.cos(2 * np.pi * 700 * t)]).astype(np.float32)
    path = tmp_path / "clip.wav"
    save_wav(path, stereo, SR)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.wav"]
    assert soundfile.info(path).subtype == "PCM_16"
    loaded, sample_rate = load_wav(path)
    assert sample_rate == SR and loaded.shape == (2, 3000) and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, stereo, rtol=0, atol=1 / 32768)

    save_wav(tmp_path / "mono.wav", np.array([0.0, 1.5, -1.5, 0.25], dtype=np.float32), 16000)
    mono, mono_rate = load_wav(tmp_path / "mono.wav")
    assert mono_rate == 16000 and mono.shape == (1, 4)
    np.testing.assert_allclose(mono[0], [0.0, 32767 / 32768, -1.0, 0.25], atol=1e-7)


def test_wav_errors_name_the_path(tmp_path):
    missing = tmp_path / "absent.wav"
    with pytest.raises(FileNotFoundError, match="absent.wav"):
        load_wav(missing)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="garbage.wav"):
        load_wav(garbage)
    with pytest.raises(ValueError, match="out.wav"):
        save_wav(tmp_path / "out.wav", np.zeros((1, 2, 3)), SR)
    assert not (tmp_path / "out.wav").exists()


def test_interpolate_frames_hand_computed():
    values = np.array([[0.0, 1.0], [10.0, 3.0], [20.0, 5.0], [30.0, 7.0]])
    # times 0, 0.25, 0.5 s -> source positions 0, 2.5, 5 (past the end: last value)
    np.testing.assert_allclose(interpolate_frames(values, 10.0, 3, 4.0), [[0, 1], [25, 6], [30, 7]])
    upsampled = interpolate_frames(np.array([[0.0], [1.0]]), 1.0, 6, 4.0)
    assert upsampled.dtype == np.float32
    np.testing.assert_allclose(upsampled[:, 0], [0, 0.25, 0.5, 0.75, 1, 1])
    mask = np.array([[1.0], [0.0], [1.0]])
    np.testing.assert_allclose(interpolate_frames(mask, 2.0, 5, 4.0)[:, 0], [1, 0.5, 0, 0.5, 1])
    assert interpolate_frames(np.array([[7.0]]), 30.0, 3, 86.1328125).tolist() == [[7.0]] * 3


def axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula, an independent route from (axis, angle) to a rotation matrix."""
    axis = axis / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def rigid(rotation: np.ndarray, translation) -> np.ndarray:
    transform = np.eye(4)
    transform[:3, :3], transform[:3, 3] = rotation, translation
    return transform


@pytest.mark.parametrize("axis, angle, expected", [
    ([0, 0, 1], math.pi / 2, [math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)]),
    ([1, 0, 0], math.pi, [0, 1, 0, 0]),  # trace -1: the x-diagonal branch
    ([0, 1, 0], math.pi, [0, 0, 1, 0]),
    ([0, 0, 1], math.pi, [0, 0, 0, 1]),
    ([1, 1, 1], 2 * math.pi / 3, [0.5, 0.5, 0.5, 0.5]),
])
def test_rigid_to_pose7_known_rotations(axis, angle, expected):
    pose = rigid_to_pose7(rigid(axis_angle_matrix(np.array(axis, float), angle), [1, 2, 3])[None])[0]
    sign = 1 if np.dot(pose[:4], expected) >= 0 else -1
    np.testing.assert_allclose(sign * pose[:4], expected, atol=1e-12)
    np.testing.assert_allclose(pose[4:], [1, 2, 3])


def test_rigid_to_pose7_random_rotations_and_round_trip():
    rng = np.random.default_rng(0)
    axes = rng.standard_normal((200, 3))
    angles = rng.uniform(0, 2 * math.pi, 200)
    transforms = np.stack([rigid(axis_angle_matrix(a, th), t) for a, th, t in
                           zip(axes, angles, rng.standard_normal((200, 3)))])
    poses = rigid_to_pose7(transforms)
    units = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    expected_q = np.concatenate([np.cos(angles / 2)[:, None], np.sin(angles / 2)[:, None] * units], axis=1)
    np.testing.assert_allclose(np.abs(np.sum(poses[:, :4] * expected_q, axis=1)), 1.0, atol=1e-12)
    np.testing.assert_allclose(pose7_to_rigid(poses), transforms, atol=1e-12)
    np.testing.assert_allclose(rigid_to_pose7(transforms[:, :3, :]), poses, atol=0)
    scaled = poses.copy()
    scaled[:, :4] *= 3.0
    np.testing.assert_allclose(pose7_to_rigid(scaled), transforms, atol=1e-12)


def test_canonical_sign_makes_quaternions_continuous():
    angles = np.linspace(0, 4 * math.pi, 97)  # w = cos(angle/2) changes sign twice
    axis = np.array([0.3, -0.5, 0.8])
    transforms = np.stack([rigid(axis_angle_matrix(axis, a), [0, 0, 0]) for a in angles])
    raw = rigid_to_pose7(transforms)
    assert np.any(np.sum(raw[1:, :4] * raw[:-1, :4], axis=1) < 0)  # the jump canonical_sign must remove
    smooth = rigid_to_pose7(transforms, canonical_sign=True)
    assert smooth[0, 0] >= 0
    assert np.all(np.sum(smooth[1:, :4] * smooth[:-1, :4], axis=1) >= 0)
    np.testing.assert_allclose(np.abs(smooth), np.abs(raw), atol=0)
    np.testing.assert_allclose(pose7_to_rigid(smooth), transforms, atol=1e-12)

    about_x = np.stack([rigid(axis_angle_matrix(np.array([1.0, 0, 0]), a), [0, 0, 0])
                        for a in [1.2 * math.pi, 1.3 * math.pi]])
    assert rigid_to_pose7(about_x)[0, 0] < 0  # Shepperd's x branch keeps x > 0, so w = cos(0.6 pi) < 0
    assert rigid_to_pose7(about_x, canonical_sign=True)[0, 0] > 0


def test_pose_conversions_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"transforms: expected shape \(N, 4, 4\)"):
        rigid_to_pose7(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"pose7: expected shape \(N, 7\)"):
        pose7_to_rigid(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="zero length"):
        pose7_to_rigid(np.zeros((1, 7)))
