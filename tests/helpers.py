"""Independent references and builders shared across test folders (fixtures live in conftest.py)."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from avflow.config import HeadVAEConfig, ModelConfig, load_config
from avflow.model.avflow import AVFlowNet
from avflow.model.head_vae import HeadVAE
from avflow.model.io import identity_count, model_state_tensors, pose_stats_shape, write_model_file
from avflow.model.state import StateCodec
from avflow.text.token_labels import LABEL_INDEX, TOKEN_LABELS

# The published wav2vec2 character vocabulary: <pad> (the CTC blank), 3 specials, then the 28 labels in order.
PUBLISHED_VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3,
                   **{label: 4 + i for i, label in enumerate(TOKEN_LABELS[1:])}}


def frame_log_probs(rows: list[dict[str, float]]) -> np.ndarray:
    """(T, 29) log-probabilities: each row gives some labels' probabilities, the rest share what is left."""
    probs = np.zeros((len(rows), len(TOKEN_LABELS)))
    for t, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (len(TOKEN_LABELS) - len(row))
        probs[t] = rest
        for label, p in row.items():
            probs[t, LABEL_INDEX[label]] = p
    return np.log(probs)


def packed_tiny_corpus(root, overrides: list[str]) -> list[str]:
    """Write and pack the demo corpus under `root` and train a throwaway head VAE, so a test trains only the
    main model; returns the data.* overrides that point a config at them."""
    from avflow.data.corpus import write_corpus
    from avflow.data.pack import pack
    from avflow.train.head_vae import train_head_vae

    data = [f"data.root={root / 'corpus'}", f"loader.shards={root / 'shards'}"]
    cfg = load_config(None, overrides + data)
    write_corpus(cfg.data.root, cfg.corpus)
    pack(cfg, cfg.loader.shards, progress=False)
    poses = [np.random.default_rng(0).standard_normal((40, 7)).astype(np.float32)]
    train_head_vae(poses, cfg.head_vae, root / "head_vae.pt", progress=False)
    return data + [f"trainer.head_vae={root / 'head_vae.pt'}"]


# a two-block banded-attention network: small enough to sample on a CPU in milliseconds
TINY_NETWORK = ModelConfig(d_model=32, n_blocks=2, n_heads=2, ffn_hidden=64, attention="banded")


def randomized(module, scale=0.2):
    """Every parameter random (adaLN-Zero gates start at zero, which would hide the sublayers)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
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
        ff = F.linear(F.gelu(F.linear(y, sd[prefix + ".feedforward.block.0.weight"],
                                      sd[prefix + ".feedforward.block.0.bias"])),
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
    return torch.cat([F.linear(hv, sd["out_v.weight"], sd["out_v.bias"]),
                      F.linear(ha, sd["out_a.weight"], sd["out_a.bias"])], -1)


def tiny_model_file(path, overrides: list[str] | None = None, seed: int = 0):
    """A consolidated model file of a tiny random network (with codec and head VAE), without training."""
    cfg = load_config(None, ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=64",
                             "head_vae.ffn_hidden=8", "sample.num_samples=2", "sample.nfe=4", *(overrides or [])])
    torch.manual_seed(seed)
    net = randomized(AVFlowNet(cfg.model), scale=0.1)
    count, pose_shape = identity_count(cfg), pose_stats_shape(cfg)
    codec = StateCodec(torch.randn(count, cfg.model.expression_dim), torch.rand(count, cfg.model.expression_dim) + 0.5,
                       torch.full((count,), cfg.mel.norm_mean), torch.full((count,), cfg.mel.norm_std), cfg.model)
    tensors = {"ema": net.state_dict(), **model_state_tensors(codec, HeadVAE(cfg.head_vae).state_dict(),
                                                              torch.zeros(pose_shape), torch.ones(pose_shape))}
    return write_model_file(cfg, tensors, path, "tests")


def write_published_release(folder, dyadic=False, pose_dim=7, edit=None):
    """Random tensors under the published key names, in the published file formats."""
    net = randomized(AVFlowNet(ModelConfig(dyadic=dyadic)), scale=0.03)  # keeps 512-wide activations O(1)
    state = {f"diffusion_module.{k}": v.clone() for k, v in net.state_dict().items()}
    if edit:
        edit(state)
    torch.save({"iteration": 1000, "model_state_dict": state, "optimizer_state_dict": {}}, folder / "model.pt")
    torch.manual_seed(1)
    vae = HeadVAE(HeadVAEConfig(pose_dim=pose_dim))
    torch.save({"model_state_dict": vae.state_dict()}, folder / "head_vae.pt")
    stats = folder / "headpose_normstats"
    stats.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for kind, size in (("qvec", 4), ("translation", pose_dim - 4)):
        np.save(stats / f"head_{kind}_mean.npy", rng.standard_normal(size).astype(np.float32))
        np.save(stats / f"head_{kind}_std.npy", rng.uniform(0.5, 2, size).astype(np.float32))
    return net, vae


def run_steps(trainer, count):
    """Train `count` optimizer steps from the trainer's current step; returns their losses."""
    losses = []
    for _ in range(count):
        trainer.train_step(trainer.step)
        losses.append(trainer.flush_metrics()["loss"])
        trainer.step += 1
    return losses


