"""Checkpoints: resume gives the uninterrupted run's next-step loss and final weights; failures are safe."""

from pathlib import Path

import pytest
import torch
from helpers import check_resume_matches_uninterrupted, packed_tiny_corpus, run_steps

from avflow.config import CorpusConfig, load_config
from avflow.train import checkpoint as checkpoint_module
from avflow.train.checkpoint import (
    CheckpointError,
    consolidate,
    latest_checkpoint,
    list_checkpoints,
    load_inference_tensors,
    read_meta,
)
from avflow.train.loop import Trainer

TINY = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48", "loader.segment_length=24",
        "trainer.batch_size=3", "trainer.steps=6", "trainer.warmup_steps=2", "trainer.checkpoint_every=3",
        "trainer.val_every=3", "trainer.lr=1e-3", "head_vae.ffn_hidden=8", "head_vae.steps=2",
        "head_vae.segment_length=16", "head_vae.batch_size=2", "corpus.train_segments=3", "corpus.val_segments=1",
        "corpus.words_per_segment=[2, 3]"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A packed tiny corpus and a head VAE shared by every run, so only the main model trains."""
    return packed_tiny_corpus(tmp_path_factory.mktemp("data"), TINY)


def config(shards, run_dir, *extra):
    return load_config(None, TINY + shards + [f"trainer.run_dir={run_dir}", *extra])


def test_resume_matches_uninterrupted_run(tmp_path, shards):
    check_resume_matches_uninterrupted(lambda run_dir: config(shards, run_dir), tmp_path, 6)


def test_fit_writes_checkpoints_and_keeps_last_k(tmp_path, shards):
    cfg = config(shards, tmp_path / "run", "trainer.keep_checkpoints=1", "trainer.steps=7")
    final = Trainer(cfg, progress=False).fit()
    assert final.name == "step-00000007"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000007"]
    meta = read_meta(final)
    assert meta["step"] == 7 and meta["config"]["trainer"]["steps"] == 7
    assert (tmp_path / "run" / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for part in ("loss", "loss_expression", "loss_head", "loss_mel"):
        assert f"train/{part}" in tags and f"val/{part}" in tags
    assert {"train/lr", "train/grad_norm", "train/frames_per_s", "train/bad_samples", "train/step_time_s",
            "train/data_wait_s"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6, 7]
    assert "val/sample_audio" in events.Tags()["audio"] and "val/sample" in events.Tags()["images"]


def test_existing_run_needs_resume_and_same_model(tmp_path, shards):
    Trainer(config(shards, tmp_path / "run"), progress=False).save()
    with pytest.raises(FileExistsError, match="pass --resume"):
        Trainer(config(shards, tmp_path / "run"), progress=False)
    with pytest.raises(ValueError,
                       match=r"checkpoint of another model config \(model.d_model: checkpoint 32 vs config 64"):
        Trainer(config(shards, tmp_path / "run", "model.d_model=64"), resume=True, progress=False)


def _rewrite_in_first_layout(step_dir: Path, tmp_path: Path) -> None:
    """Rewrite a step directory as checkpoints were written before every training state went through DCP:
    the scheduler, the loader positions (one per rank) and the step in meta.json, the CPU random state as the
    tensor `rng_rank0`, no "layout" key."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir, tmp_path / "whole.pt")
    state = torch.load(tmp_path / "whole.pt", weights_only=False)
    meta = json.loads((step_dir / "meta.json").read_text())
    meta.pop("layout")
    meta.pop("files")  # checked by the checksum tests; here the layout is what matters
    meta.update(scheduler=state.pop("scheduler"), loader=[state.pop("loader_rank0")])
    assert state.pop("train_state") == {"step": meta["step"]}
    state["rng_rank0"] = state.pop("rng_rank0")["cpu"]
    for file in step_dir.iterdir():
        file.unlink()
    dcp.save(state, checkpoint_id=step_dir)
    (step_dir / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_of_the_first_layout_resumes_like_an_uninterrupted_run(tmp_path, shards, caplog):
    import logging

    uninterrupted = Trainer(config(shards, tmp_path / "a"), progress=False)
    losses = run_steps(uninterrupted, 6)
    interrupted = Trainer(config(shards, tmp_path / "b"), progress=False)
    run_steps(interrupted, 3)
    _rewrite_in_first_layout(interrupted.save(), tmp_path)
    torch.manual_seed(12345)
    with caplog.at_level(logging.WARNING, logger="avflow.train.checkpoint"):
        resumed = Trainer(config(shards, tmp_path / "b"), resume=True, progress=False)
    assert "restored from its meta.json" in caplog.text
    assert resumed.step == 3 and run_steps(resumed, 3) == losses[3:]
    for name, value in uninterrupted.engine.full_model_state_dict().items():
        assert torch.equal(value, resumed.engine.full_model_state_dict()[name]), name


def test_an_incomplete_first_layout_checkpoint_is_one_clear_error(tmp_path, shards):
    import json

    trainer = Trainer(config(shards, tmp_path / "run"), progress=False)
    step_dir = trainer.save()
    _rewrite_in_first_layout(step_dir, tmp_path)
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta["scheduler"]
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"step-00000000: neither a current checkpoint nor a complete earlier "
                                              r"one \(its meta.json lacks 'scheduler'\)"):
        Trainer(config(shards, tmp_path / "run"), resume=True, progress=False)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, shards, monkeypatch):
    trainer = Trainer(config(shards, tmp_path / "run"), progress=False)
    good = trainer.save()
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    run_steps(trainer, 1)

    def crash(state, checkpoint_id):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.dcp, "save", crash)
    with pytest.raises(OSError):
        trainer.save()
    assert latest_checkpoint(tmp_path / "run") == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    monkeypatch.undo()
    resumed = Trainer(config(shards, tmp_path / "run"), resume=True, progress=False)
    assert resumed.step == 0


