"""Text-to-tokens training under the shared Trainer, and inference through load_text2tokens."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import check_resume_matches_uninterrupted

from avflow.config import load_config
from avflow.data.layouts.fifty_h import is_validation
from avflow.infer.text2tokens import load_text2tokens
from avflow.text.normalize import normalize_text
from avflow.text.transcripts import greedy_transcript
from avflow.train.checkpoint import consolidate
from avflow.train.loop import Trainer
from avflow.train.text2tokens import prepare_examples

TINY = ["task=text2tokens", "text2tokens.front_end=character", "text2tokens.d_model=16", "text2tokens.n_heads=2",
        "text2tokens.encoder_layers=1", "text2tokens.ffn_hidden=16", "text2tokens.duration_hidden=16",
        "text2tokens.decoder_layers=1", "text2tokens.decoder_window=4", "text2tokens.duration_rounding=cumulative",
        "text2tokens.nfe=3", "trainer.batch_size=2", "trainer.steps=4", "trainer.warmup_steps=1",
        "trainer.checkpoint_every=2", "trainer.val_every=2", "trainer.lr=1e-3", "corpus.train_segments=3",
        "corpus.val_segments=2", "corpus.words_per_segment=[2, 3]"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from avflow.data.corpus import write_corpus
    from avflow.data.pack import pack

    root = tmp_path_factory.mktemp("data")
    data = [f"data.root={root / 'corpus'}", f"loader.shards={root / 'shards'}"]
    cfg = load_config(None, TINY + data)
    write_corpus(cfg.data.root, cfg.corpus)
    pack(cfg, cfg.loader.shards, progress=False)
    return data


def config(shards, run_dir, *extra):
    return load_config(None, TINY + shards + [f"trainer.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    checkpoint = Trainer(config(shards, run_dir), progress=False).fit()
    consolidate(checkpoint, run_dir / "t2t.safetensors")
    return checkpoint, run_dir / "t2t.safetensors"


def test_examples_come_from_the_shards_own_tokens(shards):
    cfg = config(shards, "unused")
    transcripts = json.loads((Path(cfg.data.root) / "transcripts.json").read_text())
    for split in ("train", "val"):
        examples, skipped = prepare_examples(cfg.loader.shards, split, cfg)
        names = sorted(n for n in transcripts if is_validation(n, cfg.data.val_patterns) == (split == "val"))
        assert skipped == 0
        assert [e.text for e in examples] == [normalize_text(transcripts[n]) for n in names]
        for example in examples:
            assert example.durations.min() >= 1 and example.durations.sum() == len(example.tokens)
            assert greedy_transcript(example.tokens) == example.text


def test_resume_matches_the_uninterrupted_run(shards, tmp_path):
    check_resume_matches_uninterrupted(lambda run_dir: config(shards, run_dir), tmp_path, 4)


def test_auto_front_end_is_recorded_as_what_was_used(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PHONEMIZER_ESPEAK_LIBRARY", str(tmp_path / "missing.so"))  # no espeak-ng: auto means characters
    trainer = Trainer(config(shards, tmp_path / "run", "text2tokens.front_end=auto"), progress=False)
    assert trainer.cfg.text2tokens.front_end == "character"
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["task"] == "text2tokens" and saved["text2tokens"]["front_end"] == "character"


def test_consolidated_file_and_step_directory_generate_the_same(trained):
    directory, file = trained
    a = load_text2tokens(directory).token_logits("hello there", seed=5)
    b = load_text2tokens(file).token_logits("hello there", seed=5)
    assert a.dtype == np.float32 and a.shape[1] == 29
    assert np.array_equal(a, b)
    assert not np.array_equal(a, load_text2tokens(file).token_logits("hello there", seed=6))


def predicted_frames(model, text):
    """Predicted frames per input symbol at rate 1, straight from the network."""
    from avflow.text.phonemes import sequence_symbols

    words = normalize_text(text).split()
    symbols, _ = sequence_symbols(model.front_end.word_symbols(words))
    ids = torch.tensor([model.index[s] for s in symbols])
    _, log_durations = model.net.encode(ids[None], torch.ones(1, len(ids), dtype=torch.bool))
    return symbols, np.exp(log_durations[0].double().detach().numpy())


def test_rate_and_pause_scale_set_the_length(trained):
    model = load_text2tokens(trained[1])
    symbols, frames = predicted_frames(model, "hello there")
    silence = np.array([s.startswith("<") for s in symbols])
    for rate, pause in [(1.0, 1.0), (2.0, 1.0), (0.5, 1.0), (1.0, 3.0), (1.5, 0.5)]:
        scaled = np.where(silence, frames * pause, frames) / rate
        expected = max(round(scaled.sum()), len(symbols))  # cumulative rounding keeps the rounded total
        assert model.token_logits("hello there", rate=rate, pause_scale=pause).shape[0] == expected


def test_punctuation_lengthens_the_gap_after_it(trained):
    model = load_text2tokens(trained[1])
    _, frames = predicted_frames(model, "hello there")
    pause = model.cfg.text2tokens.short_pause_s * model.frame_rate
    assert model.token_logits("hello, there").shape[0] == round(frames.sum() + pause)


def test_long_text_is_generated_sentence_by_sentence(trained):
    model = load_text2tokens(trained[1])
    sentences = ["hello there", "my friend", "how are you"]
    model.cfg.text2tokens.max_symbols = 14  # each sentence fits (at most 13 symbols), no two do
    # The sentence-end pause lengthens each piece's final silence, so generate the pieces with it too.
    alone = [model.token_logits(s + ".").shape[0] for s in sentences]
    assert model.token_logits(". ".join(sentences) + ".").shape[0] == sum(alone)


@pytest.mark.parametrize("text, message", [
    ("", "empty or whitespace only"), (" \t\n", "empty or whitespace only"), ("?! ...", "no letters to speak"),
    ("hello \u2603 there", "unsupported characters '\u2603'"),
])
def test_bad_text_is_refused_with_a_clear_error(trained, text, message):
    with pytest.raises(ValueError, match=message):
        load_text2tokens(trained[1]).token_logits(text)


@pytest.mark.parametrize("kwargs, message", [({"rate": 0.0}, "rate"), ({"pause_scale": -1.0}, "pause_scale"),
                                             ({"temperature": -0.1}, "temperature")])
def test_bad_controls_are_refused(trained, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_text2tokens(trained[1]).token_logits("hello", **kwargs)


def test_a_small_model_reads_back_held_out_sentences(tmp_path):
    """The done-criterion in cheap form: 16 training sentences, 600 steps (about 30 s on 2 cores); the greedy
    CTC decoding of what it generates for 6 unseen sentences has CER < 5%, and its total length is within
    10% of the corpus's."""
    from avflow.data.corpus import write_corpus
    from avflow.data.pack import pack
    from avflow.data.shard_index import iter_split_arrays
    from avflow.infer.text2tokens import evaluate_text2tokens

    cfg = load_config(None, [
        "task=text2tokens", "text2tokens.front_end=character", "text2tokens.d_model=48", "text2tokens.n_heads=2",
        "text2tokens.encoder_layers=2", "text2tokens.ffn_hidden=96", "text2tokens.duration_hidden=32",
        "text2tokens.decoder_layers=2", "text2tokens.decoder_window=8", "text2tokens.duration_rounding=cumulative",
        "trainer.batch_size=8", "trainer.steps=600", "trainer.warmup_steps=20", "trainer.lr=3e-3",
        "trainer.val_every=1000", "trainer.checkpoint_every=1000", "trainer.ema_decay=0.95",
        "corpus.train_segments=16", "corpus.val_segments=6", f"data.root={tmp_path / 'corpus'}",
        f"loader.shards={tmp_path / 'shards'}", f"trainer.run_dir={tmp_path / 'run'}"])
    write_corpus(cfg.data.root, cfg.corpus)
    pack(cfg, cfg.loader.shards, progress=False)
    model = load_text2tokens(Trainer(cfg, progress=False).fit())
    transcripts = json.loads((Path(cfg.data.root) / "transcripts.json").read_text())
    held_out = sorted(name for name in transcripts if is_validation(name, cfg.data.val_patterns))
    frames = [arrays["tokens"].shape[0] for arrays in iter_split_arrays(cfg.loader.shards, "val", ("tokens",))]
    scores = evaluate_text2tokens(model, [transcripts[name] for name in held_out], frames)
    assert scores["cer"] < 0.05 and scores["duration_error"] < 0.10, scores


