"""`avflow evaluate` on held-out segments of several identities: each segment generated as its own identity,
per-identity values that equal evaluating each identity's segments alone, an overall value that is their
segment-weighted mean, a single-identity report as before, and one error for an identity a model lacks."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_model_file

from avflow.cli import main
from avflow.config import SampleConfig, load_config
from avflow.data.corpus import PERSONAS
from avflow.evaluate.run import held_out_segments, identity_likeness, markdown_table
from avflow.infer.generate import conditioning, generate_batch
from avflow.infer.model import load_inference_model

PEOPLE = ("bright", "demo")  # two demo-corpus personas: different voices, faces and head motion
METRICS = "mel_l1,expression_l1,expression_frechet,expression_jitter"
FAST = ["--num-samples", "2", "--nfe", "2", "--quiet", "--metrics", METRICS]
TINY = ["model.d_model=32", "model.n_blocks=1", "model.n_heads=2", "model.ffn_hidden=32"]
COLUMNS = ("shared.safetensors", "single.safetensors")  # evaluate names a column by its model's file name
SINGLE_REPORT_KEYS = {"settings", "segments", "columns", "ground_truth", "metrics"}  # the report before identities


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Each persona's corpus packed alone, both packed into one folder (data.sources), and two model files: one
    of both identities, one without an identity table."""
    root = tmp_path_factory.mktemp("identities")
    corpus = ["corpus.train_segments=1", "corpus.val_segments=3", "corpus.words_per_segment=[2, 3]"]
    folders = {}
    for name in PEOPLE:
        assert main(["corpus", *corpus, f"corpus.identity={name}", "-o", str(root / "data" / name)]) == 0
        folders[name] = root / f"alone-{name}"
        assert main(["pack", "-i", str(root / "data" / name), "--identity", name, "-o", str(folders[name])]) == 0
    sources = json.dumps([{"root": str(root / "data" / name), "identity": name} for name in PEOPLE])
    folders["both"] = root / "both"
    assert main(["pack", f"data.sources={sources}", "-o", str(folders["both"])]) == 0
    folders["shared"] = tiny_model_file(root / "shared.safetensors", TINY + [f"model.identities=[{', '.join(PEOPLE)}]"])
    folders["single"] = tiny_model_file(root / "single.safetensors", TINY, seed=1)
    return folders


def evaluate(shards, out, folder, *extra, models=("shared", "single")):
    checkpoints = [part for model in models for part in ("--checkpoint", str(shards[model]))]
    code = main(["evaluate", *checkpoints, "--shards", str(shards[folder]), *FAST, "-o", str(out), *extra])
    report = out / "report.json"
    return code, json.loads(report.read_text()) if report.is_file() else None


def test_each_identitys_values_equal_evaluating_its_segments_alone(shards, tmp_path, capsys):
    code, report = evaluate(shards, tmp_path / "both", "both")
    assert code == 0
    assert list(report["identities"]) == sorted(PEOPLE)
    assert list(report["columns"]) == list(COLUMNS)
    printed = capsys.readouterr().out
    for name in PEOPLE:
        code, alone = evaluate(shards, tmp_path / name, name)
        assert code == 0 and "identities" not in alone  # one identity: the report as before
        part = report["identities"][name]
        assert part["segments"] == len(alone["segments"]) == 3
        for column in ("shared.safetensors", "single.safetensors"):
            assert part["columns"][column] == pytest.approx(alone["columns"][column], rel=1e-5)
        assert part["ground_truth"] == pytest.approx(alone["ground_truth"], rel=1e-6)
        assert f"identity {name} (3 segments):" in printed

    # The shared model generated bright's segments as bright: mel L1 recomputed from the model chosen by name.
    model = load_inference_model(shards["shared"], "cpu", identity="bright")
    segments = [segment for segment in held_out_segments(shards["both"]) if segment.identity == "bright"]
    generated = generate_batch(model, [conditioning(model, segment.arrays["tokens"]) for segment in segments],
                               SampleConfig(num_samples=2, nfe=2), list(range(len(segments))))
    mel_l1 = np.mean([np.abs(sample.mel - segment.arrays["mel"][None]).mean()
                      for sample, segment in zip(generated, segments)])
    assert report["identities"]["bright"]["columns"]["shared.safetensors"]["mel_l1"] == pytest.approx(mel_l1, rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "both" / "tensorboard" / "shared.safetensors"))
    events.Reload()
    assert {f"eval/mel_l1/{name}" for name in PEOPLE} | {"eval/mel_l1"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/mel_l1/demo")[0].value == pytest.approx(
        report["identities"]["demo"]["columns"]["shared.safetensors"]["mel_l1"], rel=1e-6)


def test_several_identities_add_the_statistics_that_tell_people_apart_and_which_identity_each_resembles(
        shards, tmp_path):
    """By default (no --metrics) a report of several identities adds each one's mean pitch, and says per model whose
    ground truth each identity's generated pitch is nearest; the recordings' pitch is each persona's voice."""
    code = main(["evaluate", "--checkpoint", str(shards["shared"]), "--checkpoint", str(shards["single"]),
                 "--shards", str(shards["both"]), "--num-samples", "1", "--nfe", "2", "--quiet",
                 "-o", str(tmp_path / "report")])
    assert code == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "pitch_hz" in report["metrics"] and "jaw_open_range" not in report["metrics"]  # no mouth_controls
    for name in PEOPLE:
        low, high = PERSONAS[name].f0_range
        assert 0.85 * low < report["identities"][name]["ground_truth"]["pitch_hz"] < 1.15 * high
    truths = {name: report["identities"][name]["ground_truth"]["pitch_hz"] for name in PEOPLE}
    listed = 0
    for column in COLUMNS:
        generated = {name: report["identities"][name]["columns"][column]["pitch_hz"] for name in PEOPLE}
        if not all(np.isfinite(list(generated.values()))):  # an untrained model may voice no frame at all
            assert column not in report["identity_likeness"]
            continue
        listed += 1
        nearest = {name: min(PEOPLE, key=lambda other: abs(value - truths[other])) for name, value in generated.items()}
        assert report["identity_likeness"][column]["pitch_hz"] == nearest
        assert f"| {column} | pitch_hz | {nearest['bright']} | {nearest['demo']} |" in (
            tmp_path / "report" / "report.md").read_text()
    assert listed


