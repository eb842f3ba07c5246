"""Flow matching: path, loss against hand-computed values, masks."""

import math

import torch

from avflow.config import FlowConfig, ModelConfig
from avflow.model.flow import flow_matching_loss, ot_path

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
