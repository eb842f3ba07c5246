"""wav2vec2 CTC token extraction: label order mapped by name, frame rate, chunking."""

import json

import numpy as np
import pytest
import torch

from avflow.data.asr import CTCTokenizer, label_columns
from avflow.data.tokens import HF_VOCAB_COLUMNS, TOKEN_LABELS

transformers = pytest.importorskip("transformers")

PUBLISHED_VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{label: 4 + i for i, label in enumerate(TOKEN_LABELS[1:])}}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random Wav2Vec2ForCTC with the real 320-sample stride (20 ms at 16 kHz)."""
    folder = tmp_path_factory.mktemp("w2v")
    config = transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8, 8, 8), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 8, 4, 4), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(PUBLISHED_VOCAB))
    return folder


def test_published_vocabulary_maps_to_published_columns(tiny_model_dir):
    assert label_columns(tiny_model_dir, 32) == list(HF_VOCAB_COLUMNS)


def test_vocabulary_is_mapped_by_name(tmp_path):
    shuffled = {name: 31 - index for name, index in PUBLISHED_VOCAB.items()}
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled))
    columns = label_columns(tmp_path, 32)
    assert columns[0] == shuffled["<pad>"] and columns[TOKEN_LABELS.index("Z")] == shuffled["Z"]
    del shuffled["Q"]
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled))
    with pytest.raises(ValueError, match=r"missing \['Q'\]"):
        label_columns(tmp_path, 32)


def test_logits_are_the_models_selected_columns_at_50_hz(tiny_model_dir):
    tokenizer = CTCTokenizer(tiny_model_dir)
    audio = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1
    tokens = tokenizer.logits(audio)
    assert tokens.shape[1] == 29 and abs(tokens.shape[0] - 100) <= 1  # 2 s at 50 Hz
    normalized = torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7))
    with torch.no_grad():
        full = tokenizer.model(normalized[None]).logits[0].numpy()
    np.testing.assert_allclose(tokens, full[:, HF_VOCAB_COLUMNS], atol=1e-4)


def test_chunks_cover_the_whole_input(tiny_model_dir):
    tokenizer = CTCTokenizer(tiny_model_dir)
    audio = np.random.default_rng(1).standard_normal(48000).astype(np.float32) * 0.1
    assert tokenizer.logits(audio, chunk_seconds=1.0).shape[0] == sum(
        tokenizer.logits(audio[s:s + 16000]).shape[0] for s in range(0, 48000, 16000))
    assert abs(tokenizer.logits(audio, chunk_seconds=1.0).shape[0] - 150) <= 3
