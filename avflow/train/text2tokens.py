"""Training the text-to-tokens model from the packed shards alone: examples, batches, loss, the task.

Every segment's transcript is the greedy CTC decoding of its own actor tokens and its per-symbol
durations come from forced alignment (avflow.text.alignment), so no external transcript is needed.
Examples are prepared once per process (a pass over the token stream of the shards); the batch stream
is a pure function of (trainer.seed, rank, step), so a resumed run draws exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from avflow.config import Config
from avflow.data.shard_index import iter_split_arrays
from avflow.model.flow import ot_path
from avflow.model.text2tokens import TextToTokensNet, generate_tokens
from avflow.text.alignment import align_characters, align_phonemes
from avflow.text.phonemes import build_front_end, front_end_symbols
from avflow.text.transcripts import character_error_rate, greedy_transcript
from avflow.train.distributed import DistInfo

log = logging.getLogger(__name__)

SIGMA_MIN = 1e-5  # flow-matching path: the noise left at t = 1
SAMPLED_VALIDATION_EXAMPLES = 32  # held-out segments generated at each validation for the CER and duration error


@dataclass
class Example:
    text: str  # the transcript: uppercase words separated by spaces
    symbols: np.ndarray  # (N,) symbol ids of the front end's inventory
    durations: np.ndarray  # (N,) frames per symbol, >= 1 each
    tokens: np.ndarray  # (sum(durations), 29) token vectors at the mel frame rate


def prepare_examples(shard_dir: str, split: str, cfg: Config) -> tuple[list[Example], int]:
    """Examples of one split of the shards for cfg.text2tokens.front_end (resolved); returns (examples,
    segments left out): silent segments, and segments that cannot be aligned."""
    front_end = build_front_end(cfg.text2tokens.front_end, cfg.text2tokens.language)
    index = {symbol: i for i, symbol in enumerate(front_end_symbols(front_end.name))}
    aligned, skipped = [], 0
    for arrays in iter_split_arrays(shard_dir, split, ("tokens",), cfg.loader.max_bad_fraction):
        tokens = arrays["tokens"]
        try:
            aligned.append((align_characters(tokens), tokens))
        except ValueError as error:
            log.debug("left out a %s segment: %s", split, error)
            skipped += 1
    if front_end.name == "character":
        sequences = [(alignment.symbols, alignment.durations) for alignment, _ in aligned]
    else:
        phonemes = [front_end.word_symbols(alignment.words) for alignment, _ in aligned]
        sequences = align_phonemes(aligned, phonemes)
    examples = []
    for (alignment, tokens), sequence in zip(aligned, sequences):
        if sequence is None:
            skipped += 1
            continue
        symbols, durations = sequence
        examples.append(Example(" ".join(alignment.words), np.array([index[s] for s in symbols], dtype=np.int64),
                                np.asarray(durations, dtype=np.int64), tokens.astype(np.float32)))
    return examples, skipped


def token_statistics(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the token vectors (the decoder works in this normalized space)."""
    stacked = np.concatenate([example.tokens for example in examples]).astype(np.float64)
    return (torch.tensor(stacked.mean(0), dtype=torch.float32),
            torch.tensor(stacked.std(0).clip(1e-3), dtype=torch.float32))


