"""`extract_directory`: token files of a whole dataset folder, per channel, batched, resumable."""

import numpy as np
import pytest
import soundfile
import torch

from avflow.config import DataConfig
from avflow.data.asr import CTCTokenizer, extract_directory, recordings
from avflow.data.features import resample
from avflow.data.layouts.a2p import read_record
from avflow.text.token_labels import HF_VOCAB_COLUMNS

transformers = pytest.importorskip("transformers")

TOKEN_DIR = "wav2vec2_fairseq_base_ls960_asr_ls960_vad100"
RECORDINGS = {"a": (48000, 1.5), "b": (22050, 1.0)}  # name: (sample rate, seconds)




@pytest.fixture(scope="module")
def tokenizer(tiny_wav2vec2):
    return CTCTokenizer(tiny_wav2vec2)


@pytest.fixture
def dataset(tmp_path):
    """A 50h-style folder: two stereo wavs at different sample rates, distinct content per channel."""
    (tmp_path / "audio").mkdir()
    for seed, (name, (rate, seconds)) in enumerate(RECORDINGS.items()):
        audio = np.random.default_rng(seed).uniform(-0.5, 0.5, (round(rate * seconds), 2))
        soundfile.write(tmp_path / "audio" / f"{name}.wav", audio, rate, subtype="FLOAT")
    return tmp_path


def test_every_channel_is_extracted_at_50_hz(dataset, tiny_wav2vec2, tokenizer):
    assert extract_directory(dataset, tiny_wav2vec2, progress=False) == {"written": 2, "skipped": 0}
    for name, (rate, seconds) in RECORDINGS.items():
        tokens = np.load(dataset / TOKEN_DIR / f"{name}.npy", allow_pickle=False)
        assert tokens.dtype == np.float32 and tokens.shape[0] == 2 and tokens.shape[2] == 29
        assert abs(tokens.shape[1] - seconds * 50) <= 2
        audio, _ = soundfile.read(dataset / "audio" / f"{name}.wav", dtype="float32", always_2d=True)
        speech = resample(audio.T, rate, 16000)
        for channel in range(2):
            np.testing.assert_allclose(tokens[channel], tokenizer.logits(speech[channel]), atol=1e-5)
        assert not np.allclose(tokens[0], tokens[1])


def test_columns_follow_the_published_label_order(dataset, tiny_wav2vec2, tokenizer):
    extract_directory(dataset, tiny_wav2vec2, progress=False)
    tokens = np.load(dataset / TOKEN_DIR / "a.npy")
    audio, _ = soundfile.read(dataset / "audio" / "a.wav", dtype="float32")
    channel = resample(audio[:, 1], 48000, 16000)
    normalized = torch.from_numpy((channel - channel.mean()) / np.sqrt(channel.var() + 1e-7))
    with torch.no_grad():
        full = tokenizer.model(normalized[None]).logits[0].numpy()
    assert list(HF_VOCAB_COLUMNS) == [0, *range(4, 32)]
    np.testing.assert_allclose(tokens[1], full[:, HF_VOCAB_COLUMNS], atol=1e-4)


def test_a_second_run_skips_and_broken_outputs_are_redone(dataset, tiny_wav2vec2):
    extract_directory(dataset, tiny_wav2vec2, progress=False)
    first = {name: np.load(dataset / TOKEN_DIR / f"{name}.npy") for name in RECORDINGS}
    stamps = {name: (dataset / TOKEN_DIR / f"{name}.npy").stat().st_mtime_ns for name in RECORDINGS}
    assert extract_directory(dataset, tiny_wav2vec2, progress=False) == {"written": 0, "skipped": 2}
    assert stamps == {name: (dataset / TOKEN_DIR / f"{name}.npy").stat().st_mtime_ns for name in RECORDINGS}

    truncated = dataset / TOKEN_DIR / "a.npy"
    truncated.write_bytes(truncated.read_bytes()[:500])
    assert extract_directory(dataset, tiny_wav2vec2, progress=False) == {"written": 1, "skipped": 1}
    np.testing.assert_array_equal(np.load(truncated), first["a"])

    for broken in (first["b"][:1], first["b"][:, :-5], first["b"].astype(np.float64), np.array(["text"])):
        np.save(dataset / TOKEN_DIR / "b.npy", broken)
        assert extract_directory(dataset, tiny_wav2vec2, progress=False) == {"written": 1, "skipped": 1}
        np.testing.assert_array_equal(np.load(dataset / TOKEN_DIR / "b.npy"), first["b"])
    assert sorted(path.name for path in (dataset / TOKEN_DIR).iterdir()) == ["a.npy", "b.npy"]  # no temp files left


def test_batched_chunks_match_one_at_a_time(tokenizer):
    audio = np.random.default_rng(3).uniform(-0.5, 0.5, (2, 16000 * 2 + 100)).astype(np.float32)
    batched = tokenizer.channel_logits(audio, chunk_seconds=0.5, batch_size=3)
    single = tokenizer.channel_logits(audio, chunk_seconds=0.5, batch_size=1)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert batched.shape[1] == tokenizer.expected_frames(audio.shape[1], 0.5)
    assert tokenizer.chunk_bounds(audio.shape[1], 0.5)[-1] == (24000, 32100)  # a 100-sample tail joins its neighbour


def test_too_short_audio_is_an_error_naming_the_file(dataset, tiny_wav2vec2, tokenizer):
    field = tokenizer.receptive_field
    assert field == 345 and tokenizer.frames(field) == 1 and tokenizer.frames(field - 1) == 0
    soundfile.write(dataset / "audio" / "c.wav", np.zeros((100, 2)), 16000)
    with pytest.raises(ValueError, match=r"c\.wav: audio of 100 samples .* expected at least 345"):
        extract_directory(dataset, tiny_wav2vec2, progress=False)


def test_a2p_subject_folder_gets_tokens_its_reader_accepts(tmp_path, tiny_wav2vec2):
    subject = tmp_path / "TXB805"
    subject.mkdir()
    frames = 45
    rng = np.random.default_rng(4)
    soundfile.write(subject / "scene01_audio.wav", rng.uniform(-0.5, 0.5, (frames * 1600, 2)), 48000)
    np.save(subject / "scene01_body_pose.npy", np.zeros((frames, 104), dtype=np.float32))
    np.save(subject / "scene01_face_expression.npy", np.zeros((frames, 256), dtype=np.float32))
    np.save(subject / "scene01_missing_face_frames.npy", np.array([], dtype=np.int64))
    assert recordings(subject, "a2p") == [(subject / "scene01_audio.wav", subject / TOKEN_DIR / "scene01.npy")]
    assert extract_directory(subject, tiny_wav2vec2, layout="a2p", progress=False) == {"written": 1, "skipped": 0}
    record = read_record(subject, "scene01", DataConfig(layout="a2p"))
    assert record.tokens.shape[:2] == (2, 74) and record.tokens.dtype == np.float32


def test_layout_errors(tmp_path, tiny_wav2vec2):
    with pytest.raises(FileNotFoundError, match="no audio folder"):
        extract_directory(tmp_path, tiny_wav2vec2, progress=False)
    with pytest.raises(ValueError, match="^layout: expected one of 50h, a2p, manifest, got 'x'$"):
        recordings(tmp_path, "x")
