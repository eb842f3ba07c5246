"""Reading a Config: YAML files, `section.key=value` overrides and stored config dicts, with keys from before a
move read in their new place.

Unknown keys are errors that name the closest valid key; every value is converted to its field's declared type or
refused naming the field. The sections themselves and their validation: avflow.config.sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from avflow.config.sections import Config, ConfigError

log = logging.getLogger(__name__)

# Keys that moved to another section, old dotted name -> new: config files, overrides, checkpoints and model files
# written before the move still load, with one warning naming each moved key. The old `data` section mixed what
# shards are made of with the loader, the head-VAE path and validation rendering; `data` is now only the first.
MOVED_KEYS = {
    "data.segment_length": "loader.segment_length",
    "data.shards": "loader.shards",
    "data.num_workers": "loader.num_workers",
    "data.shuffle_buffer": "loader.shuffle_buffer",
    "data.max_bad_fraction": "loader.max_bad_fraction",
    "data.head_vae": "trainer.head_vae",
    "data.avatar": "evaluate.avatar",
    "data.avatar_pose": "evaluate.avatar_pose",
    "pack.segments_per_shard": "data.segments_per_shard",
    "pack.max_chunk_seconds": "data.max_chunk_seconds",
}

def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(valid)})"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the field."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, where)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    if isinstance(annotation, types.UnionType):
        raise ConfigError(f"{where}: unsupported union type")
    return value


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, checking each name against the dataclass schema."""
    parts = dotted.split(".")
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        prefix = ".".join(parts[:depth])
        if part not in hints:
            names = list(hints)
            shown = f"{prefix}.{part}" if prefix else part
            raise ConfigError(f"unknown config key '{shown}'{_closest(part, names)}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config key '{'.'.join(parts[:depth + 1])}' is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # `trainer=5` (or a file's `trainer: 5`) before `trainer.lr=...`
            raise ConfigError(f"{'.'.join(parts[:depth + 1])}: expected a mapping of {cls.__name__} fields, "
                              f"got {node!r}")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise ConfigError(f"override '{item}': the value is not valid YAML ({problem})") from error
        parsed.append((key.strip(), value))
    return parsed


def _move_old_keys(tree: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """A copy of a config tree with every key of MOVED_KEYS in its new place, and the moves made ("old -> new").

    A key given both in its old and its new place is an error: which one the user meant is unknown."""
    tree = {name: dict(value) if isinstance(value, dict) else value for name, value in tree.items()}
    moved = []
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        section = tree.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        new_section, new_key = new.split(".")
        target = tree.setdefault(new_section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{where}{new_section}: expected a mapping of config keys, got {target!r}")
        if new_key in target:
            raise ConfigError(f"{where}{old} and {new} are both set; {old} is the old name of {new}, keep only {new}")
        target[new_key] = section.pop(old_key)
        moved.append(f"{old} -> {new}")
    return tree, moved


def _warn_moved(moved: list[str], source: str) -> None:
    if moved:
        log.warning("%s: config keys in their place from before they moved, read in their new one: %s", source,
                    ", ".join(moved))


def _new_name(dotted: str, moved: list[str]) -> str:
    """The override key under its current name, recording a move in `moved`."""
    new = MOVED_KEYS.get(dotted)
    if new is None:
        return dotted
    moved.append(f"{dotted} -> {new} (override)")
    return new


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load defaults <- YAML file <- dotted overrides, then validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        tree = loaded or {}
    tree, moved = _move_old_keys(tree, f"{path}: " if path is not None else "")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, _new_name(key, moved), value)
    cfg = _build(Config, tree).validate()
    _warn_moved(moved, str(path) if path is not None else "overrides")
    return cfg


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """A validated Config from a dict as written by `Config.to_dict` (checkpoints, model files), of this version or
    an earlier one: keys in an old place are moved to their new one, with one warning naming `source`."""
    tree, moved = _move_old_keys(tree, "")
    cfg = _build(Config, tree).validate()
    _warn_moved(moved, source)
    return cfg


def with_overrides(cfg: Config, overrides: list[str], sections: tuple[str, ...]) -> Config:
    """A validated copy of cfg with `section.key=value` overrides applied, only to `sections` (a loaded model's
    other settings are fixed by its weights)."""
    tree = cfg.to_dict()
    for key, value in parse_overrides(overrides):
        if key.split(".")[0] not in sections:
            allowed = ", ".join(f"{section}.*" for section in sections)
            raise ConfigError(f"override '{key}': only {allowed} keys apply here (the rest is fixed by the model)")
        _set_dotted(tree, key, value)
    return config_from_dict(tree)
