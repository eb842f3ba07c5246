"""DiT building blocks: timestep embedding, RoPE, adaLN-Zero sublayers, the windowed block.

Module and parameter names follow the published network (`self_attn.ada_ln.linear`,
`self_attn.self_attn.qkv`, `feedforward.block.0`, ...) so released checkpoints map one-to-one.
The published shapes and weight layouts: docs/reference.md, "Network" and "The AV-Flow checkpoint".
"""

from __future__ import annotations

import math

import torch
from torch import nn

from avflow.model.attention import local_attention


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] (sin first, then cos), then Linear-GELU-Linear."""

    def __init__(self, n_freqs: int, d_model: int):
        super().__init__()
        self.n_freqs = n_freqs
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.n_freqs, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-k * math.log(10000.0) / (self.n_freqs - 1))
        angles = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def rope_angles(length: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of pos * base^(-2k / head_dim) for positions 0..T-1, in float32 as published."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of x (B, H, T, D)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class AdaLN(nn.Module):
    """LayerNorm without affine, modulated by the timestep embedding; returns the sublayer gate too.

    The modulation, `linear` of the time embedding (B, 3d), is split as (gate, shift, scale); the gate rows
    start at zero (adaLN-Zero), so a fresh block is the identity. It depends on the time alone, so a sampler
    with fixed step times computes it once per step time instead of once per network evaluation.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d_model, 3 * d_model)
        nn.init.zeros_(self.linear.weight[:d_model])
        nn.init.zeros_(self.linear.bias[:d_model])

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, shift, scale = modulation[:, None].chunk(3, dim=-1)
        return self.norm(x) * (1 + scale) + shift, gate


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention over a local band with RoPE.

    The fused qkv output is laid out per head as [q | k | v] (B, T, H, 3 * D), the published layout.
    """

    def __init__(self, d_model: int, n_heads: int, window_back: int, window_ahead: int, rope_base: float,
                 backend: str):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.window_back, self.window_ahead = window_back, window_ahead
        self.rope_base = rope_base
        self.backend = backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.project = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, valid, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`rope`: this length's (cos, sin) tables when the caller shares one pair across blocks."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, self.n_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        cos, sin = rope if rope is not None else rope_angles(length, self.head_dim, self.rope_base, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = local_attention(q, k, v, self.window_back, self.window_ahead, valid, self.backend)
        return self.project(out.transpose(1, 2).reshape(batch, length, -1))


class AttentionSublayer(nn.Module):
    def __init__(self, d_model: int, attention: LocalSelfAttention):
        super().__init__()
        self.ada_ln = AdaLN(d_model)
        self.self_attn = attention

    def forward(self, x, modulation, valid, rope=None):
        y, gate = self.ada_ln(x, modulation)
        return x + gate * self.self_attn(y, valid, rope)


class FeedForwardSublayer(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.ada_ln = AdaLN(d_model)
        self.block = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout),
                                   nn.Linear(hidden, d_model))

    def forward(self, x, modulation):
        y, gate = self.ada_ln(x, modulation)
        return x + gate * self.block(y)


class DiTBlock(nn.Module):
    """Pre-norm windowed attention then feed-forward, both adaLN-Zero modulated."""

    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, dropout: float, window_back: int,
                 window_ahead: int, rope_base: float, attention_backend: str):
        super().__init__()
        attention = LocalSelfAttention(d_model, n_heads, window_back, window_ahead, rope_base, attention_backend)
        self.self_attn = AttentionSublayer(d_model, attention)
        self.feedforward = FeedForwardSublayer(d_model, ffn_hidden, dropout)

    def modulation(self, time_embedding: torch.Tensor) -> torch.Tensor:
        """Both sublayers' adaLN modulations (B, 2, 3d) for a time embedding (B, d)."""
        return torch.stack([self.self_attn.ada_ln.linear(time_embedding),
                            self.feedforward.ada_ln.linear(time_embedding)], dim=1)

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor | None, valid=None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) at the time of `time_embedding` (B, d), or of its precomputed `modulation` (B, 2, 3d).

        The modulation is computed here, inside the block's own forward, when not given: under FSDP a block's
        weights are gathered only around its forward.
        """
        if modulation is None:
            modulation = self.modulation(time_embedding)
        return self.feedforward(self.self_attn(x, modulation[:, 0], valid, rope), modulation[:, 1])

