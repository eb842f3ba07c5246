"""Audio and motion features shared by data preparation, training and inference.

The log-mel recipe must match BigVGAN's exactly (padding, window, magnitude epsilon, Slaney filterbank,
log clamp): the model predicts these mels and a pretrained BigVGAN vocoder turns them back into audio,
so any drift here shows up as vocoder artefacts. The remaining helpers (wav I/O, resampling, frame-rate
interpolation, rigid transform <-> pose conversion) bring raw recordings and tracked head motion onto
the single mel frame rate that every stream uses.
The published mel recipe and frame rates: docs/reference.md, "State and normalization" and "Rates and
alignment" (which also says how avflow's zero-aligned interpolation differs from the published one).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch

from avflow.config import MelConfig
from avflow.optional import require
from avflow.utils import atomic_path

SLANEY_LINEAR_HZ_PER_MEL = 200.0 / 3.0
SLANEY_LOG_START_HZ = 1000.0
SLANEY_LOG_START_MEL = SLANEY_LOG_START_HZ / SLANEY_LINEAR_HZ_PER_MEL
SLANEY_LOG_STEP = math.log(6.4) / 27.0
MAGNITUDE_EPSILON = 1e-9  # BigVGAN adds this under the square root of |STFT|^2
LOG_CLAMP_MIN = 1e-5  # BigVGAN's floor before the natural log


def hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's Auditory Toolbox scale: linear below 1 kHz, logarithmic above (librosa htk=False)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / SLANEY_LINEAR_HZ_PER_MEL
    log_ratio_above_log_start = np.log(np.maximum(hz, SLANEY_LOG_START_HZ) / SLANEY_LOG_START_HZ)
    logarithmic = SLANEY_LOG_START_MEL + log_ratio_above_log_start / SLANEY_LOG_STEP
    return np.where(hz >= SLANEY_LOG_START_HZ, logarithmic, linear)


def slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of `hz_to_slaney_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * SLANEY_LINEAR_HZ_PER_MEL
    mels_above_log_start = np.maximum(mel, SLANEY_LOG_START_MEL) - SLANEY_LOG_START_MEL
    logarithmic = SLANEY_LOG_START_HZ * np.exp(SLANEY_LOG_STEP * mels_above_log_start)
    return np.where(mel >= SLANEY_LOG_START_MEL, logarithmic, linear)


@functools.lru_cache(maxsize=8)
def _cached_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    bin_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_hz = slaney_mel_to_hz(np.linspace(hz_to_slaney_mel(fmin), hz_to_slaney_mel(fmax), n_mels + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    unit_area = 2.0 / (upper - lower)  # Slaney normalization: every filter has the same area
    return torch.from_numpy((triangles * unit_area).astype(np.float32))


def mel_filterbank(cfg: MelConfig) -> torch.Tensor:
    """(n_mels, n_fft//2+1) float32 Slaney-scale, Slaney-area-normalized triangles over fmin..fmax.

    Cached per config values; the returned tensor is shared, so treat it as read-only.
    """
    if not 0.0 <= cfg.fmin < cfg.fmax <= cfg.sample_rate / 2.0:
        raise ValueError(f"mel fmin={cfg.fmin}, fmax={cfg.fmax}: expected 0 <= fmin < fmax <= sample_rate/2 "
                         f"= {cfg.sample_rate / 2.0}")
    return _cached_filterbank(int(cfg.sample_rate), int(cfg.n_fft), int(cfg.n_mels), float(cfg.fmin), float(cfg.fmax))


def reflect_padding(cfg: MelConfig) -> int:
    """Samples BigVGAN reflect-pads on each side so that frames == floor(samples / hop)."""
    return (cfg.n_fft - cfg.hop_length) // 2


def min_audio_samples(cfg: MelConfig) -> int:
    """Shortest input `complex_stft` accepts: reflect padding needs more samples than it pads, and the
    padded signal must hold one full FFT window."""
    padding = reflect_padding(cfg)
    return max(padding + 1, cfg.n_fft - 2 * padding, cfg.hop_length)


def complex_stft(audio: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """(..., samples) -> complex (..., n_fft//2+1, frames) with BigVGAN's framing (reflect pad, center=False).

    Public so that the Griffin-Lim fallback vocoder analyses audio with exactly the framing of `log_mel`.
    """
    if audio.dim() < 1:
        raise ValueError("audio: expected shape (..., samples), got a scalar")
    samples = audio.shape[-1]
    if samples < min_audio_samples(cfg):
        raise ValueError(f"audio length {samples} samples: expected at least {min_audio_samples(cfg)} "
                         f"to reflect-pad {reflect_padding(cfg)} samples per side and hold one {cfg.n_fft}-point frame")
    if not audio.is_floating_point():
        audio = audio.to(torch.float32)
    leading = audio.shape[:-1]
    padding = reflect_padding(cfg)
    flat = audio.reshape(-1, 1, samples)
    padded = torch.nn.functional.pad(flat, (padding, padding), mode="reflect").squeeze(1)
    window = torch.hann_window(cfg.win_length, dtype=audio.dtype, device=audio.device)
    spectrum = torch.stft(padded, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                          window=window, center=False, onesided=True, return_complex=True)
    return spectrum.reshape(*leading, *spectrum.shape[-2:])


def log_mel(audio: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """(..., samples) float audio at cfg.sample_rate -> (..., n_mels, floor(samples / hop)) natural-log mel."""
    spectrum = torch.view_as_real(complex_stft(audio, cfg))
    magnitude = torch.sqrt(spectrum.pow(2).sum(-1) + MAGNITUDE_EPSILON)
    filterbank = mel_filterbank(cfg).to(device=magnitude.device, dtype=magnitude.dtype)
    return torch.log(torch.clamp(torch.matmul(filterbank, magnitude), min=LOG_CLAMP_MIN))


def load_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read any soundfile-readable file -> (float32 array (channels, samples), sample rate)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    soundfile = require("soundfile", "reading audio files")
    try:
        audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except RuntimeError as error:  # soundfile.LibsndfileError is one
        raise ValueError(f"{path}: not a readable audio file ({error})") from error
    return np.ascontiguousarray(audio.T), int(sample_rate)


def audio_info(path: str | os.PathLike):
    """An audio file's header (`frames`, `samplerate`, `channels`, `duration`), without reading the samples."""
    soundfile = require("soundfile", "reading audio files")
    try:
        return soundfile.info(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path}: not a readable audio file ({error})") from error


def audio_seconds(path: str | os.PathLike) -> float:
    """An audio file's duration from its header, without reading the samples."""
    return float(audio_info(path).duration)


def save_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write (samples,) or (channels, samples) audio in [-1, 1] as 16-bit PCM wav, atomically.

    Values outside [-1, 1] are clipped rather than left to wrap around in the integer conversion.
    """
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
        raise ValueError(f"audio for {path}: expected shape (samples,) or (channels, samples), got {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise ValueError(f"audio for {path}: contains NaN or infinite samples")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate for {path}: expected a positive rate, got {sample_rate}")
    frames_by_channel = np.clip(audio.astype(np.float32), -1.0, 1.0)
    if frames_by_channel.ndim == 2:
        frames_by_channel = frames_by_channel.T
    soundfile = require("soundfile", "writing wav files")
    with atomic_path(path) as tmp:
        soundfile.write(tmp, frames_by_channel, int(sample_rate), subtype="PCM_16", format="WAV")


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """(..., samples) audio at sr_in -> (..., resampled samples) at sr_out with soxr's high quality filter."""
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"resample rates: expected positive sample rates, got {sr_in} -> {sr_out}")
    audio = np.asarray(audio)
    if audio.ndim < 1:
        raise ValueError("audio: expected shape (..., samples), got a scalar")
    if sr_in == sr_out:
        return audio
    if audio.dtype not in (np.float32, np.float64):
        audio = audio.astype(np.float32)
    leading = audio.shape[:-1]
    samples_by_channel = np.ascontiguousarray(audio.reshape(-1, audio.shape[-1]).T)
    resampled = require("soxr", "resampling audio").resample(samples_by_channel, sr_in, sr_out, quality="HQ")
    return np.ascontiguousarray(resampled.T).reshape(*leading, -1)


def interpolate_frames(values: np.ndarray, src_fps: float, n_out: int, dst_fps: float) -> np.ndarray:
    """Resample a (N, D) stream sampled at times i/src_fps onto times j/dst_fps, j < n_out, linearly.

    Times past either end take the edge value, so a slightly short tracking stream still covers the
    audio. Passing a 0/1 mask as float gives the fraction of valid neighbours, which callers threshold.
    """
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"values: expected shape (N >= 1, D), got {values.shape}")
    if src_fps <= 0 or dst_fps <= 0:
        raise ValueError(f"frame rates: expected positive fps, got src_fps={src_fps}, dst_fps={dst_fps}")
    if n_out < 0:
        raise ValueError(f"n_out: expected a non-negative frame count, got {n_out}")
    last = values.shape[0] - 1
    source_position = np.clip(np.arange(n_out, dtype=np.float64) * (src_fps / dst_fps), 0.0, last)
    before = np.floor(source_position).astype(np.int64)
    after = np.minimum(before + 1, last)
    weight = (source_position - before)[:, None]
    values = values.astype(np.float64)
    return ((1.0 - weight) * values[before] + weight * values[after]).astype(np.float32)