def check_resume_matches_uninterrupted(make_config, tmp_path, steps: int):
    """Train `steps` steps in one go, and again with a save, a fresh Trainer and a resume halfway: the losses,
    the final weights and the EMA weights must be identical."""
    from avflow.train.loop import Trainer

    half = steps // 2
    uninterrupted = Trainer(make_config(tmp_path / "a"), progress=False)
    losses = run_steps(uninterrupted, steps)
    interrupted = Trainer(make_config(tmp_path / "b"), progress=False)
    assert run_steps(interrupted, half) == losses[:half]
    interrupted.save()
    torch.manual_seed(12345)  # a fresh process would have different global RNG state
    resumed = Trainer(make_config(tmp_path / "b"), resume=True, progress=False)
    assert resumed.step == half
    assert run_steps(resumed, steps - half) == losses[half:]
    expected, got = uninterrupted.engine.full_model_state_dict(), resumed.engine.full_model_state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
    assert uninterrupted.ema.params.keys() == resumed.ema.params.keys()
    for name, value in uninterrupted.ema.params.items():
        assert torch.equal(value, resumed.ema.params[name]), name



# The released Codec Avatar's decoder keys and shapes, stated from the published description
# (docs/reference.md, "The 50h Codec Avatar"), independently of avflow.render: (key prefix, kind, shapes of
# v, g, bias).
AVATAR_VERTICES = 7306
_TEXTURE_CHANNELS, _WARP_CHANNELS = (256, 256, 128, 128, 64, 64, 32, 8, 3), (256, 256, 128, 128, 64, 64, 2)


def published_avatar_layers(vertices=AVATAR_VERTICES):
    layers = [("encmod.0", (256, 256), (256, 1), (256,)),
              ("geommod.0", (3 * vertices, 256), (3 * vertices, 1), (3 * vertices,)),
              ("viewmod.0", (8, 3), (8, 1), (8,)), ("texmod2.0", (4096, 264), (4096, 1), (4096,)),
              ("warpmod2.0", (4096, 264), (4096, 1), (4096,))]
    for prefix, channels, untied in (("texmod", _TEXTURE_CHANNELS, True), ("warpmod", _WARP_CHANNELS, False)):
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            size = 4 * 2 ** (i + 1)
            layers.append((f"{prefix}.{2 * i}", (c_in, c_out, 4, 4), (1, c_out, 1, 1),
                           (c_out, size, size) if untied else (c_out,)))
    return layers


