"""Rule-based character front end: text -> timed letters -> CTC-style token logits.

AV-Flow is conditioned on the frame-level character logits of a wav2vec2 CTC model. Until a learned
text-to-tokens model exists, text is turned into logits of the same shape and statistics by rule:
each letter gets a duration from its class (vowels longer than consonants, pauses between words,
silence at both ends), and within each letter's span the letter dominates the centre while the CTC
blank dominates the edges, as in a real character CTC model. The demo corpus uses the same timeline
to synthesize speech and motion, so its tokens and its streams agree.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from avflow.data.tokens import BLANK, LABEL_INDEX, TOKEN_LABELS, WORD_DELIMITER
from avflow.optional import require

PUNCTUATION = ".,;:!?-"
APOSTROPHES = "'\u2019"
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


MAX_NUMBER = 10 ** 12 - 1  # read up to the billions; a longer digit string is more likely an identifier
# Abbreviations spelled out before punctuation is read; the trailing period is part of the match.
ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "ms": "miz", "dr": "doctor", "st": "saint", "jr": "junior",
                 "sr": "senior", "prof": "professor", "vs": "versus", "etc": "et cetera", "e.g": "for example",
                 "i.e": "that is", "approx": "approximately"}
SYMBOL_WORDS = {"&": " and ", "+": " plus ", "@": " at ", "%": " percent ", "=": " equals ", "#": " number "}
SHORT_PAUSE_MARKS = ",;:()[]\"\u201c\u201d\u2013\u2014"  # read as a short pause
LONG_PAUSE_MARKS = ".!?\u2026"  # end a sentence: a long pause
WORD_BREAKS = "-_/"  # separate words without a pause
SHORT_PAUSE, LONG_PAUSE = "short", "long"


def _american_reading(words: str) -> str:
    """num2words writes British English ('one hundred and one', 'forty-two', commas between groups); the corpora
    and models read numbers the American way: no 'and', words separated by single spaces."""
    return " ".join(word for word in words.replace("-", " ").replace(",", " ").split() if word != "and")


def number_words(value: int) -> str:
    """English cardinal for 0 <= value <= MAX_NUMBER, e.g. 1042 -> 'one thousand forty two'."""
    return _spelled(value, "cardinal")


def ordinal_words(value: int) -> str:
    """'first', 'twenty second', 'one hundredth'."""
    return _spelled(value, "ordinal")


def _spelled(value: int, form: str) -> str:
    if not 0 <= value <= MAX_NUMBER:
        raise ValueError(f"number {value} is out of range; expected 0 to {MAX_NUMBER}")
    num2words = require("num2words", "reading numbers in text").num2words
    return _american_reading(num2words(value, lang="en", to=form))


def _spell_number(match: re.Match) -> str:
    """A written number as words. Decimals and currency stay hand-written: num2words drops a decimal's trailing
    zeros and cuts long fractions ('1.50' would be 'one point five'), and reads money always with cents ('five
    dollars, zero cents' for $5)."""
    currency, digits, fraction, suffix = (match.group("currency"), match.group("int"), match.group("frac"),
                                          match.group("suffix"))
    value = int(digits.replace(",", ""))
    if value > MAX_NUMBER:
        raise ValueError(f"number {match.group(0)!r} is too large to read; expected at most {MAX_NUMBER}")
    if suffix and not fraction:
        return f" {ordinal_words(value)} "
    words = number_words(value)
    if fraction:
        words += " point " + " ".join(number_words(int(digit)) for digit in fraction)
    if currency:
        words += " dollar" if value == 1 and not fraction else " dollars"
    return f" {words} "


NUMBER = re.compile(r"(?P<currency>\$)?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?(?P<suffix>st|nd|rd|th)?",
                    re.IGNORECASE)


def _fold_accents(text: str) -> str:
    """Latin letters with diacritics become their base letter (cafe for café); other characters stay."""
    folded = []
    for char in text:
        base = unicodedata.normalize("NFKD", char)
        stripped = "".join(c for c in base if not unicodedata.combining(c))
        folded.append(stripped if len(stripped) == 1 and stripped.isascii() and stripped.isalpha() else char)
    return "".join(folded)


def expand_text(text: str) -> str:
    """Spell out what is written but spoken differently: numbers, currency, ordinals, symbols, abbreviations.

    Accented Latin letters lose their accents; every other character is left for `speech_words` to accept
    or reject.
    """
    text = _fold_accents(text.replace("\u2019", "'").replace("\u2018", "'"))
    for mark, words in SYMBOL_WORDS.items():
        if mark != "%":
            text = text.replace(mark, words)
    text = NUMBER.sub(_spell_number, text).replace("%", SYMBOL_WORDS["%"])
    pattern = "|".join(re.escape(key) for key in sorted(ABBREVIATIONS, key=len, reverse=True))
    return re.sub(rf"\b({pattern})\.(?=\s|$)", lambda m: ABBREVIATIONS[m.group(1).lower()], text, flags=re.IGNORECASE)


def speech_words(text: str) -> list[tuple[str, str]]:
    """The text as it is spoken: (WORD, pause after it) pairs, pause "" (none), "short" or "long".

    Numbers, symbols and abbreviations are spelled out (`expand_text`); commas, colons, semicolons,
    brackets and quotes become short pauses, sentence ends long ones. Characters that cannot be read
    (digits left over, non-Latin scripts, emoji, ...) are an error naming each of them, rather than
    silently dropped, so the caller learns what the model cannot say.
    """
    if not text.strip():
        raise ValueError(f"text {text!r} is empty or whitespace only: no letters to speak; expected at least one word")
    expanded = expand_text(text)
    allowed = PUNCTUATION + APOSTROPHES + SHORT_PAUSE_MARKS + LONG_PAUSE_MARKS + WORD_BREAKS
    unsupported = []
    for char in expanded:
        if not ((char.isascii() and char.isalpha()) or char.isspace() or char in allowed) and char not in unsupported:
            unsupported.append(char)
    if unsupported:
        named = ", ".join(repr(char) for char in unsupported)
        raise ValueError(f"text contains unsupported characters {named}; expected letters, apostrophes, "
                         f"spaces, numbers and punctuation")
    words: list[tuple[str, str]] = []
    for token in re.findall(rf"[A-Za-z']+|[{re.escape(SHORT_PAUSE_MARKS + LONG_PAUSE_MARKS)}]", expanded):
        word = token.strip("'").upper()
        if word and word[0].isalpha():
            words.append((word, ""))
        elif words and token in LONG_PAUSE_MARKS:
            words[-1] = (words[-1][0], LONG_PAUSE)
        elif words and token in SHORT_PAUSE_MARKS and words[-1][1] != LONG_PAUSE:
            words[-1] = (words[-1][0], SHORT_PAUSE)
    if not words:
        raise ValueError(f"text {text!r} has no letters to speak; expected at least one word")
    return words


def split_sentences(words: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Cut `speech_words` output after each long pause (sentence end)."""
    sentences, current = [], []
    for word, pause in words:
        current.append((word, pause))
        if pause == LONG_PAUSE:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def normalize_text(text: str) -> str:
    """Uppercase words of A-Z and apostrophes separated by single spaces (see `speech_words`)."""
    return " ".join(word for word, _ in speech_words(text))


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