def test_identity_likeness_names_the_nearest_ground_truth_and_skips_a_statistic_without_values():
    def part(generated: dict, truth: dict) -> dict:
        return {"segments": 1, "columns": {"model": generated}, "ground_truth": truth}

    def ranges(jaw, lip_round, lip_close):
        return dict(zip(("jaw_open_range", "lip_round_range", "lip_close_range"), (jaw, lip_round, lip_close)))

    # The mouth ranges are compared together: anna's generated jaw is nearer ben's, but her lips are far nearer
    # her own (distance to anna sqrt(0.1^2 + 0 + 0) = 0.1, to ben sqrt(0.05^2 + 0.3^2 + 0) = 0.304).
    report = {"metrics": {}, "columns": {"model": {}}, "ground_truth": {},
              "identities": {"anna": part({"pitch_hz": 121.0, **ranges(0.6, 0.5, 0.2)},
                                          {"pitch_hz": 118.0, **ranges(0.5, 0.5, 0.2)}),
                             "ben": part({"pitch_hz": 140.0, **ranges(0.7, 0.2, 0.2)},
                                         {"pitch_hz": 220.0, **ranges(0.65, 0.2, 0.2)})}}
    likeness = identity_likeness(report)
    assert likeness == {"model": {"pitch_hz": {"anna": "anna", "ben": "anna"},  # 140 is nearer 118 than 220
                                  "mouth_ranges": {"anna": "anna", "ben": "ben"}}}
    report["identity_likeness"] = likeness
    assert "| model | pitch_hz | anna | anna |" in markdown_table(report)
    report["identities"]["ben"]["ground_truth"]["lip_round_range"] = float("nan")
    assert set(identity_likeness(report)["model"]) == {"pitch_hz"}


def test_the_overall_value_is_the_segment_weighted_mean_of_the_identities(shards, tmp_path):
    code, report = evaluate(shards, tmp_path / "report", "both", "--max-items", "4")  # 3 of bright, 1 of demo
    assert code == 0
    parts = report["identities"]
    assert [parts[name]["segments"] for name in PEOPLE] == [3, 1]
    for column in ("shared.safetensors", "single.safetensors"):
        for metric in ("mel_l1", "expression_l1"):
            weighted = np.average([parts[name]["columns"][column][metric] for name in PEOPLE], weights=[3, 1])
            assert report["columns"][column][metric] == pytest.approx(weighted, rel=1e-6)
    weighted = np.average([parts[name]["ground_truth"]["expression_jitter"] for name in PEOPLE], weights=[3, 1])
    assert report["ground_truth"]["expression_jitter"] == pytest.approx(weighted, rel=1e-6)


def test_a_single_identity_report_keeps_its_keys_table_and_scalars(shards, tmp_path):
    code, report = evaluate(shards, tmp_path / "report", "demo", models=("single",))
    assert code == 0
    assert set(report) == SINGLE_REPORT_KEYS
    table = (tmp_path / "report" / "report.md").read_text().strip().splitlines()
    assert table[0] == "| metric | better | single.safetensors | ground truth |"
    assert len(table) == 2 + len(METRICS.split(","))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "report" / "tensorboard" / "single.safetensors"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"eval/{name}" for name in METRICS.split(",")}


def test_an_identity_the_model_lacks_is_one_error_and_identity_chooses_the_segments(shards, tmp_path, capsys):
    other = tiny_model_file(tmp_path / "other.safetensors", TINY + ["model.identities=[bright, quick]"])
    shards = {**shards, "other": other}
    code, report = evaluate(shards, tmp_path / "report", "both", models=("other",))
    assert code == 2 and report is None
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "a model of identities bright, quick; the held-out segments are also of demo" in error
    assert not (tmp_path / "report").exists()  # refused before anything was written

    code, report = evaluate(shards, tmp_path / "report", "both", "--identity", "bright", models=("other",))
    assert code == 0 and "identities" not in report
    assert len(report["segments"]) == 3 and all(key.startswith("bright-") for key in report["segments"])

    assert evaluate(shards, tmp_path / "again", "both", "--identity", "carl", models=("other",))[0] == 2
    assert "--identity carl: not in" in capsys.readouterr().err


def test_the_three_identity_demo_config_is_the_demos_run_on_three_personas():
    """configs/demo_identities.yaml is compared with one-identity configs/demo.yaml models at the same total steps:
    it must differ from the demo only in its data, its folders and its step count."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    demo, three = load_config(configs / "demo.yaml"), load_config(configs / "demo_identities.yaml")
    for section in ("model", "head_vae", "flow", "sample", "corpus", "evaluate"):
        assert getattr(three, section) == getattr(demo, section), section
    assert [(source.layout, source.identity) for source in three.data.sources] == [
        ("50h", name) for name in ("demo", "bright", "deep")]
    assert all(source.identity in PERSONAS for source in three.data.sources)
    assert three.trainer.steps == 3 * demo.trainer.steps
    for name in ("steps", "run_dir"):
        setattr(three.trainer, name, getattr(demo.trainer, name))
    assert three.trainer == demo.trainer
    assert three.loader.segment_length == demo.loader.segment_length
