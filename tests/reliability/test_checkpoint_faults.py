"""Damaged checkpoints: every step records its files' checksums; a truncated, bit-flipped or missing file is
named, resume falls back to the newest step that verifies, and loading for inference verifies too."""

import hashlib
import json
import logging
import shutil

import pytest
import torch
from helpers import packed_tiny_corpus, run_steps
from reliability_inputs import step_directories, tiny_model  # noqa: F401 (fixture)

from avflow.config import load_config
from avflow.train.checkpoint import (
    CheckpointError,
    consolidate,
    load_inference_tensors,
    newest_verified_checkpoint,
    verify_checkpoint,
)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _flip_three_bits(path):
    data = bytearray(path.read_bytes())
    for position in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        data[position] ^= 0x10
    path.write_bytes(bytes(data))


def _empty(path):
    path.write_bytes(b"")


def _delete(path):
    path.unlink()


DAMAGE = [  # (name, file, how, what the error says)
    ("truncated .distcp", "__0_0.distcp", _truncate, "truncated or replaced"),
    ("flipped bits in .distcp", "__0_0.distcp", _flip_three_bits, "sha256 differs"),
    ("truncated .metadata", ".metadata", _truncate, "truncated or replaced"),
    ("empty .metadata", ".metadata", _empty, "truncated or replaced"),
    ("missing .distcp", "__0_0.distcp", _delete, "missing"),
]


@pytest.fixture
def steps(tiny_model, tmp_path):  # noqa: F811
    return step_directories(tmp_path / "run", tiny_model, steps=(1, 2))


def test_each_step_records_the_checksum_of_every_file(steps):
    for step in steps:
        recorded = json.loads((step / "meta.json").read_text())["files"]
        on_disk = {path.name for path in step.iterdir()} - {"meta.json"}
        assert set(recorded) == on_disk and {"__0_0.distcp", ".metadata"} <= on_disk
        for name, entry in recorded.items():
            content = (step / name).read_bytes()
            assert entry == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


@pytest.mark.parametrize("name, damage, reason", [case[1:] for case in DAMAGE], ids=[case[0] for case in DAMAGE])
def test_a_damaged_step_is_named_and_resume_falls_back(steps, caplog, name, damage, reason):
    older, newest = steps
    damage(newest / name)
    with pytest.raises(CheckpointError, match=reason) as error:
        verify_checkpoint(newest)
    assert str(newest / name) in str(error.value)
    for load in (load_inference_tensors, lambda path: consolidate(path, path.parent / "model.safetensors")):
        with pytest.raises(CheckpointError, match=reason):  # inference and consolidation verify too
            load(newest)
    with caplog.at_level(logging.WARNING, logger="avflow.train.checkpoint"):
        assert newest_verified_checkpoint(newest.parent.parent) == older
    assert f"skipping checkpoint {newest.name}: {newest / name}" in caplog.text
    assert f"resuming from {older.name}" in caplog.text


def test_no_verified_step_is_one_clear_error(steps):
    for step in steps:
        _flip_three_bits(step / "__0_0.distcp")
    with pytest.raises(CheckpointError) as error:
        newest_verified_checkpoint(steps[0].parent.parent)
    message = str(error.value)
    assert "no checkpoint verifies" in message and all(step.name in message for step in steps)


def test_a_step_written_before_checksums_still_loads_with_a_warning(steps, tiny_model, caplog):  # noqa: F811
    meta_file = steps[1] / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="avflow.train.checkpoint"):
        cfg, tensors = load_inference_tensors(steps[1])
    assert "loading it unverified" in caplog.text
    _, expected = load_inference_tensors(tiny_model)
    assert all(torch.equal(tensors["ema"][key], value) for key, value in expected["ema"].items())
    _truncate(steps[1] / "__0_0.distcp")  # unverifiable and damaged: still one clear error, not a raw EOFError
    with pytest.raises(CheckpointError, match=f"{steps[1]}: cannot load the checkpoint's tensors"):
        load_inference_tensors(steps[1])


