"""The rule-based text front end: timing and CTC-like token logits."""

import numpy as np
import pytest

from avflow.text.normalize import normalize_text
from avflow.text.token_labels import TOKEN_LABELS
from avflow.text.token_logits import (
    blank_token_logits,
    char_durations,
    text_to_token_logits,
    token_logits_from_durations,
)

# Seconds per symbol at rate 1, as the module documents them.
HAND_SECONDS = {"A": 0.12, "O": 0.11, "E": 0.10, "U": 0.10, "I": 0.09, "'": 0.03}
CONSONANT, WORD_GAP, EDGE = 0.06, 0.08, 0.2


def greedy_ctc_decode(log_probs: np.ndarray) -> str:
    """Argmax per frame, merge repeats, drop blanks, '|' -> space; then trim and collapse spaces."""
    best = log_probs.argmax(axis=1)
    kept = [TOKEN_LABELS[label] for i, label in enumerate(best) if label != 0 and (i == 0 or best[i - 1] != label)]
    return " ".join("".join(kept).replace("|", " ").split())


def hand_total_seconds(normalized: str, rate: float) -> float:
    words = normalized.split(" ")
    letters = sum(HAND_SECONDS.get(c, CONSONANT) for c in normalized.replace(" ", ""))
    return (2 * EDGE + WORD_GAP * (len(words) - 1) + letters) / rate


def test_hand_computed_durations():
    # | 0.2 s, H 0.06 s, I 0.09 s, | 0.2 s at 100 fps: cumulative ends 20, 26, 35, 55 frames.
    assert char_durations("hi", 100) == [("|", 20), ("H", 6), ("I", 9), ("|", 20)]


def test_symbol_sequence_marks_word_gaps_and_edges():
    symbols = [symbol for symbol, _ in char_durations("no, it's", 50)]
    assert "".join(symbols) == "|NO|IT'S|"


@pytest.mark.parametrize("text", ["the quick brown fox", "a", "don't jump over the lazy dog"])
@pytest.mark.parametrize("fps", [30.0, 50.0, 86.1328125])
@pytest.mark.parametrize("rate", [0.8, 1.0, 1.7])
def test_durations_sum_to_rounded_total(text, fps, rate):
    durations = char_durations(text, fps, rate)
    assert all(count >= 1 for _, count in durations)
    assert sum(count for _, count in durations) == round(hand_total_seconds(normalize_text(text), rate) * fps)


def test_every_symbol_keeps_a_frame_at_a_very_low_rate():
    durations = char_durations("strengths", 5.0, rate=3.0)
    assert all(count >= 1 for _, count in durations)
    assert sum(count for _, count in durations) == len(durations)


def test_duration_argument_errors():
    with pytest.raises(ValueError, match="rate"):
        char_durations("hi", 50, rate=0)
    with pytest.raises(ValueError, match="frame rate"):
        char_durations("hi", 0)


@pytest.mark.parametrize("text", ["hello world", "Mississippi bookkeeper", "all is well", "don't", "a b c"])
@pytest.mark.parametrize("fps", [50.0, 86.1328125])
def test_token_logits_decode_to_the_text(text, fps):
    logits = text_to_token_logits(text, fps)
    assert logits.dtype == np.float32
    assert logits.shape == (sum(count for _, count in char_durations(text, fps)), len(TOKEN_LABELS))
    np.testing.assert_allclose(np.exp(logits.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)
    assert greedy_ctc_decode(logits) == normalize_text(text)


def test_noisy_logits_still_decode_and_depend_on_the_generator():
    durations = char_durations("small noise keeps letters", 50)
    first = token_logits_from_durations(durations, 50, np.random.default_rng(1), noise=0.5)
    second = token_logits_from_durations(durations, 50, np.random.default_rng(2), noise=0.5)
    assert greedy_ctc_decode(first) == "SMALL NOISE KEEPS LETTERS"
    assert not np.array_equal(first, second)


def test_letter_dominates_the_centre_and_blank_the_edges():
    best = token_logits_from_durations([("|", 5), ("S", 5), ("|", 5)], 50).argmax(axis=1)
    s = TOKEN_LABELS.index("S")
    assert best[5] == 0 and best[9] == 0 and best[7] == s
    assert best[0] == TOKEN_LABELS.index("|") and best[10] == TOKEN_LABELS.index("|")
    assert (best[11:] == 0).all()


def test_blank_logits_and_argument_errors():
    silence = blank_token_logits(7)
    assert silence.shape == (7, len(TOKEN_LABELS)) and (silence.argmax(axis=1) == 0).all()
    with pytest.raises(ValueError, match="rng"):
        token_logits_from_durations([("A", 3)], 50, None, noise=0.1)
    with pytest.raises(ValueError, match="not a token label"):
        token_logits_from_durations([("7", 3)], 50)
    with pytest.raises(ValueError, match="at least 1"):
        token_logits_from_durations([("A", 0)], 50)


def test_text_to_token_logits_is_deterministic():
    assert np.array_equal(text_to_token_logits("same input", 50), text_to_token_logits("same input", 50))