def _quaternion_from_rotation(rotation: np.ndarray) -> np.ndarray:
    """(N, 3, 3) -> (N, 4) [w, x, y, z] by Shepperd's method: branch on the largest of trace and the diagonal
    so the component divided by is never near zero."""
    r = rotation
    trace = r[:, 0, 0] + r[:, 1, 1] + r[:, 2, 2]
    candidates = np.stack([trace, r[:, 0, 0], r[:, 1, 1], r[:, 2, 2]], axis=1)
    branch = np.argmax(candidates, axis=1)
    quaternion = np.empty((r.shape[0], 4), dtype=np.float64)

    def fill(mask: np.ndarray, largest_squared_times_four: np.ndarray, compose) -> None:
        s = 2.0 * np.sqrt(np.maximum(largest_squared_times_four[mask], 1e-300))  # s = 4 * largest component
        quaternion[mask] = compose(r[mask], s)

    fill(branch == 0, 1.0 + trace, lambda m, s: np.stack(
        [s / 4, (m[:, 2, 1] - m[:, 1, 2]) / s, (m[:, 0, 2] - m[:, 2, 0]) / s, (m[:, 1, 0] - m[:, 0, 1]) / s], 1))
    fill(branch == 1, 1.0 + r[:, 0, 0] - r[:, 1, 1] - r[:, 2, 2], lambda m, s: np.stack(
        [(m[:, 2, 1] - m[:, 1, 2]) / s, s / 4, (m[:, 0, 1] + m[:, 1, 0]) / s, (m[:, 0, 2] + m[:, 2, 0]) / s], 1))
    fill(branch == 2, 1.0 + r[:, 1, 1] - r[:, 0, 0] - r[:, 2, 2], lambda m, s: np.stack(
        [(m[:, 0, 2] - m[:, 2, 0]) / s, (m[:, 0, 1] + m[:, 1, 0]) / s, s / 4, (m[:, 1, 2] + m[:, 2, 1]) / s], 1))
    fill(branch == 3, 1.0 + r[:, 2, 2] - r[:, 0, 0] - r[:, 1, 1], lambda m, s: np.stack(
        [(m[:, 1, 0] - m[:, 0, 1]) / s, (m[:, 0, 2] + m[:, 2, 0]) / s, (m[:, 1, 2] + m[:, 2, 1]) / s, s / 4], 1))
    return quaternion / np.linalg.norm(quaternion, axis=1, keepdims=True)


