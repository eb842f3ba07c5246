"""Mel -> waveform with the vocoder at hand: BigVGAN when one is given, the weight-free Griffin-Lim otherwise."""

from __future__ import annotations

import torch

from avflow.config import MelConfig
from avflow.vocoder.bigvgan import BigVGAN


def vocode(mel_frames_first: torch.Tensor, vocoder: BigVGAN | None, cfg: MelConfig) -> torch.Tensor:
    """(T, n_mels) natural-log mel (NOT model-normalized) -> (T * hop_length,) float32 CPU waveform.

    Uses `vocoder` when given, else Griffin-Lim (`avflow.vocoder.griffin_lim.mel_to_audio`)."""
    if mel_frames_first.dim() != 2 or mel_frames_first.shape[1] != cfg.n_mels:
        raise ValueError(f"mel: expected shape (frames, {cfg.n_mels}), got {tuple(mel_frames_first.shape)}")
    if vocoder is None:
        from avflow.vocoder.griffin_lim import mel_to_audio

        return mel_to_audio(mel_frames_first.T, cfg)
    if vocoder.config.num_mels != cfg.n_mels or vocoder.hop_length != cfg.hop_length:
        raise ValueError(f"vocoder expects {vocoder.config.num_mels} mels and hop {vocoder.hop_length}; the mel "
                         f"config has {cfg.n_mels} mels and hop {cfg.hop_length}")
    weight = vocoder.conv_pre.weight
    with torch.inference_mode():
        mel = mel_frames_first.detach().to(device=weight.device, dtype=weight.dtype).T.unsqueeze(0)
        audio = vocoder(mel)
    return audio[0, 0].to(device="cpu", dtype=torch.float32)
