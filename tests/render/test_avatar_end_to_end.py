"""The Codec Avatar through the command line: generate and infer with --avatar write 1024 x 1024 mp4s with
audio showing the face, an export with --avatar renders the same frames without the dataset, and bad
assets stop the command with one line naming the file before anything is written."""

import subprocess

import numpy as np
import pytest
import torch
from helpers import tiny_model_file, write_synthetic_avatar

from avflow.cli import main
from avflow.export.__main__ import main as export_main

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="videos need imageio-ffmpeg")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatar_e2e")
    model = tiny_model_file(root / "model.safetensors", ["sample.num_samples=1"])
    tokens = root / "short.npy"
    np.save(tokens, np.random.default_rng(0).standard_normal((12, 29)).astype(np.float32))  # 0.24 s: 7 frames
    return {"model": model, "avatar": write_synthetic_avatar(root / "dataset"), "tokens": tokens, "root": root}


def _frames(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


def _check_face_video(path):
    meta, frames = _frames(path)
    assert meta["size"] == (1024, 1024) and meta["fps"] == pytest.approx(30)
    # The ~160 x 220 mm head 1 m from the published camera covers ~17% of the frame; the rest is black.
    covered = (frames.astype(int).sum(-1) > 24).mean()
    assert 0.05 < covered < 0.5
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path)], capture_output=True, text=True)
    assert "Audio: aac" in probe.stderr
    return frames


def test_generate_with_the_avatar_writes_a_1024_video_with_audio(setup, tmp_path):
    assert main(["generate", "--model", str(setup["model"]), "--tokens", str(setup["tokens"]), "--avatar",
                 str(setup["avatar"]), "--avatar-pose", "relative", "-o", str(tmp_path)]) == 0
    _check_face_video(tmp_path / "short_s0.mp4")


def test_infer_with_the_avatar_and_an_export_renders_the_same_frames_without_the_dataset(setup, tmp_path):
    export = tmp_path / "export"
    assert export_main(["--checkpoint", str(setup["model"]), "-o", str(export), "--format", "eager",
                        "--max-seconds", "1", "--batch", "1", "--avatar", str(setup["avatar"])]) == 0
    assert (export / "avatar.safetensors").is_file()
    common = ["infer", "--model", str(export), "--tokens", str(setup["tokens"]), "--name", "clip",
              "--avatar-pose", "relative"]
    assert main([*common, "--avatar", str(setup["avatar"]), "-o", str(tmp_path / "with_dataset")]) == 0
    with_dataset = _check_face_video(tmp_path / "with_dataset" / "clip" / "clip_s0.mp4")
    moved = setup["root"] / "dataset_elsewhere"
    setup["avatar"].rename(moved)
    try:
        assert main([*common, "-o", str(tmp_path / "from_export")]) == 0
    finally:
        moved.rename(setup["avatar"])
    np.testing.assert_array_equal(_frames(tmp_path / "from_export" / "clip" / "clip_s0.mp4")[1], with_dataset)


