"""HeadVAE against the published layout and against the Transformer math written out by hand; PoseDecoder."""

import math

import pytest
import torch

from avflow.config import HeadVAEConfig
from avflow.model.head_vae import HeadVAE, PoseDecoder


def published_shapes(pose_dim: int) -> dict[str, tuple[int, ...]]:
    """The key/shape list of head_vae/iter-0500000.pt (hidden 16, latent 8, FFN 2048), from docs/reference.md."""
    layer = {
        "self_attn.in_proj_weight": (48, 16),
        "self_attn.in_proj_bias": (48,),
        "self_attn.out_proj.weight": (16, 16),
        "self_attn.out_proj.bias": (16,),
        "linear1.weight": (2048, 16),
        "linear1.bias": (2048,),
        "linear2.weight": (16, 2048),
        "linear2.bias": (16,),
        "norm1.weight": (16,),
        "norm1.bias": (16,),
        "norm2.weight": (16,),
        "norm2.bias": (16,),
    }
    shapes = {"encoder.0.weight": (16, pose_dim), "encoder.0.bias": (16,)}
    shapes.update({f"encoder.1.layers.0.{name}": shape for name, shape in layer.items()})
    shapes.update({
        "fc_mu.weight": (8, 16), "fc_mu.bias": (8,),
        "fc_var.weight": (8, 16), "fc_var.bias": (8,),
        "decoder_input.weight": (16, 8), "decoder_input.bias": (16,),
    })
    shapes.update({f"decoder.0.layers.0.{name}": shape for name, shape in layer.items()})
    shapes.update({"final_layer.weight": (pose_dim, 16), "final_layer.bias": (pose_dim,)})
    return shapes


def randomized(cfg: HeadVAEConfig, seed: int = 0) -> HeadVAE:
    """A VAE whose every weight (biases and LayerNorm affine included) is random, in eval mode."""
    torch.manual_seed(seed)
    vae = HeadVAE(cfg)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return vae.eval()


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def post_norm_layer(x, weights: dict[str, torch.Tensor], n_heads: int):
    """One TransformerEncoderLayer: x = LN1(x + SelfAttn(x)); x = LN2(x + W2 relu(W1 x))."""
    batch, frames, width = x.shape
    head = width // n_heads
    qkv = x @ weights["self_attn.in_proj_weight"].T + weights["self_attn.in_proj_bias"]
    q, k, v = (part.reshape(batch, frames, n_heads, head).transpose(1, 2) for part in qkv.split(width, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head)
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, frames, width)
    attended = attended @ weights["self_attn.out_proj.weight"].T + weights["self_attn.out_proj.bias"]
    x = layer_norm(x + attended, weights["norm1.weight"], weights["norm1.bias"])
    hidden = torch.relu(x @ weights["linear1.weight"].T + weights["linear1.bias"])
    feedforward = hidden @ weights["linear2.weight"].T + weights["linear2.bias"]
    return layer_norm(x + feedforward, weights["norm2.weight"], weights["norm2.bias"])


def layer_weights(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: value.double() for name, value in state.items() if name.startswith(prefix)}


@pytest.mark.parametrize("pose_dim", [7, 4])
def test_state_dict_matches_published_layout(pose_dim):
    vae = HeadVAE(HeadVAEConfig(pose_dim=pose_dim))
    shapes = {name: tuple(value.shape) for name, value in vae.state_dict().items()}
    assert shapes == published_shapes(pose_dim)


def test_published_layout_loads_strictly():
    published = {name: torch.randn(shape) for name, shape in published_shapes(7).items()}
    vae = HeadVAE(HeadVAEConfig())
    vae.load_state_dict(published, strict=True)
    assert torch.equal(vae.fc_mu.weight, published["fc_mu.weight"])


