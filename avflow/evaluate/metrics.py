"""Held-out metrics of speech, motion and their synchrony: pure functions of arrays (docs/evaluation.md).

This module imports numpy and scipy only (librosa when a pitch track is asked for), never a stage of
avflow, so that training validation (avflow.train) and the evaluation command (avflow.evaluate.run)
compute the same numbers from the same code without training importing inference.

Every sequence is at the mel frame rate (86.13 fps): log-mel (T, n_mels) in natural log, expression
codes (T, 256), head pose (T, 7). Per segment, generated samples come as (N, T, D) and the ground
truth as (T, D).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.fft import dct

MCD_COEFFICIENTS = 13  # cepstral coefficients c1..c13 of the log-mel (c0, the level, is left out), as in TTS practice
MCD_DB = 10.0 * np.sqrt(2.0) / np.log(10.0)  # natural-log cepstral distance -> dB (Kubichek 1993)
PITCH_FMIN_HZ = 60.0  # pyin search range: covers adult speech
PITCH_FMAX_HZ = 500.0
PITCH_FRAME_LENGTH = 1024  # samples at 22.05 kHz: ~46 ms, two periods of the lowest pitch searched
SYNC_MAX_LAG_SECONDS = 0.5  # cross-correlation lags searched, both ways
MOTION_RATE = 30.0  # fps jitter is measured at: the capture rate of the published data and of every motion output
SPEECH_MOUTH_CONTROLS = (0, 1, 2)  # demo corpus: jaw_open, lip_round, lip_close (blink, index 3, is random)


@dataclass(frozen=True)
class Metric:
    better: str  # "lower" | "higher" | "closer to ground truth"
    description: str
    on_ground_truth: bool = False  # also measured on the ground truth itself (a reference column)


METRICS: dict[str, Metric] = {
    "mel_l1": Metric("lower", "mean |log-mel difference|"),
    "mel_cepstral_distortion": Metric("lower", "mel-cepstral distortion, dB"),
    "log_f0_rmse": Metric("lower", "RMSE of ln F0 on frames voiced in both"),
    "voicing_error": Metric("lower", "fraction of frames whose voicing decision differs"),
    "cer": Metric("lower", "character error rate of the greedy CTC transcript", on_ground_truth=True),
    "expression_l1": Metric("lower", "mean |expression-code difference|"),
    "expression_l2": Metric("lower", "mean squared expression-code difference"),
    "head_pose_l1": Metric("lower", "mean |head-pose difference| (7-d)"),
    "head_pose_l2": Metric("lower", "mean squared head-pose difference (7-d)"),
    "expression_frechet": Metric("lower", "Fréchet distance of expression-code Gaussians"),
    "expression_jitter": Metric("closer to ground truth", "mean squared expression acceleration per frame",
                                on_ground_truth=True),
    "head_pose_jitter": Metric("closer to ground truth", "mean squared head-pose acceleration per frame",
                               on_ground_truth=True),
    "expression_diversity": Metric("higher", "mean pairwise expression distance across samples"),
    "head_pose_diversity": Metric("higher", "mean pairwise head-pose distance across samples"),
    "sync_lag_ms": Metric("closer to ground truth", "lag of expression speed behind speech energy, ms",
                          on_ground_truth=True),
    "sync_peak_correlation": Metric("closer to ground truth", "peak speech-energy / expression-speed correlation",
                                    on_ground_truth=True),
    "mouth_correlation": Metric("higher", "Pearson correlation of the demo's mouth controls"),
    "pitch_hz": Metric("closer to ground truth", "mean F0 of voiced frames, Hz", on_ground_truth=True),
    "jaw_open_range": Metric("closer to ground truth", "5-95th percentile spread of the demo's jaw opening",
                             on_ground_truth=True),
    "lip_round_range": Metric("closer to ground truth", "5-95th percentile spread of the demo's lip rounding",
                              on_ground_truth=True),
    "lip_close_range": Metric("closer to ground truth", "5-95th percentile spread of the demo's lip closing",
                              on_ground_truth=True),
}
MOUTH_RANGES = ("jaw_open_range", "lip_round_range", "lip_close_range")  # SPEECH_MOUTH_CONTROLS' order
POOLED = ("expression_frechet",)  # over all segments' frames at once, not a mean of per-segment values
NEEDS_AUDIO = ("log_f0_rmse", "voicing_error", "pitch_hz")  # the mel must be vocoded and pitch-tracked
# Statistics that tell people apart, each one metric or several compared together (Euclidean distance): a model
# of several identities should give each one's generated values nearest that identity's own ground truth
# (avflow.evaluate.run.identity_likeness).
IDENTITY_STATISTICS = {"pitch_hz": ("pitch_hz",), "mouth_ranges": MOUTH_RANGES}
MOUTH_RANGE_PERCENTILES = (5.0, 95.0)  # a spread that one stray frame does not set
NEEDS_ASR = ("cer",)


def check_metric_names(names: list[str], where: str) -> None:
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"{where}: unknown metrics {', '.join(unknown)}; expected some of {', '.join(METRICS)}")


# Speech

def mel_l1(generated: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(generated - truth).mean())


def mel_cepstrum(log_mel: np.ndarray, coefficients: int = MCD_COEFFICIENTS) -> np.ndarray:
    """Cepstral coefficients c1..c_K per frame: orthonormal DCT-II of the natural-log mel, c0 dropped."""
    return dct(log_mel, type=2, norm="ortho", axis=-1)[..., 1:coefficients + 1]


def mel_cepstral_distortion(generated: np.ndarray, truth: np.ndarray, coefficients: int = MCD_COEFFICIENTS) -> float:
    """Mean over frames of (10 sqrt(2) / ln 10) ||c_gen - c_truth||, in dB, on frame-aligned log-mels."""
    difference = mel_cepstrum(generated, coefficients) - mel_cepstrum(truth, coefficients)
    return float(MCD_DB * np.sqrt((difference ** 2).sum(-1)).mean())


def pitch_track(audio: np.ndarray, sample_rate: int, hop_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(F0 in Hz, NaN where unvoiced; voiced flags) per hop with librosa's pyin, one value per mel frame."""
    import librosa

    f0, voiced, _ = librosa.pyin(np.asarray(audio, dtype=np.float64), fmin=PITCH_FMIN_HZ, fmax=PITCH_FMAX_HZ,
                                 sr=sample_rate, frame_length=PITCH_FRAME_LENGTH, hop_length=hop_length)
    return f0, voiced.astype(bool)


