"""Reader of a manifest: a JSONL file, one JSON object per recording, for capture data laid out any other way.

Each line names a recording's files and what they are (format, fields and an example: shards/README.md,
"Your own capture data: the manifest layout"):
  {"segment": "anna_take01", "audio": "anna/take01.wav", "expression": "anna/take01_codes.npy",
   "head_pose": "anna/take01_pose.npy", "identity": "anna", "split": "train"}
Paths are relative to the manifest's folder unless absolute. Streams are kept at their native rates
(`visual_fps`, `token_fps`: the line's, else data.visual_fps / data.token_fps); aligning them to the mel
clock is packing's job, as for every layout.

The same checks as the 50h and Audio2Photoreal readers (finite values, shapes, stream durations within
DURATION_TOLERANCE_FRAMES) are made, and every error is one line naming the manifest, the line number and
the field. A line that cannot be read is a bad segment like any other: `avflow pack` lists it and fails,
or counts it under --skip-bad. Its key is its segment name, or `line N` when the line names none it can use.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avflow.config import ConfigError, DataConfig
from avflow.data.features import continuous_quaternion_signs, rigid_to_pose7
from avflow.data.layouts.a2p import read_missing_face_frames
from avflow.data.layouts.fifty_h import DURATION_TOLERANCE_FRAMES, EXPRESSION_DIM, TOKEN_DIR, load_array, read_audio
from avflow.data.layouts.layout import Layout
from avflow.data.records import SegmentRecord
from avflow.text.token_labels import TOKEN_LABELS

REQUIRED_FIELDS = ("segment", "audio", "expression", "head_pose", "identity", "split")
OPTIONAL_FIELDS = ("tokens", "missing_face_frames", "visual_fps", "token_fps")
PATH_FIELDS = ("audio", "expression", "head_pose", "tokens", "missing_face_frames")
SPLITS = ("train", "val")
HEAD_POSE_SHAPES = ("(N, 4, 4) or (N, 3, 4) rigid transforms, (N, 7) quaternion [w, x, y, z] + translation, "
                    "or (N, 4) joints")
UNIT_QUATERNION_TOLERANCE = 1e-3  # |q| may differ from 1 by this much (float32 rounding of stored quaternions)


@dataclass(frozen=True)
class ManifestLine:
    """One line of the manifest: its fields as written, or the one-line error that makes it unusable."""

    manifest: Path
    number: int  # 1-based, counting every line of the file
    fields: dict[str, Any]
    problem: str = ""  # empty for a well-formed line
    named: bool = False  # whether `segment` is a usable name that no other line uses

    @property
    def key(self) -> str:
        """The segment name; `line N` (never a segment name: names hold no whitespace) when it has no usable one."""
        return self.fields["segment"] if self.named else f"line {self.number}"

    def error(self, field: str, message: str) -> ValueError:
        return ValueError(f"{self.manifest}:{self.number}: {field}: {message}")

    def path(self, field: str) -> Path:
        """A path field resolved against the manifest's folder; tokens default to TOKEN_DIR/{segment}.npy."""
        value = self.fields.get(field)
        if value is None and field == "tokens":
            return self.manifest.parent / TOKEN_DIR / f"{self.fields['segment']}.npy"
        return self.manifest.parent / value  # an absolute value replaces the folder

    def rate(self, field: str, default: float) -> float:
        return float(self.fields.get(field, default))


def _name_problem(name: Any) -> str | None:
    """Why `name` cannot be a segment name (it becomes a WebDataset key and a file name), or None."""
    if not isinstance(name, str) or not name:
        return f"expected a non-empty string, got {name!r}"
    if "." in name or "/" in name or any(character.isspace() for character in name):
        return f"expected a name without '.', '/' or whitespace (it becomes a WebDataset key), got {name!r}"
    return None


def _field_problem(field: str, value: Any) -> str | None:
    """Why a known field's value cannot be used, or None."""
    if field == "segment":
        return _name_problem(value)
    if field in PATH_FIELDS or field == "identity":
        return None if isinstance(value, str) and value else f"expected a non-empty string, got {value!r}"
    if field == "split":
        return None if value in SPLITS else f"expected \"train\" or \"val\", got {value!r}"
    # visual_fps, token_fps: frames per second
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"expected a positive number of frames per second, got {value!r}"
    return None


