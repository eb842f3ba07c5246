"""Head-VAE training, checkpoint format and loading checks."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from helpers import packed_tiny_corpus

from avflow.config import HeadVAEConfig, load_config
from avflow.model.head_vae import HeadVAE, PoseDecoder
from avflow.model.io import load_head_vae
from avflow.train.batches import build_batch_encoder, ensure_head_vae
from avflow.train.head_vae import train_head_vae
from avflow.utils import load_torch, save_torch_atomic

TINY = HeadVAEConfig(ffn_hidden=64, dropout=0.0, steps=300, batch_size=16, segment_length=32, lr=3e-3)
RAW_OFFSET = np.array([0.9, 0.1, -0.2, 0.05, 0.0, 1.5, -30.0])  # quaternion-like, then translation-like
RAW_SCALE = np.array([0.05, 0.1, 0.1, 0.08, 2.0, 1.0, 5.0])


def smooth_poses(seed: int, count: int) -> list[np.ndarray]:
    """Raw 7-d poses at 30 fps: per-channel offset + scale times a sum of three slow sinusoids.

    Lengths 20..89 frames, so some segments are shorter than the 32-frame crop and get padded.
    """
    rng = np.random.default_rng(seed)
    segments = []
    for _ in range(count):
        seconds = np.arange(int(rng.integers(20, 90))) / 30.0
        freqs = rng.uniform(0.1, 0.6, size=(3, 1, 1))
        phases = rng.uniform(0, 2 * np.pi, size=(3, 1, 7))
        amplitudes = rng.normal(size=(3, 1, 7))
        wave = (amplitudes * np.sin(2 * np.pi * freqs * seconds[None, :, None] + phases)).sum(axis=0)
        segments.append(RAW_OFFSET + RAW_SCALE * wave)
    return segments


def encoded(vae, mean, std, pose: np.ndarray) -> torch.Tensor:
    """The head target the batch encoder trains on: mu of the z-normalized pose, (1, T, latent_dim)."""
    with torch.no_grad():
        return vae.eval().encode(((torch.from_numpy(pose).float() - mean) / std)[None])[0]


def normalized_round_trip_error(vae, mean, std, segments) -> float:
    """Mean squared decode(encode(x)) error in z-normalized units, so every channel counts alike."""
    decoder = PoseDecoder(vae, mean, std)
    errors = [np.mean(((decoder(encoded(vae, mean, std, pose))[0].numpy() - pose) / std.numpy()) ** 2)
              for pose in segments]
    return float(np.mean(errors))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    poses = smooth_poses(seed=0, count=40)
    path = tmp_path_factory.mktemp("head_vae") / "head_vae.pt"
    summary = train_head_vae(poses, TINY, path, seed=0, progress=False)
    return poses, path, summary


def test_training_beats_untrained_and_round_trips_held_out_poses(trained):
    _, path, summary = trained
    vae, mean, std = load_head_vae(path)
    torch.manual_seed(0)
    untrained = HeadVAE(TINY)
    held_out = smooth_poses(seed=1, count=6)
    before = normalized_round_trip_error(untrained, mean, std, held_out)
    after = normalized_round_trip_error(vae, mean, std, held_out)
    assert after < 0.3 * before
    assert after < 0.05
    assert summary["steps"] == TINY.steps
    assert summary["final_recon_loss"] < 0.05


def test_checkpoint_holds_weights_stats_and_config(trained):
    poses, path, _ = trained
    checkpoint = load_torch(path)
    assert set(checkpoint) == {"model_state_dict", "pose_mean", "pose_std", "config"}
    frames = np.concatenate(poses)
    np.testing.assert_allclose(checkpoint["pose_mean"].numpy(), frames.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(checkpoint["pose_std"].numpy(), frames.std(axis=0), rtol=1e-5)
    assert checkpoint["config"] == dataclasses.asdict(TINY)


def test_several_identities_are_each_normalized_with_their_own_statistics(tmp_path):
    """Two people whose raw poses differ in level and spread: the file keeps each one's statistics (a row each,
    sorted by name), and the VAE round-trips both in the one normalized space the batch encoder feeds it."""
    anna, ben = smooth_poses(seed=4, count=20), smooth_poses(seed=5, count=20)
    ben = [3.0 * pose + 10.0 for pose in ben]
    path = tmp_path / "two.pt"
    train_head_vae(ben + anna, TINY, path, seed=0, progress=False, identities=["ben"] * 20 + ["anna"] * 20)
    checkpoint = load_torch(path)
    assert checkpoint["identities"] == ["anna", "ben"]
    vae, mean, std = load_head_vae(path)
    for row, poses in enumerate((anna, ben)):
        frames = np.concatenate(poses)
        np.testing.assert_allclose(mean[row].numpy(), frames.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(std[row].numpy(), frames.std(axis=0), rtol=1e-5)
        assert normalized_round_trip_error(vae, mean[row], std[row], poses) < 0.05


def test_identity_names_must_match_the_segments(tmp_path):
    with pytest.raises(ValueError, match=r"identities: expected one name per pose segment \(2\), got 1"):
        train_head_vae([np.zeros((10, 7))] * 2, TINY, tmp_path / "x.pt", progress=False, identities=["anna"])


def test_save_load_round_trip_gives_identical_encodings(tmp_path):
    cfg = HeadVAEConfig(pose_dim=4, ffn_hidden=32)
    torch.manual_seed(3)
    vae = HeadVAE(cfg).eval()
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.9]), torch.tensor([0.5, 0.2, 0.1, 0.05])
    path = tmp_path / "vae.pt"
    save_torch_atomic(
        {"model_state_dict": vae.state_dict(), "pose_mean": mean, "pose_std": std, "config": dataclasses.asdict(cfg)},
        path,
    )
    loaded, loaded_mean, loaded_std = load_head_vae(path)
    pose = np.random.default_rng(0).normal(size=(25, 4))
    assert not loaded.training
    assert torch.equal(loaded_mean, mean) and torch.equal(loaded_std, std)
    assert torch.equal(encoded(loaded, loaded_mean, loaded_std, pose), encoded(vae, mean, std, pose))


def test_constant_channel_gets_floored_std(tmp_path):
    poses = [np.ones((10, 7)), np.ones((5, 7))]
    train_head_vae(poses, dataclasses.replace(TINY, steps=2, batch_size=2), tmp_path / "flat.pt", progress=False)
    assert torch.all(load_torch(tmp_path / "flat.pt")["pose_std"] == torch.tensor(1e-6))


def test_same_seed_same_checkpoint_and_tensorboard_scalars(tmp_path):
    poses = smooth_poses(seed=2, count=3)
    cfg = dataclasses.replace(TINY, steps=3, batch_size=4)
    train_head_vae(poses, cfg, tmp_path / "a.pt", seed=5, progress=False, log_dir=tmp_path / "logs")
    train_head_vae(poses, cfg, tmp_path / "b.pt", seed=5, progress=False)
    first, second = load_torch(tmp_path / "a.pt"), load_torch(tmp_path / "b.pt")
    for name, value in first["model_state_dict"].items():
        assert torch.equal(value, second["model_state_dict"][name]), name
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_misshaped_weight_is_named(tmp_path):
    state = HeadVAE(HeadVAEConfig()).state_dict()
    state["fc_mu.weight"] = torch.zeros(8, 15)
    del state["final_layer.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    save_torch_atomic({"model_state_dict": state, "pose_mean": torch.zeros(7), "pose_std": torch.ones(7)}, path)
    with pytest.raises(ValueError) as raised:
        load_head_vae(path)
    message = str(raised.value)
    assert "fc_mu.weight (8, 15) (expected (8, 16))" in message
    assert "missing: final_layer.bias" in message
    assert "unexpected: extra.weight" in message
    assert str(path) in message


def test_published_file_without_stats_asks_for_headpose_stats(tmp_path):
    path = tmp_path / "iter-0500000.pt"
    save_torch_atomic({"model_state_dict": HeadVAE(HeadVAEConfig(pose_dim=4)).state_dict()}, path)
    with pytest.raises(ValueError, match="--headpose-stats") as raised:
        load_head_vae(path, HeadVAEConfig(pose_dim=4))
    assert str(path) in str(raised.value)


def test_bad_training_segment_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"poses\[1\]: expected shape \(frames >= 1, 7\), got \(10, 4\)"):
        train_head_vae([np.zeros((10, 7)), np.zeros((10, 4))], TINY, tmp_path / "x.pt", progress=False)


def test_training_runs_the_head_vae_as_a_stage_of_its_own_and_loading_never_trains(tmp_path, caplog):
    """ensure_head_vae says in the log what it does: trains <run_dir>/head_vae.pt once, reuses it on the next
    run, takes trainer.head_vae as given; build_batch_encoder only loads, so it cannot train as a side effect."""
    tiny = ["head_vae.ffn_hidden=8", "head_vae.steps=2", "head_vae.segment_length=16", "head_vae.batch_size=2",
            "corpus.train_segments=2", "corpus.val_segments=1", "corpus.words_per_segment=[2, 3]"]
    data = [o for o in packed_tiny_corpus(tmp_path / "data", tiny) if not o.startswith("trainer.head_vae=")]
    cfg = load_config(None, tiny + data + [f"trainer.run_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError):
        build_batch_encoder(cfg, tmp_path / "run" / "head_vae.pt", torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="avflow.train.batches"):
        trained = ensure_head_vae(cfg, progress=False)
        first = trained.stat().st_mtime_ns
        assert ensure_head_vae(cfg, progress=False) == trained and trained.stat().st_mtime_ns == first
    messages = [record.getMessage() for record in caplog.records if record.name == "avflow.train.batches"]
    assert messages == [f"head-pose VAE stage: training it into {trained} first (`avflow train-head-vae` runs this "
                        "stage alone)", f"head-pose VAE: reusing {trained}"]
    assert build_batch_encoder(cfg, trained, torch.device("cpu")).head_vae.cfg.ffn_hidden == 8


def test_a_run_dir_under_a_file_fails_before_the_head_vae_trains(tmp_path, monkeypatch):
    from avflow.train import batches

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder's parent should be")
    trained = []
    monkeypatch.setattr(batches, "train_head_vae_stage", lambda *args: trained.append(args))
    cfg = load_config(None, [f"trainer.run_dir={blocker / 'run'}"])
    with pytest.raises(NotADirectoryError, match=f"trainer.run_dir={blocker / 'run'}: cannot be a folder"):
        ensure_head_vae(cfg, progress=False)
    assert trained == [] and blocker.read_text().startswith("a file")
