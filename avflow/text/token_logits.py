"""Rule-based character front end: text -> timed letters -> CTC-style token logits.

AV-Flow is conditioned on the frame-level character logits of a wav2vec2 CTC model. Without a learned
text-to-tokens model, text is turned into logits of the same shape and statistics by rule:
each letter gets a duration from its class (vowels longer than consonants, pauses between words,
silence at both ends), and within each letter's span the letter dominates the centre while the CTC
blank dominates the edges, as in a real character CTC model. The demo corpus uses the same timeline
to synthesize speech and motion, so its tokens and its streams agree.
"""

from __future__ import annotations

import numpy as np

from avflow.text.normalize import normalize_text
from avflow.text.token_labels import BLANK, LABEL_INDEX, TOKEN_LABELS, WORD_DELIMITER

PAUSE = "|"

# Seconds per symbol at rate 1.0: open vowels are held longest, consonants are short.
VOWEL_SECONDS = {"A": 0.12, "O": 0.11, "E": 0.10, "U": 0.10, "I": 0.09}
CONSONANT_SECONDS = 0.06
APOSTROPHE_SECONDS = 0.03
WORD_GAP_SECONDS = 0.08
EDGE_SILENCE_SECONDS = 0.2

# Logit levels shaping the CTC-like posteriors (before log-softmax).
DOMINANT_LOGIT = 9.0
RUNNER_UP_LOGIT = 4.0
LABEL_CENTRE_FRACTION = 0.5


def symbol_seconds(text: str, rate: float = 1.0) -> list[tuple[str, float]]:
    """The normalized text as (symbol, seconds): letters, "'" and "|" for word gaps and edge silence."""
    if rate <= 0:
        raise ValueError(f"speaking rate must be positive, got {rate}")
    timeline = [(PAUSE, EDGE_SILENCE_SECONDS)]
    for index, word in enumerate(normalize_text(text).split(" ")):
        if index:
            timeline.append((PAUSE, WORD_GAP_SECONDS))
        for letter in word:
            if letter == "'":
                timeline.append((letter, APOSTROPHE_SECONDS))
            else:
                timeline.append((letter, VOWEL_SECONDS.get(letter, CONSONANT_SECONDS)))
    timeline.append((PAUSE, EDGE_SILENCE_SECONDS))
    return [(symbol, seconds / rate) for symbol, seconds in timeline]


def seconds_to_frames(seconds: list[float], fps: float) -> list[int]:
    """Frame counts for consecutive spans, each at least one frame, by rounding cumulative end times.

    Rounding the ends (not each span) keeps the total at round(sum(seconds) * fps), so streams at
    different rates built from the same spans stay aligned. Only when that total is smaller than the
    number of spans does the total grow, to one frame per span.
    """
    if fps <= 0:
        raise ValueError(f"frame rate must be positive, got {fps}")
    if not seconds:
        raise ValueError("no spans to convert to frames")
    if min(seconds) < 0:
        raise ValueError(f"span durations must be non-negative, got {min(seconds)}")
    count = len(seconds)
    total = max(int(round(float(np.sum(seconds)) * fps)), count)
    ends = np.rint(np.cumsum(seconds) * fps).astype(np.int64)
    ends[-1] = total
    for index in range(count):
        ends[index] = max(ends[index], index + 1 if index == 0 else ends[index - 1] + 1)
    ends[-1] = total
    for index in range(count - 2, -1, -1):
        ends[index] = min(ends[index], ends[index + 1] - 1)
    return np.diff(ends, prepend=0).tolist()


def char_durations(text: str, fps: float, rate: float = 1.0) -> list[tuple[str, int]]:
    """(symbol, n_frames) at `fps` for the text spoken at `rate` (2.0 speaks twice as fast)."""
    timeline = symbol_seconds(text, rate)
    frames = seconds_to_frames([seconds for _, seconds in timeline], fps)
    return [(symbol, count) for (symbol, _), count in zip(timeline, frames)]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _add_noise(logits: np.ndarray, rng: np.random.Generator | None, noise: float) -> np.ndarray:
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    if noise > 0:
        if rng is None:
            raise ValueError("noise > 0 needs a random generator (rng)")
        logits = logits + rng.normal(0.0, noise, size=logits.shape)
    return logits


def _frame_labels(durations: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the dominant label, and the label it transitions to/from (the runner-up)."""
    total = sum(count for _, count in durations)
    dominant = np.full(total, BLANK, dtype=np.int64)
    runner_up = np.full(total, BLANK, dtype=np.int64)
    previous_label, previous_emission_end = None, -1
    start = 0
    for symbol, count in durations:
        if symbol not in LABEL_INDEX or LABEL_INDEX[symbol] == BLANK:
            raise ValueError(f"symbol {symbol!r} is not a token label; expected one of {' '.join(TOKEN_LABELS[1:])}")
        if count < 1:
            raise ValueError(f"symbol {symbol!r} has {count} frames; expected at least 1")
        label = LABEL_INDEX[symbol]
        end = start + count
        if label == WORD_DELIMITER:
            first, last = start, start + 1  # a real CTC model emits '|' once as a pause begins, then blanks
        else:
            width = max(1, int(round(count * LABEL_CENTRE_FRACTION)))
            first = start + (count - width) // 2
            last = first + width
            if label == previous_label and first == previous_emission_end and count > 1:
                # A doubled letter needs a blank between its two emissions, or CTC decoding merges them.
                first, last = first + 1, min(last + 1, end)
        runner_up[start:end] = label
        dominant[first:last] = label
        runner_up[first:last] = BLANK
        previous_label, previous_emission_end = label, last
        start = end
    return dominant, runner_up


def token_logits_from_durations(durations: list[tuple[str, int]], fps: float,
                                rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """(M, 29) float32 log-probabilities in TOKEN_LABELS order for a (symbol, n_frames) timeline.

    Each letter dominates the centre of its span and the blank its edges, with the letter as runner-up
    at the edges (soft transitions); a pause emits '|' on its first frame and then blanks. Greedy CTC
    decoding (argmax, merge repeats, drop blanks) therefore recovers the text, as long as each doubled
    letter has two frames (true at 50 fps and above). `fps` is the frame rate of the durations; it
    is only checked, so that a caller cannot pass a rate-free timeline by mistake.
    """
    if fps <= 0:
        raise ValueError(f"frame rate must be positive, got {fps}")
    if not durations:
        raise ValueError("empty duration timeline; expected at least one (symbol, n_frames)")
    dominant, runner_up = _frame_labels(durations)
    frames = np.arange(dominant.shape[0])
    logits = np.zeros((dominant.shape[0], len(TOKEN_LABELS)), dtype=np.float64)
    logits[frames, runner_up] = RUNNER_UP_LOGIT
    logits[frames, dominant] = DOMINANT_LOGIT
    return _log_softmax(_add_noise(logits, rng, noise)).astype(np.float32)


def blank_token_logits(frames: int, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """(frames, 29) float32 log-probabilities of silence: the blank dominates every frame."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    logits = np.zeros((frames, len(TOKEN_LABELS)), dtype=np.float64)
    logits[:, BLANK] = DOMINANT_LOGIT
    return _log_softmax(_add_noise(logits, rng, noise)).astype(np.float32)


def text_to_token_logits(text: str, fps: float, rate: float = 1.0) -> np.ndarray:
    """Deterministic (M, 29) token log-probabilities for `text` at `fps` (no noise)."""
    return token_logits_from_durations(char_durations(text, fps, rate), fps)