@pytest.mark.parametrize("n_heads", [1, 2])
def test_encode_and_decode_equal_written_out_math(n_heads):
    cfg = HeadVAEConfig(n_heads=n_heads, ffn_hidden=64)
    vae = randomized(cfg)
    state = vae.state_dict()
    pose = torch.randn(2, 11, cfg.pose_dim)

    x = pose.double() @ state["encoder.0.weight"].double().T + state["encoder.0.bias"].double()
    x = post_norm_layer(x, layer_weights(state, "encoder.1.layers.0."), n_heads)
    expected_mu = x @ state["fc_mu.weight"].double().T + state["fc_mu.bias"].double()
    expected_logvar = x @ state["fc_var.weight"].double().T + state["fc_var.bias"].double()

    latent = torch.randn(2, 11, cfg.latent_dim)
    y = latent.double() @ state["decoder_input.weight"].double().T + state["decoder_input.bias"].double()
    y = post_norm_layer(y, layer_weights(state, "decoder.0.layers.0."), n_heads)
    expected_pose = y @ state["final_layer.weight"].double().T + state["final_layer.bias"].double()

    with torch.no_grad():
        mu, logvar = vae.encode(pose)
        decoded = vae.decode(latent)
    torch.testing.assert_close(mu.double(), expected_mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar.double(), expected_logvar, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded.double(), expected_pose, atol=1e-5, rtol=1e-5)


def test_forward_uses_mu_in_eval_and_samples_in_training():
    vae = randomized(HeadVAEConfig(ffn_hidden=32, dropout=0.0))
    pose = torch.randn(1, 9, 7)
    with torch.no_grad():
        recon, mu, _ = vae(pose)
        torch.testing.assert_close(recon, vae.decode(mu))
        vae.train()
        sampled, _, _ = vae(pose)
    assert not torch.allclose(sampled, recon)


def test_kl_term_equals_hand_computation():
    cfg = HeadVAEConfig(ffn_hidden=32, kl_weight=0.5)
    vae = randomized(cfg)
    mu = torch.zeros(8)
    mu[0] = 1.0
    logvar = torch.zeros(8)
    logvar[1] = math.log(2.0)
    with torch.no_grad():
        vae.fc_mu.weight.zero_()
        vae.fc_mu.bias.copy_(mu)
        vae.fc_var.weight.zero_()
        vae.fc_var.bias.copy_(logvar)
    # Per frame: dim 0 gives -0.5 (1 + 0 - 1 - 1) = 0.5; dim 1 gives -0.5 (1 + ln 2 - 0 - 2); others 0.
    expected_kl = 0.5 + 0.5 * (1.0 - math.log(2.0))
    pose = torch.randn(3, 6, 7)
    with torch.no_grad():
        total, parts = vae.loss(pose)
        recon = ((vae.decode(mu.expand(3, 6, 8)) - pose) ** 2).mean()
    assert parts["kl"].item() == pytest.approx(expected_kl, rel=1e-6)
    assert parts["recon"].item() == pytest.approx(recon.item(), rel=1e-6)
    assert total.item() == pytest.approx(recon.item() + 0.5 * expected_kl, rel=1e-6)


def test_masked_loss_ignores_padded_frames():
    vae = randomized(HeadVAEConfig(ffn_hidden=32))
    pose = torch.randn(2, 12, 7)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        reference, _ = vae.loss(pose, mask)
        repadded = pose.clone()
        repadded[1, 7:] = torch.randn(5, 7) * 100
        assert vae.loss(repadded, mask)[0].item() == pytest.approx(reference.item(), rel=1e-6)
        changed_real = pose.clone()
        changed_real[1, 3] += 1.0
        assert vae.loss(changed_real, mask)[0].item() != pytest.approx(reference.item(), rel=1e-6)
        # A padded crop must score exactly like the truncated sequence on its own.
        padded_alone, _ = vae.loss(repadded[1:], mask[1:])
        truncated, _ = vae.loss(pose[1:, :7])
    assert padded_alone.item() == pytest.approx(truncated.item(), rel=1e-5)


def test_wrong_input_width_is_reported():
    vae = HeadVAE(HeadVAEConfig())
    with pytest.raises(ValueError, match=r"pose: expected shape \(batch, frames, 7\), got \(1, 5, 4\)"):
        vae.encode(torch.zeros(1, 5, 4))


def test_pose_decoder_decodes_its_frames_together_without_dropout_and_denormalizes():
    """The poses of latents decoded together, then denormalized by the statistics; dropout stays off in a module in
    training mode, whose mode is restored."""
    torch.manual_seed(5)
    vae = HeadVAE(HeadVAEConfig(ffn_hidden=32)).train()
    mean, std = torch.linspace(-1.0, 1.0, 7), torch.linspace(0.5, 2.0, 7)
    latent = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(0))
    vae.eval()
    with torch.no_grad():
        expected = vae.decode(latent) * std + mean
    vae.train()
    decoded = PoseDecoder(vae, mean, std)(latent)
    assert vae.training
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-6)
