"""Griffin-Lim mel -> waveform: the fallback vocoder.

It needs no weights, so inference and tests can produce audible output before a pretrained BigVGAN is
available. Quality is far below a neural vocoder (phasey, metallic), which is acceptable for checking
timing and content, not for evaluation.

The STFT here is `avflow.data.features.complex_stft` itself, and the inverse is a least-squares overlap-add
in the same padded coordinates, so sample n of the output lines up with sample n of the audio whose
`log_mel` was given.
"""

from __future__ import annotations

import functools
import math

import torch

from avflow.config import MelConfig
from avflow.data.features import complex_stft, mel_filterbank, min_audio_samples, reflect_padding

FAST_GRIFFIN_LIM_MOMENTUM = 0.99  # Perraudin et al. 2013; librosa's default
ENVELOPE_FLOOR = 1e-8  # overlap-add window energy below this only occurs at the outermost padded samples
NON_NEGATIVE_REFINEMENT_STEPS = 30  # measured: halves the magnitude's mel error left by the clamped pseudo-inverse


def _analysis_window(cfg: MelConfig, dtype: torch.dtype) -> torch.Tensor:
    """The periodic Hann window of `complex_stft`, zero-padded to n_fft and centred as torch.stft does."""
    window = torch.hann_window(cfg.win_length, dtype=dtype)
    left = (cfg.n_fft - cfg.win_length) // 2
    return torch.nn.functional.pad(window, (left, cfg.n_fft - cfg.win_length - left))


def _inverse_stft(spectrum: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Complex (n_fft//2+1, frames) -> (frames*hop,) signal whose `complex_stft` is closest to `spectrum`
    in the least-squares sense, ignoring that the padding is a reflection of the signal."""
    frames = spectrum.shape[-1]
    window = _analysis_window(cfg, spectrum.real.dtype)
    segments = torch.fft.irfft(spectrum, n=cfg.n_fft, dim=0) * window[:, None]
    padded_length = cfg.n_fft + cfg.hop_length * (frames - 1)

    def overlap_add(columns: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.fold(columns.unsqueeze(0), output_size=(1, padded_length),
                                        kernel_size=(1, cfg.n_fft), stride=(1, cfg.hop_length)).reshape(-1)

    signal = overlap_add(segments)
    envelope = overlap_add(window.pow(2)[:, None].expand(-1, frames))
    signal = torch.where(envelope > ENVELOPE_FLOOR, signal / envelope.clamp(min=ENVELOPE_FLOOR), 0.0)
    start = reflect_padding(cfg)
    return signal[start:start + frames * cfg.hop_length]


def _filterbank_and_inverse(cfg: MelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 filterbank and its pseudo-inverse, computed once per filterbank (a stream vocodes chunk by
    chunk, and the pseudo-inverse costs more than a short chunk's Griffin-Lim)."""
    return _cached_inverse(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)


@functools.lru_cache(maxsize=4)
def _cached_inverse(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float):
    cfg = MelConfig(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    filterbank = mel_filterbank(cfg).to(torch.float64)
    return filterbank, torch.linalg.pinv(filterbank)


def _linear_magnitude(mel_magnitude: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Non-negative linear magnitude whose mel projection approximates `mel_magnitude`.

    Starts from the clamped least-squares (pseudo-inverse) solution, whose clamping adds energy, then
    applies multiplicative non-negative least-squares updates (Lee & Seung), which keep it >= 0.
    """
    filterbank, inverse = _filterbank_and_inverse(cfg)
    magnitude = torch.clamp(inverse @ mel_magnitude, min=0.0) + 1e-12
    projected_target = filterbank.T @ mel_magnitude
    for _ in range(NON_NEGATIVE_REFINEMENT_STEPS):
        magnitude = magnitude * projected_target / (filterbank.T @ (filterbank @ magnitude) + 1e-12)
    return magnitude


def mel_to_audio(log_mel: torch.Tensor, cfg: MelConfig, n_iter: int = 32, seed: int = 0,
                 prefix: torch.Tensor | None = None) -> torch.Tensor:
    """(n_mels, frames) natural-log mel (NOT model-normalized) -> (frames * hop,) float32 CPU waveform.

    The linear magnitude is a non-negative least-squares inverse of the filterbank applied to exp(mel);
    its phase comes from fast Griffin-Lim started at random phases drawn from `seed`. `prefix`: the output's
    first samples, already known (audio a stream has played): every iteration keeps them, so the phases of the
    frames after them continue that audio instead of starting a seam.
    """
    if log_mel.dim() != 2 or log_mel.shape[0] != cfg.n_mels:
        raise ValueError(f"log_mel: expected shape ({cfg.n_mels}, frames), got {tuple(log_mel.shape)}")
    min_frames = -(-min_audio_samples(cfg) // cfg.hop_length)  # its audio must be long enough to re-analyse
    if log_mel.shape[1] < min_frames:
        raise ValueError(f"log_mel: expected at least {min_frames} frames, got {log_mel.shape[1]}")
    if n_iter < 0:
        raise ValueError(f"n_iter: expected a non-negative iteration count, got {n_iter}")
    # A full-scale signal's STFT magnitude is at most sum(hann) = win_length / 2, and the Slaney filters
    # do not amplify: values above log(win_length / 2) are not audio (e.g. an untrained model's output).
    ceiling = math.log(cfg.win_length / 2)
    mel_magnitude = torch.exp(log_mel.detach().to(device="cpu", dtype=torch.float64).clamp(max=ceiling))
    magnitude = _linear_magnitude(mel_magnitude, cfg)

    generator = torch.Generator().manual_seed(seed)
    phase = torch.polar(torch.ones_like(magnitude),
                        2.0 * math.pi * torch.rand(magnitude.shape, generator=generator, dtype=torch.float64))
    known = None if prefix is None else prefix.detach().to(dtype=torch.float64, device="cpu").reshape(-1)
    if known is not None:  # start the frames over the known audio at its phases
        padded = torch.zeros(log_mel.shape[1] * cfg.hop_length, dtype=torch.float64)
        padded[:known.numel()] = known
        spectrum = complex_stft(padded, cfg)
        covered = min(known.numel() // cfg.hop_length, spectrum.shape[-1])
        phase[:, :covered] = spectrum[:, :covered] / spectrum[:, :covered].abs().clamp(min=1e-16)

    def signal(spectrum: torch.Tensor) -> torch.Tensor:
        audio = _inverse_stft(spectrum, cfg)
        return audio if known is None else torch.cat([known, audio[known.numel():]])

    previous_rebuilt = torch.zeros_like(phase)
    for _ in range(n_iter):
        rebuilt = complex_stft(signal(magnitude * phase), cfg)
        accelerated = rebuilt - (FAST_GRIFFIN_LIM_MOMENTUM / (1.0 + FAST_GRIFFIN_LIM_MOMENTUM)) * previous_rebuilt
        phase = accelerated / accelerated.abs().clamp(min=1e-16)
        previous_rebuilt = rebuilt
    return signal(magnitude * phase).to(torch.float32)
