"""Fixtures shared across test folders."""

import json

import pytest
import torch

from avflow.data.tokens import TOKEN_LABELS

# The published wav2vec2 character vocabulary: <pad> (the CTC blank), 3 specials, then the 28 labels in order.
PUBLISHED_VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{label: 4 + i for i, label in enumerate(TOKEN_LABELS[1:])}}


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


def packed_tiny_corpus(root, overrides: list[str]) -> list[str]:
    """Write and pack the demo corpus under `root` and train a throwaway head VAE, so a test trains only the
    main model; returns the data.* overrides that point a config at them."""
    import numpy as np

    from avflow.config import load_config
    from avflow.data.corpus import write_corpus
    from avflow.data.shards import pack
    from avflow.train.head_vae import train_head_vae

    data = [f"data.root={root / 'corpus'}", f"data.shards={root / 'shards'}"]
    cfg = load_config(None, overrides + data)
    write_corpus(cfg.data.root, cfg.corpus)
    pack(cfg, cfg.data.shards, progress=False)
    poses = [np.random.default_rng(0).standard_normal((40, 7)).astype(np.float32)]
    train_head_vae(poses, cfg.head_vae, root / "head_vae.pt", progress=False)
    return data + [f"data.head_vae={root / 'head_vae.pt'}"]
