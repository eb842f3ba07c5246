"""The layout registry: every choice of layout is read from LAYOUTS, so a layout registered there (here a tiny
one invented by the test) is offered and packed with no other edit, and an unknown one is one line naming the
registered ones, before any work is done."""

import json
from pathlib import Path

import numpy as np
import pytest

import launch.extract_asr
import launch.pack
from avflow.cli import _parsers, main
from avflow.config import ConfigError, DataConfig
from avflow.data.asr import recordings
from avflow.data.layouts import LAYOUTS, list_segment_names
from avflow.data.layouts.layout import Layout
from avflow.data.records import SegmentRecord

FRAMES = 45  # 1.5 s at 30 fps


def read_seeded(cfg: DataConfig, name: str) -> SegmentRecord:
    """A segment whose streams are drawn from the seed in DATASET/{name}.seed; names starting val are held out."""
    rng = np.random.default_rng(int((Path(cfg.root) / f"{name}.seed").read_text()))
    rotation = rng.standard_normal(4)
    head_pose = np.concatenate([np.tile(rotation / np.linalg.norm(rotation), (FRAMES, 1)),
                                rng.standard_normal((FRAMES, 3))], axis=1)
    return SegmentRecord(name=name, is_val=name.startswith("val"),
                         audio=rng.uniform(-0.5, 0.5, (1, FRAMES * 1600)).astype(np.float32), sample_rate=48000,
                         expression=rng.standard_normal((FRAMES, 256)).astype(np.float32),
                         head_pose=head_pose.astype(np.float32), visual_fps=30.0,
                         tokens=rng.standard_normal((1, FRAMES * 5 // 3, 29)).astype(np.float32), token_fps=50.0)


SEEDED = Layout(
    name="seeded",
    description="segments drawn from seeds: DATASET/{segment}.seed",
    list_segments=lambda cfg: sorted(path.stem for path in Path(cfg.root).glob("*.seed")),
    read_record=read_seeded,
    recordings=lambda folder: [(path.with_suffix(".wav"), path.with_suffix(".npy"))
                               for path in sorted(folder.glob("*.seed"))],
)


@pytest.fixture
def seeded(monkeypatch, tmp_path):
    monkeypatch.setitem(LAYOUTS, SEEDED.name, SEEDED)
    dataset = tmp_path / "seeded"
    dataset.mkdir()
    for seed, name in enumerate(("a", "b", "val1")):
        (dataset / f"{name}.seed").write_text(str(seed))
    return dataset


def layout_option(parser) -> tuple[str, ...]:
    return next(tuple(action.choices) for action in parser._actions if "--layout" in action.option_strings)


def test_a_registered_layout_is_offered_everywhere_and_packs(seeded, tmp_path, capsys):
    commands = _parsers()[1]
    for parser in (commands["pack"], commands["extract-asr"], launch.pack.build_parser(),
                   launch.extract_asr.build_parser()):
        assert layout_option(parser) == ("50h", "demo", "a2p", "manifest", "seeded")
    assert "seeded, segments drawn from seeds" in " ".join(commands["pack"].format_help().split())
    assert recordings(seeded, "seeded") == [(seeded / f"{name}.wav", seeded / f"{name}.npy")
                                            for name in ("a", "b", "val1")]

    assert main(["pack", "--layout", "seeded", "-i", str(seeded), "-o", str(tmp_path / "by_option")]) == 0
    assert main(["pack", "-o", str(tmp_path / "by_config"), "data.layout=seeded", f"data.root={seeded}"]) == 0
    for out in ("by_option", "by_config"):
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert manifest["layout"] == "seeded"
        assert (manifest["splits"]["train"]["segments"], manifest["splits"]["val"]["segments"]) == (2, 1)
    capsys.readouterr()


def test_an_unknown_layout_is_one_line_naming_the_registered_ones(tmp_path, capsys):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    with pytest.raises(ConfigError, match="^data.layout: expected one of 50h, a2p, manifest, got 'mystery'$"):
        list_segment_names(DataConfig(layout="mystery", root=str(dataset)))

    output = tmp_path / "shards"
    assert main(["pack", "-i", str(dataset), "-o", str(output), "data.layout=mystery"]) == 2
    assert capsys.readouterr().err == ("avflow pack: error: data.layout: expected one of 50h, a2p, manifest, got "
                                       "'mystery'\n")
    assert not output.exists()  # failed before any work

    with pytest.raises(SystemExit) as exit_status:  # before anything is queued
        launch.pack.main(["-i", str(dataset), "-o", str(output), "data.layout=mystery", "--partition", "cpu",
                          "--time", "10"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.endswith("error: data.layout: expected one of 50h, a2p, manifest, got 'mystery'\n")
