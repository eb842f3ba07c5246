"""`avflow evaluate` end to end on a tiny trained model and demo shards: two checkpoints in one table,
numbers that match an independent recomputation, determinism, resume, and one-line errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from avflow.cli import main
from avflow.config import load_config
from avflow.data.features import interpolate_frames
from avflow.evaluate.run import held_out_segments, model_config
from avflow.infer.generate import generate_batch
from avflow.infer.model import load_inference_model
from avflow.model.io import load_inference_tensors
from avflow.train.checkpoint import write_model_file

TINY = ["corpus.train_segments=3", "corpus.val_segments=2", "corpus.words_per_segment=[2, 3]",
        "model.d_model=32", "model.n_blocks=1", "model.n_heads=2", "model.ffn_hidden=32",
        "loader.segment_length=64", "trainer.batch_size=2", "trainer.steps=4", "trainer.warmup_steps=1",
        "trainer.val_every=4", "trainer.checkpoint_every=2", "head_vae.ffn_hidden=8", "head_vae.steps=3",
        "head_vae.segment_length=32", "head_vae.batch_size=2", "evaluate.val_items=1"]
FAST = ["--num-samples", "2", "--nfe", "2", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    overrides = TINY + [f"data.root={root / 'data'}", f"loader.shards={root / 'shards'}",
                        f"trainer.run_dir={root / 'run'}"]
    assert main(["corpus", *overrides]) == 0
    assert main(["pack", *overrides]) == 0
    assert main(["train", *overrides]) == 0
    checkpoints = root / "run" / "checkpoints"
    return {"shards": root / "shards", "early": checkpoints / "step-00000002", "late": checkpoints / "step-00000004"}


def evaluate(trained, out, *extra):
    return main(["evaluate", "--checkpoint", str(trained["early"]), "--checkpoint", str(trained["late"]),
                 "--shards", str(trained["shards"]), *FAST, "-o", str(out), *extra])


def test_two_checkpoints_side_by_side_match_an_independent_recomputation(trained, tmp_path, capsys):
    assert evaluate(trained, tmp_path / "a") == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert list(report["columns"]) == ["step-00000002", "step-00000004"]
    assert len(report["segments"]) == 2
    # Ground truth appears where a metric describes it on its own, and nowhere else.
    assert set(report["ground_truth"]) == {"expression_jitter", "head_pose_jitter", "sync_lag_ms",
                                           "sync_peak_correlation"}
    table = (tmp_path / "a" / "report.md").read_text()
    assert "| metric | better | step-00000002 | step-00000004 | ground truth |" in table
    assert table.strip() in capsys.readouterr().out
    assert len(list((tmp_path / "a" / "tensorboard").iterdir())) == 3

    # mel L1 and expression jitter of the late checkpoint, recomputed from generate_batch with plain numpy
    model = load_inference_model(trained["late"], "cpu")
    model.cfg.sample.num_samples, model.cfg.sample.nfe = 2, 2
    segments = held_out_segments(trained["shards"])
    mel_l1, jitter = [], []
    for index, segment in enumerate(segments):
        generated = generate_batch(model, [segment.arrays["tokens"]], model.cfg.sample, [index])[0]
        mel_l1.append(np.abs(generated.mel - segment.arrays["mel"][None]).mean())
        frame_rate = model.cfg.mel.frame_rate  # jitter is measured at 30 fps, as the motion outputs are written
        frames_30 = round(generated.mel.shape[1] / frame_rate * 30)
        motion = np.stack([interpolate_frames(sample, frame_rate, frames_30, 30.0) for sample in generated.expression])
        acceleration = motion[:, 2:] - 2 * motion[:, 1:-1] + motion[:, :-2]
        jitter.append((acceleration.astype(np.float64) ** 2).mean())
    late = report["columns"]["step-00000004"]
    assert late["mel_l1"] == pytest.approx(np.mean(mel_l1), rel=1e-5)
    assert late["expression_jitter"] == pytest.approx(np.mean(jitter), rel=1e-5)
    assert report["columns"]["step-00000002"]["mel_l1"] != late["mel_l1"]

    # Deterministic: a second run into another folder gives the same numbers.
    assert evaluate(trained, tmp_path / "b") == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["columns"] == report["columns"]


def test_an_interrupted_report_resumes_per_segment(trained, tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", "--checkpoint", str(trained["late"]), "--shards", str(trained["shards"]), *FAST,
                 "--max-items", "1", "-o", str(out)]) == 0
    first = out / "items" / "step-00000004"
    (only,) = first.glob("*.json")
    written = only.stat().st_mtime_ns
    expected = json.loads((out / "report.json").read_text())["columns"]
    (out / "report.json").unlink()
    assert main(["evaluate", "--checkpoint", str(trained["late"]), "--shards", str(trained["shards"]), *FAST,
                 "--max-items", "1", "-o", str(out)]) == 0
    assert only.stat().st_mtime_ns == written  # not generated again
    assert json.loads((out / "report.json").read_text())["columns"] == expected
    # Other settings are not mixed into the same report.
    assert main(["evaluate", "--checkpoint", str(trained["late"]), "--shards", str(trained["shards"]), "--quiet",
                 "--num-samples", "1", "--max-items", "1", "-o", str(out)]) == 2


def test_the_character_error_rate_with_an_asr_model(trained, tiny_wav2vec2, tmp_path):
    assert main(["evaluate", "--checkpoint", str(trained["late"]), "--shards", str(trained["shards"]), *FAST,
                 "--max-items", "1", "--metrics", "mel_l1,cer", "--asr-model", str(tiny_wav2vec2),
                 "-o", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["columns"]["step-00000004"]) == {"mel_l1", "cer"}
    assert report["columns"]["step-00000004"]["cer"] >= 0 and report["ground_truth"]["cer"] >= 0


def test_training_validation_logs_the_configured_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained["late"].parents[1] / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    cfg = load_config(None, TINY)
    assert {f"val/{name}" for name in cfg.evaluate.val_metrics} <= scalars
    assert [event.step for event in events.Scalars("val/mel_l1")] == [4]


def _without_held_out_segments(shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"] = []
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("case, message", [
    ("no held-out", "no held-out segments in its 'val' split"),
    ("text2tokens", "a text2tokens model; avflow evaluate needs an AV-Flow model"),
    ("missing asr", "missing-asr: no such wav2vec2 model directory"),
    ("bad split", "--split test: expected one of train, val"),
    ("bad metric", "unknown metrics mel_l3"),
])
def test_bad_inputs_fail_with_one_line(trained, tmp_path, capsys, case, message):
    checkpoint, shards, extra = trained["late"], trained["shards"], []
    if case == "no held-out":
        shards = _without_held_out_segments(shards, tmp_path)
    elif case == "text2tokens":
        checkpoint = write_model_file(load_config(None, ["task=text2tokens"]), {}, tmp_path / "t2t.safetensors",
                                      "tests")
    elif case == "missing asr":
        extra = ["--asr-model", str(tmp_path / "missing-asr")]
    elif case == "bad split":
        extra = ["--split", "test"]
    else:
        extra = ["--metrics", "mel_l1,mel_l3"]
    out = tmp_path / "report"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards), *FAST, *extra,
                 "-o", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (out / "report.json").exists()


def test_a_models_config_is_read_with_the_loaders_format_check(tmp_path):
    """evaluate reads each model's config before loading any; a file the loader would refuse is refused there."""
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(1)}, str(other), metadata={"format": "someone-elses", "config": "{}"})
    for read in (model_config, load_inference_tensors):
        with pytest.raises(ValueError, match=r"other.safetensors: not an avflow model file \(expected format"):
            read(other)
