"""How a sequence is sampled, in one place: the methods and their time grids, the fixed-step loop, the window
plan and cross-fade, the noise, the batched scheduler and the streaming sampler (inference replays the loop as
CUDA graphs: avflow.infer.sampler).

Generation, batch inference, export, evaluation and training validation all sample through here, with one
`SampleConfig`.
"""

from avflow.model.sampling.methods import (
    METHODS,
    FixedStepSampler,
    Guided,
    PreparedVelocity,
    SamplingMethod,
    VelocityFn,
    guided,
    integrate,
    sampling_method,
)
from avflow.model.sampling.scheduler import (
    LoopFn,
    WindowMap,
    bucket_for,
    length_buckets,
    row_buckets,
    sample_sequence,
    sample_sequences,
    sample_windows,
)
from avflow.model.sampling.streaming import FinalFrames, StreamSampler
from avflow.model.sampling.windows import (
    NOISE_BLOCK_FRAMES,
    NoiseStream,
    WindowPlan,
    crossfade_weights,
    sequence_noise,
    stitch,
    window_spans,
)

__all__ = [
    "METHODS", "NOISE_BLOCK_FRAMES", "FinalFrames", "FixedStepSampler", "Guided", "LoopFn",
    "NoiseStream", "PreparedVelocity", "SamplingMethod", "StreamSampler", "VelocityFn", "WindowMap", "WindowPlan",
    "bucket_for",
    "crossfade_weights", "guided", "integrate", "length_buckets", "row_buckets",
    "sample_sequence", "sample_sequences", "sample_windows", "sampling_method", "sequence_noise", "stitch",
    "window_spans",
]
