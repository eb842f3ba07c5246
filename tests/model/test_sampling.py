"""The sampling module: methods on known ODEs, the fixed-step loop, the CUDA-graph runner (and its eager fallback),
windows, noise and buckets."""

import math

import numpy as np
import pytest
import torch
from helpers import TINY_NETWORK as TINY

from avflow.config import ModelConfig, SampleConfig
from avflow.model.sampling import (
    METHODS,
    FixedStepSampler,
    NoiseStream,
    PreparedVelocity,
    SamplingMethod,
    StreamSampler,
    WindowPlan,
    bucket_for,
    crossfade_weights,
    guided,
    integrate,
    length_buckets,
    sample_sequence,
    sample_sequences,
    sampling_method,
    sequence_noise,
    stitch,
    window_spans,
)


def test_length_buckets_round_windows_up():
    assert length_buckets(1725, 4) == [432, 863, 1294, 1725]
    assert length_buckets(10, 1) == [10]
    assert bucket_for(433, [432, 863]) == 863 and bucket_for(432, [432, 863]) == 432
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket_for(900, [432, 863])


def test_padded_and_batched_windows_equal_each_input_alone(tiny_net):
    """Inputs of different lengths share padded bucket batches (extra rows too): each result equals sampling
    that input alone at its own length, because padded frames are masked out of attention."""
    loop = FixedStepSampler(tiny_net, "euler", 3)
    lengths = [17, 40, 33]
    conds = [torch.randn(n, TINY.cond_dim) for n in lengths]
    noises = [torch.randn(2, n, TINY.state_dim) for n in lengths]
    batched = sample_sequences(loop, conds, noises, max_frames=40, overlap=8, buckets=[20, 40], max_rows=6,
                               row_counts=[6])
    for cond, noise, out in zip(conds, noises, batched):
        alone = loop(noise, cond.expand(2, -1, -1), torch.ones(2, cond.shape[0], dtype=torch.bool))
        torch.testing.assert_close(out, alone, atol=1e-4 * alone.abs().max().item(), rtol=1e-4)


def test_windowed_sampling_of_a_frame_local_field_equals_one_pass():
    """A velocity that depends only on its own frame gives the same samples whether the sequence is cut into
    windows or not: the windows share one noise sequence, so the cross-fade can add no seam."""
    local = lambda x, t, c, valid: torch.tanh(c.sum(-1, keepdim=True)) - 0.5 * x  # noqa: E731
    loop = FixedStepSampler(local, "euler", 4)
    cond, noise = torch.randn(250, 3), torch.randn(2, 250, 5)
    one_pass = sample_sequences(loop, [cond], [noise], 1725, 10, [1725], max_rows=2)[0]
    windowed = sample_sequences(loop, [cond], [noise], 60, 10, [30, 60], max_rows=4)[0]
    assert windowed.shape == (2, 250, 5)
    torch.testing.assert_close(windowed, one_pass, atol=1e-6, rtol=1e-6)


