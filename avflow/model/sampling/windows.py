"""How a sequence of any length is cut into windows, how their results are cross-faded back together, and the
noise a sequence starts from.

Every sequence is sampled as windows of at most `max_frames` that share one noise sequence, consecutive ones
overlapping by at least `overlap` frames; the last window is shifted back to end at the last frame, so no
window is short. The plan depends on the length only through that last window, so a stream that does not know
its length yet can sample every earlier window as soon as its input is there (`WindowPlan.regular_span`).
An optional shorter first window cuts the wait for the first output; the last window then never reaches back
into it past the overlap, so its frames are final as soon as it is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NOISE_BLOCK_FRAMES = 64  # noise is drawn in blocks of this many frames, so any prefix is the same at any length


@dataclass(frozen=True)
class WindowPlan:
    max_frames: int
    overlap: int
    first_frames: int | None = None  # a shorter first window (None: max_frames)

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.max_frames:
            raise ValueError(f"window overlap: expected 0 <= overlap < {self.max_frames} (the window), "
                             f"got {self.overlap}")
        if self.first_frames is not None and not self.overlap < self.first_frames <= self.max_frames:
            raise ValueError(f"first window: expected more than the overlap ({self.overlap} frames) and at most "
                             f"the window ({self.max_frames} frames), got {self.first_frames} frames")

    @property
    def first(self) -> int:
        return self.first_frames or self.max_frames

    @property
    def earliest_last_start(self) -> int:
        """How far back the shifted last window may start: not into a shorter first window past the overlap."""
        return self.first - self.overlap if self.first < self.max_frames else 0

    def regular_span(self, index: int) -> tuple[int, int]:
        """Window `index` of a sequence known to be longer than its end."""
        if index == 0:
            return 0, self.first
        start = self.first - self.overlap + (index - 1) * (self.max_frames - self.overlap)
        return start, start + self.max_frames

    def spans(self, frames: int) -> list[tuple[int, int]]:
        """Every window of a sequence of `frames` frames, in order."""
        if frames <= self.first:
            return [(0, frames)]
        last_start = max(frames - self.max_frames, self.earliest_last_start)
        spans, index = [], 0
        while True:
            start, end = self.regular_span(index)
            if start >= last_start:
                break
            spans.append((start, end))
            index += 1
        return spans + [(last_start, frames)]


def window_spans(frames: int, max_frames: int, overlap: int) -> list[tuple[int, int]]:
    """`WindowPlan(max_frames, overlap).spans(frames)`."""
    return WindowPlan(max_frames, overlap).spans(frames)


def window_weight(spans: list[tuple[int, int]], index: int) -> torch.Tensor:
    """Frame weights of window `index`: linear ramps across its overlaps with the previous and the next window
    (normalized by their sum when stitching, since the shifted last window can overlap two earlier ones).

    A window's weights before the next window's start do not depend on that window, which is what lets a
    stream weigh frames before it knows the next window."""
    start, end = spans[index]
    weight = torch.ones(end - start)
    if index > 0 and spans[index - 1][1] > start:
        shared = spans[index - 1][1] - start
        weight[:shared] = torch.arange(1, shared + 1) / (shared + 1)
    if index + 1 < len(spans) and spans[index + 1][0] < end:
        shared = end - spans[index + 1][0]
        weight[-shared:] = torch.minimum(weight[-shared:], torch.arange(shared, 0, -1) / (shared + 1))
    return weight


def crossfade_weights(spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """`window_weight` of every window."""
    return [window_weight(spans, index) for index in range(len(spans))]


def stitch(spans: list[tuple[int, int]], windows: list[torch.Tensor | None], first: int, last: int) -> torch.Tensor:
    """Frames [first, last) of the cross-fade of windows (N, end - start, D) placed at `spans`: (N, last - first, D).

    Only windows that overlap [first, last) are read (the others may be None); `spans` may end before the
    sequence does, as long as no window after it reaches back before `last`."""
    overlapping = [index for index, (start, end) in enumerate(spans) if start < last and end > first]
    reference = windows[overlapping[0]]
    out = reference.new_zeros(reference.shape[0], last - first, reference.shape[-1])
    total = reference.new_zeros(last - first)
    for index in overlapping:
        (start, end), window = spans[index], windows[index]
        lo, hi = max(start, first), min(end, last)
        part = window_weight(spans, index)[lo - start:hi - start].to(window)
        out[:, lo - first:hi - first] += window[:, lo - start:hi - start] * part.view(1, -1, 1)
        total[lo - first:hi - first] += part.to(total)
    return out / total.view(1, -1, 1)


def _sample_generator(seed: int, sample: int) -> torch.Generator:
    """An independent random stream per (seed, sample), so sample i does not depend on how many are drawn."""
    state = np.random.SeedSequence((seed, sample)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class NoiseStream:
    """The unit noise of one input's samples, drawn block by block as frames are needed: frames [0, T) are the
    same whatever T is and however they were asked for, so a stream and a whole-sequence sampler agree."""

    def __init__(self, seed: int, samples: int, dim: int):
        self.generators = [_sample_generator(seed, sample) for sample in range(samples)]
        self.dim = dim
        self.blocks: list[torch.Tensor] = []  # (samples, NOISE_BLOCK_FRAMES, dim) each

    def frames(self, first: int, last: int) -> torch.Tensor:
        """Noise of frames [first, last): (samples, last - first, dim), float32 on the CPU."""
        while len(self.blocks) * NOISE_BLOCK_FRAMES < last:
            self.blocks.append(torch.stack([torch.randn(NOISE_BLOCK_FRAMES, self.dim, generator=generator)
                                            for generator in self.generators]))
        lo, hi = first // NOISE_BLOCK_FRAMES, -(-last // NOISE_BLOCK_FRAMES)
        offset = lo * NOISE_BLOCK_FRAMES
        return torch.cat(self.blocks[lo:hi], dim=1)[:, first - offset:last - offset]


def sequence_noise(seed: int, samples: int, frames: int, dim: int) -> torch.Tensor:
    """Unit noise (samples, frames, dim) of one input: `NoiseStream` read whole."""
    return NoiseStream(seed, samples, dim).frames(0, frames)
