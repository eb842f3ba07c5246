"""Packing into WebDataset shards: contents, chunks, statistics, determinism, resume, bad segments, verify."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset

import avflow.data.pack as packing
from avflow.config import Config, CorpusConfig, DataConfig
from avflow.data.align_streams import align_segment
from avflow.data.corpus import write_corpus
from avflow.data.layouts import list_segment_names, read_segment_record
from avflow.data.layouts.fifty_h import SMIRK_DIR, stream_paths
from avflow.data.pack import chunk_bounds, pack
from avflow.data.shard_format import iter_shard_samples, load_manifest
from avflow.data.verify import verify
from avflow.utils import LOCK_FILE

TINY = CorpusConfig(train_segments=3, val_segments=1, words_per_segment=[2, 3])
SMIRK_WIDTHS = {"expression": 55, "headpose": 3}
FLOAT16_TOLERANCE = 4e-3  # half a float16 step at the demo's largest log-mel magnitudes (8 to 16)


def config(root, **data_overrides) -> Config:
    """One-second chunks so that every tiny segment is stored as several samples."""
    cfg = Config()
    cfg.data.root = str(root)
    cfg.data.max_chunk_seconds = 1.0
    cfg.data.segments_per_shard = 2
    for key, value in data_overrides.items():
        setattr(cfg.data, key, value)
    return cfg


def shard_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))


def decoded_samples(folder: Path, split: str | None = None) -> list[dict]:
    """Every sample of a folder's shards: its header and arrays, in shard order."""
    samples = []
    for path in shard_paths(folder):
        for key, members in iter_shard_samples(path):
            header = json.loads(members["json"])
            if split in (None, header["split"]):
                arrays = {suffix[:-4]: np.load(io.BytesIO(data))
                          for suffix, data in members.items() if suffix != "json"}
                samples.append({"key": key, "header": header, **arrays})
    return samples


def aligned_segments(cfg: Config) -> dict:
    return {name: align_segment(read_segment_record(cfg.data, name), cfg.mel) for name in list_segment_names(cfg.data)}


def add_participant_features(root: Path) -> None:
    """SMIRK participant expression + head pose files (and their min/max stats) for every segment."""
    smirk = root / SMIRK_DIR
    rng = np.random.default_rng(0)
    for name in list_segment_names(DataConfig(root=str(root))):
        frames = np.load(stream_paths(root, name)["expression"]).shape[0]
        for kind, width in SMIRK_WIDTHS.items():
            (smirk / f"{name}--{kind}.npy").parent.mkdir(parents=True, exist_ok=True)
            np.save(smirk / f"{name}--{kind}.npy", rng.uniform(-1, 1, (frames, width)).astype(np.float32))
    (smirk / "stats").mkdir(exist_ok=True)
    for kind, width in SMIRK_WIDTHS.items():
        np.save(smirk / "stats" / f"{kind}_min.npy", -np.ones(width, dtype=np.float32))
        np.save(smirk / "stats" / f"{kind}_max.npy", np.ones(width, dtype=np.float32))


