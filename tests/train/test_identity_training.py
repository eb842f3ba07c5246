"""One model, many identities (issue 23) on the training side: per-identity normalization and one-hot
conditioning of mixed batches, model.identities from the shards, and fine-tuning a new identity onto a model."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import packed_tiny_corpus, run_steps, tiny_model_file

from avflow.config import load_config
from avflow.model.avflow import AVFlowNet
from avflow.model.head_vae import HeadVAE
from avflow.model.io import load_inference_tensors
from avflow.model.state import StateCodec
from avflow.train.batches import BatchEncoder, resolve_identities
from avflow.train.loop import Trainer

TINY = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48", "loader.segment_length=24",
        "trainer.batch_size=3", "trainer.steps=3", "trainer.warmup_steps=1", "trainer.checkpoint_every=3",
        "trainer.val_every=100", "trainer.lr=1e-2", "head_vae.ffn_hidden=8", "head_vae.steps=2",
        "head_vae.segment_length=16", "head_vae.batch_size=2", "corpus.train_segments=3", "corpus.val_segments=1",
        "corpus.words_per_segment=[2, 3]", "evaluate.val_items=0"]


def test_a_mixed_batch_is_normalized_and_conditioned_row_by_row():
    cfg = load_config(None, ["model.identities=[alice, bob, carol]", "head_vae.ffn_hidden=8"])
    e, p = cfg.model.expression_dim, cfg.head_vae.pose_dim
    codec = StateCodec(torch.stack([torch.zeros(e), torch.full((e,), 10.0), torch.full((e,), 20.0)]),
                       torch.ones(3, e), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 4.0]), cfg.model)
    pose_mean = torch.stack([torch.zeros(p), torch.full((p,), 5.0), torch.full((p,), -5.0)])
    # the loader numbers the shards' sorted names; here the shards hold carol and alice only: loader 0 -> row 0,
    # loader 1 -> row 2
    encoder = BatchEncoder(cfg, codec, HeadVAE(cfg.head_vae), pose_mean, torch.ones(3, p), torch.device("cpu"),
                           table_rows=[0, 2])
    frames = 6
    every = torch.ones(2, frames, dtype=torch.bool)
    batch = {"expression": torch.full((2, frames, e), 20.0), "mel": torch.full((2, frames, 80), 2.0),
             "pose": torch.full((2, frames, p), -5.0), "tokens": torch.zeros(2, frames, 29), "valid": every,
             "expression_valid": every, "identity": torch.tensor([1, 0])}
    encoded = encoder(batch)
    assert torch.equal(encoded.cond[..., 29:], torch.tensor([[0.0, 0, 1], [1, 0, 0]])[:, None].expand(2, frames, 3))
    torch.testing.assert_close(encoded.state[0, :, :e], torch.zeros(frames, e))  # carol: (20 - 20) / 1
    torch.testing.assert_close(encoded.state[1, :, :e], torch.full((frames, e), 20.0))  # alice: (20 - 0) / 1
    mel = encoded.state[..., -80:]
    torch.testing.assert_close(mel[0], torch.zeros(frames, 80))  # carol: (2 - 2) / 4
    torch.testing.assert_close(mel[1], torch.full((frames, 80), 2.0))  # alice: (2 - 0) / 1
    # the head latent sees each row's own pose normalization: carol's pose is her mean, alice's is not
    head = encoded.state[..., e:e + cfg.model.head_latent_dim]
    carol_alone = encoder.head_vae.encode(torch.zeros(1, frames, p), torch.ones(1, frames, dtype=torch.bool))[0]
    torch.testing.assert_close(head[0], carol_alone[0])
    assert not torch.allclose(head[1], carol_alone[0])


def manifest_with(names):
    stats = {feature: {"count": 1, "mean": [0.0], "std": [1.0]} for feature in ("mel", "expression", "pose")}
    return {"splits": {}, "stats": stats,
            "identities": {name: {"segments": {"train": 1, "val": 0}, "hours": {"train": 0.1, "val": 0.0},
                                  "stats": stats} for name in names}}


def test_training_takes_the_identity_table_from_the_shards_and_refuses_another():
    cfg = load_config(None, [])
    resolve_identities(cfg, manifest_with(["bob", "alice"]), [])
    assert cfg.model.identities == ["alice", "bob"]
    one = load_config(None, [])
    resolve_identities(one, manifest_with(["alice"]), [])
    assert one.model.identities == []  # one identity: the published network, no embedding
    fine_tune = load_config(None, [])
    resolve_identities(fine_tune, manifest_with(["dave", "bob"]), ["carol", "bob"])
    assert fine_tune.model.identities == ["carol", "bob", "dave"]  # the trained table's order kept, dave added
    wrong = load_config(None, ["model.identities=[alice, carol]"])
    with pytest.raises(ValueError, match=r"model.identities=\['alice', 'carol'\].*expected \['alice', 'bob'\]"):
        resolve_identities(wrong, manifest_with(["alice", "bob"]), [])


def add_identities(shards_dir, names):
    """The packed corpus's manifest listing more identities than its samples have (they were packed as the first of
    `names`), each with the corpus's statistics: the identity table a model of several people is trained on."""
    path = shards_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    assert list(manifest["identities"]) == names[:1]
    manifest["identities"].update({name: {"segments": {"train": 1, "val": 1}, "hours": {"train": 0.01, "val": 0.01},
                                          "stats": manifest["stats"]} for name in names[1:]})
    manifest["identities"] = dict(sorted(manifest["identities"].items()))
    path.write_text(json.dumps(manifest))


