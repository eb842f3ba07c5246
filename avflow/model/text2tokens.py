"""Text -> frame-level ASR token logits: the network AV-Flow's text input goes through.

As published: a RoPE transformer encoder over the input symbols (phonemes or letters), a duration
predictor (log frames per symbol; durations are exp, then rounded up), and a decoder over the
length-regulated encoding that produces 29-d token vectors at the mel frame rate. The decoder is a
stack of DiT blocks (windowed RoPE attention, adaLN-Zero from a timestep embedding): as a flow-matching
decoder it predicts a velocity at time t, as a regression decoder it is called once at t = 0 with a
zero input and predicts the tokens directly, so both variants share one network and one set of names.
Each decoder frame also sees where it lies in its symbol's span and how long that span is.
The published front end's settings: docs/reference.md, "Text front end".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avflow.config import Text2TokensConfig
from avflow.model.dit import DiTBlock, TimestepEmbedding, apply_rope, rope_angles
from avflow.model.sampling import integrate

SPAN_FEATURES = 2  # position within the span in (0, 1), log of the span length
ROPE_BASE = 10000.0
TIME_FREQS = 32


class EncoderLayer(nn.Module):
    """Pre-norm self-attention with RoPE over the whole (padded) symbol sequence, then a GELU FFN."""

    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.attention_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.project = nn.Linear(d_model, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_hidden, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.n_heads, self.head_dim).unbind(2)
        cos, sin = rope_angles(length, self.head_dim, ROPE_BASE, x.device)
        q, k, v = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        x = x + self.dropout(self.project(attended.transpose(1, 2).reshape(batch, length, -1)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class DurationPredictor(nn.Module):
    """Two convolutions (ReLU, LayerNorm, dropout) and a projection to log frames per symbol."""

    def __init__(self, d_model: int, hidden: int, kernel: int, dropout: float):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(d_model, hidden, kernel, padding=kernel // 2),
                                    nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)])
        self.norms = nn.ModuleList([nn.LayerNorm(hidden), nn.LayerNorm(hidden)])
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = valid[..., None].to(x.dtype)
        for conv, norm in zip(self.convs, self.norms):
            x = self.dropout(norm(torch.relu(conv((x * mask).transpose(1, 2)).transpose(1, 2))))
        return self.out(x * mask).squeeze(-1)


class TextToTokensNet(nn.Module):
    def __init__(self, cfg: Text2TokensConfig, vocab_size: int, token_dim: int = 29):
        super().__init__()
        self.cfg = cfg
        self.token_dim = token_dim
        d = cfg.d_model
        self.embed = nn.Embedding(vocab_size, d)
        self.encoder = nn.ModuleList(EncoderLayer(d, cfg.n_heads, cfg.ffn_hidden, cfg.dropout)
                                     for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.duration = DurationPredictor(d, cfg.duration_hidden, cfg.duration_kernel, cfg.dropout)
        self.time_embed = TimestepEmbedding(TIME_FREQS, d)
        self.decoder_in = nn.Linear(token_dim + d + SPAN_FEATURES, d)
        self.decoder = nn.ModuleList(
            DiTBlock(d, cfg.n_heads, cfg.ffn_hidden, cfg.dropout, cfg.decoder_window, cfg.decoder_window,
                     ROPE_BASE, "auto")
            for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_out = nn.Linear(d, token_dim)

    def encode(self, symbols: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoding (B, N, d) and predicted log durations (B, N) of symbol ids (B, N); `valid` marks real symbols.

        The duration predictor reads a detached encoding, so its loss does not shape the encoder.
        """
        x = self.embed(symbols) * math.sqrt(self.cfg.d_model)
        for layer in self.encoder:
            x = layer(x, valid)
        x = self.encoder_norm(x) * valid[..., None]
        return x, self.duration(x.detach(), valid)

    def decode(self, x: torch.Tensor, t: torch.Tensor, frame_cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, M, token_dim) for input x (B, M, token_dim) at times t (B,) given the
        length-regulated encoding with span features (B, M, d + 2)."""
        h = self.decoder_in(torch.cat([x, frame_cond], dim=-1))
        time_embedding = self.time_embed(t)
        for block in self.decoder:
            h = block(h, time_embedding, valid)
        return self.decoder_out(self.decoder_norm(h))

    def forward(self, symbols: torch.Tensor, symbol_valid: torch.Tensor, durations: torch.Tensor, x: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward under given durations (B, N): predicted log durations (B, N) and the decoder
        output (B, M, token_dim) for its input x (B, M, token_dim) at times t (B,)."""
        encoding, log_durations = self.encode(symbols, symbol_valid)
        frame_cond, frame_valid = length_regulate(encoding, durations)
        return log_durations, self.decode(x, t, frame_cond, frame_valid)


