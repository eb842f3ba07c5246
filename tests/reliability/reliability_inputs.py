"""Shared inputs of the fault-injection tests (imported by them): a small packed corpus and a tiny model."""

import pytest

from avflow.config import load_config

# 20 training segments in shards of 4: enough samples for loader.max_bad_fraction to apply (the loader
# judges the fraction only after 20 samples).
CORPUS = ["corpus.train_segments=20", "corpus.val_segments=1", "corpus.words_per_segment=[2, 3]",
          "data.segments_per_shard=4"]


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    """(corpus root, shard folder) of a small demo corpus, packed; tests copy it before damaging anything."""
    from avflow.data.corpus import write_corpus
    from avflow.data.pack import pack

    root = tmp_path_factory.mktemp("packed")
    cfg = load_config(None, CORPUS + [f"data.root={root / 'corpus'}"])
    write_corpus(cfg.data.root, cfg.corpus)
    pack(cfg, root / "shards", progress=False)
    return root / "corpus", root / "shards"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A consolidated .safetensors model of a tiny random network."""
    from helpers import tiny_model_file

    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def step_directories(run_dir, model_file, steps=(1, 2)) -> list:
    """Training-checkpoint step directories holding a model file's inference tensors, written by the
    CheckpointManager as training writes them (oldest first)."""
    from avflow.model.io import load_inference_tensors
    from avflow.train.checkpoint import CheckpointManager

    cfg, tensors = load_inference_tensors(model_file)
    checkpoints = CheckpointManager(run_dir, tensors, keep=len(steps), describe=lambda: {"config": cfg.to_dict()})
    return [checkpoints.save(step) for step in steps]
