"""Importing the released weights: the imported network computes the published function, and any key
mismatch is named."""

import numpy as np
import pytest
import torch
from helpers import published_velocity
from helpers import write_published_release as write_release

from avflow.cli import main
from avflow.infer.model import load_inference_model
from avflow.model.published import import_published


@pytest.mark.parametrize("dyadic", [False, True])
def test_imported_network_computes_the_published_function(tmp_path, dyadic):
    reference, vae = write_release(tmp_path, dyadic)
    out = import_published(tmp_path / "model.pt", tmp_path / "head_vae.pt", tmp_path / "headpose_normstats",
                           tmp_path / "imported.safetensors", dyadic=dyadic)
    model = load_inference_model(out, "cpu")
    cfg = model.cfg.model
    assert cfg.dyadic == dyadic and not model.cfg.data.canonical_quaternion_sign
    torch.manual_seed(2)
    x, cond, t = torch.randn(2, 60, cfg.state_dim), torch.randn(2, 60, cfg.cond_dim), torch.rand(2)
    expected = published_velocity(reference, reference.cfg, x, t, cond)
    # in float64 like the re-statement: float32 rounding of the 16-block network alone reaches ~1e-4 here
    with torch.no_grad():
        got = model.net.double()(x.double(), t.double(), cond.double())
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    pose = torch.randn(1, 30, 7)
    with torch.no_grad():
        assert torch.equal(model.head_vae.encode(pose)[0], vae.eval().encode(pose)[0])
    assert torch.allclose(model.pose_mean[:4], torch.from_numpy(np.load(tmp_path / "headpose_normstats" /
                                                                        "head_qvec_mean.npy")))
    arguments = ["generate", "--checkpoint", str(out), "--text", "hi", "--nfe", "2", "--num-samples", "1",
                 "-o", str(tmp_path / "outputs")]
    assert main(arguments) == (2 if dyadic else 0)
    assert (tmp_path / "outputs" / "text_s0.wav").exists() != dyadic


def test_renamed_or_misshaped_keys_are_named(tmp_path):
    def rename(state):
        state["diffusion_module.fusion.0.weights"] = state.pop("diffusion_module.fusion.0.weight")

    write_release(tmp_path, edit=rename)
    with pytest.raises(ValueError, match=r"missing: diffusion_module.fusion.0.weight; "
                                         r"unexpected: diffusion_module.fusion.0.weights"):
        import_published(tmp_path / "model.pt", tmp_path / "head_vae.pt", tmp_path / "headpose_normstats",
                         tmp_path / "out.safetensors")

    def shrink(state):
        state["diffusion_module.out_a.weight"] = state["diffusion_module.out_a.weight"][:70]

    write_release(tmp_path, edit=shrink)
    with pytest.raises(ValueError,
                       match=r"mis-shaped: diffusion_module.out_a.weight \(70, 512\) \(expected \(80, 512\)\)"):
        import_published(tmp_path / "model.pt", tmp_path / "head_vae.pt", tmp_path / "headpose_normstats",
                         tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    (tmp_path / "headpose_normstats" / "head_qvec_std.npy").unlink()
    write_release(tmp_path)
    (tmp_path / "headpose_normstats" / "head_qvec_std.npy").unlink()
    with pytest.raises(FileNotFoundError, match="head_qvec_std.npy: missing head-pose std"):
        import_published(tmp_path / "model.pt", tmp_path / "head_vae.pt", tmp_path / "headpose_normstats",
                         tmp_path / "out.safetensors")
