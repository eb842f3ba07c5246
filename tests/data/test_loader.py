"""The shard loader: batch layout, determinism, exact resume, consumer dealing, validation coverage, bad data.

Most tests use small hand-written shards in the packed format whose pose stream names its source: column 0
holds the sample id (shard * 100 + index), column 1 the frame index, so every window can be traced back.
"""

import io
import json
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from avflow.config import Config, CorpusConfig
from avflow.data import shard_index
from avflow.data.corpus import write_corpus
from avflow.data.loader import training_batches, validation_batches
from avflow.data.pack import pack
from avflow.data.shard_format import FORMAT, MANIFEST, shard_file_name
from avflow.data.shard_index import BadDataError, iter_split_arrays

WINDOW = 16
DIMS = {"mel": 80, "expression": 256, "pose": 7, "tokens": 29}
FEATURES = tuple(DIMS)


def sample_id(shard: int, index: int) -> int:
    return shard * 100 + index


def sample_key(split: str, shard: int, index: int) -> str:
    return f"{split}{shard:02d}_{index:03d}"


def sample_arrays(ident: int, frames: int, damage: str | None) -> dict[str, np.ndarray]:
    """Traceable streams of one sample; every 4th sample has an expression mask (frames % 5 == 0 invalid)."""
    rng = np.random.default_rng(ident)
    arrays = {stream: rng.normal(size=(frames, width)).astype(np.float32 if stream == "pose" else np.float16)
              for stream, width in DIMS.items()}
    arrays["pose"][:, 0] = ident
    arrays["pose"][:, 1] = np.arange(frames)
    if ident % 4 == 0:
        arrays["expression_valid"] = np.arange(frames) % 5 != 0
    if damage == "nan":
        arrays["mel"][frames // 2, 3] = np.nan
    elif damage == "wrong_dims":
        arrays["tokens"] = arrays["tokens"][:, :20]
    elif damage == "missing":
        del arrays["expression"]
    return arrays


def add_sample(tar: tarfile.TarFile, key: str, split: str, arrays: dict[str, np.ndarray], frames: int) -> None:
    header = {"segment": key, "chunk": 0, "chunks": 1, "start_frame": 0, "frames": frames,
              "frame_rate": Config().mel.frame_rate, "layout": "50h", "split": split, "streams": sorted(arrays)}
    members = {f"{key}.json": json.dumps(header).encode()}
    for stream, values in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        members[f"{key}.{stream}.npy"] = buffer.getvalue()
    for name in sorted(members):
        info = tarfile.TarInfo(name)
        info.size = len(members[name])
        tar.addfile(info, io.BytesIO(members[name]))


def write_shards(directory: Path, train: list[list[int]], val: list[list[int]],
                 damage: dict[str, str] | None = None) -> Path:
    """Shards in the packed format: train/val list the frame counts of each shard's samples.

    `damage` maps sample keys to "nan", "wrong_dims" or "missing".
    """
    damage = damage or {}
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shards in (("train", train), ("val", val)):
        entries = []
        for shard, frame_counts in enumerate(shards):
            path = directory / shard_file_name("test", split, shard)
            with tarfile.open(path, "w") as tar:
                for index, frames in enumerate(frame_counts):
                    key = sample_key(split, shard, index)
                    add_sample(tar, key, split, sample_arrays(sample_id(shard, index), frames, damage.get(key)), frames)
            entries.append({"file": path.name, "samples": len(frame_counts), "frames": sum(frame_counts),
                            "bytes": path.stat().st_size, "sha256": ""})
        frames = sum(entry["frames"] for entry in entries)
        splits[split] = {"shards": entries, "samples": sum(entry["samples"] for entry in entries), "frames": frames,
                         "hours": frames / Config().mel.frame_rate / 3600}
    manifest = {"format": FORMAT, "frame_rate": Config().mel.frame_rate, "dims": DIMS, "splits": splits,
                "stats": {}, "bad": []}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def small_config(num_workers: int = 0, seed: int = 0, batch_size: int = 4, **loader) -> Config:
    cfg = Config()
    cfg.loader.segment_length = WINDOW
    cfg.loader.shuffle_buffer = 4
    cfg.loader.num_workers = num_workers
    cfg.trainer.batch_size = batch_size
    cfg.trainer.seed = seed
    for key, value in loader.items():
        setattr(cfg.loader, key, value)
    return cfg


def take(stream, count: int) -> list[dict]:
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def row_ids(batch: dict) -> list[int]:
    """The sample id of each row with any real frame."""
    return [int(batch["pose"][row, 0, 0]) for row in range(batch["valid"].shape[0]) if batch["valid"][row].any()]


def assert_batches_equal(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for one, other in zip(expected, actual):
        assert one.keys() == other.keys()
        for key in one:
            assert torch.equal(one[key], other[key]), key


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    train = [[int(frames) for frames in rng.integers(6, 60, size=6)] for _ in range(4)]
    val = [[int(frames) for frames in rng.integers(6, 60, size=3)] for _ in range(5)]
    return write_shards(tmp_path_factory.mktemp("shards"), train, val)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """The demo corpus through the real packer."""
    root = tmp_path_factory.mktemp("packed")
    write_corpus(root / "corpus", CorpusConfig(train_segments=4, val_segments=2, words_per_segment=[3, 5]))
    cfg = Config()
    cfg.data.root = str(root / "corpus")
    cfg.data.segments_per_shard = 2
    pack(cfg, root / "shards", progress=False)
    return root / "shards"


def test_packed_corpus_batches_have_the_documented_layout(packed):
    cfg = small_config(batch_size=3)
    batch = take(training_batches(packed, cfg), 1)[0]
    widths = {**DIMS, "participant_tokens": 29}  # the demo corpus records a partner channel
    for stream, width in widths.items():
        assert batch[stream].shape == (3, WINDOW, width) and batch[stream].dtype == torch.float32, stream
    for mask in ("valid", "expression_valid"):
        assert batch[mask].shape == (3, WINDOW) and batch[mask].dtype == torch.bool
    assert batch["valid"].all() and int(batch["bad_samples"]) == 0
    arrays = list(iter_split_arrays(packed, "val", ("mel", "expression_valid")))
    windows = [batch["valid"][row] for batch in validation_batches(packed, cfg) for row in range(len(batch["keys"]))]
    assert len(windows) == sum(math.ceil(len(sample["mel"]) / WINDOW) for sample in arrays)
    assert all(sample["mel"].dtype == np.float32 and sample["expression_valid"].all() for sample in arrays)


def test_windows_are_crops_of_one_sample_with_masks(shard_dir):
    for batch in take(training_batches(shard_dir, small_config()), 12):
        for row in range(batch["valid"].shape[0]):
            valid = batch["valid"][row]
            length = int(valid.sum())
            assert valid[:length].all() and not valid[length:].any()
            pose = batch["pose"][row]
            assert torch.unique(pose[:length, 0]).numel() == 1
            frame = pose[:length, 1]
            assert torch.equal(frame, frame[0] + torch.arange(length, dtype=torch.float32))
            assert not batch["mel"][row, length:].any() and not batch["expression_valid"][row, length:].any()
            masked = int(pose[0, 0]) % 4 == 0
            expected = frame % 5 != 0 if masked else torch.ones(length, dtype=torch.bool)
            assert torch.equal(batch["expression_valid"][row, :length], expected)


def test_batches_mix_several_long_samples(tmp_path):
    directory = write_shards(tmp_path, train=[[20 * WINDOW] * 8], val=[[12]])
    for batch in take(training_batches(directory, small_config()), 5):
        assert len(set(row_ids(batch))) >= 2


def test_same_seed_gives_the_same_batches_and_ranks_differ(shard_dir):
    first = take(training_batches(shard_dir, small_config()), 5)
    assert_batches_equal(first, take(training_batches(shard_dir, small_config()), 5))
    other_seed = take(training_batches(shard_dir, small_config(seed=1)), 5)
    assert not torch.equal(first[0]["pose"], other_seed[0]["pose"])
    # one batch pulls at most 4 + 3 samples through the pool and shuffle buffer: inside epoch 0 (12 per rank),
    # where the two ranks read disjoint shards
    rank0, rank1 = (take(training_batches(shard_dir, small_config(), rank, 2), 1) for rank in (0, 1))
    assert not set(sum(map(row_ids, rank0), [])) & set(sum(map(row_ids, rank1), []))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly_like_an_uninterrupted_run(shard_dir, num_workers):
    cfg = small_config(num_workers=num_workers)
    stream = training_batches(shard_dir, cfg)
    reference, states = [], []
    for batch in stream:
        states.append(stream.state_dict())
        reference.append(batch)
        if len(reference) == 11:
            break
    for position in (1, 4, 7):
        resumed = training_batches(shard_dir, cfg)
        resumed.load_state_dict(states[position - 1])
        assert_batches_equal(reference[position:position + 4], take(resumed, 4))
    with pytest.raises(ValueError, match="num_workers"):
        training_batches(shard_dir, small_config(num_workers=1 - min(num_workers, 1))).load_state_dict(states[0])


def test_fast_forward_decodes_no_skipped_sample(shard_dir, monkeypatch):
    cfg = small_config()
    reference = take(training_batches(shard_dir, cfg), 41)
    reads = []
    real_read = shard_index.read_arrays
    monkeypatch.setattr(shard_index, "read_arrays", lambda sample: reads.append(sample.key) or real_read(sample))
    resumed = training_batches(shard_dir, cfg)
    resumed.load_state_dict({"batches": 40})
    assert_batches_equal(reference[40:], take(resumed, 1))
    assert len(reads) <= cfg.trainer.batch_size


def test_every_consumer_yields_when_shards_are_fewer_than_consumers(tmp_path):
    directory = write_shards(tmp_path, train=[[20, 30, 40]], val=[[10]])
    cfg = small_config(num_workers=2)
    for rank in (0, 1):
        batches = take(training_batches(directory, cfg, rank, 2), 6)
        assert all(batch["valid"].any() for batch in batches)


def test_each_epoch_deals_every_shard_to_exactly_one_consumer(shard_dir):
    dataset = training_batches(shard_dir, small_config(num_workers=2), 1, 2).dataset
    for epoch in range(3):
        dealt = sorted(index for consumer in range(4) for index in dataset.epoch_shards(epoch, consumer, 4))
        assert dealt == [0, 1, 2, 3]


def test_validation_reads_every_sample_once_across_ranks(shard_dir):
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    frames = {}
    for shard, entry in enumerate(manifest["splits"]["val"]["shards"]):
        with tarfile.open(shard_dir / entry["file"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    frames[member.name.split(".")[0]] = json.loads(tar.extractfile(member).read())["frames"]
    seen: dict[str, list[int]] = {}
    owners: dict[str, set[int]] = {}
    for rank, num_workers in ((0, 2), (1, 0)):
        stream = validation_batches(shard_dir, small_config(num_workers=num_workers), rank, 2)
        passes = [list(stream) for _ in range(2)]
        assert_batches_equal([{k: v for k, v in b.items() if k != "keys"} for b in passes[0]],
                             [{k: v for k, v in b.items() if k != "keys"} for b in passes[1]])
        for batch in passes[0]:
            for row, key in enumerate(batch["keys"]):
                owners.setdefault(key, set()).add(rank)
                seen.setdefault(key, []).append(int(batch["pose"][row, 0, 1]))
                assert int(batch["valid"][row].sum()) == min(WINDOW, frames[key] - int(batch["pose"][row, 0, 1]))
    assert sorted(seen) == sorted(frames)
    assert all(len(ranks) == 1 for ranks in owners.values())
    assert all(sorted(starts) == list(range(0, frames[key], WINDOW)) for key, starts in seen.items())


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    damage = {"train00_002": "nan", "train00_005": "wrong_dims", "train00_007": "missing",
              "val00_001": "nan", "val00_003": "wrong_dims", "val00_004": "missing"}
    directory = write_shards(tmp_path, train=[[12] * 30], val=[[12] * 30], damage=damage)
    cfg = small_config(batch_size=1, max_bad_fraction=0.2, shuffle_buffer=1)  # windows in sample order
    with caplog.at_level(logging.WARNING, logger="avflow.data.shard_index"):
        val = list(validation_batches(directory, cfg))
    keys = [key for batch in val for key in batch["keys"]]
    assert len(keys) == 27 and not set(keys) & set(damage) and int(val[-1]["bad_samples"]) == 3
    assert all(f"{directory / shard_file_name('test', 'val', 0)}: skipping sample {key}" in caplog.text
               for key in ("val00_001", "val00_003", "val00_004"))
    stream = training_batches(directory, cfg)
    batches, states = [], []
    for batch in stream:  # 28 windows: the 28 samples that pass the header scan
        batches.append(batch)
        states.append(stream.state_dict())
        if len(batches) == 28:
            break
    ids = {ident for batch in batches for ident in row_ids(batch)}
    assert ids == set(range(30)) - {2, 5, 7}
    assert sum(int((~batch["valid"].any(dim=1)).sum()) for batch in batches) == 1  # the NaN sample, padded out
    assert all(torch.isfinite(batch[stream]).all() for batch in batches for stream in FEATURES)
    # 2 found by the header scan + the NaN sample; the last batch pulled epoch 1, whose scan counts 2 again
    assert [int(batch["bad_samples"]) for batch in batches] == [2, 2] + [3] * 25 + [5]
    resumed = training_batches(directory, cfg)
    resumed.load_state_dict(states[3])  # the NaN sample was only found by decoding, which resuming skips
    assert_batches_equal(batches[4:], take(resumed, 24))


def test_too_many_bad_samples_stop_the_stream(tmp_path):
    damage = {f"train00_{index:03d}": "wrong_dims" for index in (1, 2)}
    directory = write_shards(tmp_path, train=[[12] * 30], val=[[12]], damage=damage)
    with pytest.raises(BadDataError, match=r"2 of 20 samples read are bad, more than loader.max_bad_fraction=0.05"):
        take(training_batches(directory, small_config(max_bad_fraction=0.05)), 10)


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_a_truncated_shard_is_reported_by_path(tmp_path, caplog, cut):
    directory = write_shards(tmp_path, train=[[12] * 30, [12] * 30], val=[[12]])
    shard = directory / shard_file_name("test", "train", 1)
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    length = shard.stat().st_size // 2 if cut == "mid_member" else members[len(members) // 2].offset
    shard.write_bytes(shard.read_bytes()[:length])
    with caplog.at_level(logging.ERROR, logger="avflow.data.shard_index"):
        with pytest.raises(BadDataError, match=str(shard)):
            take(training_batches(directory, small_config(max_bad_fraction=0.01)), 20)
    assert f"{shard}: corrupt or truncated shard" in caplog.text
    batches = take(training_batches(directory, small_config(max_bad_fraction=0.6)), 20)
    assert {ident // 100 for batch in batches for ident in row_ids(batch)} == {0, 1}


def test_a_missing_shard_or_mismatched_config_is_named(tmp_path):
    directory = write_shards(tmp_path, train=[[12], [12]], val=[[12]])
    cfg = small_config()
    cfg.head_vae.pose_dim = 4
    with pytest.raises(ValueError, match="pose has 7 dims per frame; head_vae.pose_dim=4"):
        training_batches(directory, cfg)
    (directory / shard_file_name("test", "train", 1)).unlink()
    with pytest.raises(FileNotFoundError, match=shard_file_name("test", "train", 1)):
        training_batches(directory, small_config())
