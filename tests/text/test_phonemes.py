"""Front ends: espeak-ng phonemes when installed, letters as the fallback without it."""

import shutil
import subprocess
from pathlib import Path

import pytest

from avflow.text.phonemes import (
    IPA_SYMBOLS,
    SILENCE,
    WORD_GAP,
    CharacterFrontEnd,
    PhonemeFrontEnd,
    build_front_end,
    espeak_available,
    resolve_front_end,
    sequence_symbols,
    with_primary_stress,
)


@pytest.fixture
def no_espeak(monkeypatch, tmp_path):
    """phonemizer pointed at an espeak-ng library that does not exist, as on a machine without it."""
    monkeypatch.setenv("PHONEMIZER_ESPEAK_LIBRARY", str(tmp_path / "libespeak-ng.so.1"))
    assert not espeak_available()


def test_without_espeak_auto_falls_back_to_letters(no_espeak):
    assert resolve_front_end("auto") == "character"
    front_end = build_front_end("auto")
    assert isinstance(front_end, CharacterFrontEnd)
    assert front_end.word_symbols(["DON'T", "GO"]) == [["D", "O", "N", "'", "T"], ["G", "O"]]


def test_without_espeak_the_phoneme_front_end_says_what_is_missing(no_espeak):
    with pytest.raises(RuntimeError, match="needs the espeak-ng library.*text2tokens.front_end=character"):
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


@pytest.mark.parametrize("phonemes, expected", [
    (["ð", "ə"], "ðˈə"),  # no stress at all: the last vowel gets it
    (["ð", "eɪ", "ɚ"], "ðeɪˈɚ"),
    (["m", "ˌʌ", "l", "t", "ɪ", "p", "əl"], "mˈʌltɪpəl"),  # a secondary stress is promoted
    (["s", "ˌuː", "p", "ɚ", "ɹ", "ɪ", "n", "ˌɪ", "t"], "sˌuːpɚɹɪnˈɪt"),  # the last of several
    (["h", "ə", "l", "ˈoʊ"], "həlˈoʊ"),  # a primary stress stays where it is
])
def test_a_lone_word_gets_a_primary_stress(phonemes, expected):
    assert with_primary_stress(phonemes) == expected


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the espeak-ng program is not installed")
def test_words_read_as_the_espeak_ng_program_reads_them_alone():
    words = ["THE", "OF", "ANY", "THEY'RE", "MULTIPLE", "DON'T", "HELLO", "THOUGHT", "IV"]
    program = [subprocess.run(["espeak-ng", "-q", "--ipa", "-v", "en-us", word.lower()], capture_output=True,
                              text=True, check=True).stdout for word in words]
    assert PhonemeFrontEnd().word_symbols(words) == [list("".join(ipa.split())) for ipa in program]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_a_library_beside_the_program_is_found_where_the_system_search_does_not_look(tmp_path, monkeypatch):
    """As with a conda or user-prefix install: PREFIX/bin/espeak-ng and PREFIX/lib/libespeak-ng.so.1, neither
    in the system's library search."""
    from phonemizer.backend.espeak import wrapper

    system_library = next(Path("/usr/lib").rglob("libespeak-ng.so.1"), None)
    if system_library is None:
        pytest.skip("no libespeak-ng.so.1 under /usr/lib to stand in for a prefix install")
    (tmp_path / "bin").mkdir()
    (tmp_path / "lib").mkdir()
    program = tmp_path / "bin" / "espeak-ng"
    program.write_text(f'#!/bin/sh\nexec {shutil.which("espeak-ng")} "$@"\n')
    program.chmod(0o755)
    (tmp_path / "lib" / "libespeak-ng.so.1").symlink_to(system_library)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("PHONEMIZER_ESPEAK_LIBRARY", raising=False)
    monkeypatch.setattr(wrapper, "_find_library", lambda name: None)  # the system search finds nothing
    monkeypatch.setattr(wrapper.EspeakWrapper, "_ESPEAK_LIBRARY", None)
    assert espeak_available()
    assert Path(wrapper.EspeakWrapper.library()) == tmp_path / "lib" / "libespeak-ng.so.1"
    assert resolve_front_end("auto") == "phoneme"
