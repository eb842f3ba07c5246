"""Per-symbol durations from a segment's own frame-level CTC token logits, with no external transcript.

A segment's transcript is the greedy CTC decoding of its own actor tokens (`avflow.text.transcripts`: argmax
per frame, merge repeats, drop blanks). Its letters are then placed in time by a forced alignment: the Viterbi path of
that label sequence through the CTC logits. A symbol's span starts where its label is first emitted and
runs to the next symbol's start, so each letter owns its emission and the blanks after it; silences and
word gaps own the frames from their '|' (or, when the model emitted none, from the end of the previous
letter's emission). Phonemes have no CTC labels: they share out each word's frames by monotonic
alignment search (MAS) against per-phoneme mean token vectors, re-estimated a few times over the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avflow.optional import require
from avflow.text.phonemes import SILENCE, WORD_GAP, sequence_symbols
from avflow.text.token_labels import BLANK, WORD_DELIMITER
from avflow.text.transcripts import greedy_labels, labels_to_text

MAS_ITERATIONS = 3  # re-estimations of the phoneme means; the alignment barely moves after the second


def ctc_forced_align(log_probs: np.ndarray, targets: list[int]) -> np.ndarray:
    """Viterbi CTC alignment: per frame, the index into `targets` it emits, or -1 for a blank.

    The CTC topology: blanks interleave the targets, each state may repeat, a blank may be skipped
    between two different labels, and the path ends on the last label or the blank after it.
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    frames = log_probs.shape[0]
    if not targets:
        raise ValueError("forced alignment needs at least one target label")
    if BLANK in targets:
        raise ValueError("forced alignment targets must not contain the blank")
    repeats = sum(a == b for a, b in zip(targets[:-1], targets[1:]))
    if frames < len(targets) + repeats:
        raise ValueError(f"{frames} frames cannot hold {len(targets)} labels ({repeats} repeated); "
                         f"expected at least {len(targets) + repeats} frames")
    states = np.full(2 * len(targets) + 1, BLANK, dtype=np.int64)
    states[1::2] = targets
    skip = np.zeros(states.shape[0], dtype=bool)  # state s may be entered from s - 2
    skip[3::2] = states[3::2] != states[1:-2:2]
    score = np.full(states.shape[0], -np.inf)
    score[:2] = log_probs[0, states[:2]]
    back = np.zeros((frames, states.shape[0]), dtype=np.int8)
    for t in range(1, frames):
        stay = score
        step = np.concatenate([[-np.inf], score[:-1]])
        jump = np.where(skip, np.concatenate([[-np.inf, -np.inf], score[:-2]]), -np.inf)
        candidates = np.stack([stay, step, jump])
        back[t] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + log_probs[t, states]
    state = states.shape[0] - 1 if score[-1] >= score[-2] else states.shape[0] - 2
    path = np.empty(frames, dtype=np.int64)
    for t in range(frames - 1, -1, -1):
        path[t] = state
        state -= int(back[t, state])  # a Python int: NumPy 2 would keep int8 and overflow past 127 states
    return np.where(path % 2 == 1, path // 2, -1)


def monotonic_alignment_search(score: np.ndarray) -> np.ndarray:
    """Durations (N,) of N symbols over T frames maximizing the summed score (N, T) of a monotonic
    alignment in which every symbol holds at least one consecutive frame and every frame one symbol."""
    return batched_monotonic_alignment_search([score])[0]


def batched_monotonic_alignment_search(scores: list[np.ndarray]) -> list[np.ndarray]:
    """`monotonic_alignment_search` of each score, all in one call of Glow-TTS's MAS (monotonic-alignment-search).

    It sums in float32 and marks impossible cells with -1e9, so each frame's best score is subtracted first: every
    frame belongs to exactly one symbol, so that shifts every path's total alike and keeps the sums small. On an
    exact tie a symbol keeps the frame (its predecessor must score better).
    """
    if not scores:
        return []
    shapes = [np.shape(score) for score in scores]
    for symbols, frames in shapes:
        if symbols < 1 or frames < symbols:
            raise ValueError(f"monotonic alignment of {symbols} symbols over {frames} frames; expected "
                             "1 <= symbols <= frames")
    value = torch.zeros(len(scores), max(n for n, _ in shapes), max(t for _, t in shapes))
    mask = torch.zeros_like(value)
    for index, (score, (symbols, frames)) in enumerate(zip(scores, shapes)):
        score = np.asarray(score, dtype=np.float64)
        value[index, :symbols, :frames] = torch.from_numpy((score - score.max(axis=0)).astype(np.float32))
        mask[index, :symbols, :frames] = 1
    maximum_path = require("monotonic_alignment_search", "phoneme durations by monotonic alignment").maximum_path
    paths = maximum_path(value, mask).sum(dim=2).to(torch.int64).numpy()
    return [paths[index, :symbols] for index, (symbols, _) in enumerate(shapes)]


@dataclass
class CharacterAlignment:
    """A segment's transcript in words, its character input sequence and durations (frames per symbol)."""

    words: list[str]
    symbols: list[str]
    durations: np.ndarray


def _starts_to_durations(starts: list[int], frames: int) -> np.ndarray:
    """Durations from span starts, nudged so every span keeps at least one frame and the total is `frames`."""
    count = len(starts)
    if frames < count:
        raise ValueError(f"{frames} frames cannot hold {count} symbols of at least one frame each")
    fixed = np.asarray(starts, dtype=np.int64)
    fixed[0] = 0
    for index in range(1, count):
        fixed[index] = max(fixed[index], fixed[index - 1] + 1)
    fixed[-1] = min(fixed[-1], frames - 1)
    for index in range(count - 2, -1, -1):
        fixed[index] = min(fixed[index], fixed[index + 1] - 1)
    return np.diff(np.append(fixed, frames))


def align_characters(log_probs: np.ndarray) -> CharacterAlignment:
    """Transcript and character durations of one segment from its own CTC token logits (T, 29)."""
    labels = greedy_labels(log_probs)
    words = labels_to_text(labels).split()
    if not words:
        raise ValueError("the tokens decode to no words (silence only); nothing to align")
    path = ctc_forced_align(log_probs, labels)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for frame, target in enumerate(path.tolist()):
        if target >= 0:
            first.setdefault(target, frame)
            last[target] = frame
    symbols, _ = sequence_symbols([list(word) for word in words])
    letter_labels = [j for j, label in enumerate(labels) if label != WORD_DELIMITER]
    starts, letter = [], 0  # letter: how many letters precede this position
    for symbol in symbols:
        if symbol not in (SILENCE, WORD_GAP):
            starts.append(first[letter_labels[letter]])
            letter += 1
        elif letter == 0:
            starts.append(0)
        else:
            before = letter_labels[letter - 1]
            after = letter_labels[letter] if letter < len(letter_labels) else len(labels)
            delimiters = [j for j in range(before + 1, after) if labels[j] == WORD_DELIMITER]
            starts.append(first[delimiters[0]] if delimiters else last[before] + 1)
    return CharacterAlignment(words, symbols, _starts_to_durations(starts, log_probs.shape[0]))


def align_phonemes(segments: list[tuple[CharacterAlignment, np.ndarray]], word_phonemes: list[list[list[str]]],
                   iterations: int = MAS_ITERATIONS) -> list[tuple[list[str], np.ndarray] | None]:
    """Phoneme input sequences and durations for character-aligned segments (None where one cannot be aligned).

    segments: (character alignment, tokens (T, 29)) per segment; word_phonemes: per segment, the phonemes of
    each of its words. Silences and word gaps keep their character-alignment spans; each word's frames are
    shared among its phonemes by MAS with the score -|tokens - mean of the phoneme|^2, the means starting
    from an even split of every word and re-estimated `iterations` times over all segments. A segment with
    a word of more phonemes than frames is left out (None).
    """
    word_spans = [_word_spans(alignment) for alignment, _ in segments]
    usable = [all(end - start >= len(word) for (start, end), word in zip(spans, phonemes, strict=True))
              for spans, phonemes in zip(word_spans, word_phonemes)]
    durations = [[_even_split(end - start, len(word)) for (start, end), word in zip(spans, phonemes)] if ok else None
                 for spans, phonemes, ok in zip(word_spans, word_phonemes, usable)]
    for _ in range(iterations):
        means = _phoneme_means(segments, word_spans, word_phonemes, durations)
        for index, ((_, tokens), spans, phonemes) in enumerate(zip(segments, word_spans, word_phonemes)):
            if durations[index] is None:
                continue
            scores = [_phoneme_scores(tokens[start:end], word, means) for (start, end), word in zip(spans, phonemes)]
            durations[index] = batched_monotonic_alignment_search(scores)
    results: list[tuple[list[str], np.ndarray] | None] = []
    for (alignment, _), phonemes, word_durations in zip(segments, word_phonemes, durations):
        if word_durations is None:
            results.append(None)
            continue
        symbols, word_of = sequence_symbols(phonemes)
        _, char_word_of = sequence_symbols([list(word) for word in alignment.words])
        framing = iter(int(d) for d, w in zip(alignment.durations, char_word_of) if w < 0)
        merged = []
        for position, w in enumerate(word_of):
            if w < 0:
                merged.append(next(framing))
            elif position == 0 or word_of[position - 1] != w:
                merged.extend(int(d) for d in word_durations[w])
        results.append((symbols, np.asarray(merged, dtype=np.int64)))
    return results


def _word_spans(alignment: CharacterAlignment) -> list[tuple[int, int]]:
    _, word_of = sequence_symbols([list(word) for word in alignment.words])
    ends = np.cumsum(alignment.durations)
    starts = ends - alignment.durations
    return [(int(starts[word_of.index(w)]), int(ends[len(word_of) - 1 - word_of[::-1].index(w)]))
            for w in range(len(alignment.words))]


def _even_split(frames: int, parts: int) -> np.ndarray:
    edges = np.rint(np.linspace(0, frames, parts + 1)).astype(np.int64)
    return np.diff(edges)


def _phoneme_scores(frames: np.ndarray, word: list[str], means: dict[str, np.ndarray]) -> np.ndarray:
    """(phonemes, frames) MAS score of a word: -|frame - mean of the phoneme|^2."""
    centres = np.stack([means[phoneme] for phoneme in word])
    return -((frames.astype(np.float64)[None] - centres[:, None]) ** 2).sum(-1)


def _phoneme_means(segments, word_spans, word_phonemes, durations) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for (_, tokens), spans, phonemes, word_durations in zip(segments, word_spans, word_phonemes, durations):
        if word_durations is None:
            continue
        for (start, _), word, lengths in zip(spans, phonemes, word_durations):
            offset = start
            for phoneme, length in zip(word, lengths):
                block = tokens[offset:offset + length].astype(np.float64)
                sums[phoneme] = sums.get(phoneme, 0.0) + block.sum(0)
                counts[phoneme] = counts.get(phoneme, 0) + int(length)
                offset += length
    return {p: sums[p] / counts[p] for p in sums}