def _parse_line(manifest: Path, number: int, text: str) -> ManifestLine:
    line = _checked_line(manifest, number, text)
    return dataclasses.replace(line, named=_name_problem(line.fields.get("segment")) is None)


def _checked_line(manifest: Path, number: int, text: str) -> ManifestLine:
    where = f"{manifest}:{number}"
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        return ManifestLine(manifest, number, {}, f"{where}: not valid JSON ({error.msg} at column {error.colno}); "
                                                  f"expected one JSON object per line")
    if not isinstance(fields, dict):
        return ManifestLine(manifest, number, {}, f"{where}: expected a JSON object with the fields "
                                                  f"{', '.join(REQUIRED_FIELDS)}, got {type(fields).__name__}")
    known = (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)
    for field in fields:
        if field not in known:
            closest = difflib.get_close_matches(field, known, n=1)
            hint = f" (did you mean {closest[0]!r}?)" if closest else ""
            return ManifestLine(manifest, number, fields, f"{where}: {field}: unknown field{hint}; expected "
                                                          f"fields of {', '.join(known)}")
    missing = [field for field in REQUIRED_FIELDS if field not in fields]
    if missing:
        return ManifestLine(manifest, number, fields, f"{where}: {', '.join(missing)}: missing; every line names "
                                                      f"{', '.join(REQUIRED_FIELDS)}")
    for field, value in fields.items():
        problem = _field_problem(field, value)
        if problem:
            return ManifestLine(manifest, number, fields, f"{where}: {field}: {problem}")
    return ManifestLine(manifest, number, fields)


def _with_duplicates_marked(lines: list[ManifestLine]) -> list[ManifestLine]:
    """Every line whose segment name another line also uses is bad: neither is chosen silently."""
    numbers: dict[str, list[int]] = {}
    for line in lines:
        if line.named:
            numbers.setdefault(line.fields["segment"], []).append(line.number)
    marked = []
    for line in lines:
        others = [number for number in numbers.get(line.fields.get("segment"), []) if number != line.number]
        if line.named and others:
            line = dataclasses.replace(line, named=False, problem=(
                f"{line.manifest}:{line.number}: segment: {line.fields['segment']!r} is also named on line "
                f"{', '.join(map(str, others))}; expected unique segment names"))
        marked.append(line)
    return marked


def read_manifest(path: str | os.PathLike) -> list[ManifestLine]:
    """Every non-blank line of the manifest, parsed and checked field by field (files are read per segment).

    Raises one error for a manifest that cannot be used at all: missing, empty, or without a train line.
    """
    return _read_manifest_cached(*_version(path))


def lines_by_key(path: str | os.PathLike) -> dict[str, ManifestLine]:
    """The manifest's lines by segment key (see ManifestLine.key)."""
    return _lines_by_key_cached(*_version(path))


def _version(path: str | os.PathLike) -> tuple[Path, int, int]:
    """(absolute path, mtime, size): what the parsed manifest is cached under, so an edited file is reread."""
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest (expected a JSONL file, one JSON object per recording)")
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _read_manifest_cached(path: Path, mtime_ns: int, size: int) -> list[ManifestLine]:
    """Parsed once per version of the file: pack reads every segment's record through it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); expected a JSONL "
                         f"file") from error
    lines = [_parse_line(path, number, line) for number, line in enumerate(text.splitlines(), start=1)
             if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no recordings; expected one JSON object per line")
    # a bad line that names no valid split may be meant for train: its own error says more than this one
    if not any(line.fields.get("split") == "train" or (line.problem and line.fields.get("split") != "val")
               for line in lines):
        raise ValueError(f"{path}: no line has \"split\": \"train\"; expected at least one training recording")
    return _with_duplicates_marked(lines)


@functools.lru_cache(maxsize=4)
def _lines_by_key_cached(path: Path, mtime_ns: int, size: int) -> dict[str, ManifestLine]:
    return {line.key: line for line in _read_manifest_cached(path, mtime_ns, size)}


def list_segments(cfg: DataConfig) -> list[str]:
    """Sorted keys of every line: segment names, and `line N` for a line that names none it can use."""
    return sorted(lines_by_key(cfg.root))


def recordings(manifest: Path) -> list[tuple[Path, Path]]:
    """(audio, token file) of every line whose token file does not exist yet, for `avflow extract-asr`.

    A token file that exists is never replaced: it may be the user's own logits, (M, 29) as well as the
    (channels, M, 29) extract-asr writes; extraction writes atomically, so an existing file is complete.
    """
    lines = read_manifest(manifest)
    bad = [line.problem for line in lines if line.problem]
    if bad:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise ValueError(f"{bad[0]}{more}")
    pairs = [(line.path("audio"), line.path("tokens")) for line in lines]
    return [(audio, tokens) for audio, tokens in pairs if not tokens.exists()]


def check_manifest_file(cfg: DataConfig) -> None:
    root = Path(cfg.root)
    if not root.is_file():
        found = "a folder" if root.is_dir() else "no such file"
        raise ConfigError(f"data.root: expected the manifest's JSONL file for data.layout=manifest, got "
                          f"{cfg.root!r} ({found})")


def _pose_width(shape: tuple[int, ...]) -> int | None:
    """The record's head-pose width for a stored array shape: 7 (quaternion + translation), 4 (joints), or None."""
    if len(shape) == 3 and shape[1:] in ((4, 4), (3, 4)):
        return 7
    if len(shape) == 2 and shape[1] in (7, 4):
        return shape[1]
    return None


