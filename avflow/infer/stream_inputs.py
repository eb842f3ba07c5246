"""What a stream is fed: `Piece`s of per-frame conditioning, made from text given whole or line by line, tokens,
or speech (turned into tokens chunk by chunk, with context on both sides for wav2vec2), optionally at their real-time
pace. An input that stops arriving (a closed pipe, an interrupted read) ends the stream with what came so far."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from avflow.data.features import FrameResampler

if TYPE_CHECKING:
    from avflow.infer.model import InferenceModel

log = logging.getLogger(__name__)

REALTIME_PIECE_SECONDS = 0.1  # file inputs fed at their real pace arrive in pieces of this length
ASR_CHUNK_SECONDS = 1.0  # speech is turned into tokens in chunks of this length, with context on both sides
ASR_LEFT_CONTEXT_SECONDS = 2.0
ASR_RIGHT_CONTEXT_SECONDS = 0.5


@dataclass
class Piece:
    """Conditioning that arrived: (frames, cond_dim) at the mel frame rate; `ends` closes the utterance."""

    cond: np.ndarray
    ends: bool
    arrived: float  # time.perf_counter() when it arrived


def _paced(cond: np.ndarray, frame_rate: float, realtime: bool) -> Iterator[Piece]:
    """One input known whole: at once, or in REALTIME_PIECE_SECONDS pieces, each when its real time has come."""
    if not realtime:
        yield Piece(cond, True, time.perf_counter())
        return
    step = max(1, round(REALTIME_PIECE_SECONDS * frame_rate))
    started = time.perf_counter()
    for first in range(0, cond.shape[0], step):
        last = min(first + step, cond.shape[0])
        due = started + last / frame_rate
        time.sleep(max(0.0, due - time.perf_counter()))
        yield Piece(cond[first:last], last == cond.shape[0], max(due, time.perf_counter()))


def token_pieces(model: InferenceModel, tokens: np.ndarray, realtime: bool = False,
                 participant_tokens: np.ndarray | None = None,
                 participant_features: np.ndarray | None = None) -> Iterator[Piece]:
    """Token logits (T, 29) at the mel frame rate (and a dyadic model's participant streams), given whole or fed
    at their real pace."""
    from avflow.infer.generate import conditioning
    from avflow.infer.inputs import check_duration

    cond = conditioning(model, tokens, participant_tokens, participant_features)
    check_duration(cond.shape[0], model.cfg, "input")  # known whole: refused before anything is written
    return _paced(cond, model.cfg.mel.frame_rate, realtime)


def text_pieces(model: InferenceModel, text: str, rate: float = 1.0, pause_scale: float = 1.0) -> Iterator[Piece]:
    """Text given whole: one utterance."""
    from avflow.infer.inputs import check_text_length, tokens_for_text

    check_text_length(text, rate, model.cfg)
    tokens = tokens_for_text(model, text, rate, pause_scale, model.cfg.sample.seed)
    return token_pieces(model, tokens)


def line_pieces(model: InferenceModel, lines: Iterable[str], skipped: list[dict], rate: float = 1.0,
                pause_scale: float = 1.0) -> Iterator[Piece]:
    """Text arriving line by line: each line one utterance, spoken as soon as it arrives. A line that cannot be
    spoken is reported, recorded in `skipped` and passed over; empty lines are passed over silently."""
    from avflow.infer.generate import conditioning
    from avflow.infer.inputs import check_text_length, tokens_for_text

    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            check_text_length(text, rate, model.cfg)
            cond = conditioning(model, tokens_for_text(model, text, rate, pause_scale, model.cfg.sample.seed + number))
        except ValueError as error:
            log.warning("line %d: cannot be spoken (%s); skipped", number, error)
            skipped.append({"line": number, "text": text[:80], "reason": str(error)})
            continue
        yield Piece(cond, True, time.perf_counter())


def audio_pieces(model: InferenceModel, path: str | Path, asr_model: str | Path | None,
                 realtime: bool = False) -> Iterator[Piece]:
    """Speech turned into token logits chunk by chunk: each ASR_CHUNK_SECONDS of audio with up to
    ASR_LEFT_CONTEXT_SECONDS before and ASR_RIGHT_CONTEXT_SECONDS after it (wav2vec2 attends both ways), fed
    at the audio's real pace under `realtime`. Token frames are resampled to mel frames as they come."""
    from avflow.data.asr import ASR_SAMPLE_RATE, CTCTokenizer
    from avflow.data.features import audio_seconds, load_wav, resample
    from avflow.infer.generate import conditioning

    cfg = model.cfg
    if asr_model is None:
        raise ValueError("--audio needs --asr-model: a local wav2vec2 CTC model directory (Wav2Vec2ForCTC)")
    if Path(path).is_file() and audio_seconds(path) > cfg.sample.max_input_seconds:
        raise ValueError(f"{path}: {audio_seconds(path):.1f} s long; sample.max_input_seconds="
                         f"{cfg.sample.max_input_seconds:g} (--max-input-seconds) is the limit")
    audio, sample_rate = load_wav(path)
    speech = resample(audio[0], sample_rate, ASR_SAMPLE_RATE)
    tokenizer = CTCTokenizer(asr_model)
    token_hop = ASR_SAMPLE_RATE / cfg.data.token_fps
    chunk, left, right = (round(seconds * ASR_SAMPLE_RATE) for seconds in
                          (ASR_CHUNK_SECONDS, ASR_LEFT_CONTEXT_SECONDS, ASR_RIGHT_CONTEXT_SECONDS))
    token_total = int(len(speech) / token_hop)
    mel_total = int(len(speech) / ASR_SAMPLE_RATE * cfg.mel.frame_rate)
    if mel_total < 1:
        raise ValueError(f"{path}: too short to generate from")
    tokens = np.zeros((0, 0), np.float32)
    resampler = FrameResampler(cfg.data.token_fps, cfg.mel.frame_rate)
    started = time.perf_counter()
    for first in range(0, len(speech), chunk):
        last = min(first + chunk, len(speech))
        if realtime:
            time.sleep(max(0.0, started + min(last + right, len(speech)) / ASR_SAMPLE_RATE - time.perf_counter()))
        lo, hi = max(0, first - left), min(len(speech), last + right)
        logits = tokenizer.logits(speech[lo:hi])
        offset = round(lo / token_hop)
        new = logits[round(first / token_hop) - offset:round(last / token_hop) - offset]
        tokens = new if tokens.size == 0 else np.concatenate([tokens, new])
        complete = last == len(speech)
        tokens = tokens[:token_total]
        count = mel_total if complete else min(resampler.ready(tokens.shape[0]), mel_total)
        (mel_tokens,) = resampler.frames([tokens], tokens.shape[0], count)
        yield Piece(conditioning(model, mel_tokens) if mel_tokens.shape[0] else
                    np.zeros((0, cfg.model.cond_dim), np.float32), complete, time.perf_counter())
