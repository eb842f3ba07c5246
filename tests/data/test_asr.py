"""wav2vec2 CTC token extraction: label order mapped by name, frame rate, chunking."""

import json

import numpy as np
import pytest
import torch

from avflow.data.asr import CTCTokenizer, label_columns
from avflow.text.token_labels import HF_VOCAB_COLUMNS, TOKEN_LABELS

transformers = pytest.importorskip("transformers")

from helpers import PUBLISHED_VOCAB


def test_published_vocabulary_maps_to_published_columns(tiny_wav2vec2):
    assert label_columns(tiny_wav2vec2, 32) == list(HF_VOCAB_COLUMNS)


def test_vocabulary_is_mapped_by_name(tmp_path):
    shuffled = {name: 31 - index for name, index in PUBLISHED_VOCAB.items()}
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled))
    columns = label_columns(tmp_path, 32)
    assert columns[0] == shuffled["<pad>"] and columns[TOKEN_LABELS.index("Z")] == shuffled["Z"]
    del shuffled["Q"]
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled))
    with pytest.raises(ValueError, match=r"missing \['Q'\]"):
        label_columns(tmp_path, 32)


def test_logits_are_the_models_selected_columns_at_50_hz(tiny_wav2vec2):
    tokenizer = CTCTokenizer(tiny_wav2vec2)
    audio = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1
    tokens = tokenizer.logits(audio)
    assert tokens.shape[1] == 29 and abs(tokens.shape[0] - 100) <= 1  # 2 s at 50 Hz
    normalized = torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7))
    with torch.no_grad():
        full = tokenizer.model(normalized[None]).logits[0].numpy()
    np.testing.assert_allclose(tokens, full[:, HF_VOCAB_COLUMNS], atol=1e-4)


def test_chunks_cover_the_whole_input(tiny_wav2vec2):
    tokenizer = CTCTokenizer(tiny_wav2vec2)
    audio = np.random.default_rng(1).standard_normal(48000).astype(np.float32) * 0.1
    assert tokenizer.logits(audio, chunk_seconds=1.0).shape[0] == sum(
        tokenizer.logits(audio[s:s + 16000]).shape[0] for s in range(0, 48000, 16000))
    assert abs(tokenizer.logits(audio, chunk_seconds=1.0).shape[0] - 150) <= 3
