"""Streaming generation: speech and avatar motion out while the input is still arriving, with bounded latency.

`InferenceModel.stream(...)` returns a `Stream`: an iterator of `StreamChunk`s, each holding what became final
since the last one: mel frames, their audio, 30 fps expression codes and head poses, and with a face decoder
the rendered frames. The sequence is sampled by `avflow.model.sampling.StreamSampler` on the windows, noise
and cross-fade `generate` uses, so with the whole input known at the start and the same seed and windows, the
mel, expression codes and head poses are `generate`'s. Around it, per chunk:

- audio: BigVGAN is convolutional, so a chunk vocoded with BIGVGAN_CONTEXT_FRAMES of mel on both sides is the
  whole mel's audio; Griffin-Lim chunks get context on both sides too and continue the audio already out
  (its phases are kept, not started afresh);
- head pose: the head VAE's decoder attends over every frame it is given, so each window's head latents are
  decoded together as soon as the window is sampled and the poses cross-faded with the states
  (`avflow.model.state.StateDecoder`, as `generate` decodes them): final with their states;
- motion: resampled to 30 fps exactly as `write_outputs` does, each 30 fps frame once both of its mel-rate
  neighbours are final.

Inputs arrive as `Piece`s of per-frame conditioning (avflow.infer.stream_inputs); the audio of each chunk comes
from avflow.vocoder.chunked. An input that stops arriving (a closed pipe, an interrupted read) ends the stream
with everything produced so far.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch

from avflow.config import SampleConfig
from avflow.data.features import FrameResampler
from avflow.infer.stream_inputs import Piece, audio_pieces, line_pieces, text_pieces, token_pieces
from avflow.model.sampling import NoiseStream, StreamSampler, WindowPlan, bucket_for, sample_windows
from avflow.vocoder.chunked import MIN_AUDIO_CHUNK_FRAMES, ChunkVocoder
from avflow.vocoder.vocode import vocode

if TYPE_CHECKING:
    from avflow.infer.model import InferenceModel
    from avflow.model.state import StateDecoder
    from avflow.render import CodecAvatar, FaceDecoder

log = logging.getLogger(__name__)

STREAM_WINDOW_SECONDS = 2.0  # windows sized for latency: the first audio waits for one window
STREAM_OVERLAP_SECONDS = 0.25
FIRST_AUDIO_FRAMES = 32  # the first audio chunk is vocoded alone and sent, the rest of its frames right after
VISUAL_OUTPUT_FPS = 30.0


@dataclass
class StreamChunk:
    """What became final: mel frames from `mel_start`, audio samples from `audio_start`, 30 fps motion (and
    rendered frames) from `motion_start`. Any of them may be empty."""

    index: int
    mel_start: int
    mel: np.ndarray  # (frames, n_mels) natural-log mel
    audio_start: int
    audio: np.ndarray  # (samples,) float32 in [-1, 1]
    motion_start: int
    expression: np.ndarray  # (frames_30, expression_dim)
    head_pose: np.ndarray  # (frames_30, 7)
    frames: np.ndarray | None  # (frames_30, H, W, 3) uint8 with a face decoder
    emitted_s: float  # since the stream started (or, fed in real time, since its first input arrived)
    latency_s: float  # since the input it depends on had arrived


def stream_sample_config(sample_cfg: SampleConfig, frame_rate: float, windows_given: bool) -> SampleConfig:
    """One sample per stream; windows of STREAM_WINDOW_SECONDS unless sample.max_frames/window_overlap were given."""
    cfg = dataclasses.replace(sample_cfg, num_samples=1)
    if not windows_given:
        cfg.max_frames = round(STREAM_WINDOW_SECONDS * frame_rate)
        cfg.window_overlap = round(STREAM_OVERLAP_SECONDS * frame_rate)
    return cfg


def motion_frames_30(frames: int, frame_rate: float) -> int:
    """30 fps frames of `frames` mel frames, as `write_outputs` counts them."""
    return max(1, round(frames / frame_rate * VISUAL_OUTPUT_FPS))


class Stream:
    """An iterator of StreamChunks for one input; see the module docstring. After (or while) iterating,
    `summary()` gives the latencies and the real-time factor, `skipped` the lines that could not be spoken and
    `interrupted` why the input stopped early, if it did."""

    def __init__(self, model: InferenceModel, pieces: Iterable[Piece], sample_cfg: SampleConfig,
                 first_window_s: float | None = None, face_decoder: FaceDecoder | CodecAvatar | None = None,
                 realtime: bool = False, skipped: list[dict] | None = None, preparation_s: float = 0.0):
        self.model, self.pieces, self.cfg = model, pieces, sample_cfg
        frame_rate = model.cfg.mel.frame_rate
        first = None if first_window_s is None else round(first_window_s * frame_rate)
        if first is not None and first >= sample_cfg.max_frames:
            first = None  # a first window as long as the others is no shorter
        self.plan = WindowPlan(sample_cfg.max_frames, sample_cfg.window_overlap, first)
        self.face_decoder, self.realtime = face_decoder, realtime
        self.skipped = skipped if skipped is not None else []
        self.interrupted: str | None = None
        self.chunks: list[dict] = []
        self.waited = 0.0
        self.finished_at: float | None = None
        self._arrivals: list[tuple[int, float]] = []  # (input frames received, when) after each piece
        self.runner, _, self.buckets, _, row_counts = model.sampler(sample_cfg)
        self.decoder = model.state_decoder
        self.rows = min(row_counts)
        self._warm_up()
        # the clock runs from the request: work done on the input before the stream opened (text timing) counts
        self.started = self.reference = time.perf_counter() - preparation_s
        self._iterator = self._run()

    def _sample_window(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        jobs = [(noise.to(self.model.device), cond.to(self.model.device))]
        states = sample_windows(self.runner, jobs, bucket_for(cond.shape[0], self.buckets), self.rows)[0]
        return self.decoder.with_poses(states)

    def _warm_up(self) -> None:
        """Run every window shape and the vocoder once before the clock starts: the first call of a shape pays
        for lazy set-up (kernels, attention tiles) that a loaded, serving model has behind it."""
        state_dim, cond_dim = self.model.cfg.model.state_dim, self.model.cfg.model.cond_dim
        for length in self.buckets:
            self._sample_window(torch.zeros(1, length, state_dim), torch.zeros(length, cond_dim))
        mel = np.full((2 * MIN_AUDIO_CHUNK_FRAMES, self.model.cfg.mel.n_mels), -5.0, np.float32)
        vocode(torch.from_numpy(mel), self.model.vocoder, self.model.cfg.mel)

    def __iter__(self) -> Iterator[StreamChunk]:
        return self._iterator

    def __next__(self) -> StreamChunk:
        return next(self._iterator)

    def _pieces(self) -> Iterator[Piece]:
        """The input's pieces until it ends or stops arriving, timing the wait for each."""
        iterator = iter(self.pieces)
        while True:
            asked = time.perf_counter()
            try:
                piece = next(iterator)
            except StopIteration:
                return
            except (OSError, EOFError) as error:
                self.interrupted = f"{type(error).__name__}: {error}"
                log.warning("the input stopped arriving (%s); ending the stream with what arrived", self.interrupted)
                return
            finally:
                self.waited += time.perf_counter() - asked
            yield piece

    def _run(self) -> Iterator[StreamChunk]:
        model, cfg = self.model, self.cfg
        noise = NoiseStream(cfg.seed, 1, model.cfg.model.state_dim)
        sampler = StreamSampler(self._sample_window, self.plan, noise, cfg.temperature)
        self.state = _Outputs(model, self.decoder, self.face_decoder)
        limit = math.floor(cfg.max_input_seconds * model.cfg.mel.frame_rate)
        for piece in self._pieces():
            if not self._arrivals and self.realtime:
                self.reference = piece.arrived
            if sampler.frames + piece.cond.shape[0] > limit:
                yield from self._emit(sampler.end_utterance(), sampler, utterance_ended=True)
                yield from self._emit(iter(()), sampler, utterance_ended=True, complete=True)
                self.finished_at = time.perf_counter()
                seconds = sampler.frames / model.cfg.mel.frame_rate
                raise ValueError(f"input: longer than sample.max_input_seconds={cfg.max_input_seconds:g} "
                                 f"(--max-input-seconds); the stream stopped after {seconds:.1f} s of input, with "
                                 "everything before it written")
            self._arrivals.append((sampler.frames + piece.cond.shape[0], piece.arrived))
            yield from self._emit(sampler.push(torch.from_numpy(np.ascontiguousarray(piece.cond, np.float32))),
                                  sampler)
            if piece.ends:
                yield from self._emit(sampler.end_utterance(), sampler, utterance_ended=True)
        yield from self._emit(sampler.end_utterance(), sampler, utterance_ended=True)
        yield from self._emit(iter(()), sampler, utterance_ended=True, complete=True)
        self.finished_at = time.perf_counter()

    def _emit(self, finals, sampler: StreamSampler, utterance_ended: bool = False,
              complete: bool = False) -> Iterator[StreamChunk]:
        for final in finals:
            yield from self._chunks(self.state.add(final.states[0].float().cpu(), edge=False), sampler, False)
        if utterance_ended:
            yield from self._chunks(self.state.add(None, edge=True, complete=complete), sampler, True)

    def _chunks(self, chunk: StreamChunk | None, sampler: StreamSampler, edge: bool) -> Iterator[StreamChunk]:
        if chunk is not None:
            yield self._stamp(chunk, sampler)
        while (extra := self.state.more_audio(edge)) is not None:
            yield self._stamp(extra, sampler)

    def _stamp(self, chunk: StreamChunk, sampler: StreamSampler) -> StreamChunk:
        now = time.perf_counter()
        chunk.index = len(self.chunks)
        chunk.emitted_s = now - self.reference
        needed = min(sampler.frames, chunk.mel_start + chunk.mel.shape[0] + self.plan.max_frames)
        position = bisect.bisect_left([frames for frames, _ in self._arrivals], needed)
        arrived = self._arrivals[min(position, len(self._arrivals) - 1)][1] if self._arrivals else self.started
        chunk.latency_s = now - max(arrived, self.reference)
        self.chunks.append({"emitted_s": chunk.emitted_s, "latency_s": chunk.latency_s,
                            "audio_start": int(chunk.audio_start), "audio_samples": int(chunk.audio.size),
                            "motion_frames": int(chunk.expression.shape[0])})
        return chunk

    def summary(self) -> dict:
        """first_audio_s, first_motion_s, chunk latency percentiles and the real-time factor (compute time over
        the audio's duration, time spent waiting for input excluded)."""
        sample_rate = self.model.cfg.mel.sample_rate
        first_audio = next((c["emitted_s"] for c in self.chunks if c["audio_samples"]), None)
        first_motion = next((c["emitted_s"] for c in self.chunks if c["motion_frames"]), None)
        latencies = np.array([c["latency_s"] for c in self.chunks]) if self.chunks else np.zeros(1)
        audio_seconds = sum(c["audio_samples"] for c in self.chunks) / sample_rate
        compute = (self.finished_at or time.perf_counter()) - self.started - self.waited
        # played from the first audio on without a pause, each chunk is due when the audio before it has played
        stall = 0.0
        for chunk in self.chunks:
            if chunk["audio_samples"] and first_audio is not None:
                due = first_audio + stall + chunk["audio_start"] / sample_rate
                stall += max(0.0, chunk["emitted_s"] - due)
        return {
            "first_audio_s": first_audio, "first_motion_s": first_motion,
            "chunk_latency_s": {name: float(np.percentile(latencies, q))
                                for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "real_time_factor": compute / audio_seconds if audio_seconds else None,
            "playback_stall_s": stall,
            "audio_seconds": audio_seconds, "compute_seconds": compute, "chunks": len(self.chunks),
            "window_frames": self.plan.max_frames, "overlap_frames": self.plan.overlap,
            "first_window_frames": self.plan.first, "nfe": self.cfg.nfe, "method": self.cfg.method,
            "vocoder": "bigvgan" if self.model.vocoder is not None else "griffin-lim",
            "realtime": self.realtime, "measured_from": "first input" if self.realtime else "start",
            "skipped_lines": self.skipped, "interrupted": self.interrupted, "device": str(self.model.device),
        }


class _Rows:
    """An (n, width) float32 array that rows are appended to in amortized constant time."""

    def __init__(self, width: int):
        self.data = np.zeros((1024, width), np.float32)
        self.size = 0

    def append(self, rows: np.ndarray) -> None:
        needed = self.size + rows.shape[0]
        if needed > self.data.shape[0]:
            grown = np.zeros((max(needed, 2 * self.data.shape[0]), self.data.shape[1]), np.float32)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:needed] = rows
        self.size = needed

    @property
    def rows(self) -> np.ndarray:
        return self.data[:self.size]


