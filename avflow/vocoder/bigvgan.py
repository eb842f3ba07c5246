"""BigVGAN generator (log-mel -> waveform) for the base 22 kHz 80-band checkpoint, written for inference.

Structure (BigVGAN v2 "base 22 kHz 80 band"): conv_pre (7 taps) -> for each upsampling stage a transposed
convolution followed by the mean of three AMP residual blocks (type 1) -> anti-aliased SnakeBeta ->
conv_post (7 taps, bias) -> tanh. Every activation is anti-aliased: 2x upsample with a 12-tap Kaiser-sinc
filter, SnakeBeta, 2x low-pass downsample with the same filter, replicate padding at both ends.

The module and buffer names reproduce the official state-dict keys, so a released generator loads as it is
(`avflow.vocoder.weights`).
The published configuration and key names: docs/reference.md, "BigVGAN vocoder".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SNAKE_EPS = 1e-9  # added to exp(log beta) before dividing, as in the published SnakeBeta
RESAMPLE_RATIO = 2
RESAMPLE_TAPS = 12
RESAMPLE_CUTOFF = 0.5 / RESAMPLE_RATIO  # 0.25 of the (upsampled) sample rate
RESAMPLE_HALF_WIDTH = 0.6 / RESAMPLE_RATIO  # 0.3


@dataclass(frozen=True)
class BigVGANConfig:
    """Generator sizes; the defaults are the base 22 kHz 80-band model (~14M parameters)."""

    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))

    def __post_init__(self) -> None:
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes must have the same length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes must have the same length")
        if self.upsample_initial_channel % (2 ** len(self.upsample_rates)):
            raise ValueError("upsample_initial_channel must be divisible by 2 ** number of upsampling stages")

    @property
    def hop_length(self) -> int:
        """Audio samples per mel frame: the product of the upsampling rates (256 for the base model)."""
        return math.prod(self.upsample_rates)


def kaiser_sinc_filter(cutoff: float, half_width: float, taps: int) -> torch.Tensor:
    """(1, 1, taps) low-pass FIR: a sinc at `cutoff` (fraction of the sample rate) under a Kaiser window whose
    beta follows Kaiser's formula for a transition band of `half_width`; normalised to unit DC gain."""
    half = taps // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95  # dB
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21.0) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(taps, periodic=False, beta=beta)
    # Symmetric sample times: half-integers for an even number of taps, integers for an odd one.
    times = torch.arange(taps, dtype=torch.float32) - (half - 0.5 if taps % 2 == 0 else half)
    fir = 2 * cutoff * window * torch.sinc(2 * cutoff * times)
    return (fir / fir.sum()).view(1, 1, taps)


def _depthwise(x: torch.Tensor, fir: torch.Tensor, transposed: bool, stride: int) -> torch.Tensor:
    """Apply the same single-channel FIR to every channel of (B, C, T) as one grouped (depthwise) convolution,
    the layout GPU convolution kernels are tuned for, instead of B * C single-channel sequences."""
    channels = x.shape[1]
    weight = fir.to(x.dtype).expand(channels, 1, fir.shape[-1])
    convolve = F.conv_transpose1d if transposed else F.conv1d
    return convolve(x, weight, stride=stride, groups=channels)


class Upsample2x(nn.Module):
    """Zero-stuffing 2x upsampler followed by the Kaiser-sinc low-pass; output length = 2 * input length."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filter", kaiser_sinc_filter(RESAMPLE_CUTOFF, RESAMPLE_HALF_WIDTH, RESAMPLE_TAPS))
        self.edge = RESAMPLE_TAPS // RESAMPLE_RATIO - 1  # input samples replicated at each end
        self.crop = self.edge * RESAMPLE_RATIO + (RESAMPLE_TAPS - RESAMPLE_RATIO) // 2  # symmetric for even taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.edge, self.edge), mode="replicate")
        y = RESAMPLE_RATIO * _depthwise(x, self.filter, transposed=True, stride=RESAMPLE_RATIO)
        return y[..., self.crop:y.shape[-1] - self.crop]


class LowPass(nn.Module):
    """Kaiser-sinc low-pass with stride 2 (the `lowpass` of the published DownSample1d)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filter", kaiser_sinc_filter(RESAMPLE_CUTOFF, RESAMPLE_HALF_WIDTH, RESAMPLE_TAPS))
        self.pad_left = RESAMPLE_TAPS // 2 - (1 if RESAMPLE_TAPS % 2 == 0 else 0)
        self.pad_right = RESAMPLE_TAPS // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return _depthwise(x, self.filter, transposed=False, stride=RESAMPLE_RATIO)


class Downsample2x(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lowpass = LowPass()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class SnakeBeta(nn.Module):
    """x + sin^2(alpha x) / beta per channel, with alpha and beta stored as natural logs (zeros = 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[None, :, None]
        inv_beta = 1.0 / (self.beta.exp()[None, :, None] + SNAKE_EPS)
        return x + inv_beta * torch.sin(x * alpha).pow(2)


class AntiAliasedActivation(nn.Module):
    """2x upsample -> SnakeBeta -> 2x downsample; keeps the length."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = Upsample2x()
        self.downsample = Downsample2x()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


def _same_padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class AMPBlock(nn.Module):
    """AMP residual block, type 1: per dilation d, x += conv2(act(conv1_d(act(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same_padding(kernel, d)) for d in dilations)
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=_same_padding(kernel, 1)) for _ in dilations)
        self.activations = nn.ModuleList(AntiAliasedActivation(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
            h = conv1(self.activations[2 * index](x))
            x = x + conv2(self.activations[2 * index + 1](h))
        return x


class BigVGAN(nn.Module):
    """(B, num_mels, T) natural-log mel (not model-normalized) -> (B, 1, T * hop_length) audio in [-1, 1]."""

    def __init__(self, config: BigVGANConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or BigVGANConfig()
        width = config.upsample_initial_channel
        self.conv_pre = nn.Conv1d(config.num_mels, width, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for stage, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            c_in, c_out = width // 2 ** stage, width // 2 ** (stage + 1)
            # A one-element list so the key is ups.{i}.0, as in the published generator.
            self.ups.append(nn.ModuleList([nn.ConvTranspose1d(c_in, c_out, kernel, rate,
                                                              padding=(kernel - rate) // 2)]))
            for res_kernel, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(AMPBlock(c_out, res_kernel, tuple(dilations)))
        final = width // 2 ** len(config.upsample_rates)
        self.activation_post = AntiAliasedActivation(final)
        self.conv_post = nn.Conv1d(final, 1, 7, padding=3, bias=True)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.config.num_mels:
            raise ValueError(f"mel: expected shape (batch, {self.config.num_mels}, frames), got {tuple(mel.shape)}")
        x = self.conv_pre(mel)
        per_stage = len(self.config.resblock_kernel_sizes)
        for stage, up in enumerate(self.ups):
            x = up[0](x)
            blocks = self.resblocks[stage * per_stage:(stage + 1) * per_stage]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / per_stage
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x)
