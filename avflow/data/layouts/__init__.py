"""One reader per on-disk dataset layout; each yields layout-neutral SegmentRecords at native rates.

`list_segment_names` and `read_segment_record` dispatch on `data.layout`, so the packer and the trainer
never branch on the layout themselves. The a2p layout reads the subject folder `data.root/data.subject`.
"""

from __future__ import annotations

from pathlib import Path

from avflow.config import DataConfig
from avflow.data.layouts import a2p, fifty_h
from avflow.data.records import SegmentRecord


def subject_root(cfg: DataConfig) -> Path:
    return Path(cfg.root) / cfg.subject


def list_segment_names(cfg: DataConfig) -> list[str]:
    if cfg.layout == "50h":
        return fifty_h.list_segments(cfg.root)
    if cfg.layout == "a2p":
        return a2p.list_scenes(subject_root(cfg))
    raise ValueError(f"data.layout={cfg.layout!r}: no reader for this layout (expected 50h or a2p)")


def read_segment_record(cfg: DataConfig, name: str) -> SegmentRecord:
    if cfg.layout == "50h":
        return fifty_h.read_record(Path(cfg.root), name, cfg)
    if cfg.layout == "a2p":
        return a2p.read_record(subject_root(cfg), name, cfg)
    raise ValueError(f"data.layout={cfg.layout!r}: no reader for this layout (expected 50h or a2p)")
