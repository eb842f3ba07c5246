"""Fixtures shared across test folders; the helpers they and the tests use are in helpers.py."""

import json

import pytest
import torch
from helpers import PUBLISHED_VOCAB, TINY_NETWORK, randomized

from avflow.model.avflow import AVFlowNet


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a CUDA device is; elsewhere they are skipped, not deselected, so that
    `pytest -m cuda` on a CPU still collects them and succeeds."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory):
    """A random Wav2Vec2ForCTC directory with the real 320-sample stride (20 ms at 16 kHz) and the published
    vocabulary, small enough to load anywhere (also inside SLURM array jobs)."""
    transformers = pytest.importorskip("transformers", reason="ASR extraction needs transformers")
    folder = tmp_path_factory.mktemp("wav2vec2")
    config = transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8, 8, 8), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 8, 4, 4), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(PUBLISHED_VOCAB))
    return folder


@pytest.fixture(scope="module")
def tiny_net():
    """A randomized TINY_NETWORK in eval mode, one per test module."""
    return randomized(AVFlowNet(TINY_NETWORK)).eval()