def log_f0_rmse(f0_generated: np.ndarray, voiced_generated: np.ndarray, f0_truth: np.ndarray,
                voiced_truth: np.ndarray) -> float:
    """sqrt(mean (ln f0_gen - ln f0_truth)^2) over frames voiced in both; NaN when there are none."""
    frames = min(len(f0_generated), len(f0_truth))
    both = voiced_generated[:frames] & voiced_truth[:frames]
    if not both.any():
        return float("nan")
    difference = np.log(f0_generated[:frames][both]) - np.log(f0_truth[:frames][both])
    return float(np.sqrt((difference ** 2).mean()))


def voicing_error(voiced_generated: np.ndarray, voiced_truth: np.ndarray) -> float:
    frames = min(len(voiced_generated), len(voiced_truth))
    return float((voiced_generated[:frames] != voiced_truth[:frames]).mean())


# Motion

def mean_abs(generated: np.ndarray, truth: np.ndarray, frames: np.ndarray | None = None) -> float:
    """Mean |difference| over the frames selected by `frames` (T,) (all when None) and every dimension."""
    difference = np.abs(generated - truth)
    return float((difference if frames is None else difference[..., frames, :]).mean())


def mean_squared(generated: np.ndarray, truth: np.ndarray, frames: np.ndarray | None = None) -> float:
    difference = (generated - truth) ** 2
    return float((difference if frames is None else difference[..., frames, :]).mean())


def resample(sequence: np.ndarray, rate: float, target_rate: float) -> np.ndarray:
    """(..., T, D) sampled at times t / rate -> linearly interpolated at times j / target_rate within the same span."""
    frames = int(round(sequence.shape[-2] / rate * target_rate))
    position = np.minimum(np.arange(frames) * (rate / target_rate), sequence.shape[-2] - 1)
    before = np.floor(position).astype(np.int64)
    after = np.minimum(before + 1, sequence.shape[-2] - 1)
    weight = (position - before)[:, None]
    return (1 - weight) * sequence[..., before, :] + weight * sequence[..., after, :]


def jitter(sequence: np.ndarray) -> float:
    """Mean over frames and dimensions of the squared second difference x[t+1] - 2 x[t] + x[t-1].

    Callers measure it at MOTION_RATE: motion is captured at 30 fps and stored upsampled (linearly) to the
    mel rate, where its second differences vanish between capture frames while a generated sequence's do not.
    """
    acceleration = np.diff(sequence, n=2, axis=-2)
    return float((acceleration ** 2).mean()) if acceleration.size else float("nan")