class _Outputs:
    """The final frames so far, decoded, vocoded, resampled to 30 fps and rendered chunk by chunk."""

    def __init__(self, model: InferenceModel, decoder: StateDecoder, face_decoder):
        self.model, self.decoder, self.face_decoder = model, decoder, face_decoder
        self.vocoder = ChunkVocoder(model.vocoder, model.cfg.mel)
        self.motion = FrameResampler(model.cfg.mel.frame_rate, VISUAL_OUTPUT_FPS)
        self.mel = _Rows(model.cfg.model.mel_dim)
        self.expression = _Rows(model.cfg.model.expression_dim)
        self.pose = _Rows(model.cfg.head_vae.pose_dim)
        self.audio_done = 0

    def add(self, states: torch.Tensor | None, edge: bool, complete: bool = False) -> StreamChunk | None:
        model = self.model
        mel_start = self.mel.size
        if states is not None:
            parts = self.decoder(states[None])
            self.mel.append(parts.mel[0])
            self.expression.append(parts.expression[0])
            self.pose.append(parts.head_pose[0])
        final = self.mel.size
        if final == 0:
            return None
        first = FIRST_AUDIO_FRAMES if self.vocoder.done == 0 else None
        audio = self.vocoder.audio(self.mel.rows, edge, first)
        motion_start = self.motion.done
        total = motion_frames_30(final, model.cfg.mel.frame_rate)
        count = total if complete else min(self.motion.ready(final), total)
        expression, pose = self.motion.frames([self.expression.rows, self.pose.rows], final, count)
        if not (final - mel_start or audio.size or expression.shape[0]):
            return None
        frames = None
        if self.face_decoder is not None and expression.shape[0]:
            from avflow.infer.outputs import render_frames

            frames = render_frames(self.face_decoder, expression, pose)
        chunk = StreamChunk(0, mel_start, self.mel.rows[mel_start:].copy(), self.audio_done, audio, motion_start,
                            expression, pose, frames, 0.0, 0.0)
        self.audio_done += audio.size
        return chunk

    def more_audio(self, edge: bool) -> StreamChunk | None:
        """The audio `add` held back after a short first chunk, as a chunk of its own."""
        audio = self.vocoder.audio(self.mel.rows, edge)
        if not audio.size:
            return None
        empty = np.zeros((0, self.expression.data.shape[1]), np.float32)
        chunk = StreamChunk(0, self.mel.size, self.mel.rows[:0].copy(), self.audio_done, audio, self.motion.done,
                            empty, np.zeros((0, self.pose.data.shape[1]), np.float32), None, 0.0, 0.0)
        self.audio_done += audio.size
        return chunk


