"""Full and read-only disks, on a real small tmpfs: every command ends with one line naming the path and "no space
left" (or "read-only") and exit status 2, leaves nothing under a final name that a rerun would take for complete,
and reruns to completion once there is space. `avflow infer` stops at the first item the disk fails, and a rerun
does that item again. Skipped where mounting a tmpfs is not permitted."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
from reliability_inputs import CORPUS, packed, step_directories, tiny_model  # noqa: F401 (fixtures)
from test_cli_errors import TINY_TRAIN

from avflow.cli import main
from avflow.export.__main__ import main as export_main
from avflow.train.checkpoint import list_checkpoints, verify_checkpoint

DISK_BYTES = 8 << 20


@pytest.fixture
def disk(tmp_path):
    """A tmpfs of DISK_BYTES at tmp_path/disk."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()})")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk, leave: int) -> None:
    """Occupy the disk's space but `leave` bytes."""
    stats = os.statvfs(disk)
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * (stats.f_bavail * stats.f_frsize - leave))


def free(disk) -> None:
    (disk / "filler").unlink()


def one_error_line(capsys, prefix: str) -> str:
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and sum(line.startswith(f"{prefix}: error: ") for line in lines) == 1, stderr
    assert lines[-1].startswith(f"{prefix}: error: "), stderr
    return lines[-1]


def _places(packed, tiny_model, tmp_path, disk):  # noqa: F811
    corpus, shards = packed
    return {"corpus": corpus, "shards": shards, "model": tiny_model, "disk": disk, "root": tmp_path,
            "train": " ".join(TINY_TRAIN), "corpus_options": " ".join(option.replace(" ", "") for option in CORPUS)}


FULL_DISK = [  # (name, command line, bytes left free, what must hold after the rerun)
    ("corpus", "corpus -o {disk}/data {corpus_options}", 256 << 10, "corpus"),
    ("pack", "pack -i {corpus} -o {disk}/shards {corpus_options}", 256 << 10, "pack"),
    ("train", "train data.root={corpus} loader.shards={shards} trainer.run_dir={disk}/run {train}", 64 << 10, "train"),
    ("generate", "generate --checkpoint {model} --text hello -o {disk}/out", 16 << 10, "generate"),
    ("consolidate", "checkpoint consolidate {step} -o {disk}/model.safetensors", 128 << 10, "consolidate"),
    ("export", "export --checkpoint {model} -o {disk}/exported", 256 << 10, "export"),
]


def _run(argv: list[str]) -> int:
    return export_main(argv[1:]) if argv[0] == "export" else main(argv)


def _check_complete(kind: str, disk) -> None:
    """What the rerun left is complete, checked independently of the command's own bookkeeping."""
    if kind == "pack":
        assert main(["pack", "-o", str(disk / "shards"), "--verify"]) == 0
    elif kind == "train":
        steps = list_checkpoints(disk / "run")
        assert steps and all(verify_checkpoint(step) for step in steps)
    elif kind == "generate":
        assert soundfile.read(disk / "out" / "text_s0.wav")[0].size > 0
        assert np.load(disk / "out" / "text_s0.npz")["expression"].shape[1] == 256
    elif kind == "consolidate":
        from avflow.model.io import load_inference_tensors

        load_inference_tensors(disk / "model.safetensors")
    elif kind == "export":
        from avflow.infer.artifacts import read_export_meta

        read_export_meta(disk / "exported")
    elif kind == "corpus":
        assert len(list((disk / "data").rglob("*.wav"))) == 21


@pytest.mark.parametrize("command, leave, kind", [case[1:] for case in FULL_DISK], ids=[case[0] for case in FULL_DISK])
def test_a_full_disk_is_one_line_and_the_rerun_completes(packed, tiny_model, tmp_path, disk, capsys,  # noqa: F811
                                                         command, leave, kind):
    places = _places(packed, tiny_model, tmp_path, disk)
    if "{step}" in command:
        places["step"] = step_directories(tmp_path / "run", tiny_model, steps=(1,))[0]
    argv = command.format(**places).split()
    fill(disk, leave)
    assert _run(argv) == 2
    last = one_error_line(capsys, "python -m avflow.export" if argv[0] == "export" else f"avflow {argv[0]}")
    assert f"{disk}/" in last and "no space left" in last, last
    free(disk)
    assert _run(argv) == 0, capsys.readouterr().err
    _check_complete(kind, disk)


@pytest.mark.parametrize("command", [
    "infer --checkpoint {model} --text hello --no-video -o {disk}/out",
    "generate --checkpoint {model} --text hello -o {disk}/out",
    "train data.root={corpus} loader.shards={shards} trainer.run_dir={disk}/run {train}",
    "pack -i {corpus} -o {disk}/shards",
    "export --checkpoint {model} -o {disk}/exported",
], ids=["infer", "generate", "train", "pack", "export"])
def test_a_read_only_disk_is_one_line(packed, tiny_model, tmp_path, disk, capsys, command):  # noqa: F811
    argv = command.format(**_places(packed, tiny_model, tmp_path, disk)).split()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert _run(argv) == 2
    last = one_error_line(capsys, "python -m avflow.export" if argv[0] == "export" else f"avflow {argv[0]}")
    assert f"{disk}/" in last and "read-only" in last, last


def test_infer_stops_at_a_full_disk_and_the_rerun_does_every_item_once(tiny_model, tmp_path, disk, capsys):  # noqa: F811
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).standard_normal((50, 29)).astype(np.float32))
    ids = [f"item{i}" for i in range(6)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"id": i, "tokens": "tokens.npy"}) + "\n" for i in ids))
    out = disk / "out"
    argv = ["infer", "--model", str(tiny_model), "--inputs", str(tmp_path / "items.jsonl"), "-o", str(out),
            "--no-video", "--quiet"]
    fill(disk, 400 << 10)  # about two items' outputs
    assert main(argv) == 2
    last = one_error_line(capsys, "avflow infer")
    assert f"{out}/" in last and "no space left" in last, last
    done = [path.name for path in out.iterdir() if path.is_dir() and not path.name.startswith(".")]
    assert 0 < len(done) < len(ids)  # the disk filled during the job
    for item in done:  # a folder under an item's id is complete
        assert soundfile.read(out / item / f"{item}_s1.wav")[0].size > 0
        assert np.load(out / item / f"{item}_s1.npz")["expression"].shape[1] == 256
    free(disk)
    assert main(argv) == 0  # no --retry-errors: the item the disk failed is not the item's fault
    entries = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    failed = [entry for entry in entries if entry["status"] == "error"]
    assert all(entry["cause"] == "output" and "no space left" in entry["error"] for entry in failed), failed
    assert sorted(entry["id"] for entry in entries if entry["status"] == "ok") == ids  # each once
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == sorted(["results.jsonl",
                                                                                                  *ids])
    shutil.rmtree(out)