def length_regulate(encoding: torch.Tensor, durations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each symbol's encoding over its frames: (B, N, d) and integer durations (B, N) ->
    per-frame conditioning (B, M, d + 2) with span features, and the valid-frame mask (B, M)."""
    durations = durations.long().clamp_min(0)
    totals = durations.sum(1)
    frames = max(1, int(totals.max()))
    batch, _, width = encoding.shape
    cond = encoding.new_zeros(batch, frames, width + SPAN_FEATURES)
    for b in range(batch):
        lengths = durations[b]
        index = torch.repeat_interleave(torch.arange(lengths.shape[0], device=encoding.device), lengths)
        span_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        span_length = lengths[index].to(encoding.dtype)
        position = (torch.arange(index.shape[0], device=encoding.device) - span_start + 0.5) / span_length
        cond[b, :index.shape[0]] = torch.cat([encoding[b, index], position[:, None],
                                              torch.log(span_length)[:, None] / 4.0], dim=-1)
    valid = torch.arange(frames, device=encoding.device)[None] < totals[:, None]
    return cond, valid


def round_durations(log_durations: np.ndarray, scale: float | np.ndarray, rounding: str) -> np.ndarray:
    """Integer frames (>= 1 each) from predicted log durations times `scale` (per symbol or one value).

    ceil (published): each duration is rounded up on its own, so the total is biased up by about half a
    frame per symbol. cumulative: the running end times are rounded, so the total is round(sum) and
    each symbol still keeps at least one frame.
    """
    frames = np.exp(np.asarray(log_durations, dtype=np.float64)) * scale
    if rounding == "ceil":
        return np.maximum(1, np.ceil(frames - 1e-9)).astype(np.int64)
    if rounding != "cumulative":
        raise ValueError(f"duration rounding: expected ceil or cumulative, got {rounding!r}")
    count = frames.shape[0]
    total = max(int(np.rint(frames.sum())), count)
    ends = np.rint(np.cumsum(frames)).astype(np.int64)
    for index in range(count):
        ends[index] = max(ends[index], index + 1 if index == 0 else ends[index - 1] + 1)
    ends[-1] = total
    for index in range(count - 2, -1, -1):
        ends[index] = min(ends[index], ends[index + 1] - 1)
    return np.diff(ends, prepend=0)


@torch.no_grad()
def sample_tokens(model: TextToTokensNet, frame_cond: torch.Tensor, valid: torch.Tensor, decoder: str, nfe: int,
                  temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalized token vectors (B, M, token_dim) for the length-regulated conditioning.

    flow: Euler integration of the velocity from noise N(0, temperature^2) at t = 0 to t = 1 in `nfe`
    uniform steps. regression: one call at t = 0 on a zero input (temperature has no effect).
    """
    batch, frames, _ = frame_cond.shape
    shape = (batch, frames, model.token_dim)
    if decoder == "regression":
        return model.decode(frame_cond.new_zeros(shape), frame_cond.new_zeros(batch), frame_cond, valid)
    if decoder != "flow":
        raise ValueError(f"decoder: expected flow or regression, got {decoder!r}")
    x = torch.randn(shape, generator=generator, device=frame_cond.device, dtype=frame_cond.dtype) * temperature
    return integrate(model.decode, x, frame_cond, valid, "euler", nfe)


@torch.no_grad()
def generate_tokens(model: TextToTokensNet, symbols: torch.Tensor, scale: np.ndarray, extra_frames: np.ndarray,
                    temperature: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Normalized token vectors (M, token_dim) and durations (N,) for one symbol sequence (N,).

    Each predicted duration is multiplied by `scale` (per symbol: speaking rate, pause length) and then
    lengthened by `extra_frames` (punctuation pauses) before rounding per text2tokens.duration_rounding.
    """
    cfg = model.cfg
    valid = torch.ones(1, symbols.shape[0], dtype=torch.bool, device=symbols.device)
    encoding, log_durations = model.encode(symbols[None], valid)
    predicted = np.exp(log_durations[0].double().cpu().numpy()) * scale + extra_frames
    durations = round_durations(np.log(np.maximum(predicted, 1e-6)), 1.0, cfg.duration_rounding)
    frame_cond, frame_valid = length_regulate(encoding, torch.from_numpy(durations)[None].to(symbols.device))
    tokens = sample_tokens(model, frame_cond, frame_valid, cfg.decoder, cfg.nfe, temperature, generator)
    return tokens[0], durations