def continuous_quaternion_signs(quaternion: np.ndarray) -> np.ndarray:
    """Flip q -> -q (the same rotation) so each frame has dot >= 0 with its predecessor and frame 0 has w >= 0."""
    first_sign = 1.0 if quaternion[0, 0] >= 0 else -1.0
    step_signs = np.where(np.sum(quaternion[1:] * quaternion[:-1], axis=1) >= 0, 1.0, -1.0)
    signs = first_sign * np.cumprod(np.concatenate([[1.0], step_signs]))
    return quaternion * signs[:, None]


def rigid_to_pose7(transforms: np.ndarray, canonical_sign: bool = False) -> np.ndarray:
    """(N, 4, 4) or (N, 3, 4) rigid transforms -> (N, 7) [qw, qx, qy, qz, tx, ty, tz].

    Without canonical_sign the quaternion sign is whatever Shepperd's branch yields (w > 0 whenever
    the trace branch is taken). With it, signs are made continuous over time so a model regressing
    the 7-d pose never sees the q/-q jump.
    """
    transforms = np.asarray(transforms)
    if transforms.ndim != 3 or transforms.shape[1:] not in ((4, 4), (3, 4)):
        raise ValueError(f"transforms: expected shape (N, 4, 4) or (N, 3, 4), got {transforms.shape}")
    out_dtype = transforms.dtype if np.issubdtype(transforms.dtype, np.floating) else np.float64
    transforms = transforms.astype(np.float64)
    if transforms.shape[0] == 0:
        return np.zeros((0, 7), dtype=out_dtype)
    quaternion = _quaternion_from_rotation(transforms[:, :3, :3])
    if canonical_sign:
        quaternion = continuous_quaternion_signs(quaternion)
    return np.concatenate([quaternion, transforms[:, :3, 3]], axis=1).astype(out_dtype)


