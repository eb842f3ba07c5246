"""The procedural demo talking-head corpus, written in the 50h dataset layout.

Real AV-Flow data cannot be shipped, so the demo synthesizes a small corpus whose streams are causally
linked the way real ones are: one letter timeline per sentence drives a source-filter speech
synthesizer (48 kHz stereo, actor on channel 0), the mouth of a 256-d expression code (30 fps), a
head pose that nods with speech energy (30 fps) and wav2vec2-like CTC token logits (50 Hz). A model
that learns tokens -> speech + face on it has learned something checkable: the mouth controls are the
first four expression components (see `ground_truth_mouth_controls`).

Everything is a pure function of (corpus seed, split, segment index): the same config writes
byte-identical files. It goes through the same reader and ingestion path as the 50h data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d, uniform_filter1d
from scipy.signal import butter, lfilter, sosfilt

from avflow.config import CorpusConfig
from avflow.data.features import save_wav
from avflow.data.layouts.fifty_h import EXPRESSION_DIM, stream_paths
from avflow.text.token_logits import blank_token_logits, seconds_to_frames, symbol_seconds, token_logits_from_durations
from avflow.utils import atomic_path

SAMPLE_RATE = 48000
VISUAL_FPS = 30
TOKEN_FPS = 50
SAMPLES_PER_FRAME = SAMPLE_RATE // VISUAL_FPS
CONTROL_RATE = 1000  # mouth targets are built and smoothed on a 1 ms grid, then sampled at 30 fps
TRAIN_SESSION = "20240401"
VAL_SESSION = "20240408"  # a published 50h validation session: names containing it are held out
TRANSCRIPTS = "transcripts.json"
ALIGNMENTS = "alignments.json"

MOUTH_CONTROLS = ("jaw_open", "lip_round", "lip_close", "blink")


WORDS = (
    "the be to of and a in that have it for not on with he as you do at this but his by from they we say "
    "her she or an will my one all would there their what so up out if about who get which go me when make "
    "can like time no just him know take people into year your good some could them see other than then now "
    "look only come its over think also back after use two how our work first well way even new want because "
    "any these give day most us is was are been has had were said did made may find long down very through "
    "where much before right too mean old same tell boy follow came show around form three small set put "
    "end does another large must big high such turn here why ask went men read need land different home move "
    "try kind hand picture again change off play spell air away animal house point page letter mother answer "
    "found study still learn should world quick jump lazy box zoo jazz queen"
).split()

# Formants (Hz) of voiced sounds; the first three per vowel follow the classic Peterson-Barney table.
FORMANTS = {
    "A": (730.0, 1090.0, 2440.0), "E": (530.0, 1840.0, 2480.0), "I": (390.0, 1990.0, 2550.0),
    "O": (570.0, 840.0, 2410.0), "U": (440.0, 1020.0, 2240.0), "Y": (300.0, 2200.0, 3000.0),
    "W": (300.0, 610.0, 2200.0), "R": (420.0, 1300.0, 1600.0), "L": (360.0, 1300.0, 2700.0),
    "M": (250.0, 1200.0, 2300.0), "N": (250.0, 1700.0, 2600.0), "murmur": (250.0, 1000.0, 2500.0),
}
FORMANT_BANDWIDTHS = (80.0, 100.0, 140.0)
FORMANT_GAINS = (1.0, 0.5, 0.25)
# Voicing amplitude per letter; letters absent from FORMANTS but voiced use the closure "murmur".
VOICING = {"A": 1.0, "E": 1.0, "I": 1.0, "O": 1.0, "U": 1.0, "Y": 0.8, "W": 0.6, "R": 0.6, "L": 0.6,
           "M": 0.4, "N": 0.4, "V": 0.3, "Z": 0.3, "J": 0.3, "B": 0.15, "D": 0.15, "G": 0.15}
# Noise bands (Hz) of frication and release bursts.
NOISE_BANDS = {"sibilant": (3500.0, 8000.0), "labiodental": (1200.0, 7000.0), "glottal": (400.0, 3000.0),
               "postalveolar": (1800.0, 6000.0), "alveolar": (2500.0, 7000.0), "velar": (1200.0, 3500.0),
               "bilabial": (300.0, 2000.0)}
FRICATION = {"S": ("sibilant", 0.35), "Z": ("sibilant", 0.2), "X": ("sibilant", 0.3), "F": ("labiodental", 0.12),
             "V": ("labiodental", 0.08), "H": ("glottal", 0.1), "J": ("postalveolar", 0.2)}
BURSTS = {"T": ("alveolar", 0.25), "D": ("alveolar", 0.15), "K": ("velar", 0.22), "C": ("velar", 0.22),
          "Q": ("velar", 0.22), "X": ("velar", 0.2), "G": ("velar", 0.15), "P": ("bilabial", 0.18),
          "B": ("bilabial", 0.12), "J": ("postalveolar", 0.1)}
BURST_ONSET = 0.55  # a plosive is closure silence, then its release burst at this fraction of its span
BURST_DECAY_SECONDS = 0.010

# Mouth-control targets per letter (anything absent is 0); silence and pauses close the jaw.
JAW_OPEN = {"A": 1.0, "E": 0.6, "I": 0.5, "O": 0.7, "U": 0.45, "Y": 0.3}
JAW_OPEN_CONSONANT = 0.15
LIP_ROUND = {"O": 0.9, "U": 1.0, "W": 1.0, "R": 0.3}
LIP_CLOSE = {"M": 1.0, "B": 1.0, "P": 1.0, "F": 0.3, "V": 0.3}
COARTICULATION_SIGMA_SECONDS = 0.025  # Gaussian smoothing, ~60 ms full width at half maximum


@dataclass(frozen=True)
class Persona:
    """One synthetic person: a voice, a face style and a way of moving the head.

    Real identities differ in exactly these ways: pitch and vocal-tract length (formants), how their avatar's
    expression code encodes the same mouth movement, and how much they move. The mouth controls stay the first
    four expression components for every persona, so mouth metrics read the same for all.
    """

    f0_range: tuple[float, float]  # Hz: each segment's base pitch is drawn from it
    formant_scale: float  # every formant times this: a shorter vocal tract is higher
    face_seed: int  # draws the matrix that mixes the mouth controls into the other 252 components
    jaw_scale: float  # how wide the jaw opens for the same letter
    head_motion_scale: float  # amplitude of the idle drift and of the speech nods
    nod_rate: tuple[float, float]  # nods per second, drawn per segment
    seed_salt: int  # 0 keeps the original corpus; others draw their own sentences and noise

    def face_mix(self) -> np.ndarray:
        """(4, 252): fixed per persona, independent of the corpus seed, so every corpus of it shows one face."""
        return np.random.default_rng(self.face_seed).normal(0.0, 0.5, size=(len(MOUTH_CONTROLS),
                                                                            EXPRESSION_DIM - len(MOUTH_CONTROLS)))


# `demo` is the corpus every demo and test has used; the others give the demo several people to learn at once.
PERSONAS = {
    "demo": Persona(f0_range=(115.0, 140.0), formant_scale=1.0, face_seed=1234, jaw_scale=1.0,
                    head_motion_scale=1.0, nod_rate=(1.2, 2.2), seed_salt=0),
    "bright": Persona(f0_range=(195.0, 235.0), formant_scale=1.17, face_seed=2345, jaw_scale=0.75,
                      head_motion_scale=1.6, nod_rate=(2.0, 3.0), seed_salt=1),
    "deep": Persona(f0_range=(82.0, 98.0), formant_scale=0.88, face_seed=3456, jaw_scale=1.25,
                    head_motion_scale=0.55, nod_rate=(0.8, 1.3), seed_salt=2),
    "quick": Persona(f0_range=(150.0, 175.0), formant_scale=1.08, face_seed=4567, jaw_scale=0.9,
                     head_motion_scale=1.25, nod_rate=(2.5, 3.5), seed_salt=3),
}


def persona(name: str) -> Persona:
    """The persona called `name`, or one error listing the known ones."""
    if name not in PERSONAS:
        raise ValueError(f"corpus.identity: expected one of {', '.join(PERSONAS)}, got {name!r}")
    return PERSONAS[name]


@dataclass
class SegmentStreams:
    """One synthesized segment at the 50h native rates, plus its letter timeline."""

    sentence: str
    audio: np.ndarray  # (2, N * 1600) float32 at 48 kHz
    expression: np.ndarray  # (N, 256) float32 at 30 fps
    headpose: np.ndarray  # (N, 4, 4) float32 at 30 fps
    tokens: np.ndarray  # (2, M, 29) float32 at 50 Hz
    alignment: list[tuple[str, int, int]]  # (symbol, first sample, end sample) at 48 kHz


def ground_truth_mouth_controls(expression: np.ndarray) -> np.ndarray:
    """The interpretable mouth controls (MOUTH_CONTROLS order) of demo-corpus expression codes.

    The corpus stores them unmixed as the first four components, so this is a column slice; it exists
    so that evaluation code states what it compares instead of indexing magic columns.
    """
    return expression[..., :len(MOUTH_CONTROLS)]


def segment_name(index: int, is_val: bool) -> str:
    return f"{VAL_SESSION if is_val else TRAIN_SESSION}_s{index:03d}"


def _smooth(signal: np.ndarray, width: int) -> np.ndarray:
    """Triangular smoothing (two box passes) of `width` samples: click-free envelopes."""
    if width <= 1:
        return signal
    return uniform_filter1d(uniform_filter1d(signal, width, mode="nearest"), width, mode="nearest")


def _resonator(frequency: float, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-pole resonator normalized to unit gain at its centre frequency."""
    radius = math.exp(-math.pi * bandwidth / SAMPLE_RATE)
    theta = 2.0 * math.pi * frequency / SAMPLE_RATE
    denominator = np.array([1.0, -2.0 * radius * math.cos(theta), radius * radius])
    response = abs(1.0 / np.polyval(denominator[::-1], np.exp(-1j * theta)))
    return np.array([1.0 / response]), denominator