@pytest.mark.parametrize("what", ["decoder/vert_mean.bin", "truncated", "renamed key", "other obj"])
def test_bad_assets_stop_generate_and_export_with_one_line_and_nothing_written(setup, tmp_path, capsys, what):
    broken = write_synthetic_avatar(tmp_path / "broken")
    if what == "truncated":
        (broken / "decoder" / "vert_mean.bin").write_bytes((broken / "decoder" / "vert_mean.bin").read_bytes()[:-4])
        named = "decoder/vert_mean.bin"
    elif what == "renamed key":
        state = torch.load(broken / "decoder" / "dec_params.pt")
        state["encmod.0.bias_renamed"] = state.pop("encmod.0.bias")
        torch.save(state, broken / "decoder" / "dec_params.pt")
        named = "decoder/dec_params.pt: missing key encmod.0.bias"
    elif what == "other obj":
        obj = broken / "face_topo_small_neck.obj"
        obj.write_text("v 1 2 3\n" + obj.read_text())
        named = "face_topo_small_neck.obj: has 7307 vertices, expected 7306"
    else:
        (broken / what).unlink()
        named = f"{what}: missing"
    assert main(["generate", "--model", str(setup["model"]), "--tokens", str(setup["tokens"]), "--avatar", str(broken),
                 "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("avflow generate: error:") and "\n" not in error and named in error
    assert export_main(["--checkpoint", str(setup["model"]), "-o", str(tmp_path / "export"), "--format", "eager",
                        "--avatar", str(broken)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and named in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken"]  # no output, no temporary left


def test_an_export_carries_an_avatar_per_identity_and_each_item_shows_its_own(setup, tmp_path):
    """--avatar alice=ROOT is alice's own avatar; the plain --avatar ROOT shows every other identity. infer renders
    each item with its identity's avatar, the same frames as passing that avatar's dataset root explicitly."""
    two = tiny_model_file(tmp_path / "two.safetensors", ["sample.num_samples=1", "model.identities=[alice, bob]"])
    alice_root = write_synthetic_avatar(tmp_path / "alice_dataset", seed=7)
    export = tmp_path / "export"
    assert export_main(["--checkpoint", str(two), "-o", str(export), "--format", "eager", "--max-seconds", "1",
                        "--batch", "1", "--avatar", f"alice={alice_root}", "--avatar", str(setup["avatar"])]) == 0
    assert (export / "avatar-alice.safetensors").is_file() and (export / "avatar.safetensors").is_file()
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f'{{"id": "{name}", "tokens": "{setup["tokens"]}", "identity": "{name}"}}\n'
                             for name in ("alice", "bob")))
    assert main(["infer", "--model", str(export), "--inputs", str(items), "-o", str(tmp_path / "both"),
                 "--avatar-pose", "relative"]) == 0
    for name, root in (("alice", alice_root), ("bob", setup["avatar"])):
        one = tmp_path / f"{name}.jsonl"
        one.write_text(items.read_text().splitlines()[name == "bob"] + "\n")
        assert main(["infer", "--model", str(export), "--inputs", str(one), "--avatar", str(root),
                     "--avatar-pose", "relative", "-o", str(tmp_path / f"explicit-{name}")]) == 0
        np.testing.assert_array_equal(_frames(tmp_path / "both" / name / f"{name}_s0.mp4")[1],
                                      _frames(tmp_path / f"explicit-{name}" / name / f"{name}_s0.mp4")[1])
    alice, bob = (_frames(tmp_path / "both" / name / f"{name}_s0.mp4")[1] for name in ("alice", "bob"))
    assert not np.array_equal(alice, bob)


@pytest.mark.parametrize("given, named", [
    (["carol={root}"], "--avatar carol="),
    (["alice={root}", "alice={root}"], "a second avatar for identity 'alice'"),
    (["{root}", "{root}"], "a second avatar for every identity"),
])
def test_a_bad_identity_avatar_is_one_error_before_anything_is_written(setup, tmp_path, capsys, given, named):
    two = tiny_model_file(tmp_path / "two.safetensors", ["model.identities=[alice, bob]"])
    options = [part for value in given for part in ("--avatar", value.format(root=setup["avatar"]))]
    assert export_main(["--checkpoint", str(two), "-o", str(tmp_path / "export"), "--format", "eager",
                        *options]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and named in error
    if "carol" in named:
        assert "this model knows alice, bob" in error
    assert not (tmp_path / "export").exists()


def test_an_identity_avatar_for_a_model_without_identities_is_refused(setup, tmp_path, capsys):
    assert export_main(["--checkpoint", str(setup["model"]), "-o", str(tmp_path / "export"), "--format", "eager",
                        "--avatar", f"alice={setup['avatar']}"]) == 2
    assert "this model has one identity and no identity table" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
