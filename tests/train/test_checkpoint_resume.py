"""Checkpoints: resume gives the uninterrupted run's next-step loss and final weights; failures are safe."""

import numpy as np
import pytest
import torch

from avflow.config import load_config
from avflow.model.state import StateCodec
from avflow.train import checkpoint as checkpoint_module
from avflow.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from avflow.train.head_vae import train_head_vae
from avflow.train.loop import Trainer
from avflow.train.prepare import PreparedData

TINY = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48", "data.segment_length=24",
        "trainer.batch_size=3", "trainer.steps=6", "trainer.warmup_steps=2", "trainer.checkpoint_every=3",
        "trainer.val_every=3", "trainer.lr=1e-3", "head_vae.ffn_hidden=8", "head_vae.steps=2",
        "head_vae.segment_length=16", "head_vae.batch_size=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = load_config(None, TINY)
    vae_path = tmp_path_factory.mktemp("vae") / "head_vae.pt"
    rng = np.random.default_rng(0)
    train_head_vae([rng.standard_normal((40, 7)).astype(np.float32)], cfg.head_vae, vae_path, progress=False)
    width = cfg.model.state_dim + cfg.model.cond_dim

    def segment(frames):
        values = torch.from_numpy(rng.standard_normal((frames, width)).astype(np.float32))
        return torch.cat([values, torch.ones(frames, 1)], dim=-1)

    codec = StateCodec(torch.zeros(cfg.model.expression_dim), torch.ones(cfg.model.expression_dim), -5.5, 2.1, cfg.model)
    return PreparedData([segment(50), segment(30), segment(20)], [segment(26)], ["val"], codec, vae_path)


def config(run_dir, *extra):
    return load_config(None, TINY + [f"trainer.run_dir={run_dir}", *extra])


def run_steps(trainer, count):
    losses = []
    for _ in range(count):
        losses.append(trainer.train_step(trainer.step)["loss"])
        trainer.step += 1
    return losses


def test_resume_matches_uninterrupted_run(tmp_path, data):
    uninterrupted = Trainer(config(tmp_path / "a"), progress=False, data=data)
    losses = run_steps(uninterrupted, 6)

    interrupted = Trainer(config(tmp_path / "b"), progress=False, data=data)
    assert run_steps(interrupted, 3) == losses[:3]
    interrupted.save()
    torch.manual_seed(12345)  # a fresh process would have different global RNG state
    resumed = Trainer(config(tmp_path / "b"), resume=True, progress=False, data=data)
    assert resumed.step == 3
    assert run_steps(resumed, 3) == losses[3:]
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in uninterrupted.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[name]), name


def test_fit_writes_checkpoints_and_keeps_last_k(tmp_path, data):
    cfg = config(tmp_path / "run", "trainer.keep_checkpoints=1", "trainer.steps=7")
    final = Trainer(cfg, progress=False, data=data).fit()
    assert final.name == "step-00000007.pt"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000007.pt"]
    payload = load_checkpoint(final)
    assert payload["step"] == 7 and payload["config"]["trainer"]["steps"] == 7
    assert (tmp_path / "run" / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for part in ("loss", "loss_expression", "loss_head", "loss_mel"):
        assert f"train/{part}" in tags and f"val/{part}" in tags
    assert {"train/lr", "train/grad_norm", "train/frames_per_s"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6, 7]


def test_existing_run_needs_resume_and_same_model(tmp_path, data):
    Trainer(config(tmp_path / "run"), progress=False, data=data).save()
    with pytest.raises(FileExistsError, match="pass --resume"):
        Trainer(config(tmp_path / "run"), progress=False, data=data)
    with pytest.raises(ValueError, match=r"checkpoint of another model config \(model.d_model: checkpoint 32 vs config 64"):
        Trainer(config(tmp_path / "run", "model.d_model=64"), resume=True, progress=False, data=data)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch):
    trainer = Trainer(config(tmp_path / "run"), progress=False, data=data)
    good = trainer.save()
    before = good.read_bytes()
    run_steps(trainer, 1)

    def crash(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        trainer.save()
    assert latest_checkpoint(tmp_path / "run") == good and good.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [good.name]


def test_checkpoints_load_with_weights_only(tmp_path, data):
    path = Trainer(config(tmp_path / "run"), progress=False, data=data).save()
    assert torch.load(path, weights_only=True)["format"] == checkpoint_module.FORMAT
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="other.pt: not a loadable torch checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