def _spans(seconds: list[float], rate: float) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(seconds_to_frames(seconds, rate))
    return np.concatenate([[0], np.cumsum(counts)[:-1]]), counts


def _timeline(sentence: str, rng: np.random.Generator) -> tuple[list[str], list[float], int]:
    """Letters with a per-segment speaking rate and per-letter jitter, as (symbols, seconds, frames).

    Trailing silence pads it to a whole number of 30 fps frames, so every stream covers the same time.
    """
    timeline = symbol_seconds(sentence, rate=rng.uniform(0.9, 1.1))
    symbols = [symbol for symbol, _ in timeline]
    jitter = rng.uniform(0.85, 1.15, len(timeline))
    seconds = [float(value * scale) for (_, value), scale in zip(timeline, jitter)]
    frames = math.ceil(sum(seconds) * VISUAL_FPS - 1e-9)
    seconds[-1] += frames / VISUAL_FPS - sum(seconds)
    return symbols, seconds, frames


def _band_gains(table: dict[str, tuple[str, float]], symbols: list[str], band: str) -> np.ndarray:
    """Per symbol, its noise gain in `band` from a {letter: (band, gain)} table, else 0."""
    return np.array([table[symbol][1] if symbol in table and table[symbol][0] == band else 0.0 for symbol in symbols])


