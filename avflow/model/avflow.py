"""The AV-Flow velocity network: a visual and an audio DiT stream joined by highway fusion.

State x (B, T, 344) = [expression 256 | head latent 8 | mel 80] at the mel frame rate. Each stream
sees its own slice of x concatenated with the per-frame conditioning, runs its blocks, and after every
block pair a Linear over concat[audio, visual] adds one half back to each stream (no cross-attention).
"""

from __future__ import annotations

import torch
from torch import nn

from avflow.config import ModelConfig
from avflow.model.attention import prepare_key_mask
from avflow.model.dit import DiTBlock, TimestepEmbedding, rope_angles


class AVFlowNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.time_embed = TimestepEmbedding(cfg.time_freqs, d)
        self.input_proj_v = nn.Linear(cfg.visual_dim + cfg.cond_dim, d)
        self.input_proj_a = nn.Linear(cfg.mel_dim + cfg.cond_dim, d)

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(
                DiTBlock(d, cfg.n_heads, cfg.ffn_hidden, cfg.dropout, cfg.window_back, cfg.window_ahead,
                         cfg.rope_base, cfg.attention)
                for _ in range(cfg.n_blocks))

        self.transformer_blocks_v = blocks()
        self.transformer_blocks_a = blocks()
        self.fusion = nn.ModuleList(nn.Linear(2 * d, 2 * d) for _ in range(cfg.n_blocks))
        self.out_v = nn.Linear(d, cfg.visual_dim)
        self.out_a = nn.Linear(d, cfg.mel_dim)

    def modulation(self, t: torch.Tensor) -> torch.Tensor:
        """Every block's adaLN modulation at times t (B,): (B, 2 * n_blocks, 2, 3d), visual blocks first.

        It depends on t alone, so a sampler with fixed step times computes it once per step time.
        """
        time_embedding = self.time_embed(t)
        blocks = [*self.transformer_blocks_v, *self.transformer_blocks_a]
        return torch.stack([block.modulation(time_embedding) for block in blocks], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None, cond: torch.Tensor, valid=None,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for state x (B, T, state_dim) at times t (B,) given cond (B, T, cond_dim).

        `valid` (B, T) marks real frames (padded frames are never attended to), or is its FlexAttention block
        mask prepared by the caller (`attention.band_key_mask`). `modulation` replaces t by its precomputed
        `self.modulation(t)`.
        """
        visual_dim = self.cfg.visual_dim
        time_embedding = self.time_embed(t) if modulation is None else None
        valid = prepare_key_mask(valid, self.cfg.window_back, self.cfg.window_ahead, self.cfg.attention, x.device)
        rope = rope_angles(x.shape[1], self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base, x.device)
        visual = self.input_proj_v(torch.cat([x[..., :visual_dim], cond], dim=-1))
        audio = self.input_proj_a(torch.cat([x[..., visual_dim:], cond], dim=-1))
        n_blocks = self.cfg.n_blocks
        for index, (block_v, block_a, fusion) in enumerate(
                zip(self.transformer_blocks_v, self.transformer_blocks_a, self.fusion)):
            visual = block_v(visual, time_embedding, valid, rope, None if modulation is None else modulation[:, index])
            audio = block_a(audio, time_embedding, valid, rope,
                            None if modulation is None else modulation[:, n_blocks + index])
            to_audio, to_visual = fusion(torch.cat([audio, visual], dim=-1)).chunk(2, dim=-1)
            audio = audio + to_audio
            visual = visual + to_visual
        return torch.cat([self.out_v(visual), self.out_a(audio)], dim=-1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
