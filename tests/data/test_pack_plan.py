"""Which config keys packed shards follow: the `data` and `mel` sections, and no other.

Every key of every other section is changed in turn to another valid value (found from its type, so a key added
later is covered without being listed here): `pack` into the folder of an earlier pack keeps every shard file
untouched, and the kept shards are byte-identical to a fresh pack under the changed config, so no key outside
`data` changes what a shard holds. The counter-checks: a `data` key that changes the shards' content makes `pack`
rewrite them, and a key that changes no shard byte has no place in `data`.
"""

import dataclasses
import shutil
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from test_layout_a2p import write_subject
from test_shards import TINY, config, shard_paths

from avflow.config import Config, ConfigError, DataConfig
from avflow.data.corpus import write_corpus
from avflow.data.pack import ShardJob, pack

SHARD_SECTIONS = ("data", "mel")
# pack.name is the shards' file prefix, like the output folder: another name packs another set beside these.
NAMES_THE_SHARDS = {"pack.name"}
# Keys whose every valid value is fixed by a shard key, so they cannot change on their own.
FIXED_BY_A_SHARD_KEY = {"model.mel_dim": "equal to mel.n_mels"}


def _non_shard_keys() -> list[str]:
    keys = []
    for item in dataclasses.fields(Config):
        hint = typing.get_type_hints(Config)[item.name]
        if item.name in SHARD_SECTIONS:
            continue
        if dataclasses.is_dataclass(hint):
            keys += [f"{item.name}.{sub.name}" for sub in dataclasses.fields(hint)]
        else:
            keys.append(item.name)
    return keys


def _owner(cfg: Config, key: str) -> tuple[Any, str]:
    section, _, name = key.rpartition(".")
    return (getattr(cfg, section) if section else cfg), name


def _other_values(cfg: Config, key: str) -> list[Any]:
    """Candidates of the key's type other than its current value; the caller keeps the first that validates."""
    owner, name = _owner(cfg, key)
    hint, value = typing.get_type_hints(type(owner))[name], getattr(owner, name)

    def others(hint, value) -> list:
        if hint is bool:
            return [not value]
        if typing.get_origin(hint) is Literal:
            return [choice for choice in typing.get_args(hint) if choice != value]
        if hint is int:
            return [value * 2, value + 1, value + 2, value - 1, value - 3]
        if hint is float:
            return [value * 2, value / 2, value + 0.5, value + 1.0]
        if hint is str:
            return [f"{value}-changed" if value else "changed"]
        if typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            if typing.get_origin(item) is Literal:
                return [value[:-1], [choice for choice in typing.get_args(item) if choice not in value][:1] + value]
            if not value:  # an empty list (model.identities): one element of the item's type
                return [[others(item, item())[0]]]
            per_item = [others(item, element) for element in value]
            return [[options[index] for options in per_item] for index in range(min(map(len, per_item)))]
        raise AssertionError(f"{key}: no other values for type {hint}")

    return [other for other in others(hint, value) if other != value]


def _with(base: Path, changes: dict[str, Any]) -> Config | None:
    cfg = config(base)
    for key, value in changes.items():
        owner, name = _owner(cfg, key)
        setattr(owner, name, value)
    try:
        return cfg.validate()
    except ConfigError:
        return None


def changed_config(root: Path, key: str) -> Config | None:
    """A valid config differing from `config(root)` in `key`, and in one other non-shard key where `key` is tied to
    it (model.head_latent_dim to head_vae.latent_dim); None when every valid value of `key` is the current one."""
    current = config(root)
    for value in _other_values(current, key):
        if (cfg := _with(root, {key: value})) is not None:
            return cfg
    for other in _non_shard_keys():
        for value in _other_values(current, key):
            for other_value in _other_values(current, other):
                if other != key and (cfg := _with(root, {key: value, other: other_value})) is not None:
                    return cfg
    return None


def file_states(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime, size) of every shard and sidecar: a rewritten file gets a new inode (written, then renamed)."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_size)
            for path in sorted(folder.glob("*.tar*"))}


@pytest.fixture(scope="module")
def packed_once(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, TINY)
    output = tmp_path_factory.mktemp("packed")
    pack(config(root), output, workers=1, progress=False)
    return root, output


@pytest.mark.parametrize("key", [key for key in _non_shard_keys() if key not in NAMES_THE_SHARDS])
def test_changing_a_key_outside_data_and_mel_keeps_every_shard(packed_once, tmp_path, key):
    root, output = packed_once
    cfg = changed_config(root, key)
    if key in FIXED_BY_A_SHARD_KEY:
        assert cfg is None, f"{key} can change on its own now: drop it from FIXED_BY_A_SHARD_KEY"
        return
    assert cfg is not None, f"{key}: no valid value other than the default found; extend _other_values"
    owner, name = _owner(cfg, key)
    assert getattr(owner, name) != getattr(_owner(config(root), key)[0], name)

    before = file_states(output)
    pack(cfg, output, progress=False)
    assert file_states(output) == before, f"changing {key} rewrote shards"

    pack(cfg, tmp_path, workers=1, progress=False)
    fresh = shard_paths(tmp_path)
    assert [path.name for path in fresh] == [path.name for path in shard_paths(output)]
    for path in fresh:
        assert path.read_bytes() == (output / path.name).read_bytes(), f"{key} changes what {path.name} holds"


@pytest.mark.parametrize("key, value", [("data.canonical_quaternion_sign", False), ("data.segments_per_shard", 3),
                                        ("data.max_chunk_seconds", 2.0), ("mel.n_mels", 64)])
def test_changing_a_shard_key_rewrites_the_shards(packed_once, tmp_path, key, value):
    root, output = packed_once
    folder = tmp_path / "shards"
    shutil.copytree(output, folder)
    before = file_states(folder)
    cfg = _with(root, {key: value, "model.mel_dim": value} if key == "mel.n_mels" else {key: value})
    assert cfg is not None
    pack(cfg, folder, workers=1, progress=False)
    after = file_states(folder)
    assert after and not set(after.items()) & set(before.items()), f"changing {key} kept shards packed before it"


def test_every_data_key_is_read_where_shards_are_made(packed_once, tmp_path, monkeypatch):
    """A key that only the loader, trainer or validation reads (one moved into `data`, say) has no place there: each
    `data` key is read while a 50h or an Audio2Photoreal dataset is packed, its recording in the plan aside."""
    root, _ = packed_once
    keys = {item.name for item in dataclasses.fields(DataConfig)}
    read: set[str] = set()
    recording = [False]

    class RecordingDataConfig(DataConfig):
        def __getattribute__(self, name):
            if recording[0] and name in keys:
                read.add(name)
            return super().__getattribute__(name)

    plan = ShardJob.plan

    def unrecorded_plan(job):
        recording[0] = False
        try:
            return plan(job)
        finally:
            recording[0] = True

    monkeypatch.setattr(ShardJob, "plan", unrecorded_plan)
    subject = write_subject(tmp_path / "a2p", "PXB184")
    a2p = Config(data=DataConfig(layout="a2p", root=str(subject.parent), subject=subject.name))
    for cfg, output in ((config(root), tmp_path / "50h"), (a2p, tmp_path / "a2p-shards")):
        cfg.data = RecordingDataConfig(**dataclasses.asdict(cfg.data))
        recording[0] = True
        pack(cfg, output, workers=1, progress=False)
        recording[0] = False
    assert sorted(keys - read) == [], "data keys read nowhere shards are made"