def _speech(symbols: list[str], starts: np.ndarray, counts: np.ndarray, voice: Persona,
            rng: np.random.Generator) -> np.ndarray:
    """Source-filter speech at 48 kHz: formant-filtered glottal source plus band noise and bursts."""
    total = int(counts.sum())
    span = np.repeat(np.arange(len(symbols)), counts)
    seconds = np.arange(total) / SAMPLE_RATE
    duration = total / SAMPLE_RATE

    base_f0 = rng.uniform(*voice.f0_range)
    intonation = 1.0 + 0.07 * np.sin(2.0 * math.pi * rng.uniform(0.3, 0.7) * seconds + rng.uniform(0, 2 * math.pi))
    declination = 1.06 - 0.12 * seconds / duration
    f0 = base_f0 * intonation * declination
    sawtooth = 2.0 * (np.cumsum(f0 / SAMPLE_RATE) % 1.0) - 1.0
    source = lfilter([0.3], [1.0, -0.7], sawtooth)  # extra spectral tilt of a glottal pulse
    voicing = np.array([VOICING.get(symbol, 0.0) for symbol in symbols])[span]
    source *= _smooth(voicing, int(0.012 * SAMPLE_RATE))

    classes = [symbol if symbol in FORMANTS else "murmur" for symbol in symbols]
    speech = np.zeros(total)
    for name in sorted(set(classes)):
        weight = _smooth((np.array(classes) == name).astype(np.float64)[span], int(0.02 * SAMPLE_RATE))
        filtered = np.zeros(total)
        for frequency, bandwidth, gain in zip(FORMANTS[name], FORMANT_BANDWIDTHS, FORMANT_GAINS):
            b, a = _resonator(frequency * voice.formant_scale, bandwidth)
            filtered += gain * lfilter(b, a, source)
        speech += weight * filtered

    white = rng.standard_normal(total)
    offset = np.arange(total) - starts[span]
    since_burst = (offset - BURST_ONSET * counts[span]) / SAMPLE_RATE
    burst_shape = np.where(since_burst >= 0, np.exp(-np.maximum(since_burst, 0) / BURST_DECAY_SECONDS), 0.0)
    for band in sorted(NOISE_BANDS):
        frication, burst = _band_gains(FRICATION, symbols, band), _band_gains(BURSTS, symbols, band)
        if not frication.any() and not burst.any():
            continue
        envelope = _smooth(frication[span], int(0.008 * SAMPLE_RATE)) + _smooth(burst[span] * burst_shape, 48)
        low, high = NOISE_BANDS[band]
        speech += envelope * sosfilt(butter(2, [low, high], btype="bandpass", fs=SAMPLE_RATE, output="sos"), white)
    return 0.5 * speech / np.abs(speech).max()


