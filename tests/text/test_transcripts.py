"""Greedy CTC transcripts of token logits and their character error rate."""

import pytest
from helpers import frame_log_probs

from avflow.text.transcripts import character_error_rate, edit_distance, greedy_transcript

BLANK = "-"


def test_greedy_transcript_and_character_error_rate():
    rows = [{"|": 0.9}, {"H": 0.9}, {"I": 0.9}, {"I": 0.9}, {"|": 0.9}, {"|": 0.9}, {BLANK: 0.9}, {"Y": 0.9}]
    assert greedy_transcript(frame_log_probs(rows)) == "HI Y"
    assert edit_distance("HELO", "HELLO") == 1 and edit_distance("", "AB") == 2
    assert character_error_rate(["HELO", "AB"], ["HELLO", "AB"]) == pytest.approx(1 / 7)
