"""One reader per on-disk dataset layout; each yields layout-neutral SegmentRecords at native rates.

`list_segment_names` and `read_segment_record` dispatch on `data.layout`, so the packer and the trainer
never branch on the layout themselves.
"""

from __future__ import annotations

from pathlib import Path

from avflow.config import DataConfig
from avflow.data.layouts import fifty_h
from avflow.data.records import SegmentRecord


def list_segment_names(cfg: DataConfig) -> list[str]:
    if cfg.layout == "50h":
        return fifty_h.list_segments(cfg.root)
    raise ValueError(f"data.layout={cfg.layout!r}: no reader for this layout")


def read_segment_record(cfg: DataConfig, name: str) -> SegmentRecord:
    if cfg.layout == "50h":
        return fifty_h.read_record(Path(cfg.root), name, cfg)
    raise ValueError(f"data.layout={cfg.layout!r}: no reader for this layout")
