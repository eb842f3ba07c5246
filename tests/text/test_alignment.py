"""Durations from CTC token logits: Viterbi forced alignment, MAS, character/phoneme spans."""

import itertools

import numpy as np
import pytest
from helpers import frame_log_probs

from avflow.text.alignment import (
    CharacterAlignment,
    align_characters,
    align_phonemes,
    ctc_forced_align,
    monotonic_alignment_search,
)
from avflow.text.phonemes import SILENCE, WORD_GAP
from avflow.text.token_labels import LABEL_INDEX, TOKEN_LABELS
from avflow.text.token_logits import char_durations, token_logits_from_durations

BLANK = "-"


def test_forced_alignment_follows_the_clear_frames():
    rows = [{BLANK: 0.9}, {BLANK: 0.9}, {"A": 0.9}, {"A": 0.9}, {BLANK: 0.9}, {"B": 0.9}, {"B": 0.9}, {BLANK: 0.9}]
    path = ctc_forced_align(frame_log_probs(rows), [LABEL_INDEX["A"], LABEL_INDEX["B"]])
    assert path.tolist() == [-1, -1, 0, 0, -1, 1, 1, -1]


def test_forced_alignment_puts_a_blank_between_doubled_letters_where_it_costs_least():
    # Every frame's argmax is L, so greedy decoding reads one L; "LL" needs a blank. Candidates (hand-computed):
    # L b L L = .9*.3*.5*.9 = .1215, L L b L = .9*.6*.45*.9 = .2187, L b b L = .9*.3*.45*.9 = .1094.
    rows = [{"L": 0.9}, {"L": 0.6, BLANK: 0.3}, {"L": 0.5, BLANK: 0.45}, {"L": 0.9}]
    path = ctc_forced_align(frame_log_probs(rows), [LABEL_INDEX["L"], LABEL_INDEX["L"]])
    assert path.tolist() == [0, 0, -1, 1]


def test_forced_alignment_refuses_too_few_frames():
    with pytest.raises(ValueError, match="cannot hold 2 labels"):
        ctc_forced_align(frame_log_probs([{"L": 0.9}, {"L": 0.9}]), [LABEL_INDEX["L"], LABEL_INDEX["L"]])


def test_forced_alignment_of_a_long_sentence():
    # 70 labels make 141 CTC states, more than an int8 back-pointer plus state index can hold together.
    letters = [TOKEN_LABELS[2 + i % 26] for i in range(70)]  # no blank, no word delimiter
    rows = [row for letter in letters for row in ({letter: 0.9}, {BLANK: 0.9})]
    path = ctc_forced_align(frame_log_probs(rows), [LABEL_INDEX[letter] for letter in letters])
    assert path.tolist() == [value for i in range(70) for value in (i, -1)]


@pytest.mark.parametrize("symbols, frames", [(1, 4), (3, 5), (4, 7), (5, 5)])
def test_monotonic_alignment_search_finds_the_best_composition(symbols, frames):
    score = np.random.default_rng(symbols * 10 + frames).normal(size=(symbols, frames))
    best, best_total = None, -np.inf
    for cuts in itertools.combinations(range(1, frames), symbols - 1):  # brute force over every split
        edges = (0, *cuts, frames)
        total = sum(score[i, edges[i]:edges[i + 1]].sum() for i in range(symbols))
        if total > best_total:
            best, best_total = np.diff(edges), total
    assert monotonic_alignment_search(score).tolist() == best.tolist()


def test_monotonic_alignment_search_ignores_a_large_score_offset_per_frame():
    """Every frame belongs to exactly one symbol, so adding any constant to a frame's scores shifts every path's total
    alike: the best path stays, however large the offset (as with squared distances of far-off features)."""
    rng = np.random.default_rng(0)
    score = rng.normal(size=(6, 40))
    for scale in (2e4, 1e7):
        offsets = -scale * rng.uniform(1, 2, size=(1, 40))
        assert monotonic_alignment_search(score + offsets).tolist() == monotonic_alignment_search(score).tolist()


def test_character_spans_of_rule_based_tokens():
    # At 100 fps "hi yo" is | 20, H 6, I 9, | 8, Y 6, O 11, | 20 frames. A letter of n frames is emitted on its
    # centre round(n / 2) frames starting (n - width) // 2 in, '|' on its first frame, so first emissions are
    # | 0, H 21, I 28, | 35, Y 44, O 51, | 60; each span runs to the next symbol's first emission.
    timeline = char_durations("hi yo", 100)
    assert timeline == [("|", 20), ("H", 6), ("I", 9), ("|", 8), ("Y", 6), ("O", 11), ("|", 20)]
    aligned = align_characters(token_logits_from_durations(timeline, 100))
    assert aligned.words == ["HI", "YO"]
    assert aligned.symbols == [SILENCE, "H", "I", WORD_GAP, "Y", "O", SILENCE]
    assert aligned.durations.tolist() == [21, 7, 7, 9, 7, 9, 20]


def test_character_spans_without_edge_delimiters():
    # No '|' at either end (as real wav2vec2 output often is): the leading silence runs to H's first emission,
    # the trailing one starts after I's last emission.
    rows = [{BLANK: 0.9}] * 3 + [{"H": 0.9}] * 2 + [{BLANK: 0.9}] + [{"I": 0.9}] * 2 + [{BLANK: 0.9}] * 2
    aligned = align_characters(frame_log_probs(rows))
    assert aligned.symbols == [SILENCE, "H", "I", SILENCE]
    assert aligned.durations.tolist() == [3, 3, 2, 2]


def test_silent_tokens_have_nothing_to_align():
    with pytest.raises(ValueError, match="no words"):
        align_characters(frame_log_probs([{BLANK: 0.9}] * 5))


def test_phonemes_share_a_word_by_their_own_token_patterns():
    # One word "AB" over frames 2..8: its first 4 frames look like one pattern, the last 2 like another. The even
    # split starts at 3 + 3; the re-estimated means move the boundary to 4 + 2.
    tokens = np.zeros((10, 29), dtype=np.float32)
    tokens[:2, 0] = tokens[8:, 0] = 1.0
    tokens[2:6, 5] = 1.0
    tokens[6:8, 9] = 1.0
    chars = CharacterAlignment(["AB"], [SILENCE, "A", "B", SILENCE], np.array([2, 3, 3, 2]))
    (symbols, durations), = align_phonemes([(chars, tokens)], [[["x", "y"]]])
    assert symbols == [SILENCE, "x", "y", SILENCE]
    assert durations.tolist() == [2, 4, 2, 2]


def test_a_word_with_more_phonemes_than_frames_is_left_out():
    chars = CharacterAlignment(["AB"], [SILENCE, "A", "B", SILENCE], np.array([1, 1, 1, 1]))
    assert align_phonemes([(chars, np.zeros((4, 29), dtype=np.float32))], [[["x", "y", "z"]]]) == [None]
