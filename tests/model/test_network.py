"""The two-stream network: published size, shapes, and the published math re-stated independently."""

import math

import torch
import torch.nn.functional as F

from avflow.config import ModelConfig
from avflow.model.avflow import AVFlowNet, count_parameters
from avflow.model.dit import TimestepEmbedding, apply_rope, rope_angles

TINY = dict(d_model=32, n_blocks=2, n_heads=2, ffn_hidden=48, time_freqs=8, expression_dim=12, head_latent_dim=3,
            mel_dim=10, token_dim=5, participant_feature_dim=4)


def test_published_parameter_count():
    assert count_parameters(AVFlowNet(ModelConfig())) == 67_935_576


def test_published_input_widths_monadic_and_dyadic():
    monadic = AVFlowNet(ModelConfig())
    assert monadic.input_proj_v.weight.shape == (512, 264 + 29)
    assert monadic.input_proj_a.weight.shape == (512, 80 + 29)
    dyadic = AVFlowNet(ModelConfig(dyadic=True))
    assert dyadic.input_proj_v.weight.shape == (512, 264 + 29 + 29 + 58)
    assert dyadic.input_proj_a.weight.shape == (512, 80 + 29 + 29 + 58)


def test_output_shape_and_padding_does_not_leak():
    cfg = ModelConfig(**TINY)
    net = randomized(AVFlowNet(cfg))
    x, cond = torch.randn(2, 40, cfg.state_dim), torch.randn(2, 40, cfg.cond_dim)
    t = torch.rand(2)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    out = net(x, t, cond, valid)
    assert out.shape == (2, 40, cfg.state_dim)
    x2 = x.clone()
    x2[1, 30:] = 1e3  # garbage in padded frames must not reach real ones
    assert torch.allclose(net(x2, t, cond, valid)[1, :30], out[1, :30], atol=1e-5)


def test_fresh_blocks_are_identity_adaln_zero():
    cfg = ModelConfig(**TINY)
    net = AVFlowNet(cfg)
    block = net.transformer_blocks_v[0]
    h, emb = torch.randn(2, 9, cfg.d_model), torch.randn(2, cfg.d_model)
    assert torch.equal(block(h, emb), h)


def test_time_embedding_features_hand_computed():
    embed = TimestepEmbedding(4, 6)
    captured = {}
    embed.mlp[0].register_forward_hook(lambda m, inputs, out: captured.update(x=inputs[0]))
    embed(torch.tensor([0.5]))
    freqs = [math.exp(-k * math.log(10000.0) / 3) for k in range(4)]
    expected = [math.sin(0.5 * f) for f in freqs] + [math.cos(0.5 * f) for f in freqs]
    assert torch.allclose(captured["x"][0], torch.tensor(expected), atol=1e-6)


def test_rope_rotates_adjacent_pairs():
    x = torch.zeros(1, 1, 3, 4)
    x[..., 2] = 1.0  # pair k=1 at position p rotates by p * base^(-2/4)
    cos, sin = rope_angles(3, 4, 100.0, x.device)
    out = apply_rope(x, cos, sin)
    angle = 2 * 100.0 ** -0.5
    assert torch.allclose(out[0, 0, 2], torch.tensor([0.0, 0.0, math.cos(angle), math.sin(angle)]), atol=1e-6)


