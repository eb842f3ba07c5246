"""Identity as data: several dataset roots packed into one shard folder, each sample recording its identity, the
manifest's per-identity segments, hours and statistics, batches that carry identity indices, and old shard folders
read as one `default` identity."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_layout_manifest import corpus_line, write_manifest
from test_pack_plan import file_states
from test_shards import config, decoded_samples

from avflow.cli import main
from avflow.config import ConfigError, CorpusConfig, SourceConfig, load_config
from avflow.data.corpus import write_corpus
from avflow.data.layouts import list_segment_names
from avflow.data.layouts.fifty_h import is_validation
from avflow.data.loader import training_batches, validation_batches
from avflow.data.pack import pack
from avflow.data.shard_format import DEFAULT_IDENTITY, add_members, identities, iter_shard_samples, load_manifest
from avflow.data.shard_index import iter_split_samples
from avflow.data.verify import verify
from avflow.evaluate.run import held_out_segments
from avflow.train.batches import train_head_vae_stage
from avflow.utils import file_sha256, load_torch

PEOPLE = ("bright", "demo")  # two demo-corpus personas: different voices, faces and head motion
STAT_FEATURES = ("mel", "expression", "pose", "tokens")


def two_source_config(roots: dict[str, Path]):
    cfg = config(roots[PEOPLE[0]])
    cfg.data.sources = [SourceConfig(layout="50h", root=str(roots[name]), identity=name) for name in PEOPLE]
    return cfg.validate()


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """Each person's corpus packed alone (data.identity naming it) and both packed into one folder."""
    roots, alone = {}, {}
    for name in PEOPLE:
        roots[name] = tmp_path_factory.mktemp(f"corpus-{name}")
        write_corpus(roots[name], CorpusConfig(train_segments=3, val_segments=1, words_per_segment=[2, 3],
                                               identity=name))
        alone[name] = tmp_path_factory.mktemp(f"alone-{name}")
        pack(config(roots[name], identity=name), alone[name], workers=1, progress=False)
    both = tmp_path_factory.mktemp("both")
    pack(two_source_config(roots), both, workers=1, progress=False)
    return roots, alone, both