@functools.lru_cache(maxsize=4)
def _first_pose_width(manifest: Path, mtime_ns: int, size: int) -> tuple[int, int] | None:
    """(line number, head-pose width) of the first well-formed line whose pose file has a usable shape."""
    for line in _read_manifest_cached(manifest, mtime_ns, size):
        if line.problem:
            continue
        try:
            width = _pose_width(np.load(line.path("head_pose"), mmap_mode="r", allow_pickle=False).shape)
        except (ValueError, OSError, EOFError):
            continue
        if width is not None:
            return line.number, width
    return None


def _load(line: ManifestLine, field: str, what: str) -> np.ndarray:
    """A finite float32 array from the line's file `field`; errors name the line and the field."""
    path = line.path(field)
    if not path.is_file():
        hint = (f"; `avflow extract-asr --layout manifest -i {line.manifest}` writes them"
                if field == "tokens" else "")
        raise line.error(field, f"{path}: no such file; expected {what}{hint}")
    try:
        return load_array(path, what)
    except ValueError as error:
        raise line.error(field, str(error)) from error


def _head_pose(line: ManifestLine, canonical_sign: bool) -> np.ndarray:
    """The stored head pose as the record's: transforms -> 7-d quaternion + translation as for 50h; 7-d as
    given (signs made continuous like 50h's); 4-d joints as for Audio2Photoreal."""
    pose = _load(line, "head_pose", HEAD_POSE_SHAPES)
    width = _pose_width(pose.shape)
    if width is None or pose.shape[0] == 0:
        raise line.error("head_pose", f"{line.path('head_pose')}: expected {HEAD_POSE_SHAPES} with at least one "
                                      f"frame, got shape {pose.shape}")
    first = _first_pose_width(*_version(line.manifest))
    if first is not None and first[1] != width:
        raise line.error("head_pose", f"{line.path('head_pose')}: a {width}-d head pose (shape {pose.shape}); "
                                      f"expected {first[1]}-d like line {first[0]}: one manifest packs one kind "
                                      f"of head pose")
    if pose.ndim == 3:
        return rigid_to_pose7(pose, canonical_sign=canonical_sign)
    if width == 4:
        return pose
    norms = np.linalg.norm(pose[:, :4], axis=1)
    worst = int(np.argmax(np.abs(norms - 1)))
    if abs(norms[worst] - 1) > UNIT_QUATERNION_TOLERANCE:
        raise line.error("head_pose", f"{line.path('head_pose')}: frame {worst} has a quaternion of length "
                                      f"{norms[worst]:.4f}; expected unit quaternions [w, x, y, z] in columns 0-3")
    if canonical_sign:
        pose = np.concatenate([continuous_quaternion_signs(pose[:, :4]), pose[:, 4:]], axis=1)
    return pose


