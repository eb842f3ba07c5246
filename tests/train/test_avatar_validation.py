"""With evaluate.avatar, validation logs the Codec Avatar rendering the generated sample to TensorBoard."""

import io

import numpy as np
import pytest
from helpers import packed_tiny_corpus, write_synthetic_avatar
from PIL import Image

from avflow.config import load_config
from avflow.train.loop import Trainer

TINY = ["model.d_model=32", "model.n_blocks=1", "model.n_heads=2", "model.ffn_hidden=32", "loader.segment_length=24",
        "trainer.batch_size=2", "trainer.steps=1", "trainer.warmup_steps=1", "trainer.checkpoint_every=1",
        "trainer.val_every=1", "head_vae.ffn_hidden=8", "head_vae.steps=2", "head_vae.segment_length=16",
        "head_vae.batch_size=2", "corpus.train_segments=2", "corpus.val_segments=1", "corpus.words_per_segment=[2, 3]",
        "sample.nfe=2"]


def test_validation_logs_a_rendered_avatar_clip(tmp_path):
    pytest.importorskip("moviepy.editor", reason="TensorBoard's add_video encodes with moviepy 1")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = packed_tiny_corpus(tmp_path / "data", TINY)
    avatar = write_synthetic_avatar(tmp_path / "avatar")
    cfg = load_config(None, TINY + data + [f"trainer.run_dir={tmp_path / 'run'}", f"evaluate.avatar={avatar}",
                                           "evaluate.avatar_pose=relative"])
    Trainer(cfg, progress=False).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "val/sample_video" in events.Tags()["images"]
    logged = events.Images("val/sample_video")[-1]
    assert (logged.width, logged.height) == (256, 256)
    gif = Image.open(io.BytesIO(logged.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames >= 2
    frame = np.asarray(gif.convert("RGB"))
    # The head 1 m from the published camera covers ~17% of the frame on a black background.
    assert 0.05 < (frame.astype(int).sum(-1) > 24).mean() < 0.5