def test_consolidated_file_loads_without_pickle_and_generates_like_the_directory(tmp_path, shards):
    from avflow.infer.model import load_inference_model

    path = Trainer(config(shards, tmp_path / "run", "trainer.steps=2"), progress=False).fit()
    single = consolidate(path, tmp_path / "model.safetensors")
    from_dir, from_file = load_inference_model(path, "cpu"), load_inference_model(single, "cpu")
    for name, value in from_dir.net.state_dict().items():
        assert torch.equal(value, from_file.net.state_dict()[name]), name
    assert torch.equal(from_dir.pose_std, from_file.pose_std)
    assert from_file.cfg == from_dir.cfg
    # the run set corpus options; tool options describe no model, so neither file records them
    assert not {"pack", "corpus"} & read_meta(path)["config"].keys()
    assert from_file.cfg.corpus == CorpusConfig() != config(shards, tmp_path).corpus
    (tmp_path / "other.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="other.safetensors: not an avflow checkpoint"):
        load_inference_tensors(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a complete avflow checkpoint"):
        read_meta(tmp_path)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, shards, monkeypatch):
    from avflow.train import tasks

    real_loss, calls = tasks.flow_matching_loss, []

    def loss_turning_nan(*args, **kwargs):
        total, parts = real_loss(*args, **kwargs)
        calls.append(1)
        return (total * float("nan"), parts) if len(calls) == 5 else (total, parts)

    monkeypatch.setattr(tasks, "flow_matching_loss", loss_turning_nan)
    with pytest.raises(FloatingPointError, match="step 4: the loss is nan on at least one rank; stopping with the last "
                                                 "good checkpoint intact"):
        Trainer(config(shards, tmp_path / "run", "trainer.val_every=1000"), progress=False).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000003"]
    assert read_meta(tmp_path / "run" / "checkpoints" / "step-00000003")["step"] == 3


def test_random_state_resumes_across_cpu_and_cuda(tmp_path, monkeypatch, caplog):
    """A run written on CPU resumes on CUDA and the other way round; a CUDA state is restored on CUDA. The CUDA
    calls are stand-ins here: the point is what DCP stores and hands back, not the device."""
    import logging

    import torch.distributed.checkpoint as dcp

    from avflow.train.checkpoint import RNGState

    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(state.clone()))
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    torch.manual_seed(1)
    expected_cpu = torch.get_rng_state()
    dcp.save({"rng": RNGState(cpu)}, checkpoint_id=tmp_path / "on-cpu")
    dcp.save({"rng": RNGState(cuda)}, checkpoint_id=tmp_path / "on-cuda")

    torch.manual_seed(2)
    with caplog.at_level(logging.WARNING, logger="avflow.train.checkpoint"):
        dcp.load({"rng": RNGState(cuda)}, checkpoint_id=tmp_path / "on-cpu")
    assert torch.equal(torch.get_rng_state(), expected_cpu) and restored == []
    assert "holds no CUDA random state" in caplog.text
    dcp.load({"rng": RNGState(cuda)}, checkpoint_id=tmp_path / "on-cuda")
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
    torch.manual_seed(3)
    dcp.load({"rng": RNGState(cpu)}, checkpoint_id=tmp_path / "on-cuda")
    assert torch.equal(torch.get_rng_state(), expected_cpu) and len(restored) == 1


def test_a_checkpoint_of_an_unknown_layout_is_one_clear_error(tmp_path, shards):
    import json

    step_dir = Trainer(config(shards, tmp_path / "run"), progress=False).save()
    meta = json.loads((step_dir / "meta.json").read_text())
    meta.update(layout=3)
    meta.pop("files")
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"step-00000000: state layout 3; this avflow reads layout 2"):
        Trainer(config(shards, tmp_path / "run"), resume=True, progress=False)
