"""Front ends of the text-to-tokens model: spoken words -> input symbols, by phonemes or by letters.

The published text-to-tokens model reads espeak-ng IPA phonemes (en-us). `PhonemeFrontEnd` reads them
through phonemizer's espeak backend (the espeak-ng library, all new words of a call at once, with a
per-word cache); `CharacterFrontEnd` reads the letters themselves and needs nothing installed, so it is
the fallback. Both give one symbol list per word, over a fixed inventory, so a model's embedding table
never depends on the data it saw. The front end a model was trained with is recorded in its config
(`text2tokens.front_end`), and inference rebuilds the same one.

Every input sequence has the same frame: SILENCE, the first word's symbols, WORD_GAP, the next word's,
..., SILENCE.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from avflow.optional import available, require

PAD, SILENCE, WORD_GAP = "<pad>", "<sil>", "<gap>"
SPECIAL_SYMBOLS = (PAD, SILENCE, WORD_GAP)
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
# Every character espeak-ng's en-us IPA output uses (measured on a few hundred words), plus the
# neighbouring symbols its rules can produce; each character is one symbol, stress and length marks too.
IPA_SYMBOLS = tuple("abdefhijklmnoprstuvwxzæçðŋɐɑɒɔəɚɛɜɡɪɫɬɹɾʃʊʌʒʔθᵻˈˌː\u0329")
ESPEAK_PROGRAM = "espeak-ng"
PRIMARY_STRESS, SECONDARY_STRESS = "ˈ", "ˌ"
VOWEL_LETTERS = frozenset("aeiouæɐɑɒɔəɚɛɜɪʊʌᵻ")  # a phoneme starting with one of these is a syllable's vowel
# Phonemes apart, so that a stress can be placed on a vowel; words apart only for the rare entry that espeak-ng
# reads as several words (roman numerals).
PHONE_SEPARATOR, WORD_SEPARATOR = "|", " "


class CharacterFrontEnd:
    """Letters and apostrophes of each word, as they are: the fallback that needs no phonemizer."""

    name = "character"
    symbols = SPECIAL_SYMBOLS + LETTERS

    def word_symbols(self, words: list[str]) -> list[list[str]]:
        unknown = sorted({char for word in words for char in word if char not in LETTERS})
        if unknown:
            raise ValueError(f"words contain {', '.join(map(repr, unknown))}; the character front end expects "
                             "uppercase letters and apostrophes (normalize the text first)")
        return [list(word) for word in words]


class PhonemeFrontEnd:
    """espeak-ng IPA phonemes of each word (the published front end)."""

    name = "phoneme"
    symbols = SPECIAL_SYMBOLS + IPA_SYMBOLS

    def __init__(self, language: str = "en-us"):
        require("phonemizer", "the phoneme front end")
        if not espeak_available():
            raise RuntimeError("the phoneme front end needs the espeak-ng library, which phonemizer cannot find; "
                               "install it (apt-get install espeak-ng), name it in PHONEMIZER_ESPEAK_LIBRARY, or use "
                               "text2tokens.front_end=character")
        self.language = language
        self._backend = _espeak_backend()(language, with_stress=True)
        self._separator = require("phonemizer.separator", "the phoneme front end").Separator(
            phone=PHONE_SEPARATOR, word=WORD_SEPARATOR, syllable="")
        self._ipa: dict[str, str] = {}  # word -> IPA: a corpus says its common words thousands of times

    def word_symbols(self, words: list[str]) -> list[list[str]]:
        lowered = [word.lower() for word in words]
        new = list(dict.fromkeys(word for word in lowered if word not in self._ipa))
        if new:
            self._ipa.update(zip(new, self._phonemize(new)))
        phonemes = [self._ipa[word] for word in lowered]
        unknown = sorted({char for word in phonemes for char in word if char not in IPA_SYMBOLS})
        if unknown:
            raise ValueError(f"espeak-ng produced phoneme symbols {', '.join(map(repr, unknown))} outside the "
                             f"inventory of avflow.text.phonemes.IPA_SYMBOLS (words {words})")
        return [list(word) for word in phonemes]

    def _phonemize(self, words: list[str]) -> list[str]:
        """Each word's IPA string; espeak-ng reads each one alone, the way a dictionary would."""
        ipa = []
        for word, phonemized in zip(words, self._backend.phonemize(words, separator=self._separator, strip=True)):
            joined = phonemized.replace(WORD_SEPARATOR, PHONE_SEPARATOR)
            phonemes = [phoneme for phoneme in joined.split(PHONE_SEPARATOR) if phoneme]
            if not phonemes:
                raise ValueError(f"espeak-ng gave no phonemes for {word!r} with voice {self.language!r}")
            ipa.append(with_primary_stress(phonemes))
        return ipa