def random_avatar_state(seed=0, spelling="weight_v", vertices=AVATAR_VERTICES):
    """Every parameter of the published decoder random; spelling "weight_v" (weight_v, weight_g) or "weight"
    (the older weight and flat g)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, v_shape, g_shape, bias_shape in published_avatar_layers(vertices):
        v = torch.randn(v_shape, generator=generator)
        g = 0.5 + torch.rand(g_shape, generator=generator)
        if spelling == "weight_v":
            state[f"{prefix}.weight_v"], state[f"{prefix}.weight_g"] = v, g
        else:
            state[f"{prefix}.weight"], state[f"{prefix}.g"] = v, g.flatten()
        state[f"{prefix}.bias"] = 0.1 * torch.randn(bias_shape, generator=generator)
    state["bias"] = 0.1 * torch.randn(3, 1024, 1024, generator=generator)
    return state


def head_topology(rings=83, columns=88, radii=(80.0, 110.0, 95.0)):
    """An ellipsoid head in mm (x right, y up, z towards the face), 2 + rings * columns vertices (7306 by
    default), UVs in a longitude/latitude chart whose wrap-around column is a seam (its own UVs), as OBJ text."""
    polar = np.linspace(0, np.pi, rings + 2)[1:-1]
    azimuth = np.linspace(0, 2 * np.pi, columns, endpoint=False)
    p, a = np.meshgrid(polar, azimuth, indexing="ij")
    unit = np.stack([np.sin(p) * np.sin(a), np.cos(p), np.sin(p) * np.cos(a)], -1).reshape(-1, 3)
    vertices = np.concatenate([[[0, 1, 0]], unit, [[0, -1, 0]]]) * np.array(radii)
    uv = [[(j + 0.5) / columns, 1.0] for j in range(columns)]  # one per top cap triangle
    uv += [[j / columns, 1 - (i + 1) / (rings + 1)] for i in range(rings) for j in range(columns + 1)]
    uv += [[(j + 0.5) / columns, 0.0] for j in range(columns)]
    vid = lambda i, j: 1 + i * columns + j % columns  # noqa: E731
    tid = lambda i, j: 1 + columns + i * (columns + 1) + j  # noqa: E731 - 1-based obj uv index
    bottom_v, bottom_t = len(vertices), columns + rings * (columns + 1)
    faces = [((1, j + 1), (vid(0, j) + 1, tid(0, j)), (vid(0, j + 1) + 1, tid(0, j + 1))) for j in range(columns)]
    for i in range(rings - 1):
        for j in range(columns):
            quad = [(vid(i, j) + 1, tid(i, j)), (vid(i + 1, j) + 1, tid(i + 1, j)),
                    (vid(i + 1, j + 1) + 1, tid(i + 1, j + 1)), (vid(i, j + 1) + 1, tid(i, j + 1))]
            faces += [(quad[0], quad[1], quad[2]), (quad[0], quad[2], quad[3])]
    faces += [((bottom_v, bottom_t + j + 1), (vid(rings - 1, j + 1) + 1, tid(rings - 1, j + 1)),
               (vid(rings - 1, j) + 1, tid(rings - 1, j))) for j in range(columns)]
    lines = [f"v {x:.4f} {y:.4f} {z:.4f}" for x, y, z in vertices] + [f"vt {u:.6f} {v:.6f}" for u, v in uv]
    lines += ["f " + " ".join(f"{a}/{b}" for a, b in face) for face in faces]
    return vertices.astype(np.float32), "\n".join(lines) + "\n"


def write_synthetic_avatar(root, seed=0, spelling="weight_v", obj_under_decoder=False):
    """A dataset root holding a random Codec Avatar with the released file names and shapes."""
    decoder = root / "decoder"
    decoder.mkdir(parents=True, exist_ok=True)
    torch.save(random_avatar_state(seed, spelling), decoder / "dec_params.pt")
    vertices, obj = head_topology()
    vertices.astype("<f4").tofile(decoder / "vert_mean.bin")
    (decoder / "vert_var.txt").write_text("4.0\n")
    (decoder if obj_under_decoder else root).joinpath("face_topo_small_neck.obj").write_text(obj)
    return root