def crop(example: Example, max_frames: int, rng: np.random.Generator) -> Example:
    """A random run of whole symbols of at most max_frames frames (the example itself when it fits)."""
    total = int(example.durations.sum())
    if total <= max_frames:
        return example
    ends = np.cumsum(example.durations)
    starts = ends - example.durations
    first = int(rng.integers(0, int(np.searchsorted(ends, total - max_frames, side="left")) + 1))
    last = max(first + 1, int(np.searchsorted(ends, starts[first] + max_frames, side="right")))
    return Example(example.text, example.symbols[first:last], example.durations[first:last],
                   example.tokens[starts[first]:ends[last - 1]])


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Padded tensors: symbols, symbol_valid, durations (B, N); tokens (B, M, 29), frame_valid (B, M)."""
    symbols = max(len(example.symbols) for example in examples)
    frames = max(len(example.tokens) for example in examples)
    dim = examples[0].tokens.shape[1]
    batch = {"symbols": torch.zeros(len(examples), symbols, dtype=torch.long),
             "durations": torch.zeros(len(examples), symbols, dtype=torch.long),
             "symbol_valid": torch.zeros(len(examples), symbols, dtype=torch.bool),
             "tokens": torch.zeros(len(examples), frames, dim),
             "frame_valid": torch.zeros(len(examples), frames, dtype=torch.bool)}
    for row, example in enumerate(examples):
        n, m = len(example.symbols), len(example.tokens)
        batch["symbols"][row, :n] = torch.from_numpy(example.symbols)
        batch["durations"][row, :n] = torch.from_numpy(example.durations)
        batch["symbol_valid"][row, :n] = True
        batch["tokens"][row, :m] = torch.from_numpy(example.tokens)
        batch["frame_valid"][row, :m] = True
    return batch


class ExampleBatches:
    """Endless random batches of (cropped) examples for one rank; resumable by its step count."""

    def __init__(self, examples: list[Example], batch_size: int, max_frames: int, seed: int, rank: int,
                 skipped: int = 0):
        if not examples:
            raise ValueError("no text-to-tokens training examples: every segment was silent or unalignable")
        self.examples, self.batch_size, self.max_frames = examples, batch_size, max_frames
        self.seed, self.rank = seed, rank
        self.delivered = 0
        self.bad_samples = skipped

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            rng = np.random.default_rng((self.seed, self.rank, self.delivered))
            chosen = rng.integers(0, len(self.examples), self.batch_size)
            self.delivered += 1
            yield collate([crop(self.examples[i], self.max_frames, rng) for i in chosen])

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.delivered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batches = state.get("batches")
        if not isinstance(batches, int) or batches < 0:
            raise ValueError(f"text2tokens batch state: expected a non-negative integer 'batches', got {batches!r}")
        self.delivered = batches


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(prediction.dtype)
    if prediction.dim() == 3:
        weights = weights[..., None].expand_as(prediction)
    return (((prediction - target) ** 2) * weights).sum() / weights.sum().clamp_min(1.0)


def text2tokens_loss(model, batch: dict[str, torch.Tensor], decoder: str, duration_weight: float,
                     token_mean: torch.Tensor, token_std: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Duration loss (MSE of log frames) plus the decoder's loss under the ground-truth durations.

    flow: MSE between the predicted and the OT-path velocity at a random time; regression: MSE between
    the one-pass prediction (zero input, t = 0) and the normalized tokens. One forward call, so a
    DDP or FSDP wrapper sees every parameter used.
    """
    frame_valid = batch["frame_valid"]
    target = (batch["tokens"] - token_mean) / token_std * frame_valid[..., None]
    batch_size = target.shape[0]
    if decoder == "flow":
        t = torch.rand(batch_size, device=target.device, generator=generator)
        x0 = torch.randn(target.shape, device=target.device, generator=generator)
        x, wanted = ot_path(x0, target, t, SIGMA_MIN), target - (1 - SIGMA_MIN) * x0
    else:
        t, x, wanted = torch.zeros(batch_size, device=target.device), torch.zeros_like(target), target
    log_durations, prediction = model(batch["symbols"], batch["symbol_valid"], batch["durations"], x, t)
    duration_loss = masked_mse(log_durations, torch.log(batch["durations"].clamp_min(1).float()), batch["symbol_valid"])
    token_loss = masked_mse(prediction[:, :target.shape[1]], wanted, frame_valid)
    return duration_weight * duration_loss + token_loss, {"duration": duration_loss, "tokens": token_loss}