def _frame_times(frames: int) -> np.ndarray:
    return (np.arange(frames) + 0.5) / VISUAL_FPS


def _mouth_controls(symbols: list[str], seconds: list[float], frames: int, jaw_scale: float,
                    rng: np.random.Generator) -> np.ndarray:
    """(frames, 4) controls: per-letter targets on a 1 ms grid, smoothed for coarticulation, plus blinks."""
    _, counts = _spans(seconds, CONTROL_RATE)
    span = np.repeat(np.arange(len(symbols)), counts)
    targets = np.array([[jaw_scale * JAW_OPEN.get(symbol, JAW_OPEN_CONSONANT if symbol.isalpha() else 0.0),
                         LIP_ROUND.get(symbol, 0.0), LIP_CLOSE.get(symbol, 0.0)] for symbol in symbols])[span]
    smoothed = gaussian_filter1d(targets, COARTICULATION_SIGMA_SECONDS * CONTROL_RATE, axis=0, mode="nearest")
    times = _frame_times(frames)
    grid = np.minimum((times * CONTROL_RATE).astype(np.int64), len(span) - 1)
    blink = np.zeros(frames)
    half_width = 0.1
    centre = rng.uniform(0.3, 1.5)
    while centre < frames / VISUAL_FPS:
        distance = np.abs(times - centre)
        blink = np.maximum(blink, np.where(distance < half_width, 0.5 + 0.5 * np.cos(math.pi * distance / half_width),
                                           0.0))
        centre += rng.uniform(1.5, 4.5)
    return np.column_stack([smoothed[grid], blink])


