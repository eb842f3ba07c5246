"""`avflow infer` with bad items: each is recorded with its reason and the job goes on, a rerun does not stop
at it, a repeated id never masks the first item's result, and over-long inputs are refused by a limit."""

import json

import numpy as np
import pytest
import soundfile
from reliability_inputs import tiny_model  # noqa: F401 (fixture)

from avflow.cli import main

GOOD_TOKENS = np.random.default_rng(0).standard_normal((50, 29)).astype(np.float32)  # 1 s at 50 Hz


BAD_TOKEN_FILES = [  # (id, how the file is made, what its recorded error says)
    ("empty", lambda path: path.write_bytes(b""), "empty file"),
    ("strings", lambda path: np.save(path, np.array(["a", "b", "c"])), "expected numeric token logits"),
    ("truncated", lambda path: path.write_bytes(_npy_bytes(GOOD_TOKENS)[:300]), "not a readable .npy"),
    ("objects", lambda path: np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True),
     "not a readable .npy"),
    ("wide", lambda path: np.save(path, np.zeros((50, 31), np.float32)), "expected token logits of shape (M, 29)"),
    ("nan", lambda path: np.save(path, np.full((50, 29), np.nan, np.float32)), "NaN or inf"),
]


def _npy_bytes(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def results(folder):
    lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    return {entry["id"]: entry for entry in lines}, [entry["id"] for entry in lines]


def run(model, items, out, *extra):
    return main(["infer", "--model", str(model), "--inputs", str(items), "-o", str(out), "--no-video", "--quiet",
                 *extra])


def test_bad_token_files_are_recorded_and_the_job_goes_on(tiny_model, tmp_path):  # noqa: F811
    np.save(tmp_path / "good.npy", GOOD_TOKENS)
    lines = [{"id": "first", "tokens": "good.npy"}]
    for item_id, make, _ in BAD_TOKEN_FILES:
        make(tmp_path / f"{item_id}.npy")
        lines.append({"id": item_id, "tokens": f"{item_id}.npy"})
    lines.append({"id": "last", "tokens": "good.npy"})
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert run(tiny_model, tmp_path / "items.jsonl", out) == 0
    by_id, order = results(out)
    assert order == [line["id"] for line in lines]
    assert by_id["first"]["status"] == by_id["last"]["status"] == "ok"
    for item_id, _, reason in BAD_TOKEN_FILES:
        assert by_id[item_id]["status"] == "error" and reason in by_id[item_id]["error"], by_id[item_id]
        assert f"{item_id}.npy" in by_id[item_id]["error"]
    assert run(tiny_model, tmp_path / "items.jsonl", out, "--retry-errors") == 0  # a rerun passes them again
    assert results(out)[1] == order + [item_id for item_id, _, _ in BAD_TOKEN_FILES]


def test_a_duplicate_id_is_recorded_once_and_does_not_mask_the_first(tiny_model, tmp_path):  # noqa: F811
    np.save(tmp_path / "good.npy", GOOD_TOKENS)
    lines = [{"id": "twice", "tokens": "good.npy"}, {"id": "twice", "text": "hello"}, {"id": "twice", "text": "x"}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert run(tiny_model, tmp_path / "items.jsonl", out) == 0
    assert run(tiny_model, tmp_path / "items.jsonl", out) == 0  # a rerun records nothing more
    by_id, order = results(out)
    assert order == ["twice", "line-2", "line-3"]
    assert by_id["twice"]["status"] == "ok" and (out / "twice").is_dir()
    assert "duplicate id 'twice' (first on line 1)" in by_id["line-2"]["error"]


def test_inputs_beyond_the_length_limit_fail_with_a_reason(tiny_model, tmp_path, capsys):  # noqa: F811
    np.save(tmp_path / "three_s.npy", np.zeros((150, 29), np.float32))  # 3 s at 50 Hz
    np.save(tmp_path / "one_s.npy", GOOD_TOKENS)
    soundfile.write(tmp_path / "long.wav", np.zeros(16000 * 4, np.float32), 16000)  # 4 s
    lines = [{"id": "long_tokens", "tokens": "three_s.npy"}, {"id": "long_text", "text": "hello " * 50},
             {"id": "long_audio", "audio": "long.wav"}, {"id": "short", "tokens": "one_s.npy"}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    # --asr-model is never opened: the audio is refused from its header first
    assert run(tiny_model, tmp_path / "items.jsonl", out, "--max-input-seconds", "2", "--asr-model", str(tmp_path)) == 0
    by_id, _ = results(out)
    assert by_id["short"]["status"] == "ok"
    assert "3.0 s long; sample.max_input_seconds=2" in by_id["long_tokens"]["error"]
    assert "sample.max_input_seconds=2" in by_id["long_text"]["error"]
    assert "4.0 s long; sample.max_input_seconds=2" in by_id["long_audio"]["error"]


def test_the_default_limit_refuses_hours_of_text_at_once(tiny_model, tmp_path, capsys):  # noqa: F811
    text = "word " * 40000  # 200,000 characters: hours of speech
    assert main(["generate", "--model", str(tiny_model), "--text", text, "-o", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "200000 characters" in error and "sample.max_input_seconds=600" in error
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("item_id, make, reason", BAD_TOKEN_FILES[:2], ids=[case[0] for case in BAD_TOKEN_FILES[:2]])
def test_generate_refuses_a_bad_token_file_in_one_line(tiny_model, tmp_path, capsys, item_id, make, reason):  # noqa: F811
    make(tmp_path / "bad.npy")
    assert main(["generate", "--model", str(tiny_model), "--tokens", str(tmp_path / "bad.npy"), "-o",
                 str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and reason in error[0] and "bad.npy" in error[0]


def test_lines_that_are_not_items_are_named_as_such(tiny_model, tmp_path):  # noqa: F811
    np.save(tmp_path / "good.npy", GOOD_TOKENS)
    (tmp_path / "items.jsonl").write_text("[1, 2]\n" + "".join(json.dumps(line) + "\n" for line in [
        {"id": "results.jsonl", "tokens": "good.npy"}, {"id": "results.shard-0-of-2.jsonl", "tokens": "good.npy"},
        {"id": "fine", "tokens": "good.npy"}]))
    out = tmp_path / "out"
    assert run(tiny_model, tmp_path / "items.jsonl", out) == 0
    by_id, _ = results(out)
    assert "items.jsonl line 1: expected a JSON object with an \"id\"" in by_id["line-1"]["error"]
    assert "got [1, 2]" in by_id["line-1"]["error"]
    for line, name in ((2, "results.jsonl"), (3, "results.shard-0-of-2.jsonl")):
        assert f"items.jsonl line {line}: id '{name}' is the name of a results file" in by_id[f"line-{line}"]["error"]
    assert by_id["fine"]["status"] == "ok" and (out / "results.jsonl").is_file()