def _tokens(line: ManifestLine) -> np.ndarray:
    """(channels, M, 29) token logits; a (M, 29) file is one channel, the recording's actor."""
    what = f"token logits (M, {len(TOKEN_LABELS)}) or (channels, M, {len(TOKEN_LABELS)})"
    tokens = _load(line, "tokens", what)
    tokens = tokens[None] if tokens.ndim == 2 else tokens
    if tokens.ndim != 3 or tokens.shape[2] != len(TOKEN_LABELS) or 0 in tokens.shape:
        raise line.error("tokens", f"{line.path('tokens')}: expected {what} with at least one frame, got shape "
                                   f"{tokens.shape}")
    return tokens


def _check_durations(line: ManifestLine, audio_seconds: float, streams: dict[str, tuple[int, float]],
                     visual_fps: float) -> None:
    """All streams must last as long as each other within DURATION_TOLERANCE_FRAMES visual frames, as on 50h.

    The error names the stream furthest from the audio, with the rate its length was read at, since a wrong
    visual_fps or token_fps shows there.
    """
    seconds = {"audio": audio_seconds, **{field: frames / rate for field, (frames, rate) in streams.items()}}
    if max(seconds.values()) - min(seconds.values()) <= DURATION_TOLERANCE_FRAMES / visual_fps:
        return
    field = max(streams, key=lambda name: abs(seconds[name] - audio_seconds))
    frames, rate = streams[field]
    listed = ", ".join(f"{name} {value:.3f} s" for name, value in seconds.items())
    raise line.error(field, f"{line.path(field)}: {frames} frames at {rate:g} fps last {seconds[field]:.3f} s; "
                            f"expected every stream within {DURATION_TOLERANCE_FRAMES} frames at {visual_fps:g} fps "
                            f"of the others ({listed})")


def read_record(cfg: DataConfig, key: str) -> SegmentRecord:
    """The recording of the manifest line `key` (its segment name, or `line N`) as a checked record."""
    line = lines_by_key(cfg.root).get(key)
    if line is None:
        raise ValueError(f"{os.path.abspath(cfg.root)}: no line names segment {key!r}")
    if line.problem:
        raise ValueError(line.problem)
    visual_fps = line.rate("visual_fps", cfg.visual_fps)
    token_fps = line.rate("token_fps", cfg.token_fps)

    if not line.path("audio").is_file():
        raise line.error("audio", f"{line.path('audio')}: no such file; expected an audio file, channel 0 the "
                                  f"recorded person")
    try:
        audio, sample_rate = read_audio(line.path("audio"))
    except ValueError as error:
        raise line.error("audio", str(error)) from error
    expression = _load(line, "expression", f"expression codes (N, {EXPRESSION_DIM})")
    if expression.ndim != 2 or expression.shape[1] != EXPRESSION_DIM or expression.shape[0] == 0:
        raise line.error("expression", f"{line.path('expression')}: expected expression codes of shape "
                                       f"(N, {EXPRESSION_DIM}) with at least one frame, got shape {expression.shape}")
    head_pose = _head_pose(line, cfg.canonical_quaternion_sign)
    tokens = _tokens(line)

    _check_durations(line, audio.shape[1] / sample_rate, {"expression": (expression.shape[0], visual_fps),
                                                          "head_pose": (head_pose.shape[0], visual_fps),
                                                          "tokens": (tokens.shape[1], token_fps)}, visual_fps)

    expression_valid = None
    if "missing_face_frames" in line.fields:
        expression_valid = np.ones(expression.shape[0], dtype=bool)
        try:
            missing = read_missing_face_frames(line.path("missing_face_frames"), expression.shape[0])
        except (ValueError, FileNotFoundError) as error:
            raise line.error("missing_face_frames", str(error)) from error
        expression_valid[missing] = False

    return SegmentRecord(
        name=key,
        is_val=line.fields["split"] == "val",
        audio=audio,
        sample_rate=sample_rate,
        expression=expression,
        head_pose=np.ascontiguousarray(head_pose, dtype=np.float32),
        visual_fps=visual_fps,
        tokens=tokens,
        token_fps=token_fps,
        expression_valid=expression_valid,
        identity=line.fields["identity"],
    )


LAYOUT = Layout(
    name="manifest",
    description="a JSONL manifest file, one line per recording naming its audio, expression codes, head pose, "
                "tokens, identity and split (format: shards/README.md)",
    list_segments=list_segments,
    read_record=read_record,
    recordings=recordings,
    check=check_manifest_file,
)