def diversity(samples: np.ndarray) -> float:
    """Mean over sample pairs i < j of the mean per-frame Euclidean distance ||x_i[t] - x_j[t]||; NaN for one sample."""
    count = samples.shape[0]
    distances = [np.linalg.norm(samples[i] - samples[j], axis=-1).mean()
                 for i in range(count) for j in range(i + 1, count)]
    return float(np.mean(distances)) if distances else float("nan")


@dataclass
class GaussianStats:
    """Running sums of frames (D,) for a mean and covariance over any number of segments."""

    count: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None

    def add(self, frames: np.ndarray) -> "GaussianStats":
        frames = np.asarray(frames, dtype=np.float64).reshape(-1, frames.shape[-1])
        if self.total is None:
            self.total, self.outer = np.zeros(frames.shape[1]), np.zeros((frames.shape[1], frames.shape[1]))
        self.count += frames.shape[0]
        self.total += frames.sum(0)
        self.outer += frames.T @ frames
        return self

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        if other.total is not None:
            if self.total is None:
                self.total, self.outer = np.zeros_like(other.total), np.zeros_like(other.outer)
            self.count += other.count
            self.total += other.total
            self.outer += other.outer
        return self

    def mean_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and (unbiased) covariance; needs at least two frames."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 frames, got {self.count}")
        mean = self.total / self.count
        covariance = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mean_a: np.ndarray, covariance_a: np.ndarray, mean_b: np.ndarray,
                     covariance_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the 2-Wasserstein distance squared of two
    Gaussians. Computed through symmetric eigendecompositions, so rank-deficient covariances stay real."""
    root_a = _psd_sqrt(covariance_a)
    middle = np.linalg.eigvalsh(root_a @ covariance_b @ root_a)
    cross = np.sqrt(np.clip(middle, 0, None)).sum()
    value = ((mean_a - mean_b) ** 2).sum() + np.trace(covariance_a) + np.trace(covariance_b) - 2 * cross
    return float(max(value, 0.0))


# Synchrony

def speech_energy(log_mel: np.ndarray) -> np.ndarray:
    """Per-frame log energy of the mel magnitude: ln sqrt(sum_k exp(2 m_k))."""
    doubled = 2.0 * np.asarray(log_mel, dtype=np.float64)
    peak = doubled.max(-1, keepdims=True)
    return 0.5 * (peak[..., 0] + np.log(np.exp(doubled - peak).sum(-1)))


def motion_speed(sequence: np.ndarray) -> np.ndarray:
    """Per-frame speed ||x[t] - x[t-1]||, the first frame repeating the second's, so it keeps T frames."""
    speed = np.linalg.norm(np.diff(sequence, axis=-2), axis=-1)
    return np.concatenate([speed[..., :1], speed], axis=-1) if speed.shape[-1] else speed


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant."""
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def best_lag(leader: np.ndarray, follower: np.ndarray, max_lag: int) -> tuple[int, float]:
    """(lag, correlation) maximizing pearson(leader[t], follower[t + lag]) over |lag| <= max_lag.

    A positive lag means the follower comes later. Lags that leave fewer than 3 overlapping frames are skipped;
    ties go to the smallest |lag|.
    """
    frames = min(len(leader), len(follower))
    best = (0, -np.inf)
    for lag in sorted(range(-max_lag, max_lag + 1), key=lambda value: (abs(value), value)):
        if frames - abs(lag) < 3:
            continue
        a = leader[:frames - lag] if lag >= 0 else leader[-lag:frames]
        b = follower[lag:frames] if lag >= 0 else follower[:frames + lag]
        correlation = pearson(a, b)
        if correlation > best[1]:
            best = (lag, correlation)
    return best if np.isfinite(best[1]) else (0, float("nan"))


def synchrony(log_mel: np.ndarray, expression: np.ndarray, frame_rate: float) -> tuple[float, float]:
    """(lag in ms of the expression speed behind the speech energy, peak correlation) for one pair."""
    lag, correlation = best_lag(speech_energy(log_mel), motion_speed(expression),
                                int(round(SYNC_MAX_LAG_SECONDS * frame_rate)))
    return 1000.0 * lag / frame_rate, correlation


def mouth_correlation(generated_expression: np.ndarray, truth_expression: np.ndarray) -> float:
    """Mean Pearson correlation of the demo corpus's speech-driven mouth controls, generated vs. ground truth."""
    return float(np.mean([pearson(generated_expression[:, c], truth_expression[:, c]) for c in SPEECH_MOUTH_CONTROLS]))


def mean_pitch(f0: np.ndarray, voiced: np.ndarray) -> float:
    """Mean F0 in Hz over voiced frames; NaN when none is voiced."""
    values = f0[voiced & np.isfinite(f0)]
    return float(values.mean()) if values.size else float("nan")