TINY = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48", "loader.segment_length=24",
        "trainer.batch_size=3", "trainer.steps=6", "trainer.warmup_steps=2", "trainer.checkpoint_every=3",
        "trainer.val_every=6", "trainer.lr=1e-3", "head_vae.ffn_hidden=8", "head_vae.steps=2",
        "head_vae.segment_length=16", "head_vae.batch_size=2", "corpus.train_segments=3", "corpus.val_segments=1",
        "corpus.words_per_segment=[2, 3]"]


def test_training_resumes_from_the_newest_good_step_and_reproduces_the_run(tmp_path, caplog):
    from avflow.train.loop import Trainer

    data = packed_tiny_corpus(tmp_path / "data", TINY)
    cfg = load_config(None, TINY + data + [f"trainer.run_dir={tmp_path / 'run'}"])
    final = Trainer(cfg, progress=False).fit()
    good_copy = tmp_path / "good-step-6"
    shutil.copytree(final, good_copy)
    _flip_three_bits(final / "__0_0.distcp")
    # what a kill during the next save leaves behind: a staging folder with partial files and no meta
    (final.parent / ".step-00000009.tmp").mkdir()
    (final.parent / ".step-00000009.tmp" / "__0_0.distcp").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="avflow.train.checkpoint"):
        resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.step == 3 and "skipping checkpoint step-00000006" in caplog.text
    run_steps(resumed, 3)
    redone = resumed.save()
    verify_checkpoint(redone)
    _, expected = load_inference_tensors(good_copy)
    _, got = load_inference_tensors(redone)
    for key, value in expected["ema"].items():  # the redone steps equal the lost ones
        assert torch.equal(got["ema"][key], value), key


def test_a_failed_write_is_one_error_and_keeps_the_earlier_steps(steps, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from avflow.train import checkpoint as checkpoint_module
    from avflow.utils import DiskError

    def disk_full(state, checkpoint_id):
        try:
            raise OSError(28, "No space left on device")
        except OSError as error:  # DCP reports each rank's failure wrapped, as a BaseException
            raise CheckpointException("save", {0: _wrap_exception(error)}) from error

    monkeypatch.setattr(checkpoint_module.dcp, "save", disk_full)
    _, tensors = load_inference_tensors(steps[1])
    with pytest.raises(DiskError, match=r"step-00000003.tmp: no space left on the device \(OSError: \[Errno 28\]"):
        checkpoint_module.CheckpointManager(steps[0].parent.parent, tensors, keep=2).save(3)
    assert newest_verified_checkpoint(steps[0].parent.parent) == steps[1]


@pytest.mark.parametrize("interruption", [SystemExit(-1), KeyboardInterrupt()])
def test_a_preemption_during_a_save_stops_the_process_as_such(steps, monkeypatch, interruption):
    """submitit requeues a preempted job and exits with SystemExit; DCP catches it on the rank and wraps it. It must
    leave as itself (the job is requeued), not as a checkpoint error (the job would be marked failed)."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from avflow.train import checkpoint as checkpoint_module

    def preempted(state, checkpoint_id):
        try:
            raise interruption
        except BaseException as error:
            raise CheckpointException("save", {0: _wrap_exception(error)}) from error

    monkeypatch.setattr(checkpoint_module.dcp, "save", preempted)
    _, tensors = load_inference_tensors(steps[1])
    with pytest.raises(type(interruption)):
        checkpoint_module.CheckpointManager(steps[0].parent.parent, tensors, keep=2).save(3)
    assert newest_verified_checkpoint(steps[0].parent.parent) == steps[1]


def test_a_step_without_meta_json_is_skipped_with_a_log_line(steps, caplog):
    (steps[1] / "meta.json").unlink()  # copied in part, or an interrupted copy
    with caplog.at_level(logging.WARNING, logger="avflow.train.checkpoint"):
        assert newest_verified_checkpoint(steps[0].parent.parent) == steps[0]
    assert f"skipping checkpoint {steps[1].name}: {steps[1]}: not a complete avflow checkpoint (no meta.json" in \
        caplog.text
