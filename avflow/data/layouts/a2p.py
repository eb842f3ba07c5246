"""Reader of an Audio2Photoreal subject folder (PXB184, RLW104, TXB805, GQS883), plus AV-Flow's tokens.

Layout under the subject root, per scene (e.g. scene01):
  {scene}_audio.wav                 2 channels, 48 kHz, 1600 samples per 30 fps frame; channel 0 the subject
  {scene}_body_pose.npy             (T, 104) body joint angles at 30 fps
  {scene}_face_expression.npy       (T, 256) Codec-Avatar expression codes at 30 fps
  {scene}_missing_face_frames.npy   1-D integer indices of frames that have no expression code
  data_stats.pth                    the published normalization statistics (not read: avflow keeps its own)
  wav2vec2_fairseq_base_ls960_asr_ls960_vad100/{scene}.npy   (channels, T', 29) token logits at 50 Hz

Codes at missing face frames are not data: they are kept as stored and marked False in
`expression_valid` (no interpolation, no zeroing), so the loss can leave them out. Every stream is
checked once here; errors name the file and what was expected.
The published layout and its rules: docs/reference.md, "The Audio2Photoreal layout".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from avflow.config import ConfigError, DataConfig
from avflow.data.layouts.fifty_h import (
    DURATION_TOLERANCE_FRAMES,
    EXPRESSION_DIM,
    TOKEN_DIR,
    _check_shape,
    load_array,
    read_audio,
)
from avflow.data.layouts.layout import Layout
from avflow.data.records import SegmentRecord
from avflow.text.token_labels import TOKEN_LABELS

SAMPLE_RATE = 48000
SAMPLES_PER_FRAME = 1600  # 48 kHz audio / 30 fps pose
BODY_POSE_DIM = 104
HEAD_JOINTS = slice(12, 16)  # the neck/head joints AV-Flow models as a 4-d head pose
WRAPPED_SUBJECTS = ("PXB184", "RLW104")  # captures whose pose column 3 jumps across +-pi
WRAPPED_COLUMN = 3
POSE_SUFFIX = "_body_pose.npy"
AUDIO_SUFFIX = "_audio.wav"


def scene_paths(subject_root: str | Path, name: str) -> dict[str, Path]:
    root = Path(subject_root)
    return {"audio": root / f"{name}{AUDIO_SUFFIX}",
            "pose": root / f"{name}{POSE_SUFFIX}",
            "expression": root / f"{name}_face_expression.npy",
            "missing": root / f"{name}_missing_face_frames.npy",
            "tokens": root / TOKEN_DIR / f"{name}.npy"}


def subject_root(cfg: DataConfig) -> Path:
    return Path(cfg.root) / cfg.subject


def require_subject(cfg: DataConfig) -> None:
    if not cfg.subject:
        raise ConfigError(f"data.subject: expected an Audio2Photoreal subject for data.layout=a2p (or the "
                          f"subject's own folder as the dataset folder), got {cfg.subject!r}")


def subject_settings(folder: Path) -> dict[str, str]:
    """A subject's own folder (.../PXB184) stands for root .../ and subject PXB184; any other for the root."""
    if is_subject_folder(folder):
        return {"root": str(folder.resolve().parent), "subject": folder.resolve().name}
    return {"root": str(folder)}


def recordings(subject_folder: Path) -> list[tuple[Path, Path]]:
    """(wav, token file) of every scene: SUBJECT/{scene}_audio.wav -> SUBJECT/TOKEN_DIR/{scene}.npy."""
    if not subject_folder.is_dir():
        raise FileNotFoundError(f"{subject_folder}: no such subject folder (expected sceneNN_audio.wav files)")
    return [(wav, subject_folder / TOKEN_DIR / f"{wav.name[:-len(AUDIO_SUFFIX)]}.npy")
            for wav in sorted(subject_folder.glob(f"*{AUDIO_SUFFIX}"))]


