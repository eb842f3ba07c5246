"""Corrupted shard bytes that still decode to finite numbers: each such sample is a counted bad sample named by
shard and key, and more of them than loader.max_bad_fraction stops the stream with one line naming the shards."""

import itertools
import logging
import shutil
import tarfile

import numpy as np
import pytest
from reliability_inputs import CORPUS, packed  # noqa: F401 (fixture)

from avflow.cli import main
from avflow.config import load_config
from avflow.data.loader import training_batches
from avflow.data.shard_index import BadDataError, iter_split_arrays

IMPLAUSIBLE = np.float16(3706.0)  # finite, far beyond any log-mel value


def corrupt_mel(shard, keys=None) -> list[str]:
    """Overwrite one mel value of each sample (of `keys`, default all) in place; returns the keys changed."""
    with tarfile.open(shard) as tar:
        members = [info for info in tar.getmembers() if info.name.endswith(".mel.npy")]
    changed = []
    with open(shard, "r+b") as handle:
        for info in members:
            key = info.name.split(".")[0]
            if keys is not None and key not in keys:
                continue
            handle.seek(info.offset_data + info.size - 2)  # the last value: past the .npy header for sure
            handle.write(IMPLAUSIBLE.tobytes())
            changed.append(key)
    return changed


@pytest.fixture
def shards(packed, tmp_path):  # noqa: F811
    copy = tmp_path / "shards"
    shutil.copytree(packed[1], copy)
    return copy


def test_a_flipped_sample_is_skipped_and_named(shards, caplog):
    clean = list(iter_split_arrays(shards, "train", ("mel",)))
    assert max(float(np.abs(sample["mel"]).max()) for sample in clean) < 100  # the corruption is implausible
    shard = sorted(shards.glob("*-train-*.tar"))[1]
    (key,) = corrupt_mel(shard, keys={sorted(tarfile.open(shard).getnames())[0].split(".")[0]})
    with caplog.at_level(logging.WARNING, logger="avflow.data.shard_index"):
        damaged = list(iter_split_arrays(shards, "train", ("mel",), max_bad_fraction=0.1))
    assert len(damaged) == len(clean) - 1
    assert all(float(np.abs(sample["mel"]).max()) < 100 for sample in damaged)  # never trained on
    assert f"{shard}: skipping sample {key}: mel bytes differ from their sha256" in caplog.text


def test_too_many_corrupted_samples_stop_training_with_one_line_naming_the_shards(shards):
    damaged = sorted(shards.glob("*-train-*.tar"))[:2]
    for shard in damaged:
        corrupt_mel(shard)
    cfg = load_config(None, CORPUS + ["loader.num_workers=1", "loader.segment_length=64", "trainer.batch_size=4",
                                      "loader.max_bad_fraction=0.01"])
    with pytest.raises(BadDataError) as error:  # read in a DataLoader worker, raised in this process
        list(itertools.islice(training_batches(shards, cfg), 50))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "more than loader.max_bad_fraction=0.01" in message
    named = [shard for shard in shards.glob("*.tar") if str(shard) in message]
    assert named and set(named) <= set(damaged), message  # the shards it found bad samples in, and only those


def test_the_command_line_reports_it_in_one_line(shards, capsys):
    for shard in sorted(shards.glob("*-train-*.tar"))[:3]:
        corrupt_mel(shard)
    assert main(["train-head-vae", f"loader.shards={shards}", "-o", str(shards.parent / "vae.pt")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "bad samples in" in error[0] and "mel bytes differ" in error[0]
    assert not (shards.parent / "vae.pt").exists()


@pytest.mark.parametrize("fraction, passes", [(0.5, True), (0.1, False)])
def test_the_head_vae_stage_honours_max_bad_fraction(shards, capsys, fraction, passes):
    damaged = corrupt_mel(sorted(shards.glob("*-train-*.tar"))[0])  # 4 of the 20 training samples: 20%
    assert len(damaged) == 4
    out = shards.parent / "vae.pt"
    argv = ["train-head-vae", f"loader.shards={shards}", f"loader.max_bad_fraction={fraction}", "head_vae.steps=2",
            "head_vae.ffn_hidden=8", "head_vae.segment_length=32", "head_vae.batch_size=2", "-o", str(out)]
    assert main(argv) == (0 if passes else 2)
    assert out.exists() == passes
    if not passes:
        assert f"more than loader.max_bad_fraction={fraction}" in capsys.readouterr().err