def with_primary_stress(phonemes: list[str]) -> str:
    """The word's IPA with a primary stress on its strongest syllable: the last secondary stress, else the last vowel.

    A word read alone is a whole clause, and espeak-ng's intonation gives a clause without a primary stress one
    there; the `espeak-ng --ipa` program prints it, the library's phoneme output skips that step. Without it
    unstressed words (the, of, and) would lose the stress mark that models trained on the program's output saw.
    """
    if any(PRIMARY_STRESS in phoneme for phoneme in phonemes):
        return "".join(phonemes)
    secondary = [index for index, phoneme in enumerate(phonemes) if phoneme.startswith(SECONDARY_STRESS)]
    vowels = [index for index, phoneme in enumerate(phonemes) if phoneme[0] in VOWEL_LETTERS]
    stressed = list(phonemes)
    if secondary:
        stressed[secondary[-1]] = PRIMARY_STRESS + stressed[secondary[-1]][1:]
    elif vowels:
        stressed[vowels[-1]] = PRIMARY_STRESS + stressed[vowels[-1]]
    return "".join(stressed)


def _espeak_backend():
    return require("phonemizer.backend", "the phoneme front end").EspeakBackend


def espeak_available() -> bool:
    """Whether phonemizer is installed and can load the espeak-ng library (PHONEMIZER_ESPEAK_LIBRARY may name
    one); the older espeak library does not count, its phonemes differ."""
    if not available("phonemizer"):
        return False
    backend = _espeak_backend()
    if not backend.is_available():
        _use_library_beside_program()
    return backend.is_available() and backend.is_espeak_ng()


def _use_library_beside_program() -> None:
    """espeak-ng installed without root (conda, a user prefix) keeps its library beside the program, where the
    system's library search does not look; use it there rather than silently falling back to letters."""
    program = shutil.which(ESPEAK_PROGRAM)
    if program is None or "PHONEMIZER_ESPEAK_LIBRARY" in os.environ:
        return
    prefix = Path(program).resolve().parent.parent
    found = sorted(prefix.glob("lib*/libespeak-ng.so*")) + sorted(prefix.glob("lib*/libespeak-ng*.dylib"))
    if found:
        require("phonemizer.backend.espeak.wrapper", "the phoneme front end").EspeakWrapper.set_library(str(found[0]))


def resolve_front_end(name: str) -> str:
    """The concrete front end for text2tokens.front_end: auto picks phoneme when espeak-ng is installed."""
    if name == "auto":
        return PhonemeFrontEnd.name if espeak_available() else CharacterFrontEnd.name
    if name not in (PhonemeFrontEnd.name, CharacterFrontEnd.name):
        raise ValueError(f"text2tokens.front_end: expected auto, phoneme or character, got {name!r}")
    return name


def build_front_end(name: str, language: str = "en-us") -> CharacterFrontEnd | PhonemeFrontEnd:
    resolved = resolve_front_end(name)
    return PhonemeFrontEnd(language) if resolved == PhonemeFrontEnd.name else CharacterFrontEnd()


def front_end_symbols(name: str) -> tuple[str, ...]:
    """The symbol inventory (embedding rows, in order) of a resolved front end, without building it."""
    if name == PhonemeFrontEnd.name:
        return PhonemeFrontEnd.symbols
    if name == CharacterFrontEnd.name:
        return CharacterFrontEnd.symbols
    raise ValueError(f"front end {name!r} is not resolved; expected phoneme or character")


def sequence_symbols(word_symbols: list[list[str]]) -> tuple[list[str], list[int]]:
    """The framed input sequence and, per position, its word index (-1 for silences and word gaps)."""
    symbols, word_of = [SILENCE], [-1]
    for index, word in enumerate(word_symbols):
        if index:
            symbols.append(WORD_GAP)
            word_of.append(-1)
        symbols.extend(word)
        word_of.extend([index] * len(word))
    symbols.append(SILENCE)
    word_of.append(-1)
    return symbols, word_of
