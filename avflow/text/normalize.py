"""Written text -> the words as they are spoken: numbers, symbols and abbreviations spelled out, punctuation
read as pauses, and every character the models cannot say named in an error.

Both text front ends read this: the rule-based token logits (`avflow.text.token_logits`) and the learned
text-to-tokens model.
"""

from __future__ import annotations

import re
import unicodedata

from avflow.optional import require

PUNCTUATION = ".,;:!?-"
APOSTROPHES = "'\u2019"

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