def list_scenes(subject_root: str | Path) -> list[str]:
    """Sorted scene names: one per {scene}_body_pose.npy, the file the published loader keys on."""
    root = Path(subject_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: subject folder not found (expected an Audio2Photoreal subject "
                                f"folder with sceneNN{POSE_SUFFIX} files)")
    return sorted(path.name[:-len(POSE_SUFFIX)] for path in root.glob(f"*{POSE_SUFFIX}"))


def validation_scenes(names: list[str], last_n: int) -> set[str]:
    """The published rule: the last `last_n` scenes in sorted order are held out."""
    if last_n < 0:
        raise ValueError(f"data.val_last_scenes: expected a non-negative count, got {last_n}")
    return set(sorted(names)[len(names) - min(last_n, len(names)):])


def wrap_pose(pose: np.ndarray, subject: str) -> np.ndarray:
    """The published per-subject fix: for PXB184 and RLW104, column 3 -> (column 3 + pi) mod 2 pi.

    Column 3 lies outside HEAD_JOINTS (12:16), so the wrap never changes the 4-d head pose AV-Flow
    trains on; it matters only to callers of `read_body_pose` that use the full 104-d pose.
    (audio2photoreal's own loader runs this line twice, which nets to column 3 mod 2 pi; this applies
    it once, as the AV-Flow reference is documented to.)
    """
    if subject not in WRAPPED_SUBJECTS:
        return pose
    wrapped = pose.astype(np.float64)
    wrapped[:, WRAPPED_COLUMN] = np.mod(wrapped[:, WRAPPED_COLUMN] + np.pi, 2 * np.pi)
    return wrapped.astype(np.float32)


def is_subject_folder(path: str | Path) -> bool:
    """True for a folder that holds a subject's scenes itself (rather than subject folders below it)."""
    return Path(path).is_dir() and any(Path(path).glob(f"*{POSE_SUFFIX}"))


def subject_name(subject_root: str | Path) -> str:
    """The subject is the name of its folder, as in the published dataset (dataset/PXB184/...)."""
    return Path(os.path.abspath(subject_root)).name


def read_body_pose(subject_root: str | Path, name: str) -> np.ndarray:
    """(T, 104) float32 body pose of a scene, with the subject's wrap applied."""
    path = scene_paths(subject_root, name)["pose"]
    pose = load_array(path, f"body pose (T, {BODY_POSE_DIM})")
    _check_shape(path, pose, f"body pose of shape (T, {BODY_POSE_DIM})",
                 pose.ndim == 2 and pose.shape[1] == BODY_POSE_DIM)
    return wrap_pose(pose, subject_name(subject_root))


def read_missing_face_frames(path: Path, frames: int) -> np.ndarray:
    """Indices of frames without an expression code: a 1-D integer array (possibly empty) within [0, frames)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing the list of frames without a face code")
    try:
        indices = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(f"{path}: needs pickle to load (an object array); expected a plain 1-D integer "
                             f"array of frame indices, which loads with allow_pickle=False") from error
        raise ValueError(f"{path}: not a readable .npy array of frame indices ({error})") from error
    except EOFError as error:
        raise ValueError(f"{path}: empty file; expected a .npy array of frame indices") from error
    except OSError as error:
        raise ValueError(f"{path}: not a readable .npy array of frame indices ({error})") from error
    indices = indices.reshape(-1) if indices.ndim == 0 else indices
    if indices.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D array of frame indices, got shape {indices.shape}")
    if indices.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{path}: expected integer frame indices, got dtype {indices.dtype}")
    outside = indices[(indices < 0) | (indices >= frames)]
    if outside.size:
        raise ValueError(f"{path}: frame indices {outside[:5].tolist()} lie outside [0, {frames}) "
                         f"(the scene has {frames} pose frames)")
    return indices.astype(np.int64)


def read_record(root: str | Path, name: str, cfg: DataConfig) -> SegmentRecord:
    """One scene of the subject folder `root` as a layout-neutral record: head pose = body_pose[:, 12:16]."""
    root = Path(root)
    paths = scene_paths(root, name)
    audio, sample_rate = read_audio(paths["audio"])
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"{paths['audio']}: sample rate {sample_rate} Hz; expected {SAMPLE_RATE} Hz")

    pose = read_body_pose(root, name)
    if pose.shape[0] * SAMPLES_PER_FRAME != audio.shape[1]:
        raise ValueError(f"scene {name}: {paths['pose']} has {pose.shape[0]} frames, so {paths['audio']} should "
                         f"have {pose.shape[0]} * {SAMPLES_PER_FRAME} = {pose.shape[0] * SAMPLES_PER_FRAME} "
                         f"samples per channel, but it has {audio.shape[1]}")

    expression = load_array(paths["expression"], f"expression codes (T, {EXPRESSION_DIM})")
    _check_shape(paths["expression"], expression, f"expression codes of shape (T, {EXPRESSION_DIM})",
                 expression.ndim == 2 and expression.shape[1] == EXPRESSION_DIM)
    if expression.shape[0] != pose.shape[0]:
        raise ValueError(f"scene {name}: {paths['expression']} has {expression.shape[0]} frames; expected "
                         f"{pose.shape[0]}, as many as {paths['pose']}")
    expression_valid = np.ones(pose.shape[0], dtype=bool)
    expression_valid[read_missing_face_frames(paths["missing"], pose.shape[0])] = False

    tokens = load_array(paths["tokens"], f"token logits (channels, M, {len(TOKEN_LABELS)})")
    _check_shape(paths["tokens"], tokens, f"token logits of shape (channels, M, {len(TOKEN_LABELS)})",
                 tokens.ndim == 3 and tokens.shape[2] == len(TOKEN_LABELS) and tokens.shape[1] > 0)
    pose_seconds = pose.shape[0] / cfg.visual_fps
    token_seconds = tokens.shape[1] / cfg.token_fps
    if abs(pose_seconds - token_seconds) > DURATION_TOLERANCE_FRAMES / cfg.visual_fps:
        raise ValueError(f"scene {name}: {paths['tokens']} covers {token_seconds:.3f} s at {cfg.token_fps:g} Hz but "
                         f"{paths['pose']} covers {pose_seconds:.3f} s; expected them within "
                         f"{DURATION_TOLERANCE_FRAMES} frames at {cfg.visual_fps:g} fps")

    return SegmentRecord(
        name=name,
        is_val=name in validation_scenes(list_scenes(root), cfg.val_last_scenes),
        audio=audio,
        sample_rate=sample_rate,
        expression=expression,
        head_pose=np.ascontiguousarray(pose[:, HEAD_JOINTS]),
        visual_fps=cfg.visual_fps,
        tokens=tokens,
        token_fps=cfg.token_fps,
        expression_valid=expression_valid,
        participant_features=None,
        identity=subject_name(root),
    )


LAYOUT = Layout(
    name="a2p",
    description="an Audio2Photoreal subject: SUBJECT/sceneNN_audio.wav and its streams",
    list_segments=lambda cfg: list_scenes(subject_root(cfg)),
    read_record=lambda cfg, name: read_record(subject_root(cfg), name, cfg),
    recordings=recordings,
    check=require_subject,
    input_settings=subject_settings,
)