def open_stream(model: InferenceModel, text: str | None = None, *, lines: Iterable[str] | None = None,
                tokens: np.ndarray | None = None, audio: str | Path | None = None,
                participant_tokens: np.ndarray | None = None, participant_features: np.ndarray | None = None,
                realtime: bool = False, asr_model: str | Path | None = None, rate: float = 1.0,
                pause_scale: float = 1.0, sample_cfg: SampleConfig | None = None, first_window_s: float | None = None,
                face_decoder: FaceDecoder | CodecAvatar | None = None) -> Stream:
    """`InferenceModel.stream`: exactly one of text (whole), lines (an iterable of text lines, each spoken as it
    arrives), tokens ((T, 29) logits at the mel frame rate) or audio (a speech file, with asr_model)."""
    given = [name for name, value in (("text", text), ("lines", lines), ("tokens", tokens), ("audio", audio))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"stream: expected exactly one of text, lines, tokens or audio, got {given or 'none'}")
    dyadic = model.cfg.model.dyadic
    if dyadic and (participant_tokens is None or participant_features is None or text is not None
                   or lines is not None or audio is not None):
        raise ValueError("this is a dyadic model: stream it tokens with the participant's tokens and SMIRK features")
    frame_rate = model.cfg.mel.frame_rate
    if sample_cfg is None:
        sample_cfg = stream_sample_config(model.cfg.sample, frame_rate, windows_given=False)
    sample_cfg = dataclasses.replace(sample_cfg, num_samples=1)
    skipped: list[dict] = []
    requested = time.perf_counter()
    if text is not None:
        pieces = text_pieces(model, text, rate, pause_scale)
    elif lines is not None:
        pieces = line_pieces(model, lines, skipped, rate, pause_scale)
    elif tokens is not None:
        pieces = token_pieces(model, tokens, realtime, participant_tokens, participant_features)
    else:
        pieces = audio_pieces(model, audio, asr_model, realtime)
    return Stream(model, pieces, sample_cfg, first_window_s, face_decoder, realtime, skipped,
                  preparation_s=time.perf_counter() - requested)
