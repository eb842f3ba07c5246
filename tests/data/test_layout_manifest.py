"""The manifest layout: capture data named line by line in a JSONL file packs exactly as the same files do
through the 50h layout, each line carries its identity, every bad line is one line naming the manifest, the
line number and the field, and extract-asr fills the token files the manifest still lacks."""

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from avflow.cli import main
from avflow.config import ConfigError, CorpusConfig, DataConfig
from avflow.data.asr import CTCTokenizer
from avflow.data.corpus import write_corpus
from avflow.data.features import resample, rigid_to_pose7
from avflow.data.layouts import list_segment_names, read_segment_record
from avflow.data.layouts.fifty_h import is_validation, stream_paths

VAL_PATTERNS = DataConfig().val_patterns
IDENTITIES = ("anna", "anna", "ben", "ben")  # per corpus segment, in the order write_corpus returns them


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    names = write_corpus(root, CorpusConfig(train_segments=3, val_segments=1, words_per_segment=[3, 5]))
    return root, names


def corpus_line(root: Path, name: str, identity: str, relative_to: Path | None = None) -> dict:
    """A manifest line naming the corpus files of `name`; paths relative to `relative_to` when given."""
    paths = stream_paths(root, name)

    def where(path: Path) -> str:
        return str(path if relative_to is None else os.path.relpath(path, relative_to))

    return {"segment": name, "audio": where(paths["audio"]), "expression": where(paths["expression"]),
            "head_pose": where(paths["headpose"]), "tokens": where(paths["tokens"]), "identity": identity,
            "split": "val" if is_validation(name, VAL_PATTERNS) else "train"}


