"""Text normalization: written text -> spoken words, numbers spelled out, pauses, unsupported characters named."""

import pytest

from avflow.text.normalize import (
    LONG_PAUSE,
    SHORT_PAUSE,
    normalize_text,
    number_words,
    ordinal_words,
    speech_words,
    split_sentences,
)


@pytest.mark.parametrize("raw, expected", [
    ("Hello, world!", "HELLO WORLD"),
    ("  don't   stop-now? ", "DON'T STOP NOW"),
    ("a;b:c.d", "A B C D"),
    ("tab\tand\nnewline", "TAB AND NEWLINE"),
    ("it\u2019s", "IT'S"),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("value, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"), (42, "forty two"), (100, "one hundred"),
    (1042, "one thousand forty two"), (2_000_017, "two million seventeen"),
    (999_999_999_999, "nine hundred ninety nine billion nine hundred ninety nine million nine hundred ninety nine "
                      "thousand nine hundred ninety nine"),
])
def test_number_words(value, words):
    assert number_words(value) == words


@pytest.mark.parametrize("value, words", [(1, "first"), (2, "second"), (3, "third"), (12, "twelfth"),
                                          (20, "twentieth"), (21, "twenty first"), (100, "one hundredth")])
def test_ordinal_words(value, words):
    assert ordinal_words(value) == words


@pytest.mark.parametrize("raw, expected", [
    ("room 7", "ROOM SEVEN"),
    ("1,250 people", "ONE THOUSAND TWO HUNDRED FIFTY PEOPLE"),
    ("pi is 3.14", "PI IS THREE POINT ONE FOUR"),
    ("$5 or $1", "FIVE DOLLARS OR ONE DOLLAR"),
    ("the 21st time, 99% sure", "THE TWENTY FIRST TIME NINETY NINE PERCENT SURE"),
    ("Dr. Who & Mr. Smith vs. St. Ives", "DOCTOR WHO AND MISTER SMITH VERSUS SAINT IVES"),
    ("I said no.", "I SAID NO"),
    ("caf\u00e9 na\u00efve", "CAFE NAIVE"),
])
def test_normalize_expands_what_is_spoken_differently(raw, expected):
    assert normalize_text(raw) == expected


def test_punctuation_becomes_pauses_and_sentences():
    words = speech_words("Well, hello there! (Aside) it's fine; ok?")
    assert words == [("WELL", SHORT_PAUSE), ("HELLO", ""), ("THERE", LONG_PAUSE), ("ASIDE", SHORT_PAUSE),
                     ("IT'S", ""), ("FINE", SHORT_PAUSE), ("OK", LONG_PAUSE)]
    assert [[w for w, _ in sentence] for sentence in split_sentences(words)] == [
        ["WELL", "HELLO", "THERE"], ["ASIDE", "IT'S", "FINE", "OK"]]


def test_number_too_large_is_named():
    with pytest.raises(ValueError, match="'1000000000000' is too large"):
        normalize_text("1000000000000 stars")


@pytest.mark.parametrize("raw", ["", "   ", "...!?", "\n"])
def test_normalize_rejects_text_without_letters(raw):
    with pytest.raises(ValueError, match="no letters"):
        normalize_text(raw)


def test_normalize_names_unsupported_characters():
    with pytest.raises(ValueError) as error:
        normalize_text("room \u2603 at the caf\u00e9, \u6771 and \u2603 times")
    message = str(error.value)
    assert "'\u2603'" in message and "'\u6771'" in message and message.count("'\u2603'") == 1
    assert "'\u00e9'" not in message  # accented Latin letters are read as their base letter
    assert "expected letters, apostrophes, spaces, numbers and punctuation" in message
