"""python -m avflow.export: each format round-trips with parity, the directory is self-contained, and failures
leave nothing under the output name."""

import json

import numpy as np
import pytest
from helpers import tiny_model_file

from avflow.export.__main__ import main as export_main
from avflow.export.exporter import ExportError, ExportOptions, export
from avflow.infer.generate import generate_batch
from avflow.infer.model import load_inference_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.mark.parametrize("fmt,dtype", [("eager", "fp32"), ("torchscript", "fp32"), ("torchscript", "bf16"),
                                       ("aoti", "fp32")])
def test_export_round_trip_matches_the_checkpoint(model_file, tmp_path, fmt, dtype):
    """The exported directory alone generates what the checkpoint generates (same seeds), within the dtype's
    tolerance, and records a parity error that is within it."""
    out = tmp_path / "model"
    assert export_main(["--checkpoint", str(model_file), "-o", str(out), "--format", fmt, "--dtype", dtype,
                        "--max-seconds", "0.5", "--batch", "4", "--device", "cpu"]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == fmt and meta["frames"] == 44 and meta["rows"] == 4
    assert 0 <= meta["parity"]["relative_error"] <= meta["parity"]["tolerance"]
    assert sorted(p.name for p in out.iterdir()) == sorted(meta["files"])
    model_file.rename(model_file.with_suffix(".moved"))  # loading must not need the source checkpoint
    try:
        exported = load_inference_model(out, "cpu")
    finally:
        model_file.with_suffix(".moved").rename(model_file)
    original = load_inference_model(model_file, "cpu")
    original.cfg.sample = exported.cfg.sample  # the export's window length (0.5 s) and overlap
    conds = [np.random.default_rng(i).standard_normal((n, 29)).astype(np.float32) for i, n in enumerate((30, 44, 100))]
    ours, reference = generate_batch(exported, conds), generate_batch(original, conds, original.cfg.sample)
    tolerance = 1e-3 if dtype == "fp32" else 0.3
    for a, b in zip(ours, reference):
        assert a.mel.shape == b.mel.shape
        np.testing.assert_allclose(a.mel, b.mel, atol=tolerance * 10)  # log-mel = std 2.5 x state
        np.testing.assert_allclose(a.expression, b.expression, atol=tolerance * 5)


def test_compiled_export_refuses_other_sampler_settings(model_file, tmp_path):
    export(model_file, tmp_path / "m", ExportOptions(format="torchscript", nfe=2, max_seconds=0.2, device="cpu"))
    model = load_inference_model(tmp_path / "m", "cpu")
    assert model.net is None  # the TorchScript loop holds the network: no second copy in memory
    with pytest.raises(ValueError, match="torchscript export, compiled already"):
        load_inference_model(tmp_path / "m", "cpu", compile_network=True)
    model.cfg.sample.nfe = 8
    with pytest.raises(ValueError, match="exported for method=euler nfe=2"):
        generate_batch(model, [np.zeros((10, 29), np.float32)])
    model.cfg.sample.nfe, model.cfg.sample.num_samples = 2, 4
    with pytest.raises(ValueError, match="4 samples per input do not fit this export's batch of 3"):
        generate_batch(model, [np.zeros((10, 29), np.float32)])


def test_failed_parity_or_existing_output_leaves_the_output_untouched(model_file, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass --force"):
        export(model_file, out, ExportOptions(format="eager", max_seconds=0.2, device="cpu"))
    monkeypatch.setattr("avflow.export.exporter.PARITY_TOLERANCE", {"fp32": -1.0, "bf16": -1.0})
    with pytest.raises(ExportError, match="parity check failed"):
        export(model_file, out, ExportOptions(format="torchscript", max_seconds=0.2, device="cpu", force=True))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory left behind


def test_bad_options_are_named(model_file, tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "o")]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--batch: expected at least 1"):
        export(model_file, tmp_path / "o", ExportOptions(batch=0))


def test_released_weights_run_through_export_and_batch_inference(tmp_path):
    """The imported published network (full size) exported to TorchScript: the sampler loaded from the export
    directory reproduces the imported checkpoint's eager sampler, and `avflow infer` runs on the directory."""
    from helpers import write_published_release

    from avflow.cli import main
    from avflow.model.published import import_published

    write_published_release(tmp_path)
    imported = import_published(tmp_path / "model.pt", tmp_path / "head_vae.pt", tmp_path / "headpose_normstats",
                                tmp_path / "imported.safetensors")
    out = tmp_path / "exported"
    assert export_main(["--checkpoint", str(imported), "-o", str(out), "--format", "torchscript", "--nfe", "2",
                        "--max-seconds", "0.3", "--device", "cpu"]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["parity"]["relative_error"] < 1e-4 and meta["sampler"] == {"method": "euler", "nfe": 2,
                                                                          "guidance_scale": 1.0}
    (tmp_path / "items.jsonl").write_text('{"id": "a", "text": "hello"}\n{"id": "b", "text": ""}\n')
    assert main(["infer", "--model", str(out), "--inputs", str(tmp_path / "items.jsonl"), "-o", str(tmp_path / "r"),
                 "--no-video", "--quiet", "--num-samples", "3"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert [(line["id"], line["status"]) for line in lines] == [("a", "ok"), ("b", "error")]
    assert len(lines[0]["outputs"]) == 6  # 3 samples x (wav, npz)


def test_avflow_export_is_the_same_command_as_python_m_avflow_export(model_file, tmp_path, capsys):
    """Both ways in give the same exit codes and the same one-line errors (only the command's name differs), and
    the same artifact."""
    from avflow.cli import main as avflow_main

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = [["--checkpoint", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "a")],
             ["--checkpoint", str(model_file), "-o", str(occupied), "--format", "eager"],
             ["--checkpoint", str(model_file), "-o", str(tmp_path / "{way}"), "--format", "eager", "--batch", "2"]]
    codes = []
    for argv in cases:
        results = {}
        for way, run, prefix in (("module", export_main, "python -m avflow.export: "),
                                 ("command", lambda a: avflow_main(["export", *a]), "avflow export: ")):
            code = run([part.format(way=way) for part in argv])
            err = capsys.readouterr().err.strip()
            assert err == "" or (err.count("\n") == 0 and err.startswith(prefix)), err
            results[way] = (code, err.removeprefix(prefix))
        assert results["module"] == results["command"]
        codes.append(results["module"][0])
    assert codes == [2, 2, 0]  # a missing checkpoint, an occupied output, a good export
    assert (occupied / "keep.txt").read_text() == "mine"
    exported = {way: json.loads((tmp_path / way / "export.json").read_text()) for way in ("module", "command")}
    assert exported["module"]["parity"] == exported["command"]["parity"]
