"""Input adapters: token files, text, speech and participant features -> per-frame arrays at the mel frame
rate, and the length limits that refuse an input before it is sampled."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from avflow.config import Config
from avflow.data.asr import ASR_SAMPLE_RATE, CTCTokenizer
from avflow.data.features import audio_seconds, interpolate_frames, load_wav, resample
from avflow.infer.model import InferenceModel
from avflow.text.token_labels import TOKEN_LABELS
from avflow.text.token_logits import text_to_token_logits
from avflow.utils import load_numeric_array

# Speech rarely exceeds ~20 characters per second; text longer than this many characters per second of
# sample.max_input_seconds is refused before its timing is computed.
TEXT_CHARACTERS_PER_SECOND = 40.0


def check_duration(frames: int, cfg: Config, what: str) -> None:
    """Refuse inputs longer than sample.max_input_seconds, so one item cannot hold up a whole batch."""
    seconds = frames / cfg.mel.frame_rate
    if seconds > cfg.sample.max_input_seconds:
        raise ValueError(f"{what}: {seconds:.1f} s long; sample.max_input_seconds="
                         f"{cfg.sample.max_input_seconds:g} (--max-input-seconds) is the limit (split the input, or "
                         f"raise the limit)")


def check_text_length(text: str, rate: float, cfg: Config) -> None:
    """Refuse text far longer than sample.max_input_seconds allows early, before its timing is computed (and a
    speaking rate that is not a positive number)."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate (--rate): expected a positive speaking rate, got {rate}")
    limit = int(cfg.sample.max_input_seconds * TEXT_CHARACTERS_PER_SECOND * max(rate, 1.0))
    if len(text) > limit:
        raise ValueError(f"text: {len(text)} characters, far more than sample.max_input_seconds="
                         f"{cfg.sample.max_input_seconds:g} (--max-input-seconds) of speech holds (at most {limit}); "
                         f"split the text, or raise the limit")


def tokens_from_file(path: str | Path, token_fps: float, frame_rate: float) -> np.ndarray:
    """Token logits .npy, (M, 29) or (channels, M, 29) with the actor first, at token_fps -> mel frames."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such token file")
    tokens = load_numeric_array(path, f"token logits (M, {len(TOKEN_LABELS)})")
    if tokens.ndim == 3:
        tokens = tokens[0]
    if tokens.ndim != 2 or tokens.shape[1] != len(TOKEN_LABELS):
        raise ValueError(f"{path}: expected token logits of shape (M, {len(TOKEN_LABELS)}) or "
                         f"(channels, M, {len(TOKEN_LABELS)}), got {tokens.shape}")
    if not np.isfinite(tokens).all():
        raise ValueError(f"{path}: token logits contain NaN or inf")
    frames = int(tokens.shape[0] / token_fps * frame_rate)
    if frames < 1:
        raise ValueError(f"{path}: {tokens.shape[0]} token frames are too short to generate from")
    return interpolate_frames(tokens.astype(np.float32), token_fps, frames, frame_rate)


def tokens_for_text(model: InferenceModel, text: str, rate: float = 1.0, pause_scale: float = 1.0,
                    seed: int = 0) -> np.ndarray:
    """Token logits at the mel frame rate from the model's learned text front end when it has one (an export
    with text2tokens, or --text2tokens), else from the rule-based character timing the demo corpus is made
    with (which has no pause control)."""
    if model.text2tokens is not None:
        return model.text2tokens.token_logits(text, rate=rate, pause_scale=pause_scale, seed=seed)
    if pause_scale != 1.0:
        raise ValueError("pause_scale needs a text-to-tokens model (--text2tokens); the rule-based timing has none")
    return text_to_token_logits(text, model.cfg.mel.frame_rate, rate)


def participant_features_from_file(path: str | Path, cfg: Config) -> np.ndarray:
    """The participant's SMIRK features .npy (F, participant_feature_dim), min-max normalized to [-1, 1] as
    in the shards, at the visual frame rate -> mel frames."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such participant feature file")
    width = cfg.model.participant_feature_dim
    features = load_numeric_array(path, f"participant features (frames, {width})")
    if features.ndim != 2 or features.shape[1] != width or not np.isfinite(features).all():
        raise ValueError(f"{path}: expected finite participant features of shape (frames, {width}), got "
                         f"{features.shape}")
    frames = int(features.shape[0] / cfg.data.visual_fps * cfg.mel.frame_rate)
    return interpolate_frames(features.astype(np.float32), cfg.data.visual_fps, frames, cfg.mel.frame_rate)


def tokens_from_audio(path: str | Path, asr_model: str | Path | None, token_fps: float, frame_rate: float,
                      max_seconds: float | None = None) -> np.ndarray:
    """Speech -> CTC token logits with a local wav2vec2 model -> mel frames. Any sample rate is resampled.
    Audio longer than `max_seconds` is refused from its header, before it is read."""
    if asr_model is None:
        raise ValueError("--audio needs --asr-model: a local wav2vec2 CTC model directory (Wav2Vec2ForCTC)")
    if max_seconds is not None and Path(path).is_file():
        seconds = audio_seconds(path)
        if seconds > max_seconds:
            raise ValueError(f"{path}: {seconds:.1f} s long; sample.max_input_seconds={max_seconds:g} "
                             f"(--max-input-seconds) is the limit (split the input, or raise the limit)")
    audio, sample_rate = load_wav(path)
    speech = resample(audio[0], sample_rate, ASR_SAMPLE_RATE)
    tokens = CTCTokenizer(asr_model).logits(speech)
    frames = int(len(speech) / ASR_SAMPLE_RATE * frame_rate)
    if frames < 1:
        raise ValueError(f"{path}: too short to generate from")
    return interpolate_frames(tokens, token_fps, frames, frame_rate)