def write_manifest(path: Path, lines: list) -> Path:
    """`lines` of dicts (written as JSON) or raw strings (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def manifest(corpus, tmp_path):
    """A manifest in its own folder over the corpus: the first two lines by relative paths, the rest absolute."""
    root, names = corpus
    folder = tmp_path / "capture"
    return write_manifest(folder / "recordings.jsonl",
                          [corpus_line(root, name, identity, relative_to=folder if index < 2 else None)
                           for index, (name, identity) in enumerate(zip(names, IDENTITIES))])


def config(manifest: Path) -> DataConfig:
    return DataConfig(layout="manifest", root=str(manifest))


def shard_arrays(shard_dir: Path) -> dict[str, np.ndarray]:
    """{sample key.stream: array} of every shard in the folder."""
    arrays = {}
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith(".npy"):
                    arrays[info.name[:-len(".npy")]] = np.load(io.BytesIO(tar.extractfile(info).read()))
    return arrays


def test_packing_a_manifest_gives_the_samples_of_the_same_files_packed_as_50h(corpus, manifest, tmp_path, capsys):
    root, names = corpus
    assert main(["pack", "--layout", "manifest", "-i", str(manifest), "-o", str(tmp_path / "by_manifest")]) == 0
    assert main(["pack", "--layout", "50h", "-i", str(root), "-o", str(tmp_path / "by_50h")]) == 0
    capsys.readouterr()

    by_manifest, by_50h = shard_arrays(tmp_path / "by_manifest"), shard_arrays(tmp_path / "by_50h")
    assert sorted(by_manifest) == sorted(by_50h)
    assert {key.split(".")[1] for key in by_50h} == {"mel", "expression", "pose", "tokens", "participant_tokens"}
    for key, values in by_50h.items():
        np.testing.assert_array_equal(by_manifest[key], values, err_msg=key)

    packed = [json.loads((tmp_path / folder / "manifest.json").read_text()) for folder in ("by_manifest", "by_50h")]
    assert packed[0]["layout"] == "manifest"
    assert packed[0]["splits"]["val"]["segments"] == packed[1]["splits"]["val"]["segments"] == 1
    assert packed[0]["stats"] == packed[1]["stats"]


def test_each_record_carries_its_line_identity_and_split(corpus, manifest):
    root, names = corpus
    cfg = config(manifest)
    assert list_segment_names(cfg) == sorted(names)
    for name, identity in zip(names, IDENTITIES):
        record = read_segment_record(cfg, name)
        assert (record.identity, record.is_val) == (identity, is_validation(name, VAL_PATTERNS))
        assert read_segment_record(DataConfig(layout="50h", root=str(root)), name).identity == ""


def test_head_pose_as_quaternions_or_joints(corpus, tmp_path):
    root, names = corpus
    name = names[0]
    transforms = np.load(stream_paths(root, name)["headpose"])
    fifty_h = read_segment_record(DataConfig(layout="50h", root=str(root)), name)

    raw_signs = rigid_to_pose7(transforms, canonical_sign=False)  # as another pipeline may store them
    np.save(tmp_path / "pose7.npy", raw_signs)
    quaternions = write_manifest(tmp_path / "q" / "m.jsonl", [{**corpus_line(root, name, "anna"),
                                                               "head_pose": str(tmp_path / "pose7.npy")}])
    np.testing.assert_array_equal(read_segment_record(config(quaternions), name).head_pose, fifty_h.head_pose)

    joints = np.random.default_rng(0).uniform(-1, 1, (transforms.shape[0], 4)).astype(np.float32)
    np.save(tmp_path / "joints.npy", joints)
    joint_line = {**corpus_line(root, name, "anna"), "head_pose": str(tmp_path / "joints.npy")}
    np.testing.assert_array_equal(
        read_segment_record(config(write_manifest(tmp_path / "j" / "m.jsonl", [joint_line])), name).head_pose, joints)

    mixed = write_manifest(tmp_path / "mixed" / "m.jsonl",
                           [corpus_line(root, names[1], "anna"), {**joint_line, "split": "val"}])
    with pytest.raises(ValueError, match=rf"^{mixed}:2: head_pose: .*joints\.npy: a 4-d head pose \(shape "
                                         rf"\({transforms.shape[0]}, 4\)\); expected 7-d like line 1"):
        read_segment_record(config(mixed), name)


def test_rates_come_from_the_line_else_from_the_data_config(corpus, tmp_path):
    root, names = corpus
    line = corpus_line(root, names[0], "anna")
    expression = np.load(line["expression"])
    np.save(tmp_path / "expression60.npy", np.repeat(expression, 2, axis=0))
    np.save(tmp_path / "pose60.npy", np.repeat(np.load(line["head_pose"]), 2, axis=0))
    doubled = write_manifest(tmp_path / "m.jsonl", [{**line, "expression": "expression60.npy",
                                                     "head_pose": "pose60.npy", "visual_fps": 60}])
    record = read_segment_record(config(doubled), names[0])
    assert (record.visual_fps, record.token_fps) == (60.0, 50.0)
    assert record.expression.shape[0] == 2 * expression.shape[0]

    undeclared = write_manifest(tmp_path / "undeclared.jsonl", [{**line, "expression": "expression60.npy",
                                                                 "head_pose": "pose60.npy"}])
    with pytest.raises(ValueError, match=rf"^{undeclared}:1: expression: .*expression60\.npy: "
                                         rf"{2 * expression.shape[0]} frames at 30 fps last "):
        read_segment_record(config(undeclared), names[0])
    assert read_segment_record(DataConfig(layout="manifest", root=str(undeclared), visual_fps=60.0),
                               names[0]).visual_fps == 60.0


def bad_array(tmp_path: Path, name: str, array: np.ndarray) -> str:
    np.save(tmp_path / name, array)
    return str(tmp_path / name)


BAD_LINES = {  # case: (how line 2 is written, the error's text after "MANIFEST:2: ")
    "invalid JSON": (lambda line, tmp, frames: json.dumps(line)[:-1],
                     r"not valid JSON \(.*\); expected one JSON object"),
    "not an object": (lambda line, tmp, frames: "[1, 2]",
                      r"expected a JSON object with the fields segment, .*, got list"),
    "missing field": (lambda line, tmp, frames: {key: value for key, value in line.items() if key != "identity"},
                      r"identity: missing; every line names segment, audio, expression, head_pose, identity, split"),
    "unknown field": (lambda line, tmp, frames: {**line, "identiy": "x"},
                      r"identiy: unknown field \(did you mean 'identity'\?\); expected fields of segment, "),
    "split": (lambda line, tmp, frames: {**line, "split": "test"}, r"split: expected \"train\" or \"val\", got 'test'"),
    "segment name with a dot": (lambda line, tmp, frames: {**line, "segment": "take.1"},
                                r"segment: expected a name without '\.', '/' or whitespace .*, got 'take\.1'"),
    "identity not a string": (lambda line, tmp, frames: {**line, "identity": 7},
                              r"identity: expected a non-empty string, got 7"),
    "missing file": (lambda line, tmp, frames: {**line, "expression": "nowhere.npy"},
                     r"expression: .*capture/nowhere\.npy: no such file; expected expression codes \(N, 256\)$"),
    "missing token file": (lambda line, tmp, frames: {**line, "tokens": "tokens/new.npy"},
                           r"tokens: .*tokens/new\.npy: no such file; expected token logits .*; "
                           r"`avflow extract-asr --layout manifest -i .*recordings\.jsonl` writes them"),
    "expression width": (lambda line, tmp, frames: {**line,
                                                    "expression": bad_array(tmp, "e.npy", np.zeros((frames, 128)))},
                         r"expression: .*e\.npy: expected expression codes of shape \(N, 256\) with at least one "
                         r"frame, got shape \({frames}, 128\)"),
    "head pose shape": (lambda line, tmp, frames: {**line, "head_pose": bad_array(tmp, "p.npy", np.zeros((frames, 3)))},
                        r"head_pose: .*p\.npy: expected \(N, 4, 4\) or \(N, 3, 4\) rigid transforms, .* got shape "
                        r"\({frames}, 3\)"),
    "quaternion not unit": (lambda line, tmp, frames: {**line, "head_pose": bad_array(
                                tmp, "q.npy", np.tile([2.0, 0, 0, 0, 1, 2, 3], (frames, 1)))},
                            r"head_pose: .*q\.npy: frame 0 has a quaternion of length 2\.0000; expected unit "
                            r"quaternions \[w, x, y, z\] in columns 0-3"),
    "token width": (lambda line, tmp, frames: {**line, "tokens": bad_array(tmp, "t.npy", np.zeros((frames, 30)))},
                    r"tokens: .*t\.npy: expected token logits \(M, 29\) or \(channels, M, 29\) .* got shape "
                    r"\(1, {frames}, 30\)"),
    "not finite": (lambda line, tmp, frames: {**line, "expression": bad_array(tmp, "n.npy",
                                                                              np.full((frames, 256), np.nan))},
                   r"expression: .*n\.npy: contains NaN or inf values; expected finite numbers"),
    "zero rate": (lambda line, tmp, frames: {**line, "visual_fps": 0},
                  r"visual_fps: expected a positive number of frames per second, got 0"),
    "rate not a number": (lambda line, tmp, frames: {**line, "token_fps": "50"},
                          r"token_fps: expected a positive number of frames per second, got '50'"),
    "lengths disagree": (lambda line, tmp, frames: {**line, "token_fps": 25},
                         r"tokens: .*\.npy: \d+ frames at 25 fps last [\d.]+ s; expected every stream within 2 "
                         r"frames at 30 fps of the others \(audio [\d.]+ s, expression [\d.]+ s, head_pose [\d.]+ s, "
                         r"tokens [\d.]+ s\)$"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_line_is_one_error_naming_the_manifest_line_and_field(corpus, manifest, tmp_path, case):
    root, names = corpus
    lines = [json.loads(text) for text in manifest.read_text().splitlines()]
    frames = np.load(manifest.parent / lines[1]["expression"]).shape[0]
    rewrite, expected = BAD_LINES[case]
    write_manifest(manifest, [lines[0], rewrite(lines[1], tmp_path, frames), *lines[2:]])

    keys = list_segment_names(config(manifest))
    key = names[1] if names[1] in keys else "line 2"
    assert keys == sorted([key, names[0], *names[2:]])
    with pytest.raises(ValueError) as error:
        read_segment_record(config(manifest), key)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{manifest}:2: ")
    assert re.search(expected.format(frames=frames), message[len(f"{manifest}:2: "):]), message
    read_segment_record(config(manifest), names[0])  # the other lines stay readable


def test_duplicate_segment_names_make_both_lines_bad(corpus, manifest):
    root, names = corpus
    lines = [json.loads(text) for text in manifest.read_text().splitlines()]
    write_manifest(manifest, [*lines, {**lines[2], "identity": "carl"}])
    assert list_segment_names(config(manifest)) == sorted(["line 3", "line 5", names[0], names[1], names[3]])
    for number, other in ((3, 5), (5, 3)):
        with pytest.raises(ValueError, match=rf"^{manifest}:{number}: segment: '{names[2]}' is also named on line "
                                             rf"{other}; expected unique segment names$"):
            read_segment_record(config(manifest), f"line {number}")


def test_pack_lists_bad_lines_and_fails_or_skips_and_counts_them(corpus, manifest, tmp_path, capsys):
    root, names = corpus
    lines = [json.loads(text) for text in manifest.read_text().splitlines()]
    # anna's second line and ben's train line are bad; ben keeps a training line, as every identity must
    write_manifest(manifest, [lines[0], "{not json", {**lines[2], "split": "test"}, lines[3],
                              {**lines[2], "segment": "ben_train"}])
    output = tmp_path / "shards"

    assert main(["pack", "--layout", "manifest", "-i", str(manifest), "-o", str(output)]) == 2
    report = capsys.readouterr().err.splitlines()
    report = report[next(index for index, line in enumerate(report) if line.startswith("avflow pack: error")):]
    assert report[0].endswith("2 bad segment(s) (pack.skip_bad=true skips and counts them):")
    assert report[1] == f"{names[2]}: {manifest}:3: split: expected \"train\" or \"val\", got 'test'"
    assert report[2].startswith(f"line 2: {manifest}:2: not valid JSON")
    assert not (output / "manifest.json").exists()

    assert main(["pack", "--layout", "manifest", "-i", str(manifest), "-o", str(output), "--skip-bad"]) == 0
    capsys.readouterr()
    packed = json.loads((output / "manifest.json").read_text())
    assert [entry["segment"] for entry in packed["bad"]] == [names[2], "line 2"]
    assert (packed["splits"]["train"]["segments"], packed["splits"]["val"]["segments"]) == (2, 1)


@pytest.mark.parametrize("lines, expected", [
    (["", "  "], r"recordings\.jsonl: no recordings; expected one JSON object per line"),
    ("val only", r"recordings\.jsonl: no line has \"split\": \"train\"; expected at least one training recording"),
])
def test_an_unusable_manifest_is_one_error(corpus, manifest, tmp_path, capsys, lines, expected):
    root, names = corpus
    if lines == "val only":
        lines = [{**corpus_line(root, name, "anna"), "split": "val"} for name in names]
    write_manifest(manifest, lines)
    assert main(["pack", "--layout", "manifest", "-i", str(manifest), "-o", str(tmp_path / "shards")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(expected, error), error


def test_a_bad_line_without_a_split_is_reported_as_itself_not_as_a_missing_train_line(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"segment": "a", "split": "val"}, {"segment": "b"}])
    assert list_segment_names(config(manifest)) == ["a", "b"]
    with pytest.raises(ValueError, match=rf"^{manifest}:2: audio, expression, head_pose, identity, split: missing; "):
        read_segment_record(config(manifest), "b")


def test_the_data_root_must_be_the_manifest_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"^data.root: expected the manifest's JSONL file for "
                                          rf"data.layout=manifest, got '{tmp_path}' \(a folder\)$"):
        list_segment_names(config(tmp_path))


def test_extract_asr_fills_the_missing_token_files_and_keeps_existing_ones(corpus, tmp_path, tiny_wav2vec2, capsys):
    root, names = corpus
    folder = tmp_path / "capture"
    given = np.load(stream_paths(root, names[2])["tokens"])[0]  # the user's own (M, 29) logits
    (folder / "mine").mkdir(parents=True)
    np.save(folder / "mine" / "tokens.npy", given)
    lines = [corpus_line(root, name, "anna") for name in names]
    lines[0].pop("tokens")  # default: TOKEN_DIR/{segment}.npy beside the manifest
    lines[1]["tokens"] = "asr/second.npy"
    lines[2]["tokens"] = "mine/tokens.npy"
    manifest = write_manifest(folder / "recordings.jsonl", lines)
    written = [folder / "wav2vec2_fairseq_base_ls960_asr_ls960_vad100" / f"{names[0]}.npy", folder / "asr/second.npy"]

    with pytest.raises(ValueError, match=rf"^{manifest}:1: tokens: .* no such file; .*`avflow extract-asr"):
        read_segment_record(config(manifest), names[0])
    model = ["--model", str(tiny_wav2vec2)]
    assert main(["extract-asr", "--layout", "manifest", "-i", str(manifest), *model]) == 0
    assert "2 written, 0 already complete" in capsys.readouterr().out

    tokenizer = CTCTokenizer(tiny_wav2vec2)
    for name, path in zip(names, written):
        audio, rate = soundfile.read(stream_paths(root, name)["audio"], dtype="float32", always_2d=True)
        np.testing.assert_allclose(np.load(path), tokenizer.channel_logits(resample(audio.T, rate, 16000)), atol=1e-5)
        assert read_segment_record(config(manifest), name).tokens.shape[0] == 2
    np.testing.assert_array_equal(np.load(folder / "mine" / "tokens.npy"), given)
    assert read_segment_record(config(manifest), names[2]).tokens.shape == (1, *given.shape)

    assert main(["extract-asr", "--layout", "manifest", "-i", str(manifest), *model]) == 0
    assert "0 written" in capsys.readouterr().out
