"""avflow infer: a mixed manifest with bad items, interrupted and resumed; every good item produced once."""

import json

import numpy as np
import pytest
from helpers import tiny_model_file

from avflow.cli import main
from avflow.infer import batch
from avflow.infer.batch import parse_shard, read_items


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", ["sample.max_frames=64",
                                                                                   "sample.window_overlap=8"])


class Killed(BaseException):
    """Stands for SIGKILL / preemption: nothing in the job may catch it."""


def write_manifest(folder):
    tokens = np.random.default_rng(0).standard_normal((80, 29)).astype(np.float32)  # 1.6 s at 50 Hz: 2 windows
    np.save(folder / "take.npy", tokens)
    lines = [{"id": "hello", "text": "hello moon"},
             {"id": "empty", "text": "   "},
             {"id": "take", "tokens": "take.npy", "seed": 3},
             {"id": "lost", "tokens": "missing.npy"},
             {"id": "bye", "text": "good bye", "seed": 5}]
    (folder / "items.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    return folder / "items.jsonl"


def results(folder):
    entries = [json.loads(line) for path in sorted(folder.glob("results*.jsonl"))
               for line in path.read_text().splitlines()]
    return {entry["id"]: entry for entry in entries}, [entry["id"] for entry in entries]


def test_interrupted_batch_resumes_and_produces_every_good_item_once(model_file, tmp_path, monkeypatch):
    items = write_manifest(tmp_path)
    out = tmp_path / "results"
    written = []
    real_write = batch.write_outputs

    def write_then_maybe_stop(generated, staging, name, *args, **kwargs):
        paths = real_write(generated, staging, name, *args, **kwargs)
        if name == "take" and "interrupted" not in written:
            written.append("interrupted")
            raise Killed  # the job is killed while the second good item is being written
        written.append(name)
        return paths

    monkeypatch.setattr(batch, "write_outputs", write_then_maybe_stop)
    arguments = ["infer", "--model", str(model_file), "--inputs", str(items), "-o", str(out), "--no-video", "--quiet"]
    with pytest.raises(Killed):
        main(arguments)
    assert not (out / "take").exists()  # its outputs never appeared under their final name
    assert main(arguments) == 0
    assert written == ["hello", "interrupted", "take", "bye"]  # each good item written exactly once
    by_id, order = results(out)
    assert sorted(order) == sorted(set(order))  # one line per item, across both runs
    assert {k for k, v in by_id.items() if v["status"] == "ok"} == {"hello", "take", "bye"}
    assert "no letters to speak" in by_id["empty"]["error"]
    assert "missing.npy: no such token file" in by_id["lost"]["error"]
    assert "items.jsonl line 6: not JSON" in by_id["line-6"]["error"]
    for name in ("hello", "take", "bye"):
        assert sorted(by_id[name]["outputs"]) == sorted(f"{name}/{name}_s{k}{ext}" for k in range(2)
                                                        for ext in (".wav", ".npz"))
    assert not [p for p in out.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]  # no staging
    assert main(arguments) == 0 and results(out)[1] == order  # a third run has nothing left to do


def test_batched_items_equal_each_item_generated_alone(model_file, tmp_path):
    """Per-item seeds make an item's samples independent of the batch it shares and of its line in the manifest."""
    items = write_manifest(tmp_path)
    assert main(["infer", "--model", str(model_file), "--inputs", str(items), "-o", str(tmp_path / "all"),
                 "--no-video", "--quiet"]) == 0
    assert main(["infer", "--model", str(model_file), "--tokens", str(tmp_path / "take.npy"), "--seed", "3",
                 "--name", "take", "-o", str(tmp_path / "one"), "--no-video", "--quiet"]) == 0
    for k in range(2):
        together = np.load(tmp_path / "all" / "take" / f"take_s{k}.npz")
        alone = np.load(tmp_path / "one" / "take" / f"take_s{k}.npz")
        np.testing.assert_allclose(together["expression"], alone["expression"], atol=1e-4)


def test_shards_split_the_manifest_without_overlap(tmp_path):
    items = write_manifest(tmp_path)
    shards = [{item.index for item in read_items(items, parse_shard(f"{i}/3"))} for i in range(3)]
    assert set().union(*shards) == set(range(6)) and sum(len(s) for s in shards) == 6
    with pytest.raises(ValueError, match="expected I/N with 0 <= I < N"):
        parse_shard("3/3")


def test_videos_need_a_face_decoder(model_file, tmp_path, capsys):
    assert main(["infer", "--model", str(model_file), "--text", "hi", "-o", str(tmp_path / "o")]) == 2
    assert "videos need a face decoder" in capsys.readouterr().err
    assert main(["infer", "--model", str(model_file), "--text", "hi", "-o", str(tmp_path / "o"), "--procedural-face",
                 "--quiet"]) == 0
    assert (tmp_path / "o" / "item" / "item_samples.mp4").stat().st_size > 0


def test_dyadic_items_take_participant_inputs(tmp_path):
    model = tiny_model_file(tmp_path / "dyadic.safetensors", ["model.dyadic=true"])
    rng = np.random.default_rng(1)
    np.save(tmp_path / "actor.npy", rng.standard_normal((60, 29)).astype(np.float32))  # 1.2 s at 50 Hz
    np.save(tmp_path / "listener.npy", rng.standard_normal((60, 29)).astype(np.float32))
    np.save(tmp_path / "smirk.npy", rng.uniform(-1, 1, (36, 58)).astype(np.float32))  # 1.2 s at 30 fps
    lines = [{"id": "pair", "tokens": "actor.npy", "participant_tokens": "listener.npy",
              "participant_features": "smirk.npy"},
             {"id": "alone", "tokens": "actor.npy"}]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["infer", "--model", str(model), "--inputs", str(tmp_path / "items.jsonl"), "-o", str(tmp_path / "out"),
                 "--no-video", "--quiet"]) == 0
    by_id, _ = results(tmp_path / "out")
    assert by_id["pair"]["status"] == "ok" and abs(by_id["pair"]["audio_seconds"] - 1.2) < 0.02
    timings = by_id["pair"]["timings"]
    assert by_id["pair"]["real_time_factor"] == pytest.approx(sum(timings.values()) / by_id["pair"]["audio_seconds"],
                                                              rel=0.02)
    assert "dyadic model: it needs the participant's tokens" in by_id["alone"]["error"]


def test_speaking_rate_and_pause_controls(model_file, tmp_path, capsys):
    for rate in (1, 2):
        assert main(["infer", "--model", str(model_file), "--text", "hello moon", "--rate", str(rate), "--name",
                     f"r{rate}", "-o", str(tmp_path), "--no-video", "--quiet"]) == 0
    by_id, _ = results(tmp_path)
    assert by_id["r2"]["audio_seconds"] == pytest.approx(by_id["r1"]["audio_seconds"] / 2, abs=0.03)
    assert main(["infer", "--model", str(model_file), "--text", "hi", "--pause-scale", "2", "--name", "p",
                 "-o", str(tmp_path), "--no-video", "--quiet"]) == 0
    assert "pause_scale needs a text-to-tokens model" in results(tmp_path)[0]["p"]["error"]
