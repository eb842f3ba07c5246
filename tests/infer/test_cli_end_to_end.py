"""The command line end to end on a tiny corpus: corpus -> pack -> train -> generate, and input errors."""

import numpy as np
import pytest
import soundfile

from avflow.cli import main
from avflow.config import load_config

TINY = ["corpus.train_segments=3", "corpus.val_segments=1", "corpus.words_per_segment=[2, 3]",
        "model.d_model=32", "model.n_blocks=1", "model.n_heads=2", "model.ffn_hidden=32",
        "loader.segment_length=64", "trainer.batch_size=2", "trainer.steps=3", "trainer.warmup_steps=1",
        "trainer.val_every=3", "trainer.checkpoint_every=3", "head_vae.ffn_hidden=8", "head_vae.steps=3",
        "head_vae.segment_length=32", "head_vae.batch_size=2", "sample.nfe=2", "sample.num_samples=2",
        "sample.max_frames=64", "sample.window_overlap=8"]  # inputs longer than 0.74 s go through windows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    overrides = TINY + [f"data.root={root / 'data'}", f"loader.shards={root / 'shards'}",
                        f"trainer.run_dir={root / 'run'}"]
    assert main(["corpus", *overrides]) == 0
    assert main(["pack", *overrides]) == 0
    assert main(["pack", "--verify", *overrides]) == 0
    assert main(["train", *overrides]) == 0
    return root / "run" / "checkpoints" / "step-00000003"


def test_generate_from_text_writes_every_output(checkpoint, tmp_path):
    assert main(["generate", "--checkpoint", str(checkpoint), "--text", "hello moon", "-o", str(tmp_path),
                 "--name", "hi"]) == 0
    cfg = load_config(None, TINY)
    for index in range(2):
        audio, rate = soundfile.read(tmp_path / f"hi_s{index}.wav")
        assert rate == cfg.mel.sample_rate
        motion = np.load(tmp_path / f"hi_s{index}.npz")
        frames = len(audio) // cfg.mel.hop_length
        assert motion["expression"].shape == (round(frames / cfg.mel.frame_rate * 30), 256)
        rotation = motion["head_transform"][:, :3, :3]
        assert np.allclose(rotation @ rotation.transpose(0, 2, 1), np.eye(3), atol=1e-4)
        assert (tmp_path / f"hi_s{index}.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp"))


def test_generate_with_the_procedural_face_writes_talking_head_videos(checkpoint, tmp_path):
    import imageio_ffmpeg

    assert main(["generate", "--checkpoint", str(checkpoint), "--text", "moon", "-o", str(tmp_path),
                 "--procedural-face"]) == 0
    audio, rate = soundfile.read(tmp_path / "text_s0.wav")
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "text_s0.mp4"))
    meta = next(reader)
    frames = sum(1 for _ in reader)
    assert meta["size"] == (256, 256) and abs(frames - len(audio) / rate * 30) <= 1
    side = next(imageio_ffmpeg.read_frames(str(tmp_path / "text_samples.mp4")))
    assert side["size"] == (512, 256)  # the 2 samples side by side


def test_generate_from_tokens_file_matches_its_duration(checkpoint, tmp_path):
    tokens = np.random.default_rng(0).standard_normal((2, 100, 29)).astype(np.float32)  # 2 s at 50 Hz
    np.save(tmp_path / "seg.npy", tokens)
    assert main(["generate", "--checkpoint", str(checkpoint), "--tokens", str(tmp_path / "seg.npy"),
                 "-o", str(tmp_path / "out"), "--num-samples", "1"]) == 0
    audio, _ = soundfile.read(tmp_path / "out" / "seg_s0.wav")
    assert len(audio) == int(2.0 * 22050 / 256) * 256
    assert not (tmp_path / "out" / "seg_s1.wav").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--text", "   "], "no letters to speak"),
    (["--text", "snow \u2603"], "unsupported characters"),
    (["--tokens", "missing.npy"], "missing.npy: no such token file"),
    (["--audio", "speech.wav"], "--audio needs --asr-model"),
    (["--text", "hi", "--nfe", "0"], "sample.nfe: expected at least 1"),
])
def test_bad_generate_inputs_fail_with_one_line(checkpoint, tmp_path, capsys, arguments, message):
    assert main(["generate", "--checkpoint", str(checkpoint), "-o", str(tmp_path), *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_bad_tokens_and_foreign_checkpoint(checkpoint, tmp_path, capsys):
    bad = np.zeros((50, 29), dtype=np.float32)
    bad[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert main(["generate", "--checkpoint", str(checkpoint), "--tokens", str(tmp_path / "nan.npy")]) == 2
    assert "NaN" in capsys.readouterr().err
    np.save(tmp_path / "wide.npy", np.zeros((50, 32), dtype=np.float32))
    assert main(["generate", "--checkpoint", str(checkpoint), "--tokens", str(tmp_path / "wide.npy")]) == 2
    assert "expected token logits of shape (M, 29)" in capsys.readouterr().err
    import torch

    torch.save({"model_state_dict": {}}, tmp_path / "foreign.pt")
    assert main(["generate", "--checkpoint", str(tmp_path / "foreign.pt"), "--text", "hi"]) == 2
    assert "not an avflow checkpoint" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--text", "hi"]) == 2
    assert "not a complete avflow checkpoint (no meta.json" in capsys.readouterr().err


def test_generate_from_audio_at_another_sample_rate(checkpoint, tmp_path, tiny_wav2vec2):
    speech = np.random.default_rng(0).standard_normal(int(1.5 * 44100)).astype(np.float32) * 0.1
    soundfile.write(tmp_path / "speech.wav", speech, 44100)
    assert main(["generate", "--checkpoint", str(checkpoint), "--audio", str(tmp_path / "speech.wav"),
                 "--asr-model", str(tiny_wav2vec2), "-o", str(tmp_path / "out"), "--num-samples", "1"]) == 0
    audio, _ = soundfile.read(tmp_path / "out" / "speech_s0.wav")
    assert len(audio) == int(1.5 * 22050 / 256) * 256