def randomized(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module


def published_velocity(net: AVFlowNet, cfg: ModelConfig, x, t, cond):
    """Straightforward re-statement of the published forward pass with dense attention."""
    sd = {k: v.double() for k, v in net.state_dict().items()}
    d, heads = cfg.d_model, cfg.n_heads
    dh = d // heads
    length = x.shape[1]
    k = torch.arange(cfg.time_freqs, dtype=torch.float64)
    freqs = torch.exp(-k * math.log(10000.0) / (cfg.time_freqs - 1))
    feat = torch.cat([torch.sin(t.double()[:, None] * freqs), torch.cos(t.double()[:, None] * freqs)], -1)
    emb = F.linear(F.gelu(F.linear(feat, sd["time_embed.mlp.0.weight"], sd["time_embed.mlp.0.bias"])),
                   sd["time_embed.mlp.2.weight"], sd["time_embed.mlp.2.bias"])
    i = torch.arange(length)
    allowed = (i[None] >= i[:, None] - cfg.window_back) & (i[None] <= i[:, None] + cfg.window_ahead)
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    theta = pos * cfg.rope_base ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)

    def rope(z):
        out = z.clone()
        out[..., 0::2] = z[..., 0::2] * torch.cos(theta) - z[..., 1::2] * torch.sin(theta)
        out[..., 1::2] = z[..., 0::2] * torch.sin(theta) + z[..., 1::2] * torch.cos(theta)
        return out

    def ada(prefix, h):
        mod = F.linear(emb, sd[prefix + ".ada_ln.linear.weight"], sd[prefix + ".ada_ln.linear.bias"])
        alpha, beta, gamma = mod[:, None, :d], mod[:, None, d:2 * d], mod[:, None, 2 * d:]
        return F.layer_norm(h, (d,), eps=1e-6) * (1 + gamma) + beta, alpha

    def block(prefix, h):
        y, alpha = ada(prefix + ".self_attn", h)
        qkv = F.linear(y, sd[prefix + ".self_attn.self_attn.qkv.weight"], sd[prefix + ".self_attn.self_attn.qkv.bias"])
        qkv = qkv.view(h.shape[0], length, heads, 3 * dh)
        q, kk, v = qkv[..., :dh], qkv[..., dh:2 * dh], qkv[..., 2 * dh:]
        q, kk, v = (z.permute(0, 2, 1, 3) for z in (q, kk, v))
        scores = rope(q) @ rope(kk).transpose(-1, -2) / math.sqrt(dh)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        attn = attn.permute(0, 2, 1, 3).reshape(h.shape[0], length, d)
        h = h + alpha * F.linear(attn, sd[prefix + ".self_attn.self_attn.project.weight"],
                                 sd[prefix + ".self_attn.self_attn.project.bias"])
        y, alpha = ada(prefix + ".feedforward", h)
        ff = F.linear(F.gelu(F.linear(y, sd[prefix + ".feedforward.block.0.weight"], sd[prefix + ".feedforward.block.0.bias"])),
                      sd[prefix + ".feedforward.block.3.weight"], sd[prefix + ".feedforward.block.3.bias"])
        return h + alpha * ff

    x, cond = x.double(), cond.double()
    vis_dim = cfg.visual_dim
    hv = F.linear(torch.cat([x[..., :vis_dim], cond], -1), sd["input_proj_v.weight"], sd["input_proj_v.bias"])
    ha = F.linear(torch.cat([x[..., vis_dim:], cond], -1), sd["input_proj_a.weight"], sd["input_proj_a.bias"])
    for n in range(cfg.n_blocks):
        hv, ha = block(f"transformer_blocks_v.{n}", hv), block(f"transformer_blocks_a.{n}", ha)
        fused = F.linear(torch.cat([ha, hv], -1), sd[f"fusion.{n}.weight"], sd[f"fusion.{n}.bias"])
        ha, hv = ha + fused[..., :d], hv + fused[..., d:]
    return torch.cat([F.linear(hv, sd["out_v.weight"], sd["out_v.bias"]), F.linear(ha, sd["out_a.weight"], sd["out_a.bias"])], -1)


def test_matches_published_math_monadic_and_dyadic():
    for dyadic in (False, True):
        cfg = ModelConfig(**TINY, dyadic=dyadic, attention="banded")
        net = randomized(AVFlowNet(cfg))
        x, cond = torch.randn(2, 70, cfg.state_dim), torch.randn(2, 70, cfg.cond_dim)
        t = torch.rand(2)
        expected = published_velocity(net, cfg, x, t, cond)
        assert torch.allclose(net(x, t, cond).double(), expected, atol=1e-5, rtol=1e-5)
