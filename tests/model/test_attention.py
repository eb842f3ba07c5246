"""Local attention backends against a dense masked reference computed independently here."""

import math

import pytest
import torch

from avflow.model.attention import banded_attention, flex_attention_band, local_attention


def reference_attention(q, k, v, back, ahead, valid):
    """Explicit softmax over j in [i - back, i + ahead] with padded keys excluded, one query at a time."""
    batch, heads, length, dim = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(batch):
        for i in range(length):
            keys = [j for j in range(max(0, i - back), min(length, i + ahead + 1)) if valid[b, j]]
            if not keys:
                continue
            scores = torch.einsum("hd,hkd->hk", q[b, :, i].double(), k[b, :, keys].double()) / math.sqrt(dim)
            out[b, :, i] = torch.einsum("hk,hkd->hd", scores.softmax(-1), v[b, :, keys].double())
    return out


@pytest.mark.parametrize("length", [1, 7, 64, 65, 150])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("backend", ["banded", "dense", "flex"])
def test_matches_dense_reference(length, padded, backend):
    torch.manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 16) for _ in range(3))
    valid = torch.ones(2, length, dtype=torch.bool)
    if padded:
        valid[1, length // 2 + 1:] = False
    if backend == "flex":
        out = flex_attention_band(q, k, v, 16, 8, valid if padded else None, compiled=False)
    else:
        out = local_attention(q, k, v, 16, 8, valid if padded else None, backend=backend)
    expected = reference_attention(q, k, v, 16, 8, valid)
    real = valid[:, None, :, None]
    assert torch.isfinite(out).all()
    assert torch.allclose((out * real).double(), expected * real, atol=1e-5)


def test_block_size_does_not_change_result():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 8) for _ in range(3))
    small = banded_attention(q, k, v, 16, 8, query_block=5)
    large = banded_attention(q, k, v, 16, 8, query_block=128)
    assert torch.allclose(small, large, atol=1e-6)


def test_far_keys_have_no_influence():
    """Changing a key/value outside every query's window must leave that query's output unchanged."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 100, 8) for _ in range(3))
    before = banded_attention(q, k, v, 16, 8)
    k2, v2 = k.clone(), v.clone()
    k2[..., 80, :] += 10
    v2[..., 80, :] += 10
    after = banded_attention(q, k2, v2, 16, 8)
    # key 80 is visible to queries 72..96 only (80 - 8 <= i <= 80 + 16)
    untouched = [i for i in range(100) if not 72 <= i <= 96]
    assert torch.equal(before[..., untouched, :], after[..., untouched, :])
    assert not torch.allclose(before[..., 72, :], after[..., 72, :])
    assert not torch.allclose(before[..., 96, :], after[..., 96, :])


def test_network_shares_one_flex_block_mask_across_blocks(monkeypatch):
    """With FlexAttention the network builds the padded-key block mask once per forward (not once per block)
    and computes what the banded backend computes."""
    import dataclasses

    from torch.nn.attention.flex_attention import flex_attention

    from avflow.config import ModelConfig
    from avflow.model import attention
    from avflow.model.avflow import AVFlowNet

    monkeypatch.setattr(attention, "_compiled_flex", lambda: flex_attention)  # eager FlexAttention on CPU
    built = []
    real_band_key_mask = attention.band_key_mask
    monkeypatch.setattr(attention, "band_key_mask", lambda *a: built.append(1) or real_band_key_mask(*a))
    cfg = ModelConfig(d_model=32, n_blocks=3, n_heads=2, ffn_hidden=64, attention="flex")
    torch.manual_seed(0)
    flex_net = AVFlowNet(cfg).eval()
    banded_net = AVFlowNet(dataclasses.replace(cfg, attention="banded")).eval()
    banded_net.load_state_dict(flex_net.state_dict())
    x, cond, t = torch.randn(2, 40, cfg.state_dim), torch.randn(2, 40, cfg.cond_dim), torch.rand(2)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 25:] = False
    with torch.no_grad():
        out = flex_net(x, t, cond, valid)
        expected = banded_net(x, t, cond, valid)
    assert len(built) == 1
    torch.testing.assert_close(out[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_attention_on_cuda_matches_the_reference(dtype):
    """The fused kernel FlexAttention compiles for the GPU, with key padding and a length that is not a multiple of
    its 128-frame blocks, against the float64 reference; a second call of the same shape compiles nothing new."""
    torch.manual_seed(0)
    length = 300
    q, k, v = (torch.randn(2, 4, length, 64) for _ in range(3))
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, 211:] = False
    on_gpu = [x.cuda().to(dtype) for x in (q, k, v)]
    got = flex_attention_band(*on_gpu, 16, 8, valid.cuda())
    expected = reference_attention(q, k, v, 16, 8, valid)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    real = valid[:, None, :, None].expand_as(expected)
    torch.testing.assert_close(got.double().cpu()[real], expected[real], atol=tolerance, rtol=tolerance)
    torch._dynamo.utils.counters.clear()
    flex_attention_band(*on_gpu, 16, 8, valid.cuda())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