def test_head_poses_are_decoded_per_sampled_window_and_cross_faded():
    """StateDecoder.with_poses as the window map: an input of one window gets the head VAE's decode of all of its
    latents together; a longer one, outside the overlaps, the decode of its own window's latents alone, and in
    an overlap a pose between its two windows' (the decoder attends across every frame it is given, so the
    whole-sequence decode differs)."""
    from avflow.config import HeadVAEConfig
    from avflow.model.head_vae import HeadVAE, PoseDecoder
    from avflow.model.state import StateCodec, StateDecoder

    model_cfg = ModelConfig()
    codec = StateCodec(torch.zeros(model_cfg.expression_dim), torch.ones(model_cfg.expression_dim), -5.0, 2.0,
                       model_cfg)
    torch.manual_seed(5)
    vae = HeadVAE(HeadVAEConfig(ffn_hidden=32, dropout=0.0)).eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.mul_(3.0)  # attention that depends strongly on which frames are decoded together
    poses = PoseDecoder(vae, torch.zeros(7), torch.ones(7))
    decoder = StateDecoder(codec, poses)
    drift = lambda x, t, c, valid: torch.tanh(c.sum(-1, keepdim=True)) - x  # noqa: E731
    loop = FixedStepSampler(drift, "euler", 2)
    cond = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 100, model_cfg.state_dim, generator=torch.Generator().manual_seed(1))
    latent_of = lambda states: codec.decode(states)["head_latent"]  # noqa: E731

    short = sample_sequences(loop, [cond[:40]], [noise[:, :40]], 40, 8, [40], 1, window_map=decoder.with_poses)[0]
    states = sample_sequences(loop, [cond[:40]], [noise[:, :40]], 40, 8, [40], 1)[0]
    torch.testing.assert_close(decoder(short).head_pose, poses(latent_of(states)).numpy(), rtol=0, atol=1e-6)

    generated = decoder(sample_sequences(loop, [cond], [noise], 40, 8, [40], 1, window_map=decoder.with_poses)[0])
    alone = [poses(latent_of(loop(noise[:, a:b], cond[None, a:b], torch.ones(1, b - a, dtype=torch.bool))))[0].numpy()
             for a, b in [(0, 40), (32, 72), (60, 100)]]  # the plan's windows of 100 frames
    pose = generated.head_pose[0]
    np.testing.assert_allclose(pose[:32], alone[0][:32], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pose[40:60], alone[1][8:28], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pose[72:], alone[2][12:], atol=1e-5, rtol=0)
    low, high = np.minimum(alone[0][32:], alone[1][:8]), np.maximum(alone[0][32:], alone[1][:8])
    assert np.all((pose[32:40] >= low - 1e-5) & (pose[32:40] <= high + 1e-5))
    stitched = sample_sequences(loop, [cond], [noise], 40, 8, [40], 1)[0]
    assert np.abs(pose - poses(latent_of(stitched))[0].numpy()).max() > 1e-2


def test_fixed_step_sampler_scripts_to_the_same_function(tiny_net):
    """The TorchScript form of the loop (around a traced network) computes what the eager loop does."""
    x0, cond = torch.randn(2, 24, TINY.state_dim), torch.randn(2, 24, TINY.cond_dim)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, 20:] = False
    traced = torch.jit.trace(tiny_net, (x0, torch.rand(2), cond, valid), check_trace=False)
    scripted = torch.jit.script(FixedStepSampler(traced, "midpoint", 4))
    eager = FixedStepSampler(tiny_net, "midpoint", 4)
    torch.testing.assert_close(scripted(x0, cond, valid)[:, :20], eager(x0, cond, valid)[:, :20])


def test_compiled_network_generates_what_the_eager_network_generates(tmp_path):
    import numpy as np
    from helpers import tiny_model_file

    from avflow.infer.generate import generate_batch
    from avflow.infer.model import load_inference_model

    path = tiny_model_file(tmp_path / "tiny.safetensors", ["sample.max_frames=48", "sample.window_overlap=8"])
    conds = [np.random.default_rng(0).standard_normal((40, 29)).astype(np.float32)]
    eager = generate_batch(load_inference_model(path, "cpu"), conds)[0]
    compiled_model = load_inference_model(path, "cpu", compile_network=True)
    compiled = generate_batch(compiled_model, conds)[0]
    assert all(runner.loop.velocity.compiled_forward is not None for runner in compiled_model.samplers.values())
    np.testing.assert_allclose(compiled.mel, eager.mel, atol=1e-3)


NO_COND = torch.zeros(1, 1, 0)  # the fields below take no conditioning


def test_euler_and_midpoint_on_dx_dt_equals_x():
    """dx/dt = x from t=0 to 1: Euler gives (1 + h)^n, midpoint (1 + h + h^2/2)^n."""
    x0 = torch.ones(1, 1, 1)
    linear = lambda x, t, cond, valid: x  # noqa: E731
    euler = integrate(linear, x0, NO_COND, None, "euler", 8)
    midpoint = integrate(linear, x0, NO_COND, None, "midpoint", 8)  # 4 steps of h = 1/4
    assert math.isclose(euler.item(), (1 + 1 / 8) ** 8, rel_tol=1e-6)
    assert math.isclose(midpoint.item(), (1 + 0.25 + 0.25 ** 2 / 2) ** 4, rel_tol=1e-6)
    assert abs(midpoint.item() - math.e) < abs(euler.item() - math.e)