def test_one_export_directory_serves_text_through_its_text_to_tokens_model(trained, tmp_path):
    """`python -m avflow.export --text2tokens` puts the front end in the model directory, and `avflow infer --text`
    then generates for exactly the frames that model gives the text."""
    from helpers import tiny_model_file

    from avflow.cli import main
    from avflow.export.__main__ import main as export_main

    _, t2t_file = trained
    model = tiny_model_file(tmp_path / "main.safetensors")
    out = tmp_path / "model"
    assert export_main(["--checkpoint", str(model), "-o", str(out), "--format", "eager", "--max-seconds", "1",
                        "--text2tokens", str(t2t_file), "--device", "cpu"]) == 0
    assert main(["infer", "--model", str(out), "--text", "hello there", "--seed", "4", "-o", str(tmp_path / "r"),
                 "--no-video", "--quiet"]) == 0
    entry = json.loads((tmp_path / "r" / "results.jsonl").read_text())
    frames = load_text2tokens(t2t_file).token_logits("hello there", seed=4).shape[0]
    assert entry["status"] == "ok" and entry["audio_seconds"] == round(frames / 86.1328125, 3)
    (tmp_path / "bogus.safetensors").write_bytes(b"not a model")
    assert export_main(["--checkpoint", str(model), "-o", str(tmp_path / "m2"), "--format", "eager",
                        "--text2tokens", str(tmp_path / "bogus.safetensors"), "--device", "cpu"]) == 2
    assert not (tmp_path / "m2").exists()
