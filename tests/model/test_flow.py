"""Flow matching: path, loss against hand-computed values, masks, and both samplers on known ODEs."""

import math

import torch

from avflow.config import FlowConfig, ModelConfig, SampleConfig
from avflow.model.flow import flow_matching_loss, guided, integrate, ot_path, sample

MODEL = ModelConfig(expression_dim=6, head_latent_dim=2, mel_dim=4, token_dim=3)
SIGMA = 1e-6


def test_ot_path_endpoints():
    x0, x1 = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    assert torch.allclose(ot_path(x0, x1, torch.zeros(3), SIGMA), x0)
    assert torch.allclose(ot_path(x0, x1, torch.ones(3), SIGMA), x1 + SIGMA * x0)


def exact_velocity(x1):
    """The true conditional velocity, recovering x0 from x_t and t."""
    def velocity(xt, t, cond, valid):
        t = t.view(-1, 1, 1)
        x0 = (xt - t * x1) / (1 - (1 - SIGMA) * t)
        return x1 - (1 - SIGMA) * x0
    return velocity


def test_loss_is_zero_for_the_exact_velocity():
    x1 = torch.randn(4, 10, MODEL.state_dim)
    valid = torch.ones(4, 10, dtype=torch.bool)
    total, parts = flow_matching_loss(exact_velocity(x1), x1, torch.zeros(4, 10, 3), valid, FlowConfig(), MODEL)
    assert total.item() < 1e-4 and all(p.item() < 1e-4 for p in parts.values())


def test_loss_of_zero_velocity_is_weighted_mean_abs_noise():
    """x1 = 0, v = 0: every part's L1 is E|x0| (1 - sigma) = sqrt(2 / pi); total = (1 + 0.2 + 3) of that."""
    x1 = torch.zeros(64, 200, MODEL.state_dim)
    valid = torch.ones(64, 200, dtype=torch.bool)
    zero = lambda xt, t, cond, valid: torch.zeros_like(xt)  # noqa: E731
    total, parts = flow_matching_loss(zero, x1, torch.zeros(64, 200, 3), valid, FlowConfig(), MODEL,
                                      generator=torch.Generator().manual_seed(0))
    expected = math.sqrt(2 / math.pi)
    for value in parts.values():
        assert abs(value.item() - expected) < 0.02
    assert abs(total.item() - 4.2 * expected) < 0.06


def test_padding_and_missing_expression_frames_are_masked():
    x1 = torch.randn(2, 12, MODEL.state_dim)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 8:] = False
    expression_valid = torch.ones(2, 12, dtype=torch.bool)
    expression_valid[0, :3] = False
    zero = lambda xt, t, cond, valid: torch.zeros_like(xt)  # noqa: E731

    def loss(target):
        return flow_matching_loss(zero, target, torch.zeros(2, 12, 3), valid, FlowConfig(), MODEL, expression_valid,
                                  torch.Generator().manual_seed(3))[1]

    base = loss(x1)
    changed = x1.clone()
    changed[1, 8:] += 100.0  # padding: no part may change
    changed[0, :3, :6] += 100.0  # missing expression frames: the expression part must not change
    after = loss(changed)
    for name in base:
        assert torch.allclose(base[name], after[name])
    changed[0, :3, 6:] += 100.0  # head and mel of those frames are still data
    assert loss(changed)["mel"] > base["mel"] + 1


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


def test_sample_batches_n_samples_per_input():
    cond = torch.randn(2, 7, 3)
    pull_to_cond = lambda x, t, cond, valid: cond.sum(-1, keepdim=True).expand_as(x)  # noqa: E731
    cfg = SampleConfig(num_samples=3, nfe=4)
    out = sample(pull_to_cond, cond, None, 5, cfg, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 7, 5)
    # each sample = its own noise + cond sum; samples of one input differ, noise-free parts agree
    assert not torch.allclose(out[0, 0], out[0, 1])
    again = sample(pull_to_cond, cond, None, 5, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    cold = sample(pull_to_cond, cond, None, 5, SampleConfig(num_samples=3, nfe=4, temperature=0.0))
    assert torch.allclose(cold[1, 0], cond[1].sum(-1, keepdim=True).expand(7, 5))
    assert torch.equal(cold[1, 0], cold[1, 2])


def test_guidance_extrapolates_from_unconditional():
    velocity = lambda x, t, cond, valid: cond[..., :1].expand_as(x) + 1.0  # noqa: E731
    x, t, cond = torch.zeros(2, 3, 4), torch.zeros(2), torch.full((2, 3, 2), 2.0)
    # conditional 3, unconditional (zeroed cond) 1: scale 2.5 -> 1 + 2.5 * 2 = 6
    assert torch.allclose(guided(velocity, 2.5)(x, t, cond, torch.ones(2, 3, dtype=torch.bool)),
                          torch.full((2, 3, 4), 6.0))
    assert guided(velocity, 1.0) is velocity


def test_long_inputs_are_covered_by_overlapping_windows():
    from avflow.model.flow import crossfade_weights, window_spans

    assert window_spans(50, 60, 10) == [(0, 50)]
    for frames in (61, 100, 131, 250, 301):
        spans = window_spans(frames, 60, 10)
        assert spans[0][0] == 0 and spans[-1][1] == frames
        assert all(end - start == 60 for start, end in spans)
        assert all(b_start <= a_end - 10 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        coverage = torch.zeros(frames)
        for (start, end), weight in zip(spans, crossfade_weights(spans, frames)):
            assert (weight > 0).all()
            coverage[start:end] += 1
        assert (coverage >= 1).all()