def edit_npy(path: Path, edit) -> None:
    np.save(path, edit(np.load(path)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, TINY)
    return root


@pytest.fixture(scope="module")
def packed(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("packed")
    cfg = config(corpus)
    return cfg, output, pack(cfg, output, workers=1, progress=False)


@pytest.fixture
def damaged(tmp_path):
    """A 50h tree of four train + one val segment; the first three train segments are made unreadable."""
    root = tmp_path / "data"
    names = write_corpus(root, CorpusConfig(train_segments=4, val_segments=1, words_per_segment=[2, 3]))
    add_participant_features(root)
    nan, no_tokens, short = names[:3]

    def put_nan(values):
        values[3, 5] = np.nan
        return values

    edit_npy(stream_paths(root, nan)["expression"], put_nan)
    stream_paths(root, no_tokens)["tokens"].unlink()
    edit_npy(stream_paths(root, short)["headpose"], lambda values: values[:-10])
    return root, {"nan": nan, "missing tokens": no_tokens, "length mismatch": short}


def test_chunk_bounds_are_consecutive_near_equal_and_bounded():
    assert chunk_bounds(10, 10) == [(0, 10)]
    assert chunk_bounds(11, 10) == [(0, 5), (5, 11)]
    assert chunk_bounds(250, 86) == [(0, 83), (83, 166), (166, 250)]


def test_manifest_counts_dims_and_files(packed):
    cfg, output, manifest = packed
    aligned = aligned_segments(cfg)
    assert load_manifest(output) == manifest
    assert manifest["format"] == "avflow-shards-v1" and manifest["layout"] == "50h" and manifest["name"] == "demo"
    assert manifest["frame_rate"] == pytest.approx(22050 / 256)
    assert manifest["dims"] == {"mel": 80, "expression": 256, "pose": 7, "tokens": 29, "participant_tokens": 29}
    assert manifest["bad"] == []
    for split, segments, shard_count in (("train", 3, 2), ("val", 1, 1)):
        entry = manifest["splits"][split]
        frames = sum(a.frames for a in aligned.values() if a.is_val == (split == "val"))
        samples = sum(len(chunk_bounds(a.frames, manifest["max_chunk_frames"]))
                      for a in aligned.values() if a.is_val == (split == "val"))
        assert [shard["file"] for shard in entry["shards"]] == [f"demo-{split}-{i:06d}.tar" for i in range(shard_count)]
        assert (entry["segments"], entry["samples"], entry["frames"]) == (segments, samples, frames)
        assert entry["hours"] == pytest.approx(frames / manifest["frame_rate"] / 3600)
        for shard in entry["shards"]:
            sidecar = json.loads((output / f"{shard['file']}.json").read_text())
            assert {key: sidecar[key] for key in shard} == shard
            assert shard["bytes"] == (output / shard["file"]).stat().st_size
    assert verify(output)["samples"] == manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"]


def test_chunks_reassemble_to_the_aligned_streams(packed):
    cfg, output, manifest = packed
    by_segment: dict[str, list[dict]] = {}
    for sample in decoded_samples(output):
        assert "." not in sample["key"]
        header = sample["header"]
        assert sample["key"] == f"{header['segment']}__c{header['chunk']:03d}"
        assert header["frames"] <= manifest["max_chunk_frames"]
        assert "expression_valid" not in sample  # every demo frame is valid: the mask is left out
        by_segment.setdefault(header["segment"], []).append(sample)
    for name, segment in aligned_segments(cfg).items():
        chunks = sorted(by_segment[name], key=lambda sample: sample["header"]["chunk"])
        assert len(chunks) > 1 and chunks[0]["header"]["chunks"] == len(chunks)
        assert ([c["header"]["start_frame"] for c in chunks]
                == list(np.cumsum([0] + [c["header"]["frames"] for c in chunks])[:-1]))
        for stream, dtype in (("mel", np.float16), ("expression", np.float16), ("pose", np.float32),
                              ("tokens", np.float16), ("participant_tokens", np.float16)):
            whole = np.concatenate([chunk[stream] for chunk in chunks])
            original = getattr(segment, stream)
            assert whole.dtype == dtype
            np.testing.assert_array_equal(whole, original.astype(dtype))
            np.testing.assert_allclose(whole, original, rtol=0, atol=FLOAT16_TOLERANCE)


def test_stats_equal_numpy_over_the_decoded_train_split(packed):
    _, output, manifest = packed
    train = decoded_samples(output, "train")
    assert {sample["header"]["split"] for sample in decoded_samples(output, "val")} == {"val"}
    for feature in ("mel", "expression", "pose", "tokens"):
        values = np.concatenate([sample[feature] for sample in train]).astype(np.float64)
        stats = manifest["stats"][feature]
        assert stats["count"] == values.shape[0]
        np.testing.assert_allclose(stats["mean"], values.mean(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats["std"], values.std(axis=0), rtol=1e-7, atol=1e-9)


def test_expression_mask_is_stored_and_excluded_from_statistics(corpus, tmp_path, monkeypatch):
    masked = "20240401_s001"

    def read_with_gap(data_cfg, name):
        record = read_segment_record(data_cfg, name)
        if name == masked:
            record.expression_valid = np.ones(record.expression.shape[0], dtype=bool)
            record.expression_valid[:10] = False
        return record

    monkeypatch.setattr(packing, "read_segment_record", read_with_gap)
    manifest = pack(config(corpus, max_chunk_seconds=60.0), tmp_path, workers=1, progress=False)
    samples = {sample["key"]: sample for sample in decoded_samples(tmp_path, "train")}
    valid = samples[masked]["expression_valid"]
    assert valid.dtype == np.bool_ and not valid[0] and valid[-1] and (~valid).sum() < 40
    assert "expression_valid" in samples[masked]["header"]["streams"]
    assert all("expression_valid" not in sample for key, sample in samples.items() if key != masked)
    expression = np.concatenate([s["expression"][s.get("expression_valid", slice(None))] for s in samples.values()])
    assert manifest["stats"]["expression"]["count"] == expression.shape[0] < manifest["stats"]["mel"]["count"]
    np.testing.assert_allclose(manifest["stats"]["expression"]["mean"], expression.astype(np.float64).mean(axis=0),
                               rtol=1e-9, atol=1e-12)
    verify(tmp_path)


def test_packing_is_byte_identical_across_runs_and_worker_counts(packed, tmp_path):
    cfg, output, _ = packed
    pack(cfg, tmp_path, workers=2, progress=False)
    first, second = shard_paths(output), shard_paths(tmp_path)
    assert [path.name for path in first] == [path.name for path in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert Path(f"{a}.json").read_text() == Path(f"{b}.json").read_text()


def test_resume_rewrites_only_the_missing_shard(packed, tmp_path, monkeypatch):
    cfg, output, _ = packed
    folder = tmp_path / "shards"
    shutil.copytree(output, folder)
    lost = folder / "demo-train-000001.tar"
    original = lost.read_bytes()
    lost.unlink()
    Path(f"{lost}.json").unlink()
    stale = folder / ".demo-train-000000.tar.999.tmp"
    stale.write_bytes(b"half a shard")
    kept = {path: path.stat().st_mtime_ns for path in folder.glob("demo-*") if not path.name.startswith(lost.name)}

    written = []
    write_shard = packing._write_shard
    monkeypatch.setattr(packing, "_write_shard", lambda job: written.append(job.path.name) or write_shard(job))
    manifest = pack(cfg, folder, workers=1, progress=False)
    assert written == [lost.name]
    assert lost.read_bytes() == original
    assert not stale.exists()
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert manifest["splits"] == load_manifest(output)["splits"]


def test_a_changed_plan_rewrites_the_shards(packed, tmp_path, monkeypatch):
    cfg, output, _ = packed
    shutil.copytree(output, tmp_path / "shards")
    written = []
    write_shard = packing._write_shard
    monkeypatch.setattr(packing, "_write_shard", lambda job: written.append(job.path.name) or write_shard(job))
    manifest = pack(config(cfg.data.root, max_chunk_seconds=60.0, segments_per_shard=8), tmp_path / "shards",
                    workers=1, progress=False)
    assert written == ["demo-train-000000.tar", "demo-val-000000.tar"]
    assert sorted(path.name for path in shard_paths(tmp_path / "shards")) == sorted(written)
    assert manifest["splits"]["train"]["samples"] == 3


def test_bad_segments_are_all_listed_before_anything_is_written(damaged, tmp_path):
    root, bad = damaged
    with pytest.raises(ValueError) as raised:
        pack(config(root), tmp_path / "out", workers=1, progress=False)
    lines = str(raised.value).splitlines()
    assert "3 bad segment(s)" in lines[0]
    assert sorted(line.split(":")[0] for line in lines[1:]) == sorted(bad.values())
    reasons = {line.split(":")[0]: line for line in lines[1:]}
    assert "NaN" in reasons[bad["nan"]] and "expression_codes" in reasons[bad["nan"]]
    assert "missing token logits" in reasons[bad["missing tokens"]]
    assert "disagree" in reasons[bad["length mismatch"]] and "headpose" in reasons[bad["length mismatch"]]
    assert [path.name for path in (tmp_path / "out").iterdir()] == [LOCK_FILE]  # only the pack's lock: no shard


def test_skip_bad_counts_them_and_packs_the_rest(damaged, tmp_path):
    root, bad = damaged
    manifest = pack(config(root), tmp_path / "out", workers=1, skip_bad=True, progress=False)
    assert sorted(entry["segment"] for entry in manifest["bad"]) == sorted(bad.values())
    assert (manifest["splits"]["train"]["segments"], manifest["splits"]["val"]["segments"]) == (1, 1)
    assert manifest["dims"]["participant_features"] == sum(SMIRK_WIDTHS.values())
    samples = decoded_samples(tmp_path / "out")
    assert {sample["header"]["segment"] for sample in samples} == {"20240401_s003", "20240408_s000"}
    assert all(sample["participant_features"].shape == (sample["header"]["frames"], 58) for sample in samples)
    verify(tmp_path / "out")


def test_a_segment_that_fails_while_writing_abandons_its_shard(corpus, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(corpus, root)
    overflowing = "20240401_s002"

    def overflow(values):
        values[0, 0] = 1e6
        return values

    edit_npy(stream_paths(root, overflowing)["expression"], overflow)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{overflowing}: .*float16 range"):
        pack(config(root), output, workers=1, progress=False)
    assert not (output / "demo-train-000001.tar").exists() and (output / "demo-train-000000.tar").exists()
    assert not list(output.glob(".*.tmp")) and not (output / "manifest.json").exists()

    manifest = pack(config(root), output, workers=1, skip_bad=True, progress=False)
    assert [entry["segment"] for entry in manifest["bad"]] == [overflowing]
    sidecar = json.loads((output / "demo-train-000001.tar.json").read_text())
    assert sidecar["bad"][0]["segment"] == overflowing and sidecar["samples"] == 0

    with pytest.raises(ValueError, match=overflowing):  # a shard with a bad segment is never reused
        pack(config(root), output, workers=1, progress=False)
    assert not (output / "manifest.json").exists()  # the folder no longer claims to be complete


def test_verify_names_every_corrupted_shard(packed, tmp_path):
    _, output, _ = packed
    folder = tmp_path / "shards"
    shutil.copytree(output, folder)
    truncated, flipped = folder / "demo-train-000000.tar", folder / "demo-val-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    data = bytearray(flipped.read_bytes())
    data[2000] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError) as raised:
        verify(folder)
    message = str(raised.value)
    assert "2 bad shard(s)" in message
    assert f"{truncated}: size 5000 bytes" in message and f"{flipped}: sha256 differs" in message
    assert "demo-train-000001.tar" not in message


def test_verify_checks_the_tar_contents_against_the_manifest(packed, tmp_path):
    _, output, _ = packed
    folder = tmp_path / "shards"
    shutil.copytree(output, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["dims"]["pose"] = 4
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"pose is float32 \(\d+, 7\); expected float32 \(\d+, 4\)"):
        verify(folder)


def test_load_manifest_explains_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="expected format 'avflow-shards-v1', got 'other'"):
        load_manifest(tmp_path)


def test_the_stock_webdataset_reader_decodes_the_shards(packed):
    _, output, manifest = packed
    urls = [str(path) for path in shard_paths(output)]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"]
    assert [sample["__key__"] for sample in samples] == [sample["key"] for sample in decoded_samples(output)]
    for sample in samples:
        frames = sample["json"]["frames"]
        assert sample["mel.npy"].shape == (frames, 80) and sample["mel.npy"].dtype == np.float16
        assert sample["expression.npy"].shape == (frames, 256)
        assert sample["pose.npy"].shape == (frames, 7) and sample["pose.npy"].dtype == np.float32
        assert sample["tokens.npy"].shape == (frames, 29)


def test_participant_mel_is_packed_and_streamed_when_asked_for(corpus, tmp_path):
    from avflow.data.loader import training_batches

    cfg = config(corpus)
    cfg.data.participant_mel = True
    cfg.loader.segment_length = 32
    cfg.trainer.batch_size = 2
    manifest = pack(cfg, tmp_path, workers=1, progress=False)
    assert manifest["dims"]["participant_mel"] == 80
    batch = next(iter(training_batches(tmp_path, cfg)))
    assert batch["participant_mel"].shape == (2, 32, 80)
    assert not torch.allclose(batch["participant_mel"], batch["mel"])
