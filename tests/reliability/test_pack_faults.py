"""`avflow pack` under bad inputs and kills: every per-file read error is a named bad segment that --skip-bad
counts; a killed pack takes its workers down; an Audio2Photoreal subject folder packs as given."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from reliability_inputs import CORPUS, packed  # noqa: F401 (fixture)

from avflow.cli import main

REPO = Path(__file__).resolve().parents[2]
VICTIM = "expression_codes"  # the stream each case damages, in the first training segment


def _empty(path):
    path.write_bytes(b"")


def _truncated(path):
    path.write_bytes(path.read_bytes()[:200])


def _strings(path):
    np.save(path, np.array(["a", "b"]))


def _wrong_shape(path):
    np.save(path, np.zeros((10, 7), dtype=np.float32))


def _not_finite(path):
    values = np.load(path)
    values[2, 3] = np.inf
    np.save(path, values)


def _not_npy(path):
    path.write_text("expression codes, as text\n")


def _integers(path):
    np.save(path, np.load(path).astype(np.int64))


def _complex(path):
    np.save(path, np.load(path).astype(np.complex64))


BAD_FILES = [("empty", _empty, "empty file"), ("truncated", _truncated, "not a readable .npy"),
             ("string dtype", _strings, "expected numeric"), ("wrong shape", _wrong_shape, "(N, 256)"),
             ("non-finite", _not_finite, "NaN or inf"), ("not .npy", _not_npy, "not a readable .npy"),
             ("int64", _integers, "as real floating-point values, got int64"),
             ("complex64", _complex, "as real floating-point values, got complex64")]


@pytest.fixture
def corpus_copy(packed, tmp_path):  # noqa: F811
    corpus = tmp_path / "corpus"
    shutil.copytree(packed[0], corpus)
    return corpus


@pytest.mark.parametrize("damage, reason, workers",
                         [(*case[1:], 1) for case in BAD_FILES] + [(_empty, "empty file", 2)],
                         ids=[case[0] for case in BAD_FILES] + ["empty, 2 workers"])
def test_a_bad_file_is_a_counted_bad_segment(corpus_copy, tmp_path, capsys, damage, reason, workers):
    victim = sorted((corpus_copy / VICTIM).glob("*.npy"))[0]
    damage(victim)
    command = ["pack", "-i", str(corpus_copy), "-o", str(tmp_path / "shards"), "--workers", str(workers), *CORPUS]
    assert main(command) == 2  # without --skip-bad: refused, naming the file
    assert str(victim) in capsys.readouterr().err
    assert main(command + ["--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [entry["segment"] for entry in manifest["bad"]] == [victim.stem]
    assert str(victim) in manifest["bad"][0]["reason"] and reason in manifest["bad"][0]["reason"]
    assert manifest["splits"]["train"]["segments"] + manifest["splits"]["val"]["segments"] == 20


def _workers_of(parent: psutil.Process, count: int, timeout_s: float) -> list[psutil.Process]:
    """The parent's multiprocessing pool workers, once `count` of them are running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = [child for child in parent.children() if "spawn_main" in " ".join(child.cmdline())]
        if len(workers) >= count:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"pack did not start {count} workers within {timeout_s} s")


def test_killing_pack_takes_its_workers_down(tmp_path):
    root = tmp_path / "corpus"
    overrides = ["corpus.train_segments=30", "corpus.val_segments=2", "data.segments_per_shard=4", f"data.root={root}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "avflow.cli", "corpus", *overrides], check=True, env=env,
                   capture_output=True)
    pack = subprocess.Popen([sys.executable, "-m", "avflow.cli", "pack", "-o", str(tmp_path / "shards"),
                             "--workers", "2", *overrides], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        workers = _workers_of(psutil.Process(pack.pid), 2, timeout_s=60)
        time.sleep(1.0)  # inside their first tasks
        pack.send_signal(signal.SIGKILL)
        pack.wait()
        gone, alive = psutil.wait_procs(workers, timeout=20)  # they may still be importing torch
        assert not alive, f"workers still running 20 s after the pack was killed: {[p.pid for p in alive]}"
    finally:
        if pack.poll() is None:
            pack.kill()
        for worker in psutil.Process().children(recursive=True):
            worker.kill()
    # and a rerun packs from scratch without being disturbed by what the kill left behind
    assert main(["pack", "-o", str(tmp_path / "shards"), *overrides]) == 0
    assert not list((tmp_path / "shards").glob(".*.tmp"))


def test_a2p_subject_folder_or_root_with_subject(tmp_path, capsys):
    from data.test_layout_a2p import write_subject

    subject = write_subject(tmp_path / "dataset", "PXB184")
    by_folder, by_name = tmp_path / "by_folder", tmp_path / "by_name"
    assert main(["pack", "--layout", "a2p", "-i", str(subject), "-o", str(by_folder)]) == 0
    assert main(["pack", "--layout", "a2p", "-i", str(subject.parent), "--subject", "PXB184", "-o", str(by_name)]) == 0
    first, second = (json.loads((out / "manifest.json").read_text()) for out in (by_folder, by_name))
    for split, segments in (("train", 2), ("val", 2)):  # the same shards (named after their folders)
        assert first["splits"][split]["segments"] == second["splits"][split]["segments"] == segments
        assert ([shard["sha256"] for shard in first["splits"][split]["shards"]]
                == [shard["sha256"] for shard in second["splits"][split]["shards"]])
    assert main(["pack", "--layout", "a2p", "-i", str(subject.parent), "-o", str(tmp_path / "none")]) == 2
    assert "data.subject" in capsys.readouterr().err  # a root of several subjects needs --subject
