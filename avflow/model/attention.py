"""Local (banded) self-attention: query i sees keys j with i - back <= j <= i + ahead.

The published code builds a dense T x T mask and score matrix, which dominates sampling time at
T = 1725. Here the cost is linear in T:
- `banded_attention` splits the queries into blocks and attends each block to the keys its window can
  reach (SDPA over a (block, block + back + ahead) tile); it runs anywhere, and is the CPU path.
- `flex_attention_band` uses FlexAttention with a block-sparse mask on CUDA.
- `dense_attention` is the straightforward masked reference the other two are tested against.
All take q, k, v of shape (B, H, T, D) and an optional key-validity mask (B, T) for padded frames.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

QUERY_BLOCK = 64


def band_mask(length: int, back: int, ahead: int, device: torch.device | None = None) -> torch.Tensor:
    """Dense (T, T) boolean mask of the band; used by the reference path and tests."""
    positions = torch.arange(length, device=device)
    offset = positions[None, :] - positions[:, None]
    return (offset >= -back) & (offset <= ahead)


def _fully_masked_to_self(allowed: torch.Tensor, query_valid: torch.Tensor, self_key: torch.Tensor) -> torch.Tensor:
    """Let invalid (padded) queries attend to their own slot so no row is empty (SDPA would give NaN).

    Outputs at those rows are padding and are ignored downstream; valid rows are unchanged.
    """
    return allowed | (self_key & ~query_valid[..., None])


def dense_attention(q, k, v, back: int, ahead: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    length = q.shape[-2]
    allowed = band_mask(length, back, ahead, q.device)[None]
    if valid is None:
        valid = torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device)
    allowed = allowed & valid[:, None, :]
    allowed = _fully_masked_to_self(allowed, valid, torch.eye(length, dtype=torch.bool, device=q.device)[None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])


def banded_attention(q, k, v, back: int, ahead: int, valid: torch.Tensor | None = None,
                     query_block: int = QUERY_BLOCK) -> torch.Tensor:
    batch, heads, length, head_dim = q.shape
    block = min(query_block, length)
    n_blocks = -(-length // block)
    padded_length = n_blocks * block
    window = block + back + ahead
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)

    # Keys are padded by `back` in front and `ahead` (+ query padding) behind, so block b's keys are the
    # contiguous slice [b * block, b * block + window) of the padded sequence.
    tail = padded_length - length + ahead
    k_padded = F.pad(k, (0, 0, back, tail))
    v_padded = F.pad(v, (0, 0, back, tail))
    key_valid = F.pad(valid, (back, tail), value=False)
    query_valid = F.pad(valid, (0, padded_length - length), value=False)

    q_blocks = F.pad(q, (0, 0, 0, padded_length - length)).view(batch, heads, n_blocks, block, head_dim)
    k_windows = k_padded.unfold(2, window, block).transpose(-1, -2)  # (B, H, nb, window, D)
    v_windows = v_padded.unfold(2, window, block).transpose(-1, -2)
    key_valid_windows = key_valid.unfold(1, window, block)  # (B, nb, window)

    # Within a tile, query i (block-local) may see window slot w iff i <= w <= i + back + ahead.
    local = torch.arange(block, device=q.device)[:, None]
    slot = torch.arange(window, device=q.device)[None, :]
    in_band = (slot >= local) & (slot <= local + back + ahead)
    allowed = in_band[None, None] & key_valid_windows[:, :, None, :]  # (B, nb, block, window)
    allowed = _fully_masked_to_self(allowed, query_valid.view(batch, n_blocks, block), slot == local + back)

    def tiles(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(batch * n_blocks, heads, x.shape[-2], head_dim)

    out = F.scaled_dot_product_attention(
        tiles(q_blocks), tiles(k_windows), tiles(v_windows),
        attn_mask=allowed.reshape(batch * n_blocks, 1, block, window))
    out = out.view(batch, n_blocks, heads, block, head_dim).transpose(1, 2)
    return out.reshape(batch, heads, padded_length, head_dim)[:, :, :length]


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _band_blocks(length: int, back: int, ahead: int, device: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(kv_num_blocks, kv_indices, block size) of the band's FlexAttention blocks, every one marked partial.

    A partial block evaluates the mask function per score, so any mask that is a subset of the band (padded
    keys removed) can reuse these blocks unchanged: they depend on the length only, and are computed once per
    length instead of once per forward. Blocks the band fills completely (only for windows wider than a
    block) are merged into the partial ones for the same reason.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def in_band(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - back) & (kv_idx <= q_idx + ahead)

    mask = create_block_mask(in_band, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
    counts, indices = mask.kv_num_blocks, mask.kv_indices
    if mask.full_kv_num_blocks is not None and bool(mask.full_kv_num_blocks.any()):
        slots = torch.arange(indices.shape[-1], device=indices.device)
        partial = torch.where(slots < counts[..., None], indices, indices.shape[-1])
        full = torch.where(slots < mask.full_kv_num_blocks[..., None], mask.full_kv_indices, indices.shape[-1])
        merged = torch.cat([partial, full], dim=-1).sort(dim=-1).values[..., :indices.shape[-1]]
        counts, indices = counts + mask.full_kv_num_blocks, merged.clamp_max(indices.shape[-1] - 1).to(indices.dtype)
    return counts, indices, mask.BLOCK_SIZE


def band_key_mask(valid: torch.Tensor, back: int, ahead: int):
    """The FlexAttention block mask of the band with the keys that `valid` (B, T) marks as padding masked.

    The mask function reads `valid` by reference when the attention runs, so a sampler that keeps `valid` in
    a static buffer builds this once per shape and refills the buffer (a captured CUDA graph replays it).
    Padded queries attend to themselves only, so no row is empty.
    """
    from torch.nn.attention.flex_attention import BlockMask

    def in_band_and_valid(b, h, q_idx, kv_idx):
        band = (kv_idx >= q_idx - back) & (kv_idx <= q_idx + ahead)
        return (band & valid[b, kv_idx]) | ((q_idx == kv_idx) & ~valid[b, q_idx])

    length = valid.shape[1]
    counts, indices, block_size = _band_blocks(length, back, ahead, str(valid.device))
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block_size, mask_mod=in_band_and_valid,
                                    seq_lengths=(length, length))


def flex_attention_band(q, k, v, back: int, ahead: int, valid=None, compiled: bool = True) -> torch.Tensor:
    """FlexAttention over the band; padded keys are masked when `valid` is given, either as the (B, T)
    frame mask or as its prepared block mask (`band_key_mask`)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if valid is None:
        valid = torch.ones(q.shape[0], q.shape[-2], dtype=torch.bool, device=q.device)
    if isinstance(valid, BlockMask):
        block_mask = valid
    else:
        block_mask = band_key_mask(valid, back, ahead)
    attend = _compiled_flex() if compiled else flex_attention
    return attend(q, k, v, block_mask=block_mask)


def resolve_backend(backend: str, device: torch.device) -> str:
    return ("flex" if device.type == "cuda" else "banded") if backend == "auto" else backend


def prepare_key_mask(valid, back: int, ahead: int, backend: str, device: torch.device):
    """What the blocks of one forward pass share as their key mask: for FlexAttention the block mask, built
    once here (or already built by the caller, who passes it in); for the other backends the (B, T) frame mask."""
    if isinstance(valid, torch.Tensor) and resolve_backend(backend, device) == "flex":
        return band_key_mask(valid, back, ahead)
    return valid


def local_attention(q, k, v, back: int, ahead: int, valid: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Dispatch to a backend; `auto` takes FlexAttention on CUDA and the banded tiles elsewhere."""
    backend = resolve_backend(backend, q.device)
    if backend == "flex":
        return flex_attention_band(q, k, v, back, ahead, valid)
    if backend == "banded":
        return banded_attention(q, k, v, back, ahead, valid)
    if backend == "dense":
        return dense_attention(q, k, v, back, ahead, valid)
    raise ValueError(f"attention backend: expected auto, flex, banded or dense, got {backend!r}")
