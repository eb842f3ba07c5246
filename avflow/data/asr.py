"""ASR token conditioning: 29-d character CTC logits from a local wav2vec2 CTC model (`transformers`).

The model's vocabulary is mapped onto the published label order by name when the model directory has
a vocab.json, and otherwise by the fixed ids of the published model's 32-entry vocabulary. Audio is
processed in chunks (100 s by default, as the reference does) so hours-long files fit in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from avflow.data.tokens import HF_VOCAB_COLUMNS, TOKEN_LABELS

ASR_SAMPLE_RATE = 16000
BLANK_NAMES = ("<pad>", "-")


def label_columns(model_dir: Path, vocab_size: int) -> list[int]:
    """Column of the model's logits for each of the 29 labels, in the published order."""
    vocab_file = model_dir / "vocab.json"
    if vocab_file.is_file():
        vocab = json.loads(vocab_file.read_text())
        blank = next((vocab[name] for name in BLANK_NAMES if name in vocab), None)
        missing = [label for label in TOKEN_LABELS[1:] if label not in vocab]
        if blank is None or missing:
            raise ValueError(f"{vocab_file}: expected a character CTC vocabulary with <pad> and "
                             f"{' '.join(TOKEN_LABELS[1:])}; missing {missing or ['<pad>']}")
        return [blank] + [vocab[label] for label in TOKEN_LABELS[1:]]
    if vocab_size != 32:
        raise ValueError(f"{model_dir}: no vocab.json and a vocabulary of {vocab_size} entries; expected the "
                         "published 32-entry wav2vec2 character vocabulary")
    return list(HF_VOCAB_COLUMNS)


class CTCTokenizer:
    """Wraps a local Wav2Vec2ForCTC checkpoint directory."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        try:
            from transformers import Wav2Vec2ForCTC
        except ImportError as error:
            raise ValueError("ASR token extraction needs the `transformers` package (pip install transformers)") from error
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"{self.model_dir}: no such wav2vec2 model directory")
        self.model = Wav2Vec2ForCTC.from_pretrained(self.model_dir).to(device).eval()
        self.columns = label_columns(self.model_dir, self.model.config.vocab_size)
        preprocessor = self.model_dir / "preprocessor_config.json"
        self.normalize = json.loads(preprocessor.read_text()).get("do_normalize", True) if preprocessor.is_file() else True
        self.device = device

    @torch.no_grad()
    def logits(self, audio: np.ndarray, chunk_seconds: float = 100.0) -> np.ndarray:
        """(samples,) float audio at 16 kHz -> (M, 29) float32 logits in the published label order."""
        chunk = int(chunk_seconds * ASR_SAMPLE_RATE)
        pieces = []
        for start in range(0, len(audio), chunk):
            piece = torch.from_numpy(np.ascontiguousarray(audio[start:start + chunk], dtype=np.float32))
            if self.normalize:
                piece = (piece - piece.mean()) / torch.sqrt(piece.var(unbiased=False) + 1e-7)
            out = self.model(piece[None].to(self.device)).logits[0]
            pieces.append(out[:, self.columns].float().cpu().numpy())
        return np.concatenate(pieces)