def test_samplers_are_exact_on_time_dependent_velocity_where_expected():
    """v = 2t: exact x1 = x0 + 1. Midpoint is exact for linear-in-t fields, Euler is off by h."""
    x0 = torch.zeros(1, 1, 1)
    field = lambda x, t, cond, valid: 2 * t.view(-1, 1, 1).expand_as(x)  # noqa: E731
    assert math.isclose(integrate(field, x0, NO_COND, None, "midpoint", 16).item(), 1.0, rel_tol=1e-6)
    assert math.isclose(integrate(field, x0, NO_COND, None, "euler", 16).item(), 1.0 - 1 / 16, rel_tol=1e-6)


def test_sample_sequence_draws_n_samples_of_one_input():
    cond = torch.randn(7, 3)
    pull_to_cond = lambda x, t, cond, valid: cond.sum(-1, keepdim=True).expand_as(x)  # noqa: E731
    cfg = SampleConfig(num_samples=3, nfe=4)
    out = sample_sequence(pull_to_cond, cond, 5, cfg, seed=0)
    assert out.shape == (3, 7, 5)
    # each sample = its own noise + cond sum; samples of one input differ, noise-free parts agree
    assert not torch.allclose(out[0], out[1])
    assert torch.equal(out, sample_sequence(pull_to_cond, cond, 5, cfg, seed=0))
    # sample i starts from the same noise however many samples are drawn
    torch.testing.assert_close(sample_sequence(pull_to_cond, cond, 5, SampleConfig(num_samples=1, nfe=4), 0)[0],
                               out[0], atol=0, rtol=0)
    cold = sample_sequence(pull_to_cond, cond, 5, SampleConfig(num_samples=3, nfe=4, temperature=0.0), seed=0)
    assert torch.allclose(cold[0], cond.sum(-1, keepdim=True).expand(7, 5))
    assert torch.equal(cold[0], cold[2])


def test_guidance_extrapolates_from_unconditional():
    velocity = lambda x, t, cond, valid: cond[..., :1].expand_as(x) + 1.0  # noqa: E731
    x, t, cond = torch.zeros(2, 3, 4), torch.zeros(2), torch.full((2, 3, 2), 2.0)
    # conditional 3, unconditional (zeroed cond) 1: scale 2.5 -> 1 + 2.5 * 2 = 6
    assert torch.allclose(guided(velocity, 2.5)(x, t, cond, torch.ones(2, 3, dtype=torch.bool)),
                          torch.full((2, 3, 4), 6.0))
    assert guided(velocity, 1.0) is velocity