def mouth_range(expression: np.ndarray, control: int) -> float:
    """How wide one of the demo's speech-driven mouth controls moves: its 5-95th percentile spread."""
    low, high = np.percentile(expression[:, SPEECH_MOUTH_CONTROLS[control]], MOUTH_RANGE_PERCENTILES)
    return float(high - low)


# One segment

@dataclass
class Segment:
    """One segment's streams at the mel frame rate: generated (N, T, D) or ground truth (T, D)."""

    mel: np.ndarray
    expression: np.ndarray
    head_pose: np.ndarray
    expression_valid: np.ndarray | None = None  # (T,) frames whose ground-truth expression code is data
    pitch: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (f0, voiced) per sample / of the truth


def segment_scores(generated: Segment, truth: Segment, names: list[str], frame_rate: float) -> dict[str, float]:
    """The per-segment metrics among `names` (pooled and ASR ones excluded), each a mean over the N samples.

    Pitch metrics need `pitch` filled on both segments (one track per generated sample, one for the truth).
    """
    wanted = set(names)
    valid = truth.expression_valid
    scores: dict[str, list[float]] = {name: [] for name in names if name not in POOLED + NEEDS_ASR}
    for index in range(generated.mel.shape[0]):
        mel, expression, pose = generated.mel[index], generated.expression[index], generated.head_pose[index]
        sync = functools.cache(lambda: synchrony(mel, expression, frame_rate))
        per_sample = {
            "mel_l1": lambda: mel_l1(mel, truth.mel),
            "mel_cepstral_distortion": lambda: mel_cepstral_distortion(mel, truth.mel),
            "log_f0_rmse": lambda: log_f0_rmse(*generated.pitch[index], *truth.pitch[0]),
            "voicing_error": lambda: voicing_error(generated.pitch[index][1], truth.pitch[0][1]),
            "expression_l1": lambda: mean_abs(expression, truth.expression, valid),
            "expression_l2": lambda: mean_squared(expression, truth.expression, valid),
            "head_pose_l1": lambda: mean_abs(pose, truth.head_pose),
            "head_pose_l2": lambda: mean_squared(pose, truth.head_pose),
            "expression_jitter": lambda: jitter(resample(expression, frame_rate, MOTION_RATE)),
            "head_pose_jitter": lambda: jitter(resample(pose, frame_rate, MOTION_RATE)),
            "sync_lag_ms": lambda: sync()[0],
            "sync_peak_correlation": lambda: sync()[1],
            "mouth_correlation": lambda: mouth_correlation(expression, truth.expression),
            "pitch_hz": lambda: mean_pitch(*generated.pitch[index]),
            **{name: functools.partial(mouth_range, expression, control) for control, name in enumerate(MOUTH_RANGES)},
        }
        for name in scores:
            if name in per_sample:
                scores[name].append(per_sample[name]())
    result = {name: _nanmean(values) for name, values in scores.items() if values}
    if "expression_diversity" in wanted:
        result["expression_diversity"] = diversity(generated.expression)
    if "head_pose_diversity" in wanted:
        result["head_pose_diversity"] = diversity(generated.head_pose)
    return result


def ground_truth_scores(truth: Segment, names: list[str], frame_rate: float) -> dict[str, float]:
    """The metrics among `names` that describe the ground truth on its own (jitter, synchrony, identity
    statistics); pitch_hz needs `pitch` filled."""
    sync = functools.cache(lambda: synchrony(truth.mel, truth.expression, frame_rate))
    valid = truth.expression if truth.expression_valid is None else truth.expression[truth.expression_valid]
    values = {
        "pitch_hz": lambda: mean_pitch(*truth.pitch[0]),
        **{name: functools.partial(mouth_range, valid, control) for control, name in enumerate(MOUTH_RANGES)},
        "expression_jitter": lambda: jitter(resample(truth.expression, frame_rate, MOTION_RATE)),
        "head_pose_jitter": lambda: jitter(resample(truth.head_pose, frame_rate, MOTION_RATE)),
        "sync_lag_ms": lambda: sync()[0],
        "sync_peak_correlation": lambda: sync()[1],
    }
    return {name: values[name]() for name in names if name in values}


def _nanmean(values: list[float]) -> float:
    finite = [value for value in values if np.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def mean_scores(per_segment: list[dict[str, float]]) -> dict[str, float]:
    """Mean over segments of each metric (NaN values, e.g. no voiced frame in common, left out)."""
    names = dict.fromkeys(name for scores in per_segment for name in scores)
    return {name: _nanmean([scores[name] for scores in per_segment if name in scores]) for name in names}