class Text2TokensTask:
    """What the shared Trainer needs to train the text-to-tokens model (see avflow.train.loop)."""

    name = "text2tokens"
    loss_parts = ("duration", "tokens")

    def __init__(self, cfg: Config, info: DistInfo, progress: bool = True):
        self.cfg, self.device, self.rank, self.world_size = cfg, info.device, info.rank, info.world_size

    def load_data(self) -> None:
        """Align every segment of both splits (a pass over the shards' token stream) and fix the normalization."""
        cfg = self.cfg
        train, skipped = prepare_examples(cfg.loader.shards, "train", cfg)
        self.val_examples, _ = prepare_examples(cfg.loader.shards, "val", cfg)
        log.info("text2tokens: %d training segments (%d left out), %d held out, %s front end", len(train), skipped,
                 len(self.val_examples), cfg.text2tokens.front_end)
        self.token_mean, self.token_std = (tensor.to(self.device) for tensor in token_statistics(train))
        self.train_batches = ExampleBatches(train, cfg.trainer.batch_size, cfg.text2tokens.max_train_frames,
                                            cfg.trainer.seed, self.rank, skipped)

    def build_model(self) -> TextToTokensNet:
        return TextToTokensNet(self.cfg.text2tokens, len(front_end_symbols(self.cfg.text2tokens.front_end)),
                               self.cfg.model.token_dim)

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    def loss(self, model, batch, generator=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.cfg.text2tokens
        return text2tokens_loss(model, batch, x.decoder, x.duration_weight, self.token_mean, self.token_std, generator)

    @staticmethod
    def frames(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["frame_valid"]

    def validation_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of the held-out examples, whole, in fixed order."""
        mine = self.val_examples[self.rank::self.world_size]
        for start in range(0, len(mine), self.cfg.trainer.batch_size):
            yield collate(mine[start:start + self.cfg.trainer.batch_size])

    def checkpoint_tensors(self) -> dict[str, Any]:
        return {"token_stats": {"mean": self.token_mean, "std": self.token_std}}

    def flops_per_frame(self, parameters: int) -> float:
        return 6.0 * parameters

    def log_sample(self, writer, model: TextToTokensNet, step: int) -> None:
        """Held-out quality of the full generation path on the first held-out segments: CER of the greedy
        decoding, total-duration error."""
        scores = evaluate_examples(model, self.val_examples[:SAMPLED_VALIDATION_EXAMPLES], self.token_mean,
                                   self.token_std, self.cfg.text2tokens.temperature)
        for key, value in scores.items():
            writer.add_scalar(f"val/{key}", value, step)


@torch.no_grad()
def evaluate_examples(model: TextToTokensNet, examples: list[Example], token_mean: torch.Tensor,
                      token_std: torch.Tensor, temperature: float, seed: int = 0) -> dict[str, float]:
    """Generate each example from its symbols: CER of the greedy CTC decoding against its transcript, and the
    relative error of the total duration (frames) against the aligned ground truth, both over all examples."""
    if not examples:
        return {}
    model = model.eval()
    device = token_mean.device
    hypotheses, predicted_frames, true_frames = [], 0, 0
    for index, example in enumerate(examples):
        generator = torch.Generator(device=device).manual_seed(seed + index)
        symbols = torch.from_numpy(example.symbols).to(device)
        ones = np.ones(len(example.symbols))
        tokens, durations = generate_tokens(model, symbols, ones, np.zeros_like(ones), temperature, generator)
        tokens = tokens * token_std + token_mean
        hypotheses.append(greedy_transcript(tokens.float().cpu().numpy()))
        predicted_frames += int(durations.sum())
        true_frames += int(example.durations.sum())
    return {"cer": character_error_rate(hypotheses, [example.text for example in examples]),
            "duration_error": abs(predicted_frames - true_frames) / max(1, true_frames),
            "duration_ratio": predicted_frames / max(1, true_frames)}

