"""One reader per on-disk dataset layout; each yields layout-neutral SegmentRecords at native rates.

`LAYOUTS` is the registry every choice of layout is read from: data.layout, the --layout options of
`avflow pack` and `avflow extract-asr`, and the launchers. A new layout is one new module here that
defines a `Layout` (avflow.data.layouts.layout) plus its entry below. `list_segment_names` and
`read_segment_record` dispatch on data.layout, so the packer and the trainer never branch on the layout.
"""

from __future__ import annotations

from avflow.config import ConfigError, DataConfig
from avflow.data.layouts import a2p, fifty_h, manifest
from avflow.data.layouts.layout import Layout
from avflow.data.records import SegmentRecord

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (fifty_h.LAYOUT, a2p.LAYOUT, manifest.LAYOUT)}


def layout_choices() -> tuple[str, ...]:
    """What --layout accepts: every registered layout's name and aliases."""
    return tuple(name for layout in LAYOUTS.values() for name in (layout.name, *layout.aliases))


def layout_help() -> str:
    """The help of a --layout option: each layout's name and what its dataset folder holds."""
    return "dataset layout: " + "; ".join(f"{layout.name}, {layout.description}" for layout in LAYOUTS.values())


def layout_named(name: str, source: str = "data.layout") -> Layout:
    """The registered layout `name` (or an alias of it); `source` names the input in the error."""
    for layout in LAYOUTS.values():
        if name == layout.name or name in layout.aliases:
            return layout
    raise ConfigError(f"{source}: expected one of {', '.join(LAYOUTS)}, got {name!r}")


def layout_of(cfg: DataConfig) -> Layout:
    """The layout of data.layout, checked to have the settings it needs before any data is read."""
    layout = layout_named(cfg.layout)
    layout.check(cfg)
    return layout


def list_segment_names(cfg: DataConfig) -> list[str]:
    return layout_of(cfg).list_segments(cfg)


def read_segment_record(cfg: DataConfig, name: str) -> SegmentRecord:
    return layout_named(cfg.layout).read_record(cfg, name)