def _drift(times: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Slow idle motion: two low-frequency sinusoids with random phases."""
    frequencies = rng.uniform(0.05, 0.35, 2)
    phases = rng.uniform(0.0, 2.0 * math.pi, 2)
    return amplitude * (0.7 * np.sin(2 * math.pi * frequencies[0] * times + phases[0])
                        + 0.3 * np.sin(2 * math.pi * frequencies[1] * times + phases[1]))


def _headpose(actor: np.ndarray, frames: int, mover: Persona, rng: np.random.Generator) -> np.ndarray:
    """(frames, 4, 4) rigid transforms: a few degrees of idle drift plus nods that grow with speech energy.

    Angles are in radians internally, translation in metres.
    """
    rms = np.sqrt(np.mean(actor.reshape(frames, SAMPLES_PER_FRAME) ** 2, axis=1))
    energy = gaussian_filter1d(rms / max(rms.max(), 1e-12), 5.0, mode="nearest")
    times = _frame_times(frames)
    nod = 0.5 - 0.5 * np.cos(2 * math.pi * rng.uniform(*mover.nod_rate) * times + rng.uniform(0, 2 * math.pi))
    scale = mover.head_motion_scale
    yaw = np.radians(_drift(times, 3.0 * scale, rng))
    pitch = np.radians(_drift(times, 1.5 * scale, rng) + 4.0 * scale * energy * nod)
    roll = np.radians(_drift(times, 1.5 * scale, rng))
    translation = np.column_stack([_drift(times, 0.01 * scale, rng),
                                   _drift(times, 0.008 * scale, rng) - 0.006 * scale * energy * nod,
                                   _drift(times, 0.01 * scale, rng)])
    zero, one = np.zeros(frames), np.ones(frames)

    def rotation(rows: list[list[np.ndarray]]) -> np.ndarray:
        return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)

    turn = rotation([[np.cos(yaw), zero, np.sin(yaw)], [zero, one, zero], [-np.sin(yaw), zero, np.cos(yaw)]])
    tilt = rotation([[one, zero, zero], [zero, np.cos(pitch), -np.sin(pitch)], [zero, np.sin(pitch), np.cos(pitch)]])
    lean = rotation([[np.cos(roll), -np.sin(roll), zero], [np.sin(roll), np.cos(roll), zero], [zero, zero, one]])
    pose = np.zeros((frames, 4, 4))
    pose[:, :3, :3] = turn @ tilt @ lean
    pose[:, :3, 3] = translation
    pose[:, 3, 3] = 1.0
    return pose.astype(np.float32)


def synthesize_segment(seed: int, index: int, is_val: bool, words_per_segment: list[int],
                       who: Persona = PERSONAS["demo"]) -> SegmentStreams:
    """One segment, a pure function of (seed, split, index, persona)."""
    entropy = (seed, int(is_val), index) + ((who.seed_salt,) if who.seed_salt else ())
    rng = np.random.default_rng(entropy)
    low, high = words_per_segment
    sentence = " ".join(str(word) for word in rng.choice(WORDS, size=int(rng.integers(low, high + 1))))
    symbols, seconds, frames = _timeline(sentence, rng)

    sample_starts, sample_counts = _spans(seconds, SAMPLE_RATE)
    actor = _speech(symbols, sample_starts, sample_counts, who, rng) + rng.normal(0.0, 3e-4, frames * SAMPLES_PER_FRAME)
    participant = rng.normal(0.0, 3e-4, frames * SAMPLES_PER_FRAME)

    controls = _mouth_controls(symbols, seconds, frames, who.jaw_scale, rng)
    face_mix = who.face_mix()
    mixed = controls @ face_mix + rng.normal(0.0, 0.02, (frames, face_mix.shape[1]))

    token_counts = seconds_to_frames(seconds, TOKEN_FPS)
    actor_tokens = token_logits_from_durations(list(zip(symbols, token_counts)), TOKEN_FPS, rng, noise=0.5)
    participant_tokens = blank_token_logits(sum(token_counts), rng, noise=0.5)

    return SegmentStreams(
        sentence=sentence,
        audio=np.stack([actor, participant]).astype(np.float32),
        expression=np.concatenate([controls, mixed], axis=1).astype(np.float32),
        headpose=_headpose(actor, frames, who, rng),
        tokens=np.stack([actor_tokens, participant_tokens]),
        alignment=[(symbol, int(start), int(start + count))
                   for symbol, start, count in zip(symbols, sample_starts, sample_counts)],
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _save_json(path: Path, value: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def _remove_stale_segments(root: Path, keep: set[str]) -> None:
    """Delete segments that an earlier, larger demo corpus wrote here, so readers see only this one.

    Only names listed in that corpus's own transcripts file are touched: never data it did not write.
    """
    transcripts = root / TRANSCRIPTS
    if not transcripts.is_file():
        return
    try:
        previous = json.loads(transcripts.read_text())
    except json.JSONDecodeError:
        return
    if isinstance(previous, dict):
        for name in sorted(set(previous) - keep):
            for path in stream_paths(root, name).values():
                path.unlink(missing_ok=True)


def write_corpus(root: str | Path, cfg: CorpusConfig) -> list[str]:
    """Write the demo corpus of persona `cfg.identity` in the 50h layout under `root`; return the segment names,
    train then val.

    Each file is written atomically; `transcripts.json` ({segment: sentence}) and `alignments.json`
    ({segment: [[symbol, first sample, end sample], ...]} at 48 kHz) are written last.
    """
    if cfg.seed < 0:
        raise ValueError(f"corpus.seed: expected a non-negative integer, got {cfg.seed}")
    who = persona(cfg.identity)
    root = Path(root)
    transcripts, alignments = {}, {}
    for is_val, count in ((False, cfg.train_segments), (True, cfg.val_segments)):
        for index in range(count):
            name = segment_name(index, is_val)
            streams = synthesize_segment(cfg.seed, index, is_val, cfg.words_per_segment, who)
            paths = stream_paths(root, name)
            save_wav(paths["audio"], streams.audio, SAMPLE_RATE)
            _save_npy(paths["expression"], streams.expression)
            _save_npy(paths["headpose"], streams.headpose)
            _save_npy(paths["tokens"], streams.tokens)
            transcripts[name] = streams.sentence
            alignments[name] = [list(entry) for entry in streams.alignment]
    _remove_stale_segments(root, set(transcripts))
    _save_json(root / ALIGNMENTS, alignments)
    _save_json(root / TRANSCRIPTS, transcripts)
    return list(transcripts)
