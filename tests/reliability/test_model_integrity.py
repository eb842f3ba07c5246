"""Damaged model files: a .safetensors model and every file of an export directory carry digests checked on load,
so flipped bits or a truncated file are one line naming the file, before anything is sampled or any compiled code
runs. Files written before the digests still load."""

import json
import shutil

import pytest
import torch
from reliability_inputs import tiny_model  # noqa: F401 (fixture)
from safetensors import safe_open
from safetensors.torch import save_file

from avflow.cli import main
from avflow.export.__main__ import main as export_main
from avflow.model.io import load_inference_tensors


def flip_bits(path, count=3) -> None:
    """Flip one bit at `count` places spread over the file's second half (past any header)."""
    data = bytearray(path.read_bytes())
    for k in range(count):
        data[len(data) // 2 + k * (len(data) // (2 * count + 1))] ^= 0x04
    path.write_bytes(bytes(data))


def last_error_line(capsys, prefix: str) -> str:
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines[-1].startswith(f"{prefix}: error: "), stderr
    return lines[-1]


@pytest.fixture
def flipped_model(tiny_model, tmp_path):  # noqa: F811
    damaged = tmp_path / "flipped.safetensors"
    shutil.copyfile(tiny_model, damaged)
    flip_bits(damaged)
    _, clean = load_inference_tensors(tiny_model)
    with safe_open(str(damaged), framework="pt") as handle:  # the damage is in the weights, and still loads as such
        changed = [name for name in handle.keys() if not torch.equal(handle.get_tensor(name), _get(clean, name))]
    assert changed
    return damaged


def _get(tree, name):
    for part in name.split("/"):
        tree = tree[part]
    return tree


def test_a_flipped_safetensors_model_is_refused_by_generate(flipped_model, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(flipped_model), "--text", "hi", "-o", str(tmp_path / "out")]) == 2
    last = last_error_line(capsys, "avflow generate")
    assert f"{flipped_model}: tensors differ from the sha256 recorded when the file was written" in last, last
    assert not (tmp_path / "out").exists()


def test_an_export_of_a_flipped_model_is_refused(flipped_model, tmp_path, capsys):
    assert export_main(["--checkpoint", str(flipped_model), "-o", str(tmp_path / "exported")]) == 2
    assert str(flipped_model) in last_error_line(capsys, "python -m avflow.export")
    assert not (tmp_path / "exported").exists()


def test_a_changed_config_in_the_metadata_is_refused(tiny_model, tmp_path):  # noqa: F811
    data = tiny_model.read_bytes()
    assert data.count(b'\\"nfe\\": 4') == 1  # the config is JSON inside the header's JSON
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(data.replace(b'\\"nfe\\": 4', b'\\"nfe\\": 8'))
    with pytest.raises(ValueError, match="tensors differ from the sha256"):
        load_inference_tensors(changed)


def test_a_model_file_from_before_the_digest_still_loads(tiny_model, tmp_path, caplog):  # noqa: F811
    with safe_open(str(tiny_model), framework="pt") as handle:
        metadata = {key: value for key, value in handle.metadata().items() if key != "sha256"}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    older = tmp_path / "older.safetensors"
    save_file(tensors, str(older), metadata=metadata)
    _, loaded = load_inference_tensors(older)
    _, expected = load_inference_tensors(tiny_model)
    assert all(torch.equal(_get(loaded, name), _get(expected, name)) for name in tensors)
    assert "written before model files recorded a digest" in caplog.text


@pytest.fixture(scope="module", params=["eager", "torchscript", "aoti"])
def exported(request, tmp_path_factory):
    from helpers import tiny_model_file

    root = tmp_path_factory.mktemp(f"export-{request.param}")
    model = tiny_model_file(root / "tiny.safetensors")
    out = root / "exported"
    assert export_main(["--checkpoint", str(model), "-o", str(out), "--format", request.param, "--max-seconds", "0.5",
                        "--batch", "2", "--device", "cpu"]) == 0
    return out


def _infer(model, out) -> int:
    return main(["infer", "--model", str(model), "--text", "hi", "-o", str(out), "--no-video", "--quiet"])


def test_every_damaged_file_of_an_export_is_refused_before_anything_runs(exported, tmp_path, capsys):
    assert _infer(exported, tmp_path / "good") == 0
    files = sorted(path.name for path in exported.iterdir() if path.name != "export.json")
    assert "model.safetensors" in files and len(files) >= 2
    for name in files:
        for damage in ("flip", "truncate"):
            copy = tmp_path / f"{name}-{damage}"
            shutil.copytree(exported, copy)
            if damage == "flip":
                flip_bits(copy / name, count=1)
            else:
                (copy / name).write_bytes((copy / name).read_bytes()[:-100])
            assert _infer(copy, tmp_path / f"out-{name}-{damage}") == 2
            last = last_error_line(capsys, "avflow infer")
            assert f"{copy / name}: sha256 differs from the one recorded at export" in last, last
            assert not (tmp_path / f"out-{name}-{damage}").exists()


def test_export_records_a_digest_of_every_file(exported):
    import hashlib

    meta = json.loads((exported / "export.json").read_text())
    assert meta["sha256"] == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                              for path in sorted(exported.iterdir()) if path.name != "export.json"}