def pose7_to_rigid(pose7: np.ndarray) -> np.ndarray:
    """(N, 7) [qw, qx, qy, qz, tx, ty, tz] -> (N, 4, 4) rigid transforms; the quaternion is normalized first
    because predicted poses are not exactly unit length."""
    pose7 = np.asarray(pose7)
    if pose7.ndim != 2 or pose7.shape[1] != 7:
        raise ValueError(f"pose7: expected shape (N, 7), got {pose7.shape}")
    out_dtype = pose7.dtype if np.issubdtype(pose7.dtype, np.floating) else np.float64
    pose7 = pose7.astype(np.float64)
    norm = np.linalg.norm(pose7[:, :4], axis=1, keepdims=True)
    if np.any(norm < 1e-12):
        raise ValueError(f"pose7: quaternion of frame {int(np.argmin(norm))} has zero length")
    w, x, y, z = (pose7[:, :4] / norm).T
    transforms = np.zeros((pose7.shape[0], 4, 4), dtype=np.float64)
    transforms[:, 0] = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y), pose7[:, 4]], 1)
    transforms[:, 1] = np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x), pose7[:, 5]], 1)
    transforms[:, 2] = np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y), pose7[:, 6]], 1)
    transforms[:, 3, 3] = 1.0
    return transforms.astype(out_dtype)


class FrameResampler:
    """A stream at src_fps -> frames at dst_fps, computed exactly as `interpolate_frames` computes the whole
    sequence: output frame i lies at source position i * src_fps / dst_fps, between two source frames, and comes
    out once both have arrived (or, once the source is complete, clamped to its last frame)."""

    def __init__(self, src_fps: float, dst_fps: float):
        self.ratio = src_fps / dst_fps
        self.done = 0

    def ready(self, available: int) -> int:
        """How many output frames have both source neighbours among the first `available` source frames."""
        count = max(0, math.ceil((available - 1) / self.ratio))
        while count > 0 and math.floor((count - 1) * self.ratio) > available - 2:
            count -= 1
        while math.floor(count * self.ratio) <= available - 2:
            count += 1
        return count

    def frames(self, values: list[np.ndarray], available: int, count: int) -> list[np.ndarray]:
        """Output frames [done, count) of each (available, D) source stream in `values`."""
        start, self.done = self.done, max(self.done, count)
        position = np.clip(np.arange(start, count, dtype=np.float64) * self.ratio, 0.0, available - 1)
        before = np.floor(position).astype(np.int64)
        after = np.minimum(before + 1, available - 1)
        weight = (position - before)[:, None]
        return [((1.0 - weight) * value[before].astype(np.float64) + weight * value[after].astype(np.float64))
                .astype(np.float32) for value in values]