def test_fine_tuning_a_new_identity_alone_leaves_every_other_weight_bit_identical(tmp_path):
    data = packed_tiny_corpus(tmp_path / "data", TINY + ["data.identity=alice"])
    add_identities(tmp_path / "data" / "shards", ["alice", "bob", "carol"])
    source = tiny_model_file(tmp_path / "three.safetensors",
                             ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48",
                              "model.identities=[alice, carol, bob]"])
    source_cfg, source_tensors = load_inference_tensors(source)
    cfg = load_config(None, TINY + data + [f"trainer.run_dir={tmp_path / 'run'}", f"trainer.init_from={source}",
                                           "trainer.finetune=identity", "trainer.weight_decay=0.1"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.cfg.model.identities == ["alice", "carol", "bob"]  # nothing new: the same table
    run_steps(trainer, 3)
    assert not any(p.requires_grad for name, p in trainer.engine.model.named_parameters()
                   if not name.startswith("input_proj"))
    trained = {name: value.detach() for name, value in AVFlowNet(trainer.cfg.model).state_dict().items()}
    trained.update({name: p.detach() for name, p in trainer.engine.model.named_parameters()})
    changed = []
    for name, before in source_tensors["ema"].items():
        after = trained[name]
        if name.startswith("input_proj") and name.endswith("weight"):
            assert torch.equal(after[:, :-3], before[:, :-3]), name
            changed.append(not torch.equal(after[:, -3:], before[:, -3:]))
        else:
            assert torch.equal(after, before), name
    assert all(changed)  # the identity columns did train
    assert source_cfg.model.identities == trainer.cfg.model.identities


def test_a_new_identity_starts_at_the_mean_of_the_trained_ones(tmp_path):
    data = packed_tiny_corpus(tmp_path / "data", TINY + ["data.identity=alice"])
    add_identities(tmp_path / "data" / "shards", ["alice", "dave"])
    source = tiny_model_file(tmp_path / "two.safetensors",
                             ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48",
                              "model.identities=[bob, alice]"])
    _, source_tensors = load_inference_tensors(source)
    cfg = load_config(None, TINY + data + [f"trainer.run_dir={tmp_path / 'run'}", f"trainer.init_from={source}"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.cfg.model.identities == ["bob", "alice", "dave"]
    weight = dict(trainer.engine.model.named_parameters())["input_proj_a.weight"].detach()
    before = source_tensors["ema"]["input_proj_a.weight"]
    assert torch.equal(weight[:, :-1], before)
    torch.testing.assert_close(weight[:, -1], before[:, -2:].mean(1))
    # dave's statistics come from the shards; bob's and alice's stay the trained model's
    codec = trainer.task.encoder.codec
    assert torch.equal(codec.expression_mean[:2], source_tensors["codec"]["expression_mean"])


def test_identity_fine_tuning_needs_a_source_and_a_strategy_that_keeps_the_freeze():
    from avflow.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.finetune: expected 'all' unless trainer.init_from"):
        load_config(None, ["trainer.finetune=identity"])
    with pytest.raises(ConfigError, match="trainer.finetune: expected 'all' under parallel.strategy=fsdp"):
        load_config(None, ["trainer.finetune=identity", "trainer.init_from=m.safetensors", "parallel.strategy=fsdp"])
    with pytest.raises(ConfigError, match="model.identities: expected distinct names"):
        load_config(None, ["model.identities=[a, a]"])


def test_held_out_scores_of_a_multi_identity_model_generate_each_segment_as_its_identity(tmp_path):
    """Training validation of a model of several identities samples a held-out segment as `avflow generate
    --identity` samples it (the same sampler, noise seed and statistics), so its mel L1 is the inference path's."""
    from avflow.evaluate.run import held_out_segments
    from avflow.infer.generate import conditioning, generate_batch
    from avflow.infer.model import load_inference_model
    from avflow.train.tasks import VAL_SEED

    data = packed_tiny_corpus(tmp_path / "data", TINY + ["data.identity=alice"])
    add_identities(tmp_path / "data" / "shards", ["alice", "bob"])
    source = tiny_model_file(tmp_path / "two.safetensors",
                             ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48",
                              "model.identities=[bob, alice]", "sample.nfe=2"])
    cfg = load_config(None, TINY + data + [f"trainer.run_dir={tmp_path / 'run'}", f"trainer.init_from={source}",
                                           "evaluate.val_items=1", "evaluate.val_metrics=[mel_l1]", "sample.nfe=2"])
    trainer = Trainer(cfg, progress=False)
    scores = trainer.task.held_out_scores(trainer.engine.model.eval())

    alice = load_inference_model(source, "cpu", identity="alice")
    (segment,) = held_out_segments(tmp_path / "data" / "shards", max_items=1)
    (generated,) = generate_batch(alice, [conditioning(alice, segment.arrays["tokens"])],
                                  dataclasses.replace(cfg.sample, num_samples=1, temperature=cfg.sample.temperature),
                                  [VAL_SEED])
    expected = float(np.abs(generated.mel[0] - segment.arrays["mel"]).mean())
    assert scores["val/mel_l1"] == pytest.approx(expected, rel=1e-5)
    bob = load_inference_model(source, "cpu", identity="bob")
    (as_bob,) = generate_batch(bob, [conditioning(bob, segment.arrays["tokens"])],
                               dataclasses.replace(cfg.sample, num_samples=1), [VAL_SEED])
    assert float(np.abs(as_bob.mel[0] - segment.arrays["mel"]).mean()) != pytest.approx(expected, rel=1e-3)
