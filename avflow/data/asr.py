"""ASR token conditioning: 29-d character CTC logits from a local wav2vec2 CTC model (`transformers`).

The model's vocabulary is mapped onto the published label order by name when the model directory has
a vocab.json, and otherwise by the fixed ids of the published model's 32-entry vocabulary. Audio is
processed in chunks (100 s by default, as the reference does) so hours-long files fit in memory.
`extract_directory` writes the token file of every recording of a dataset folder, as the 50h and
Audio2Photoreal layouts expect it: one (channels, M, 29) float32 .npy per recording.
The published label order, vocabulary ids and file shape: docs/reference.md, "ASR tokens".
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avflow.data.features import audio_info, load_wav, resample
from avflow.data.layouts import layout_named
from avflow.text.token_labels import HF_VOCAB_COLUMNS, TOKEN_LABELS
from avflow.utils import atomic_path

ASR_SAMPLE_RATE = 16000
COMPLETE_TOLERANCE_FRAMES = 2  # an existing token file within this many frames of a fresh extraction is kept
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
            raise ValueError("ASR token extraction needs the `transformers` package "
                             "(pip install transformers)") from error
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"{self.model_dir}: no such wav2vec2 model directory")
        self.model = Wav2Vec2ForCTC.from_pretrained(self.model_dir).to(device).eval()
        self.columns = label_columns(self.model_dir, self.model.config.vocab_size)
        preprocessor = self.model_dir / "preprocessor_config.json"
        self.normalize = (json.loads(preprocessor.read_text()).get("do_normalize", True) if preprocessor.is_file()
                          else True)
        self.device = device

    @property
    def receptive_field(self) -> int:
        """Samples one output frame sees: the shortest input the convolutional front end accepts."""
        field = 1
        for kernel, stride in reversed(list(zip(self.model.config.conv_kernel, self.model.config.conv_stride))):
            field = (field - 1) * stride + kernel
        return field

    def frames(self, samples: int) -> int:
        """Output frames for one chunk of `samples` 16 kHz samples: ~50 Hz, about one fewer than samples / 320."""
        for kernel, stride in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            samples = (samples - kernel) // stride + 1
        return max(samples, 0)

    def chunk_bounds(self, samples: int, chunk_seconds: float) -> list[tuple[int, int]]:
        """(start, stop) of each chunk; a tail shorter than the receptive field joins the chunk before it."""
        if samples < self.receptive_field:
            raise ValueError(f"audio of {samples} samples at {ASR_SAMPLE_RATE} Hz: expected at least "
                             f"{self.receptive_field} samples, the model's receptive field")
        chunk = int(chunk_seconds * ASR_SAMPLE_RATE)
        if chunk < self.receptive_field:
            raise ValueError(f"chunk_seconds={chunk_seconds}: expected chunks of at least {self.receptive_field} "
                             f"samples at {ASR_SAMPLE_RATE} Hz, the model's receptive field")
        starts = list(range(0, samples, chunk))
        if len(starts) > 1 and samples - starts[-1] < self.receptive_field:
            starts.pop()
        return list(zip(starts, starts[1:] + [samples]))

    def expected_frames(self, samples: int, chunk_seconds: float) -> int:
        """Frames an extraction of `samples` 16 kHz samples yields: each chunk loses about one to its edges."""
        return sum(self.frames(stop - start) for start, stop in self.chunk_bounds(samples, chunk_seconds))

    def _normalized(self, piece: np.ndarray) -> torch.Tensor:
        piece = torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32))
        if self.normalize:
            piece = (piece - piece.mean()) / torch.sqrt(piece.var(unbiased=False) + 1e-7)
        return piece

    @torch.no_grad()
    def channel_logits(self, audio: np.ndarray, chunk_seconds: float = 100.0, batch_size: int = 2) -> np.ndarray:
        """(channels, samples) float audio at 16 kHz -> (channels, M, 29) float32 logits, published label order.

        Chunks of equal length (every one but the last) go through the model `batch_size` at a time, so
        the channels of a recording share a forward pass; each chunk is normalized on its own.
        """
        if audio.ndim != 2:
            raise ValueError(f"audio: expected shape (channels, samples), got {audio.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
        bounds = self.chunk_bounds(audio.shape[1], chunk_seconds)
        pieces = [(channel, start, stop) for start, stop in bounds for channel in range(audio.shape[0])]
        outputs = {}
        for _, same_length in itertools.groupby(pieces, key=lambda piece: piece[2] - piece[1]):
            same_length = list(same_length)
            for first in range(0, len(same_length), batch_size):
                batch = same_length[first:first + batch_size]
                inputs = torch.stack([self._normalized(audio[channel, start:stop]) for channel, start, stop in batch])
                logits = self.model(inputs.to(self.device)).logits[:, :, self.columns].float().cpu().numpy()
                for (channel, start, _), chunk_logits in zip(batch, logits):
                    outputs[channel, start] = chunk_logits
        return np.stack([np.concatenate([outputs[channel, start] for start, _ in bounds])
                         for channel in range(audio.shape[0])]).astype(np.float32)

    def logits(self, audio: np.ndarray, chunk_seconds: float = 100.0) -> np.ndarray:
        """(samples,) float audio at 16 kHz -> (M, 29) float32 logits in the published label order."""
        return self.channel_logits(np.asarray(audio)[None], chunk_seconds, batch_size=1)[0]


def recordings(input_dir: str | Path, layout: str) -> list[tuple[Path, Path]]:
    """(wav, token file) of every recording of the dataset folder `input_dir` in the registered `layout`."""
    return layout_named(layout, "layout").recordings(Path(input_dir))


def is_complete(token_path: Path, channels: int, frames: int) -> bool:
    """Whether an existing token file is a finished extraction: a plain float32 (channels, ~frames, 29) array."""
    if not token_path.is_file():
        return False
    try:
        tokens = np.load(token_path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError):
        return False
    return (tokens.dtype == np.float32 and tokens.ndim == 3 and tokens.shape[0] == channels
            and tokens.shape[2] == len(TOKEN_LABELS) and abs(tokens.shape[1] - frames) <= COMPLETE_TOLERANCE_FRAMES)


def extract_directory(input_dir: str | Path, model_dir: str | Path, *, layout: str = "50h",
                      chunk_seconds: float = 100.0, batch_size: int = 2, device: str = "cpu",
                      progress: bool = True) -> dict[str, int]:
    """Write the token file of every recording under `input_dir`; resumable: complete files are skipped.

    Every channel is resampled to 16 kHz and extracted, giving (channels, M, 29) float32 with channel 0
    the actor/subject. A file counts as complete when its M is within COMPLETE_TOLERANCE_FRAMES of what
    this extraction would write, which is about one frame per chunk short of duration * 50.
    """
    return extract_recordings(recordings(input_dir, layout), CTCTokenizer(model_dir, device=device),
                              chunk_seconds=chunk_seconds, batch_size=batch_size, progress=progress)


def extract_recordings(pairs: list[tuple[Path, Path]], tokenizer: CTCTokenizer, *, chunk_seconds: float = 100.0,
                       batch_size: int = 2, progress: bool = True) -> dict[str, int]:
    """`extract_directory` for an explicit list of (wav, token file) pairs, e.g. one array job's share."""
    counts = {"written": 0, "skipped": 0}
    for wav, token_path in tqdm(pairs, desc="extract-asr", unit="file", disable=not progress):
        info = audio_info(wav)
        samples = round(info.frames * ASR_SAMPLE_RATE / info.samplerate)  # soxr's output length
        try:
            frames = tokenizer.expected_frames(samples, chunk_seconds)
        except ValueError as error:
            raise ValueError(f"{wav}: {error}") from error
        if is_complete(token_path, info.channels, frames):
            counts["skipped"] += 1
            continue
        audio, sample_rate = load_wav(wav)
        tokens = tokenizer.channel_logits(resample(audio, sample_rate, ASR_SAMPLE_RATE), chunk_seconds, batch_size)
        with atomic_path(token_path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, tokens)
        counts["written"] += 1
    return counts
