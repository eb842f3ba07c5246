"""Front ends: espeak-ng phonemes when installed, letters as the fallback without it."""

import pytest

from avflow.data.phonemes import (
    IPA_SYMBOLS,
    SILENCE,
    WORD_GAP,
    CharacterFrontEnd,
    PhonemeFrontEnd,
    build_front_end,
    espeak_available,
    resolve_front_end,
    sequence_symbols,
)


@pytest.fixture
def no_espeak(monkeypatch, tmp_path):
    """A PATH on which no espeak-ng can be found, as on a machine without it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not espeak_available()


def test_without_espeak_auto_falls_back_to_letters(no_espeak):
    assert resolve_front_end("auto") == "character"
    front_end = build_front_end("auto")
    assert isinstance(front_end, CharacterFrontEnd)
    assert front_end.word_symbols(["DON'T", "GO"]) == [["D", "O", "N", "'", "T"], ["G", "O"]]


def test_without_espeak_the_phoneme_front_end_says_what_is_missing(no_espeak):
    with pytest.raises(RuntimeError, match="needs the espeak-ng program.*text2tokens.front_end=character"):
        build_front_end("phoneme")


def test_character_front_end_rejects_unnormalized_words():
    with pytest.raises(ValueError, match="'a'.*expects uppercase letters"):
        CharacterFrontEnd().word_symbols(["aB"])


def test_sequence_frames_words_with_silences_and_gaps():
    symbols, word_of = sequence_symbols([["H", "I"], ["Y", "O"]])
    assert symbols == [SILENCE, "H", "I", WORD_GAP, "Y", "O", SILENCE]
    assert word_of == [-1, 0, 0, -1, 1, 1, -1]


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_espeak_phonemes_of_words():
    assert resolve_front_end("auto") == "phoneme"
    the, think = PhonemeFrontEnd().word_symbols(["THE", "THINK"])
    assert the[0] == "ð" and think[0] == "θ"  # the voiced and the voiceless 'th', which spelling does not show
    assert all(symbol in IPA_SYMBOLS for symbol in the + think)
