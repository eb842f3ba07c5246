"""Text-to-tokens network pieces: duration rounding, length regulation, the decoder's sampler."""

import numpy as np
import pytest
import torch

from avflow.config import Text2TokensConfig
from avflow.model.text2tokens import TextToTokensNet, length_regulate, round_durations, sample_tokens


def test_ceil_rounding_rounds_every_duration_up():
    assert round_durations(np.log([1.4, 2.0, 0.2]), 1.0, "ceil").tolist() == [2, 2, 1]


def test_cumulative_rounding_keeps_the_total():
    # Cumulative ends 1.4, 2.8, 4.2 round to 1, 3, 4: durations 1, 2, 1, total round(4.2) = 4 (ceil would give 6).
    assert round_durations(np.log([1.4, 1.4, 1.4]), 1.0, "cumulative").tolist() == [1, 2, 1]
    # Halving the rate doubles every duration first: ends 2.8, 5.6, 8.4 -> 3, 6, 8.
    assert round_durations(np.log([1.4, 1.4, 1.4]), 2.0, "cumulative").tolist() == [3, 3, 2]


@pytest.mark.parametrize("seed", range(5))
def test_cumulative_total_is_the_rounded_sum_with_a_frame_per_symbol(seed):
    frames = np.random.default_rng(seed).uniform(0.05, 12.0, size=40)
    durations = round_durations(np.log(frames), 1.0, "cumulative")
    assert durations.min() >= 1
    assert durations.sum() == max(round(frames.sum()), len(frames))


def test_tiny_durations_still_get_one_frame_each():
    assert round_durations(np.log([0.1, 0.1, 0.1]), 1.0, "cumulative").tolist() == [1, 1, 1]


def test_length_regulation_repeats_each_symbol_over_its_span():
    encoding = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [0.0]]])
    cond, valid = length_regulate(encoding, torch.tensor([[2, 0, 1], [1, 1, 0]]))
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    assert cond[0, :, 0].tolist() == [1.0, 1.0, 3.0]
    assert cond[0, :, 1].tolist() == [0.25, 0.75, 0.5]  # centre of each frame within its span
    assert cond[0, :, 2].tolist() == pytest.approx([np.log(2) / 4, np.log(2) / 4, 0.0])
    assert cond[1, :2, 0].tolist() == [4.0, 5.0] and cond[1, 2].abs().sum() == 0


def test_euler_sampler_integrates_a_constant_velocity_from_scaled_noise():
    net = TextToTokensNet(Text2TokensConfig(d_model=8, encoder_layers=1, n_heads=2, ffn_hidden=8, decoder_layers=1,
                                            duration_hidden=8), vocab_size=5)
    velocity = torch.arange(29, dtype=torch.float32)
    net.decode = lambda x, t, cond, valid: velocity.expand_as(x)
    cond, valid = torch.zeros(1, 4, 10), torch.ones(1, 4, dtype=torch.bool)
    out = sample_tokens(net, cond, valid, "flow", 10, 0.5, torch.Generator().manual_seed(3))
    noise = torch.randn((1, 4, 29), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, 0.5 * noise + velocity, atol=1e-5)
    regressed = sample_tokens(net, cond, valid, "regression", 10, 0.5)
    assert torch.equal(regressed, velocity.expand(1, 4, 29))
