"""Streaming: one input whose conditioning arrives in pieces, sampled window by window as its input arrives,
yielding each frame as soon as no later window can change it.

The windows are those `WindowPlan.spans` gives the whole sequence, the noise is the input's `NoiseStream`,
and the cross-fade is `stitch`'s, so with the same seed and plan the streamed frames are the frames a
whole-sequence sampler produces. While the input is still arriving its length is unknown: a window is sampled
once all of its input is there, and a frame is final once every window over it is sampled and the shifted
last window, which starts at most `max_frames` before the end, cannot reach it. An utterance that ends (a
line of text, the end of the input) is finished at once: its last window is planned and sampled, and the
next utterance starts after it with its own windows, on the same noise sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from avflow.model.sampling.windows import NoiseStream, WindowPlan, stitch

# noise (N, frames, D), already temperature-scaled, and cond (frames, C) of one window -> its samples (N, frames, D)
WindowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FinalFrames:
    """Frames [start, start + states.shape[1]) of the whole stream, which no later window changes."""

    start: int
    states: torch.Tensor  # (N, frames, D)


class StreamSampler:
    """`push` conditioning as it arrives and `end_utterance` when an utterance is complete; both yield the
    frames that became final, in order and without gaps."""

    def __init__(self, sample_window: WindowFn, plan: WindowPlan, noise: NoiseStream, temperature: float):
        self.sample_window = sample_window
        self.plan = plan
        self.noise = noise
        self.temperature = temperature
        self.offset = 0  # where the current utterance starts in the stream
        self._start_utterance()

    def _start_utterance(self) -> None:
        self.buffer: torch.Tensor | None = None  # conditioning of the utterance, grown by doubling
        self.arrived = 0
        self.ended = False
        self.spans: list[tuple[int, int]] = []
        self.windows: list[torch.Tensor | None] = []  # None once every frame it covers is emitted
        self.emitted = 0

    @property
    def frames(self) -> int:
        """Frames of input received so far, over every utterance."""
        return self.offset + self.arrived

    def push(self, cond: torch.Tensor) -> Iterator[FinalFrames]:
        """Append conditioning frames (frames, C) to the current utterance."""
        if cond.shape[0]:
            needed = self.arrived + cond.shape[0]
            if self.buffer is None or needed > self.buffer.shape[0]:
                grown = cond.new_empty(max(needed, 2 * (0 if self.buffer is None else self.buffer.shape[0])),
                                       cond.shape[1])
                if self.buffer is not None:
                    grown[:self.arrived] = self.buffer[:self.arrived]
                self.buffer = grown
            self.buffer[self.arrived:needed] = cond
            self.arrived = needed
        yield from self._advance()

    def end_utterance(self) -> Iterator[FinalFrames]:
        """The current utterance is complete: sample its remaining windows, emit every frame, start the next."""
        self.ended = True
        yield from self._advance()
        self.offset += self.arrived
        self._start_utterance()

    def _planned(self) -> list[tuple[int, int]]:
        planned = self.plan.spans(self.arrived) if self.arrived else []
        if planned[:len(self.spans)] != self.spans:
            raise AssertionError(f"streamed windows {self.spans} are not the plan's {planned}")
        return planned

    def _next_span(self) -> tuple[int, int] | None:
        index = len(self.spans)
        if self.ended:
            planned = self._planned()
            return planned[index] if index < len(planned) else None
        start, end = self.plan.regular_span(index)
        return (start, end) if end <= self.arrived else None

    def _frontier(self) -> int:
        """Frames before this are final."""
        if self.ended:
            planned = self._planned()
            return planned[len(self.spans)][0] if len(self.spans) < len(planned) else self.arrived
        next_start = self.plan.regular_span(len(self.spans))[0]
        last_start_at_least = max(self.arrived - self.plan.max_frames, self.plan.earliest_last_start)
        return max(0, min(next_start, last_start_at_least))

    def _advance(self) -> Iterator[FinalFrames]:
        while (span := self._next_span()) is not None:
            start, end = span
            noise = self.temperature * self.noise.frames(self.offset + start, self.offset + end)
            self.windows.append(self.sample_window(noise, self.buffer[start:end]))
            self.spans.append(span)
            yield from self._emit()
        yield from self._emit()

    def _emit(self) -> Iterator[FinalFrames]:
        frontier = self._frontier()
        if frontier <= self.emitted:
            return
        states = stitch(self.spans, self.windows, self.emitted, frontier)
        yield FinalFrames(self.offset + self.emitted, states)
        self.emitted = frontier
        self.windows = [None if end <= frontier else window for (_, end), window in zip(self.spans, self.windows)]
