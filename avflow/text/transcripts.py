"""Transcripts from frame-level CTC token logits (greedy decoding), and their character error rate.

Greedy decoding is what a transcript of a segment's own tokens means everywhere in avflow: the text the
alignment places in time, the text-to-tokens model's check, and the ASR score of evaluation.
"""

from __future__ import annotations

import numpy as np

from avflow.text.token_labels import BLANK, TOKEN_LABELS, WORD_DELIMITER


def greedy_labels(log_probs: np.ndarray) -> list[int]:
    """Label ids of the greedy CTC decoding: argmax per frame, repeats merged, blanks dropped."""
    best = np.asarray(log_probs).argmax(axis=-1)
    keep = np.ones(best.shape[0], dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(label) for label in best[keep] if label != BLANK]


def labels_to_text(labels: list[int]) -> str:
    """Uppercase words separated by single spaces ('|' and blanks are word breaks)."""
    return " ".join("".join(TOKEN_LABELS[label] if label != WORD_DELIMITER else " " for label in labels
                            if label != BLANK).split())


def greedy_transcript(log_probs: np.ndarray) -> str:
    return labels_to_text(greedy_labels(log_probs))


def edit_distance(hypothesis: str, reference: str) -> int:
    previous = list(range(len(reference) + 1))
    for i, h in enumerate(hypothesis, 1):
        current = [i]
        for j, r in enumerate(reference, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r)))
        previous = current
    return previous[-1]


def character_error_rate(hypotheses: list[str], references: list[str]) -> float:
    """Character edits (spaces included) over reference characters, summed over all pairs."""
    edits = sum(edit_distance(h, r) for h, r in zip(hypotheses, references, strict=True))
    return edits / max(1, sum(len(r) for r in references))
