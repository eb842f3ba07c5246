"""Front ends of the text-to-tokens model: spoken words -> input symbols, by phonemes or by letters.

The published text-to-tokens model reads espeak-ng IPA phonemes (en-us). `PhonemeFrontEnd` calls the
espeak-ng program (one process per batch of words, with a per-word cache); `CharacterFrontEnd` reads the
letters themselves and needs nothing installed, so it is the fallback. Both give one symbol list per
word, over a fixed inventory, so a model's embedding table never depends on the data it saw. The
front end a model was trained with is recorded in its config (`text2tokens.front_end`), and inference
rebuilds the same one.

Every input sequence has the same frame: SILENCE, the first word's symbols, WORD_GAP, the next word's,
..., SILENCE.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

PAD, SILENCE, WORD_GAP = "<pad>", "<sil>", "<gap>"
SPECIAL_SYMBOLS = (PAD, SILENCE, WORD_GAP)
LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
# Every character espeak-ng's en-us IPA output uses (measured on a few hundred words), plus the
# neighbouring symbols its rules can produce; each character is one symbol, stress and length marks too.
IPA_SYMBOLS = tuple("abdefhijklmnoprstuvwxzæçðŋɐɑɒɔəɚɛɜɡɪɫɬɹɾʃʊʌʒʔθᵻˈˌː\u0329")
ESPEAK_PROGRAM = "espeak-ng"


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
        if not espeak_available():
            raise RuntimeError(f"the phoneme front end needs the {ESPEAK_PROGRAM} program, which is not on PATH; "
                               "install it (apt-get install espeak-ng) or use text2tokens.front_end=character")
        self.language = language

    def word_symbols(self, words: list[str]) -> list[list[str]]:
        phonemes = [_phonemize_word(word.lower(), self.language) for word in words]
        unknown = sorted({char for word in phonemes for char in word if char not in IPA_SYMBOLS})
        if unknown:
            raise ValueError(f"espeak-ng produced phoneme symbols {', '.join(map(repr, unknown))} outside the "
                             f"inventory of avflow.data.phonemes.IPA_SYMBOLS (words {words})")
        return [list(word) for word in phonemes]


def espeak_available() -> bool:
    return shutil.which(ESPEAK_PROGRAM) is not None


@functools.lru_cache(maxsize=65536)
def _phonemize_word(word: str, language: str) -> str:
    """One word's IPA string; espeak-ng reads a lone word the way a dictionary would."""
    try:
        result = subprocess.run([ESPEAK_PROGRAM, "-q", "--ipa", "-v", language, word], capture_output=True,
                                text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"{ESPEAK_PROGRAM} failed on {word!r} with voice {language!r}: {error}") from error
    ipa = "".join(result.stdout.split())
    if not ipa:
        raise ValueError(f"{ESPEAK_PROGRAM} gave no phonemes for {word!r}")
    return ipa


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
