"""A multi-identity model at inference (issue 23): --identity for generate, infer (and an item's "identity"),
stream and the Python API; each output decoded with its identity's statistics; unknown identities refused in one
line listing the known ones; a model without a table unchanged."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_model_file

from avflow.cli import main
from avflow.infer.generate import conditioning, generate
from avflow.infer.model import load_inference_model
from avflow.model.io import load_inference_tensors, model_weights, stored_config, write_model_file

TINY = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48", "sample.max_frames=64",
        "sample.window_overlap=8", "sample.num_samples=1"]
SHIFT = 3.0  # bob's expression and mel means sit this far above alice's


@pytest.fixture(scope="module")
def two_identities(tmp_path_factory):
    """alice and bob with the same embedding columns (the network samples the same state for both) and
    statistics that differ by SHIFT in mean: any difference in the outputs is the decoding's."""
    folder = tmp_path_factory.mktemp("model")
    path = tiny_model_file(folder / "random.safetensors", TINY + ["model.identities=[alice, bob]"])
    cfg, tensors = load_inference_tensors(path)
    for key in ("input_proj_v.weight", "input_proj_a.weight"):
        tensors["ema"][key][:, -1] = tensors["ema"][key][:, -2]
    codec = tensors["codec"]
    codec["expression_std"][1] = codec["expression_std"][0]
    codec["expression_mean"][1] = codec["expression_mean"][0] + SHIFT
    codec["mel_std"][1], codec["mel_mean"][1] = codec["mel_std"][0], codec["mel_mean"][0] + SHIFT
    return write_model_file(cfg, tensors, folder / "two.safetensors", "tests")


def tokens(frames=60):
    return np.random.default_rng(0).standard_normal((frames, 29)).astype(np.float32)


def test_the_conditioning_carries_the_chosen_identitys_one_hot(two_identities):
    bob = load_inference_model(two_identities, "cpu").with_identity("bob")
    cond = conditioning(bob, tokens())
    assert cond.shape == (60, 31)
    assert np.array_equal(cond[:, 29:], np.tile([[0.0, 1.0]], (60, 1)))
    assert np.array_equal(cond[:, :29], tokens())


def test_each_identity_is_decoded_with_its_own_statistics(two_identities):
    model = load_inference_model(two_identities, "cpu")
    alice, bob = (generate(model.with_identity(name), tokens()) for name in ("alice", "bob"))
    np.testing.assert_allclose(bob.mel - alice.mel, SHIFT, atol=1e-4)
    np.testing.assert_allclose(bob.expression - alice.expression, SHIFT, atol=1e-4)


def test_a_stream_speaks_as_the_chosen_identity(two_identities):
    model = load_inference_model(two_identities, "cpu")
    alice, bob = (np.concatenate([chunk.mel for chunk in model.with_identity(name).stream(tokens=tokens())])
                  for name in ("alice", "bob"))
    assert alice.shape[0] > 0
    np.testing.assert_allclose(bob - alice, SHIFT, atol=1e-4)


def test_a_model_of_several_identities_asks_for_one_and_refuses_unknown_ones(two_identities):
    model = load_inference_model(two_identities, "cpu")
    with pytest.raises(ValueError, match=r"2 identities \(alice, bob\); choose one"):
        conditioning(model, tokens())
    with pytest.raises(ValueError, match="identity 'zed': unknown; this model knows alice, bob"):
        model.with_identity("zed")
    with pytest.raises(ValueError, match="identity 'zed': unknown"):
        load_inference_model(two_identities, "cpu", identity="zed")


def test_the_cli_refuses_an_unknown_or_missing_identity_in_one_line(two_identities, tmp_path, capsys):
    np.save(tmp_path / "take.npy", tokens())
    base = ["generate", "--model", str(two_identities), "--tokens", str(tmp_path / "take.npy"), "-o", str(tmp_path)]
    assert main(base + ["--identity", "zed"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "identity 'zed': unknown; this model knows alice, bob" in error[0]
    assert main(base) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "choose one (--identity NAME" in error[0]
    assert main(base + ["--identity", "bob"]) == 0
    assert (tmp_path / "take_s0.npz").is_file()


def test_infer_items_choose_their_identity_and_are_sampled_together(two_identities, tmp_path):
    np.save(tmp_path / "take.npy", tokens())
    lines = [{"id": "a", "tokens": "take.npy", "identity": "alice"}, {"id": "b", "tokens": "take.npy"},
             {"id": "z", "tokens": "take.npy", "identity": "zed"}]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert main(["infer", "--model", str(two_identities), "--inputs", str(tmp_path / "items.jsonl"), "-o", str(out),
                 "--identity", "bob", "--no-video", "--quiet"]) == 0
    results = {entry["id"]: entry for entry in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert results["a"]["status"] == results["b"]["status"] == "ok"
    assert results["z"]["status"] == "error" and "unknown; this model knows alice, bob" in results["z"]["error"]
    alice, bob = (np.load(out / name / f"{name}_s0.npz")["expression"] for name in ("a", "b"))
    np.testing.assert_allclose(bob - alice, SHIFT, atol=1e-4)


def test_a_model_without_a_table_is_unchanged_and_takes_no_identity(tmp_path):
    path = tiny_model_file(tmp_path / "one.safetensors", TINY)
    cfg, tensors = load_inference_tensors(path)
    assert cfg.model.cond_dim == 29 and tensors["ema"]["input_proj_a.weight"].shape[1] == 80 + 29
    assert tensors["codec"]["expression_mean"].shape == (256,) and tensors["codec"]["mel_mean"].shape == ()
    assert tensors["head_vae"]["pose_mean"].shape == (7,)
    model = load_inference_model(path, "cpu")
    assert model.identity is None and conditioning(model, tokens()).shape == (60, 29)
    with pytest.raises(ValueError, match="this model has one identity and no identity table"):
        model.with_identity("alice")


def test_an_export_carries_the_identity_table_and_statistics(two_identities, tmp_path):
    from avflow.export.exporter import ExportOptions, export

    export(two_identities, tmp_path / "export", ExportOptions(format="eager", device="cpu"))
    assert stored_config(model_weights(tmp_path / "export")).model.identities == ["alice", "bob"]
    exported = load_inference_model(tmp_path / "export", "cpu", identity="bob")
    original = load_inference_model(two_identities, "cpu", identity="bob")
    assert torch.equal(exported.codec.mel_mean, original.codec.mel_mean)
    assert torch.equal(exported.pose_mean, original.pose_mean)
    np.testing.assert_allclose(generate(exported, tokens()).mel, generate(original, tokens()).mel, atol=1e-5)


def test_a_model_file_written_before_identities_loads_as_one_identity(tmp_path, monkeypatch):
    path = tiny_model_file(tmp_path / "new.safetensors", TINY)
    cfg, tensors = load_inference_tensors(path)
    written_before = cfg.checkpoint_dict

    def without_new_keys():
        tree = written_before()
        del tree["model"]["identities"], tree["trainer"]["init_from"], tree["trainer"]["finetune"]
        return tree

    monkeypatch.setattr(cfg, "checkpoint_dict", without_new_keys)
    old = write_model_file(cfg, tensors, tmp_path / "old.safetensors", "before issue 23")
    monkeypatch.undo()
    assert '"identities"' not in json.dumps(without_new_keys())
    loaded = load_inference_model(old, "cpu")
    assert loaded.cfg.model.identities == [] and loaded.identity is None
    np.testing.assert_array_equal(generate(loaded, tokens()).mel, generate(load_inference_model(path, "cpu"),
                                                                           tokens()).mel)