def direct_stats(samples: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean and std per feature over the stored train arrays, computed from the samples themselves."""
    stats = {}
    for feature in STAT_FEATURES:
        parts = []
        for sample in samples:
            values = sample[feature].astype(np.float64)
            parts.append(values[sample["expression_valid"]] if feature == "expression" and "expression_valid" in sample
                         else values)
        values = np.concatenate(parts)
        stats[feature] = (values.mean(axis=0), values.std(axis=0))
    return stats


def test_the_manifest_lists_each_identity_with_its_segments_hours_and_own_statistics(packs):
    roots, alone, both = packs
    listed = load_manifest(both)["identities"]
    assert list(listed) == sorted(PEOPLE)
    for name in PEOPLE:
        names = list_segment_names(config(roots[name]).data)
        val = [segment for segment in names if is_validation(segment, config(roots[name]).data.val_patterns)]
        assert listed[name]["segments"] == {"train": len(names) - len(val), "val": len(val)}
        own = load_manifest(alone[name])["splits"]
        for split in ("train", "val"):
            frames = sum(sample["mel"].shape[0] for sample in decoded_samples(alone[name], split))
            assert listed[name]["hours"][split] == pytest.approx(frames / config(roots[name]).mel.frame_rate / 3600)
            assert listed[name]["hours"][split] == pytest.approx(own[split]["hours"])
        for feature, (mean, std) in direct_stats(decoded_samples(alone[name], "train")).items():
            assert listed[name]["stats"][feature]["mean"] == pytest.approx(mean.tolist(), rel=1e-9, abs=1e-9)
            assert listed[name]["stats"][feature]["std"] == pytest.approx(std.tolist(), rel=1e-6, abs=1e-9)
            assert listed[name]["stats"][feature]["count"] == load_manifest(alone[name])["stats"][feature]["count"]
    mean_a, mean_b = (np.array(listed[name]["stats"]["mel"]["mean"]) for name in PEOPLE)
    assert np.abs(mean_a - mean_b).max() > 0.01, "the two corpora should differ; the test would prove nothing"
    for feature, (mean, _) in direct_stats(decoded_samples(both, "train")).items():
        assert load_manifest(both)["stats"][feature]["mean"] == pytest.approx(mean.tolist(), rel=1e-9, abs=1e-9)


def test_samples_carry_their_identity_under_unique_keys_and_hold_their_own_data(packs):
    roots, alone, both = packs
    samples = decoded_samples(both)
    keys = [sample["key"] for sample in samples]
    assert len(keys) == len(set(keys))
    for name in PEOPLE:
        mine = {sample["key"]: sample for sample in samples if sample["header"]["identity"] == name}
        own = decoded_samples(alone[name])
        assert sorted(mine) == sorted(f"{name}-{sample['key']}" for sample in own)
        for sample in own:
            assert sample["header"]["identity"] == name
            stored = mine[f"{name}-{sample['key']}"]
            for stream in STAT_FEATURES:
                np.testing.assert_array_equal(stored[stream], sample[stream])


def test_a_single_source_keeps_its_segment_names_as_keys_and_names_its_identity(packs):
    roots, alone, _ = packs
    samples = decoded_samples(alone[PEOPLE[0]])
    segments = set(list_segment_names(config(roots[PEOPLE[0]]).data))
    assert {sample["header"]["segment"] for sample in samples} == segments
    assert {sample["key"].split("__c")[0] for sample in samples} == segments
    assert list(load_manifest(alone[PEOPLE[0]])["identities"]) == [PEOPLE[0]]


def test_without_data_identity_a_root_packs_as_the_default_identity(packs, tmp_path):
    roots, _, _ = packs
    manifest = pack(config(roots[PEOPLE[0]]), tmp_path, workers=1, progress=False)
    assert list(manifest["identities"]) == [DEFAULT_IDENTITY]
    assert {sample["header"]["identity"] for sample in decoded_samples(tmp_path)} == {DEFAULT_IDENTITY}


def as_packed_before_identities(folder: Path) -> None:
    """Rewrite a shard folder as avflow wrote it before identities: no identity in sample headers or manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["identities"]
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            path = folder / entry["file"]
            samples = list(iter_shard_samples(path))
            with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
                for key, members in samples:
                    header = json.loads(members["json"])
                    del header["identity"]
                    members = {**members, "json": json.dumps(header, sort_keys=True).encode()}
                    add_members(tar, {f"{key}.{suffix}": data for suffix, data in members.items()})
            entry["bytes"], entry["sha256"] = path.stat().st_size, file_sha256(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_old_shard_folder_reads_as_one_default_identity(packs, tmp_path):
    _, alone, _ = packs
    old = tmp_path / "old"
    shutil.copytree(alone[PEOPLE[0]], old)
    as_packed_before_identities(old)
    manifest = load_manifest(old)
    assert identities(manifest) == {DEFAULT_IDENTITY: {
        "segments": {split: manifest["splits"][split]["segments"] for split in ("train", "val")},
        "hours": {split: manifest["splits"][split]["hours"] for split in ("train", "val")},
        "stats": manifest["stats"]}}
    assert verify(old)["samples"] == load_manifest(alone[PEOPLE[0]])["splits"]["train"]["samples"] + \
        load_manifest(alone[PEOPLE[0]])["splits"]["val"]["samples"]
    assert {sample.identity for sample in iter_split_samples(old, "val")} == {DEFAULT_IDENTITY}
    cfg = config(old)
    cfg.loader.segment_length = 32
    batch = next(iter(training_batches(old, cfg)))
    assert batch["identity"].dtype.is_signed and batch["identity"].tolist() == [0] * cfg.trainer.batch_size


def containing_sample(window: np.ndarray, samples: list[dict]) -> dict:
    """The one sample whose mel holds this window of frames."""
    found = [sample for sample in samples for start in range(sample["mel"].shape[0] - len(window) + 1)
             if np.array_equal(sample["mel"][start:start + len(window)].astype(np.float32), window)]
    assert len(found) == 1
    return found[0]


def test_training_batches_carry_each_window_s_identity_and_mix_identities(packs):
    _, _, both = packs
    cfg = config(both)
    cfg.loader.segment_length = 32
    cfg.trainer.batch_size = 6
    samples = decoded_samples(both, "train")
    names = sorted(PEOPLE)
    mixed = 0
    for batch, _ in zip(training_batches(both, cfg), range(4)):
        for row in range(cfg.trainer.batch_size):
            length = int(batch["valid"][row].sum())
            sample = containing_sample(batch["mel"][row, :length].numpy(), samples)
            assert names[int(batch["identity"][row])] == sample["header"]["identity"]
        mixed += len(set(batch["identity"].tolist())) > 1
    assert mixed > 0, "no batch mixed the two identities"


def test_validation_batches_and_split_samples_name_each_identity(packs):
    _, _, both = packs
    cfg = config(both)
    cfg.loader.segment_length = 32
    names = sorted(PEOPLE)
    rows = []
    for batch in validation_batches(both, cfg):
        rows += [(key, names[index]) for key, index in zip(batch["keys"], batch["identity"].tolist())]
    assert {identity for _, identity in rows} == set(PEOPLE)
    assert all(key.startswith(f"{identity}-") for key, identity in rows)
    for samples in (list(iter_split_samples(both, "val", ("mel",))), held_out_segments(both)):
        assert sorted({sample.identity for sample in samples}) == names
        assert all(sample.key.startswith(f"{sample.identity}-") for sample in samples)


def test_repacking_keeps_every_shard_and_renaming_a_source_s_identity_rewrites_its_shards(packs, tmp_path):
    roots, _, both = packs
    folder = tmp_path / "shards"
    shutil.copytree(both, folder)
    before = file_states(folder)
    pack(two_source_config(roots), folder, workers=1, progress=False)
    assert file_states(folder) == before

    cfg = two_source_config(roots)
    cfg.data.sources[1].identity = "carl"
    pack(cfg, folder, workers=1, progress=False)
    assert not set(file_states(folder).items()) & set(before.items())
    assert list(load_manifest(folder)["identities"]) == ["bright", "carl"]


def test_changing_one_manifest_line_s_identity_rewrites_that_shard_only(packs, tmp_path):
    roots, _, _ = packs
    root = roots[PEOPLE[0]]
    names = list_segment_names(config(root).data)
    lines = [corpus_line(root, name, "anna") for name in names]
    manifest = write_manifest(tmp_path / "capture" / "recordings.jsonl", lines)
    cfg = config(manifest, layout="manifest")
    folder = tmp_path / "shards"
    pack(cfg, folder, workers=1, progress=False)
    before = file_states(folder)

    train = [line["segment"] for line in lines if line["split"] == "train"]
    lines[names.index(train[-1])]["identity"] = "ben"  # the last train shard holds it, alone or with others
    write_manifest(manifest, lines)
    pack(cfg, folder, workers=1, progress=False)
    after = file_states(folder)
    changed = sorted(name for name in after if after[name] != before.get(name))
    last_train = sorted(name for name in after if "-train-" in name and name.endswith(".tar"))[-1]
    assert changed == [last_train, f"{last_train}.json"]
    assert load_manifest(folder)["identities"]["ben"]["segments"] == {"train": 1, "val": 0}


def test_a_bad_source_layout_or_two_sources_with_one_identity_and_equal_names_fail_naming_them(packs, tmp_path):
    roots, _, _ = packs
    cfg = two_source_config(roots)
    cfg.data.sources[1].layout = "fifty"
    with pytest.raises(ConfigError, match=r"^data.sources\[1\].layout: expected one of .*, got 'fifty'$"):
        pack(cfg, tmp_path, workers=1, progress=False)
    cfg.data.sources[1].layout = "50h"
    cfg.data.sources[1].identity = "bright"
    with pytest.raises(ValueError, match=r"data.sources\[1\]: segment .* of identity 'bright' is also in "
                                         r"data.sources\[0\]"):
        pack(cfg, tmp_path, workers=1, progress=False)
    assert not list(tmp_path.glob("*.tar"))


def test_verify_checks_the_per_identity_counts(packs, tmp_path):
    _, _, both = packs
    folder = tmp_path / "shards"
    shutil.copytree(both, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["identities"]["demo"]["segments"]["train"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="identity 'demo' lists 4 train segments, its shards hold 3"):
        verify(folder)


def test_sources_load_from_yaml_and_bad_ones_are_one_named_error(tmp_path):
    path = tmp_path / "people.yaml"
    path.write_text("data:\n  sources:\n    - {root: /data/anna, identity: anna}\n"
                    "    - {layout: a2p, root: /data/a2p, subject: PXB184}\n")
    sources = load_config(path).data.sources
    assert sources == [SourceConfig(root="/data/anna", identity="anna"),
                       SourceConfig(layout="a2p", root="/data/a2p", subject="PXB184")]
    for text, message in (("[{roots: /x}]", r"unknown config key 'data.sources\[0\].roots'"),
                          ("[{root: /x, identity: 'an na'}]", r"data.sources\[0\].identity: expected a name"),
                          ("[{identity: anna}]", r"data.sources\[0\].root: expected the dataset folder"),
                          ("/data/anna", "data.sources: expected a list")):
        path.write_text(f"data:\n  sources: {text}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_pack_takes_sources_from_the_config_and_refuses_single_source_options_beside_them(packs, tmp_path, capsys):
    roots, _, _ = packs
    sources = json.dumps([{"root": str(roots[name]), "identity": name} for name in PEOPLE])
    overrides = [f"data.sources={sources}", "data.max_chunk_seconds=1.0"]
    assert main(["pack", "-o", str(tmp_path / "shards"), *overrides]) == 0
    assert list(load_manifest(tmp_path / "shards")["identities"]) == sorted(PEOPLE)
    assert main(["pack", "-o", str(tmp_path / "shards"), "--verify"]) == 0

    capsys.readouterr()
    assert main(["pack", "-i", str(roots[PEOPLE[0]]), "-o", str(tmp_path / "other"), *overrides]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "-i: describe a single dataset source, but data.sources lists 2" in error[0]
    assert not (tmp_path / "other").exists()



def test_an_identity_without_training_segments_is_one_error_naming_it(packs, tmp_path):
    roots, _, _ = packs
    root = roots[PEOPLE[0]]
    lines = [corpus_line(root, name, "anna") for name in list_segment_names(config(root).data)]
    val = next(line for line in lines if line["split"] == "val")
    val["identity"] = "ben"
    manifest = write_manifest(tmp_path / "capture" / "recordings.jsonl", lines)
    with pytest.raises(ValueError, match="^identity 'ben': no training segment was packed, only validation ones"):
        pack(config(manifest, layout="manifest"), tmp_path / "shards", workers=1, progress=False)
    assert not (tmp_path / "shards" / "manifest.json").exists()


@pytest.mark.parametrize("listed", [{}, [], {"anna": {"segments": {"train": 1}}}, {"anna": 3}])
def test_a_manifest_with_malformed_identities_is_one_error(packs, tmp_path, listed):
    _, _, both = packs
    manifest = json.loads((both / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "identities": listed}))
    with pytest.raises(ValueError, match=r"manifest.json: identities: expected \{name: \{\"segments\", \"hours\", "
                                         r"\"stats\"\}\} for at least one identity, got "):
        load_manifest(tmp_path)


def test_the_head_vae_stage_normalizes_each_identity_with_its_manifest_statistics(packs, tmp_path):
    """The head VAE learns the space the batch encoder feeds it: each identity's poses over its own statistics,
    which are the manifest's per-identity pose statistics."""
    _, _, both = packs
    cfg = load_config(None, [f"loader.shards={both}", "head_vae.steps=2", "head_vae.ffn_hidden=8",
                             "head_vae.segment_length=16", "head_vae.batch_size=2"])
    train_head_vae_stage(cfg, tmp_path / "head_vae.pt", progress=False)
    checkpoint = load_torch(tmp_path / "head_vae.pt")
    assert checkpoint["identities"] == sorted(PEOPLE)
    listed = identities(load_manifest(both))
    for row, name in enumerate(sorted(PEOPLE)):
        pose = listed[name]["stats"]["pose"]
        np.testing.assert_allclose(checkpoint["pose_mean"][row].numpy(), pose["mean"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(checkpoint["pose_std"][row].numpy(), pose["std"], rtol=1e-4, atol=1e-5)
