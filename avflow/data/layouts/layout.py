"""What a dataset layout tells avflow: how to list and read its segments and where its token files go."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avflow.config import DataConfig
from avflow.data.records import SegmentRecord


def _needs_nothing_more(cfg: DataConfig) -> None:
    """A layout read from data.root alone has no other setting to check."""


def _root_only(folder: Path) -> dict[str, str]:
    return {"root": str(folder)}


@dataclass(frozen=True)
class Layout:
    """One on-disk dataset layout; registered in avflow.data.layouts.LAYOUTS under `name`."""

    name: str  # the value of data.layout and of --layout
    description: str  # one line for --help: what the dataset folder holds
    list_segments: Callable[[DataConfig], list[str]]  # sorted segment names under the data settings
    read_record: Callable[[DataConfig, str], SegmentRecord]  # one segment, checked, as a layout-neutral record
    # (wav, token file) of every recording under a dataset folder, for extract-asr
    recordings: Callable[[Path], list[tuple[Path, Path]]]
    # raises a one-line error naming the data.* key this layout needs and the settings lack
    check: Callable[[DataConfig], None] = _needs_nothing_more
    # the data.* settings a dataset folder given on the command line (pack -i) stands for
    input_settings: Callable[[Path], dict[str, str]] = _root_only
    aliases: tuple[str, ...] = ()  # other names --layout and data.layout accept for it