def test_long_inputs_are_covered_by_overlapping_windows():
    assert window_spans(50, 60, 10) == [(0, 50)]
    for frames in (61, 100, 131, 250, 301):
        spans = window_spans(frames, 60, 10)
        assert spans[0][0] == 0 and spans[-1][1] == frames
        assert all(end - start == 60 for start, end in spans)
        assert all(b_start <= a_end - 10 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        coverage = torch.zeros(frames)
        for (start, end), weight in zip(spans, crossfade_weights(spans)):
            assert (weight > 0).all()
            coverage[start:end] += 1
        assert (coverage >= 1).all()


RALSTON = SamplingMethod("ralston", nodes=(0.0, 2 / 3), coupling=((), (2 / 3,)), weights=(0.25, 0.75))


def test_a_registered_method_declares_its_grid_and_the_prepared_network_follows_it(tiny_net, monkeypatch):
    """Ralston's method evaluates at t + 2h/3, off the half-step grid: the prepared network (modulations looked
    up on the method's own grid) still gives the plain network's samples. A lookup by round(t * 2 * steps)
    would use the modulation of t + h/2 there."""
    monkeypatch.setitem(METHODS, "ralston", RALSTON)
    assert sampling_method("ralston").time_grid(4) == pytest.approx([0, 1 / 3, 1 / 2, 5 / 6])
    x0, cond = torch.randn(2, 30, TINY.state_dim), torch.randn(2, 30, TINY.cond_dim)
    valid = torch.ones(2, 30, dtype=torch.bool)
    expected = FixedStepSampler(tiny_net, "ralston", 4)(x0, cond, valid)
    got = FixedStepSampler(PreparedVelocity(tiny_net, "ralston", 4), "ralston", 4)(x0, cond, valid)
    torch.testing.assert_close(got, expected, atol=2e-6 * expected.abs().max().item(), rtol=1e-5)
    # Ralston is second order: exact on dx/dt = 2t, as midpoint is and Euler is not
    field = lambda x, t, cond, valid: 2 * t.view(-1, 1, 1).expand_as(x)  # noqa: E731
    assert math.isclose(integrate(field, torch.zeros(1, 1, 1), NO_COND, None, "ralston", 8).item(), 1.0,
                        rel_tol=1e-6)


def test_the_config_and_the_command_line_offer_the_registered_methods():
    import typing

    from avflow.cli import subcommand_parser
    from avflow.config import SampleConfig as Sample

    assert set(typing.get_args(typing.get_type_hints(Sample)["method"])) == set(METHODS)
    for command in ("generate", "infer", "stream", "evaluate", "export"):
        (option,) = [action for action in subcommand_parser(command)._actions if "--method" in action.option_strings]
        assert set(option.choices) == set(METHODS)


def test_noise_of_a_prefix_does_not_depend_on_the_length():
    whole = sequence_noise(7, 2, 300, 5)
    assert torch.equal(sequence_noise(7, 2, 131, 5), whole[:, :131])
    assert torch.equal(sequence_noise(7, 1, 300, 5)[0], whole[0])
    stream = NoiseStream(7, 2, 5)
    assert torch.equal(torch.cat([stream.frames(0, 70), stream.frames(70, 200), stream.frames(200, 300)], 1), whole)
    assert not torch.equal(sequence_noise(8, 2, 300, 5), whole)


@pytest.mark.parametrize("first_frames", [None, 25])
def test_a_stream_fed_in_any_pieces_equals_the_whole_sequence_at_every_window_edge(tiny_net, first_frames):
    """Lengths on and around every window edge (and shorter than one window), fed whole, one frame at a time
    or in uneven pieces: the streamed frames come out in order, without gaps, each once, and equal sampling
    the whole sequence on the same windows (the plan a length gives) from the same noise."""
    plan = WindowPlan(60, 10, first_frames)
    loop = FixedStepSampler(tiny_net, "euler", 2)

    def sample_window(noise, cond):
        return loop(noise, cond.expand(noise.shape[0], -1, -1), torch.ones(noise.shape[:2], dtype=torch.bool))

    edges = sorted({edge + shift for span in plan.spans(140) for edge in span for shift in (-1, 0, 1)} | {1, 7})
    for frames in [edge for edge in edges if edge > 0]:
        cond = torch.randn(frames, TINY.cond_dim)
        spans = plan.spans(frames)
        noise = 0.5 * sequence_noise(3, 1, frames, TINY.state_dim)
        expected = stitch(spans, [sample_window(noise[:, s:e], cond[s:e]) for s, e in spans], 0, frames)
        for pieces in ([frames], [1] * frames, [7, 1, 30, 2, 13, 60, 5, 90][:frames]):
            stream = StreamSampler(sample_window, plan, NoiseStream(3, 1, TINY.state_dim), 0.5)
            finals, fed = [], 0
            for size in pieces:
                finals += list(stream.push(cond[fed:fed + size]))
                fed += size
            finals += list(stream.push(cond[fed:])) + list(stream.end_utterance())
            assert [final.start for final in finals] == list(np.cumsum([0] + [f.states.shape[1] for f in finals]))[:-1]
            got = torch.cat([final.states for final in finals], dim=1)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=f"{frames} frames, {pieces}")


def test_a_stream_emits_frames_before_its_input_ends(tiny_net):
    """While the input is still arriving, frames come out once no later window can reach them: a window's
    length behind the input (the shifted last window), or, after a shorter first window, at once."""
    loop = FixedStepSampler(tiny_net, "euler", 2)

    def sample_window(noise, cond):
        return loop(noise, cond.expand(noise.shape[0], -1, -1), torch.ones(noise.shape[:2], dtype=torch.bool))

    cond = torch.randn(400, TINY.cond_dim)
    for plan, first_out in ((WindowPlan(60, 10), 0), (WindowPlan(60, 10, 25), 15)):
        stream = StreamSampler(sample_window, plan, NoiseStream(0, 1, TINY.state_dim), 1.0)
        emitted = 0
        for arrived in range(1, 401):
            emitted += sum(final.states.shape[1] for final in stream.push(cond[arrived - 1:arrived]))
            if arrived == plan.first:
                assert emitted == first_out
            if arrived >= 200:
                assert emitted >= arrived - 60 - 50  # at most a window behind, plus one step of windows
