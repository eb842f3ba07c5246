"""Text -> (M, 29) token logits at the mel frame rate with a trained text-to-tokens model.

    t2t = load_text2tokens("t2t.safetensors")     # or a training step directory
    log_probs = t2t.token_logits("Hello there, friend.", rate=1.0, pause_scale=1.0, seed=0)

The text is normalized (numbers, symbols and abbreviations spelled out; punctuation read as pauses),
turned into input symbols by the front end recorded in the model's config, and generated; text with
more input symbols than text2tokens.max_symbols is cut at sentence ends (and, inside a sentence that is
still too long, between words), each piece generated in turn from one random stream, and the pieces
concatenated. Bad text raises ValueError naming the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avflow.config import Config
from avflow.model.io import load_inference_tensors
from avflow.model.text2tokens import TextToTokensNet, generate_tokens
from avflow.text.normalize import LONG_PAUSE, SHORT_PAUSE, normalize_text, speech_words, split_sentences
from avflow.text.phonemes import SILENCE, WORD_GAP, build_front_end, front_end_symbols, sequence_symbols
from avflow.text.transcripts import character_error_rate, greedy_transcript


class TextToTokens:
    """A loaded text-to-tokens model with its front end and token normalization."""

    def __init__(self, cfg: Config, net: TextToTokensNet, token_mean: torch.Tensor, token_std: torch.Tensor,
                 device: torch.device):
        self.cfg = cfg
        self.net = net.to(device).eval()
        self.token_mean, self.token_std = token_mean.to(device), token_std.to(device)
        self.device = device
        self.front_end = build_front_end(cfg.text2tokens.front_end, cfg.text2tokens.language)
        self.index = {symbol: i for i, symbol in enumerate(front_end_symbols(self.front_end.name))}

    @property
    def frame_rate(self) -> float:
        return self.cfg.mel.frame_rate

    def token_logits(self, text: str, rate: float = 1.0, pause_scale: float = 1.0, temperature: float | None = None,
                     seed: int = 0) -> np.ndarray:
        """(M, 29) float32 token logits for `text` at the mel frame rate, in the value domain of the training shards'
        tokens; the same for the same seed.

        rate: speaking rate (2.0 is twice as fast: every duration divided by it). pause_scale: multiplies the
        silences, word gaps and punctuation pauses. temperature: noise scale of the flow-matching decoder
        (default text2tokens.temperature; no effect on a regression decoder).
        """
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, got {type(text).__name__}")
        if not rate > 0:
            raise ValueError(f"rate: expected a positive speaking rate, got {rate}")
        if not pause_scale >= 0:
            raise ValueError(f"pause_scale: expected a non-negative scale, got {pause_scale}")
        temperature = self.cfg.text2tokens.temperature if temperature is None else temperature
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a non-negative value, got {temperature}")
        words = speech_words(text)
        symbols = dict(zip((word for word, _ in words), self.front_end.word_symbols([word for word, _ in words])))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        pieces = []
        for piece in self._pieces(words, symbols):
            ids, scale, extra = self._inputs(piece, symbols, rate, pause_scale)
            tokens, _ = generate_tokens(self.net, torch.from_numpy(ids).to(self.device), scale, extra, temperature,
                                        generator)
            # In the shards' own domain (raw wav2vec2 logits for extracted data, log-probabilities for the demo
            # corpus): that is what the main model trained on those shards is conditioned on.
            pieces.append((tokens * self.token_std + self.token_mean).float().cpu().numpy())
        return np.concatenate(pieces).astype(np.float32)

    def _pieces(self, words: list[tuple[str, str]], symbols: dict[str, list[str]]) -> list[list[tuple[str, str]]]:
        """The words cut into pieces of at most max_symbols input symbols: whole sentences where they fit."""
        limit = self.cfg.text2tokens.max_symbols

        def size(piece: list[tuple[str, str]]) -> int:
            return 1 + sum(len(symbols[word]) + 1 for word, _ in piece)  # silences, word gaps, symbols

        if size(words) <= limit:
            return [words]
        chunks = []
        for sentence in split_sentences(words):
            current: list[tuple[str, str]] = []
            for word in sentence:
                if current and size(current + [word]) > limit:
                    chunks.append(current)
                    current = []
                if size([word]) > limit:
                    raise ValueError(f"the word {word[0]!r} has {len(symbols[word[0]])} input symbols, more than "
                                     f"text2tokens.max_symbols={limit}")
                current.append(word)
            chunks.append(current)
        pieces = [chunks[0]]
        for chunk in chunks[1:]:
            if size(pieces[-1] + chunk) <= limit:
                pieces[-1] = pieces[-1] + chunk
            else:
                pieces.append(chunk)
        return pieces

    def _inputs(self, piece: list[tuple[str, str]], symbols: dict[str, list[str]], rate: float,
                pause_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Symbol ids, per-symbol duration scales and extra pause frames for one piece."""
        x = self.cfg.text2tokens
        sequence, word_of = sequence_symbols([symbols[word] for word, _ in piece])
        pause_frames = {"": 0.0, SHORT_PAUSE: x.short_pause_s * self.frame_rate,
                        LONG_PAUSE: x.long_pause_s * self.frame_rate}
        scale = np.array([pause_scale / rate if s in (SILENCE, WORD_GAP) else 1.0 / rate for s in sequence])
        extra = np.zeros(len(sequence))
        for position, symbol in enumerate(sequence):
            if symbol in (SILENCE, WORD_GAP) and position > 0:
                extra[position] = pause_frames[piece[word_of[position - 1]][1]] * pause_scale / rate
        return np.array([self.index[s] for s in sequence], dtype=np.int64), scale, extra


def load_text2tokens(path: str | Path, device: str | torch.device = "cpu") -> TextToTokens:
    """A text-to-tokens model from a consolidated .safetensors file or a training step directory."""
    cfg, tensors = load_inference_tensors(path, task="text2tokens")
    symbols = front_end_symbols(cfg.text2tokens.front_end)
    net = TextToTokensNet(cfg.text2tokens, len(symbols), cfg.model.token_dim)
    net.load_state_dict(tensors["ema"])
    stats = tensors["token_stats"]
    return TextToTokens(cfg, net, stats["mean"].float(), stats["std"].float(), torch.device(device))


def evaluate_text2tokens(model: TextToTokens, sentences: list[str], frames: list[int],
                         seed: int = 0) -> dict[str, float]:
    """Generate each sentence and compare: the character error rate of the greedy CTC decoding against the
    normalized sentence (edits summed over all sentences), and the relative error of the total length
    against `frames`, the recorded lengths in mel frames."""
    if len(sentences) != len(frames) or not sentences:
        raise ValueError(f"expected one recorded length per sentence and at least one sentence, got "
                         f"{len(sentences)} sentences and {len(frames)} lengths")
    generated = [model.token_logits(sentence, seed=seed) for sentence in sentences]
    references = [normalize_text(sentence) for sentence in sentences]
    total = sum(logits.shape[0] for logits in generated)
    return {"cer": character_error_rate([greedy_transcript(logits) for logits in generated], references),
            "duration_error": abs(total - sum(frames)) / sum(frames)}
