"""Reader of the AV-Flow 50h dataset layout (also written by the demo corpus).

Layout under the root, per segment:
  audio/{segment}.wav                      48 kHz, channel 0 actor, channel 1 participant
  expression_codes/{segment}.npy           (N, 256) at 30 fps
  headpose/{segment}--headpose.npy         (N, 4, 4) rigid transforms at 30 fps
  wav2vec2_fairseq_base_ls960_asr_ls960_vad100/{segment}.npy   (channels, M, 29) token logits at 50 Hz
  participant/camera01/smirk_outputs/{segment}--expression.npy / --headpose.npy   optional SMIRK features

Every stream is checked once here (shapes, finite values, matching durations) so that later stages can
trust what they get; errors name the file and what was expected.
The published layout and its rules: docs/reference.md, "The 50h dataset layout".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avflow.config import DataConfig
from avflow.data.features import load_wav, rigid_to_pose7
from avflow.data.layouts.layout import Layout
from avflow.data.records import SegmentRecord
from avflow.text.token_labels import TOKEN_LABELS
from avflow.utils import load_numeric_array

EXPRESSION_DIM = 256
TOKEN_DIR = "wav2vec2_fairseq_base_ls960_asr_ls960_vad100"
SMIRK_DIR = Path("participant") / "camera01" / "smirk_outputs"
VISUAL_FPS = 30.0
TOKEN_FPS = 50.0
DURATION_TOLERANCE_FRAMES = 2  # streams may disagree in length by this many visual frames


@dataclass
class Segment:
    """One recording at its native stream rates."""

    name: str
    audio: np.ndarray  # (channels, samples) float32; channel 0 actor, 1 participant
    sample_rate: int
    expression: np.ndarray  # (N, 256) float32 at 30 fps
    headpose: np.ndarray  # (N, 4, 4) float32 at 30 fps
    tokens: np.ndarray  # (channels, M, 29) float32 at 50 Hz
    is_val: bool
    participant_expression: np.ndarray | None = None  # SMIRK features when the layout has them
    participant_headpose: np.ndarray | None = None


def stream_paths(root: str | Path, name: str) -> dict[str, Path]:
    root = Path(root)
    return {"audio": root / "audio" / f"{name}.wav",
            "expression": root / "expression_codes" / f"{name}.npy",
            "headpose": root / "headpose" / f"{name}--headpose.npy",
            "tokens": root / TOKEN_DIR / f"{name}.npy"}


def list_segments(root: str | Path) -> list[str]:
    """Sorted segment names: one per audio/*.wav."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found (expected the 50h layout with an audio/ folder)")
    audio = root / "audio"
    if not audio.is_dir():
        raise FileNotFoundError(f"{audio}: no audio folder (expected audio/{{segment}}.wav in the 50h layout)")
    return sorted(path.stem for path in audio.glob("*.wav"))


def recordings(root: Path) -> list[tuple[Path, Path]]:
    """(wav, token file) of every segment: ROOT/audio/{segment}.wav -> ROOT/TOKEN_DIR/{segment}.npy."""
    audio = root / "audio"
    if not audio.is_dir():
        raise FileNotFoundError(f"{audio}: no audio folder (expected {{segment}}.wav files of the 50h layout)")
    return [(wav, root / TOKEN_DIR / f"{wav.stem}.npy") for wav in sorted(audio.glob("*.wav"))]


def is_validation(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """The 50h rule: a segment is held out when its name contains any validation session pattern."""
    return any(pattern in name for pattern in patterns)


def _check_finite(path: Path, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: contains NaN or inf values; expected finite numbers")


def load_array(path: Path, what: str) -> np.ndarray:
    """A numeric .npy stream as float32, refused in one line when missing or not finite (every layout reads so)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {what}")
    array = load_numeric_array(path, what)
    _check_finite(path, array)
    return array.astype(np.float32)


def _check_shape(path: Path, array: np.ndarray, expected: str, ok: bool) -> None:
    if not ok or array.shape[0] == 0:
        raise ValueError(f"{path}: expected {expected} with at least one frame, got shape {array.shape}")


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """(channels, samples) audio and its rate, refused in one line when missing, empty or not finite."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing audio (expected a 48 kHz wav, channel 0 actor)")
    audio, sample_rate = load_wav(path)
    if audio.shape[1] == 0:
        raise ValueError(f"{path}: empty audio; expected at least one sample")
    _check_finite(path, audio)
    return audio, sample_rate


def _read_optional(path: Path, what: str) -> np.ndarray | None:
    if not path.is_file():
        return None
    array = load_array(path, what)
    _check_shape(path, array, f"frame-major {what} of rank >= 2", array.ndim >= 2)
    return array


def read_segment(root: str | Path, name: str, val_patterns: list[str] | tuple[str, ...],
                 visual_fps: float = VISUAL_FPS, token_fps: float = TOKEN_FPS) -> Segment:
    """Read and check one segment's streams."""
    root = Path(root)
    paths = stream_paths(root, name)
    audio, sample_rate = read_audio(paths["audio"])

    expression = load_array(paths["expression"], f"expression codes (N, {EXPRESSION_DIM})")
    _check_shape(paths["expression"], expression, f"expression codes of shape (N, {EXPRESSION_DIM})",
                 expression.ndim == 2 and expression.shape[1] == EXPRESSION_DIM)
    headpose = load_array(paths["headpose"], "head pose (N, 4, 4)")
    _check_shape(paths["headpose"], headpose, "rigid transforms of shape (N, 4, 4)",
                 headpose.ndim == 3 and headpose.shape[1:] == (4, 4))
    tokens = load_array(paths["tokens"], f"token logits (channels, M, {len(TOKEN_LABELS)})")
    _check_shape(paths["tokens"], tokens, f"token logits of shape (channels, M, {len(TOKEN_LABELS)})",
                 tokens.ndim == 3 and tokens.shape[2] == len(TOKEN_LABELS))
    if tokens.shape[1] == 0:
        raise ValueError(f"{paths['tokens']}: expected at least one token frame, got shape {tokens.shape}")

    durations = {paths["audio"]: audio.shape[1] / sample_rate,
                 paths["expression"]: expression.shape[0] / visual_fps,
                 paths["headpose"]: headpose.shape[0] / visual_fps,
                 paths["tokens"]: tokens.shape[1] / token_fps}
    if max(durations.values()) - min(durations.values()) > DURATION_TOLERANCE_FRAMES / visual_fps:
        listed = ", ".join(f"{path} {seconds:.3f} s" for path, seconds in durations.items())
        raise ValueError(f"segment {name}: stream durations disagree by more than {DURATION_TOLERANCE_FRAMES} "
                         f"frames at {visual_fps:g} fps: {listed}")

    smirk = root / SMIRK_DIR
    return Segment(
        name=name,
        audio=audio,
        sample_rate=sample_rate,
        expression=expression,
        headpose=headpose,
        tokens=tokens,
        is_val=is_validation(name, val_patterns),
        participant_expression=_read_optional(smirk / f"{name}--expression.npy", "participant SMIRK expression"),
        participant_headpose=_read_optional(smirk / f"{name}--headpose.npy", "participant SMIRK head pose"),
    )


def _smirk_features(root: Path, segment: Segment) -> np.ndarray | None:
    """Participant SMIRK expression + head pose, min-max normalized to [-1, 1] with the dataset's stats."""
    if segment.participant_expression is None or segment.participant_headpose is None:
        return None
    stats = root / SMIRK_DIR / "stats"
    parts = []
    for kind, values in (("expression", segment.participant_expression), ("headpose", segment.participant_headpose)):
        values = values.reshape(values.shape[0], -1)
        low = load_array(stats / f"{kind}_min.npy", f"SMIRK {kind} minimum").reshape(-1)
        high = load_array(stats / f"{kind}_max.npy", f"SMIRK {kind} maximum").reshape(-1)
        if low.shape[0] != values.shape[1] or high.shape[0] != values.shape[1]:
            raise ValueError(f"{stats}: {kind} min/max have {low.shape[0]}/{high.shape[0]} values; "
                             f"expected {values.shape[1]} (the width of the participant {kind})")
        parts.append(2 * (values - low) / np.maximum(high - low, 1e-8) - 1)
    frames = min(p.shape[0] for p in parts)
    return np.concatenate([p[:frames] for p in parts], axis=1).astype(np.float32)


def read_record(root: str | Path, name: str, cfg: DataConfig) -> SegmentRecord:
    """One 50h segment as a layout-neutral record: head pose as a 7-d quaternion + translation."""
    root = Path(root)
    segment = read_segment(root, name, cfg.val_patterns, cfg.visual_fps, cfg.token_fps)
    return SegmentRecord(
        name=name,
        is_val=segment.is_val,
        audio=segment.audio,
        sample_rate=segment.sample_rate,
        expression=segment.expression,
        head_pose=rigid_to_pose7(segment.headpose, canonical_sign=cfg.canonical_quaternion_sign),
        visual_fps=cfg.visual_fps,
        tokens=segment.tokens,
        token_fps=cfg.token_fps,
        participant_features=_smirk_features(root, segment),
    )


LAYOUT = Layout(
    name="50h",
    description="the AV-Flow 50h dataset (the demo corpus too): DATASET/audio/{segment}.wav and its streams",
    list_segments=lambda cfg: list_segments(cfg.root),
    read_record=lambda cfg, name: read_record(cfg.root, name, cfg),
    recordings=recordings,
    aliases=("demo",),  # `avflow pack --layout demo`: the demo corpus is written in this layout
)
