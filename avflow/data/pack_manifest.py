"""The manifest of a pack: per-split counts and hours, per-identity statistics, merged from the shards' sidecars.

Each shard's sidecar keeps sufficient statistics (count, sum, sum of squares) per identity and feature, so the
normalization statistics of the train split, whole and per identity, are merged here without re-reading data.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

import numpy as np

from avflow.config import Config, DataConfig, MelConfig
from avflow.data.shard_format import FORMAT, OPTIONAL_STREAMS, REQUIRED_STREAMS, SPLITS

STAT_FEATURES = ("mel", "expression", "pose", "tokens")


def empty_stats() -> dict[str, dict | None]:
    return {feature: None for feature in STAT_FEATURES}


def max_chunk_frames(data_cfg: DataConfig, mel_cfg: MelConfig) -> int:
    """data.max_chunk_seconds in mel frames: the longest sample a shard holds."""
    return int(data_cfg.max_chunk_seconds * mel_cfg.frame_rate)


def accumulate(stats: dict[str, dict | None], arrays: dict[str, np.ndarray]) -> None:
    """Add count, sum and sum of squares of the stored values (expression: valid frames only)."""
    for feature in STAT_FEATURES:
        values = arrays[feature].astype(np.float64)
        if feature == "expression" and "expression_valid" in arrays:
            values = values[arrays["expression_valid"]]
        if stats[feature] is None:
            stats[feature] = {"count": 0, "sum": np.zeros(values.shape[1]), "sum_sq": np.zeros(values.shape[1])}
        stats[feature]["count"] += values.shape[0]
        stats[feature]["sum"] += values.sum(axis=0)
        stats[feature]["sum_sq"] += np.square(values).sum(axis=0)


def listed_stats(stats: dict[str, dict | None]) -> dict[str, dict[str, Any]]:
    return {feature: {"count": value["count"], "sum": value["sum"].tolist(), "sum_sq": value["sum_sq"].tolist()}
            for feature, value in stats.items() if value is not None}


def build_manifest(cfg: Config, shard_splits: list[str], sidecars: list[dict[str, Any]], bad: list[dict[str, str]],
                   dataset_name: str) -> dict[str, Any]:
    """The manifest of a pack from its shards' sidecars (`shard_splits[i]` the split of `sidecars[i]`)."""
    frame_rate = cfg.mel.frame_rate
    splits = {}
    for split in SPLITS:
        entries = [sidecar for shard_split, sidecar in zip(shard_splits, sidecars) if shard_split == split]
        frames = sum(sidecar["frames"] for sidecar in entries)
        splits[split] = {
            "shards": [{key: sidecar[key] for key in ("file", "samples", "frames", "bytes", "sha256")}
                       for sidecar in entries],
            "segments": sum(len(sidecar["plan"]["segments"]) - len(sidecar["bad"]) for sidecar in entries),
            "samples": sum(sidecar["samples"] for sidecar in entries),
            "frames": frames,
            "hours": frames / frame_rate / 3600.0,
        }
    if splits["train"]["samples"] == 0:
        raise ValueError(f"{dataset_name}: no training segment could be packed "
                         f"(every readable segment matches the validation rule, or all are bad)")
    return {
        "format": FORMAT,
        "layout": "+".join(sorted({source.layout for source in cfg.data.per_source()})),
        "name": cfg.pack.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mel": dataclasses.asdict(cfg.mel),
        "frame_rate": frame_rate,
        "max_chunk_frames": max_chunk_frames(cfg.data, cfg.mel),
        "dims": _merged_dims(sidecars),
        "splits": splits,
        "stats": _train_stats([part["stats"] for shard_split, sidecar in zip(shard_splits, sidecars)
                               if shard_split == "train" for part in sidecar["identities"].values()], "train split"),
        "identities": _identities(shard_splits, sidecars, frame_rate),
        "bad": bad,
    }


def _identities(shard_splits: list[str], sidecars: list[dict[str, Any]],
                frame_rate: float) -> dict[str, dict[str, Any]]:
    """Per identity, sorted by name: segments and hours per split, and train statistics merged from the shards."""
    names = sorted({name for sidecar in sidecars for name in sidecar["identities"]})
    merged = {}
    for name in names:
        parts = {split: [sidecar["identities"][name] for shard_split, sidecar in zip(shard_splits, sidecars)
                         if shard_split == split and name in sidecar["identities"]] for split in SPLITS}
        if not parts["train"]:
            raise ValueError(f"identity {name!r}: no training segment was packed, only validation ones; expected at "
                             f"least one per identity (its normalization statistics come from its training data)")
        merged[name] = {
            "segments": {split: sum(part["segments"] for part in parts[split]) for split in SPLITS},
            "hours": {split: sum(part["frames"] for part in parts[split]) / frame_rate / 3600.0 for split in SPLITS},
            "stats": _train_stats([part["stats"] for part in parts["train"]],
                                  f"identity {name!r}, train split"),
        }
    return merged


def _merged_dims(sidecars: list[dict[str, Any]]) -> dict[str, int]:
    """Per-stream feature widths, which must agree across every shard."""
    dims: dict[str, int] = {}
    for sidecar in sidecars:
        for stream, width in sidecar["dims"].items():
            if dims.setdefault(stream, width) != width:
                raise ValueError(f"shard {sidecar['file']}: {stream} has {width} dims; expected {dims[stream]} "
                                 f"like the shards before it")
    return {stream: dims[stream] for stream in (*REQUIRED_STREAMS, *OPTIONAL_STREAMS) if stream in dims}


def _train_stats(shard_stats: list[dict[str, Any]], what: str) -> dict[str, dict[str, Any]]:
    """Per-feature mean and std of `what`, merged from sufficient statistics (count, sum, sum_sq) per shard."""
    merged = {}
    for feature in STAT_FEATURES:
        parts = [stats[feature] for stats in shard_stats if feature in stats]
        count = sum(part["count"] for part in parts)
        if count == 0:
            raise ValueError(f"{what}: no frames of {feature} to compute statistics from "
                             f"(expression counts only frames marked valid)")
        total = np.sum([part["sum"] for part in parts], axis=0)
        total_sq = np.sum([part["sum_sq"] for part in parts], axis=0)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
        merged[feature] = {"count": count, "mean": mean.tolist(), "std": std.tolist()}
    return merged

