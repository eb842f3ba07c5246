"""The demo's jitter, explained: a network narrower than its visual state cannot move the sampling noise
outside the span of its output layer, so that noise reaches the output unchanged (docs/evaluation.md)."""

import logging

import torch
from helpers import randomized

from avflow.config import load_config
from avflow.model.avflow import AVFlowNet
from avflow.model.sampling import integrate
from avflow.train.distributed import DistInfo
from avflow.train.tasks import AVFlowTask


def test_noise_outside_the_output_layers_span_passes_through_sampling_unchanged():
    cfg = load_config(None, ["model.d_model=32", "model.n_blocks=1", "model.n_heads=2", "model.ffn_hidden=32"])
    net = randomized(AVFlowNet(cfg.model), scale=0.1).eval()
    basis, _ = torch.linalg.qr(net.out_v.weight.detach().double())  # the 32 visual directions the velocity spans
    noise = torch.randn(1, 40, cfg.model.state_dim, generator=torch.Generator().manual_seed(0))
    output = integrate(net, noise, torch.randn(1, 40, cfg.model.cond_dim), None, "euler", 4)[0]

    def outside(state):
        visual = state[:, :cfg.model.visual_dim].double()
        return visual - visual @ basis @ basis.T

    change = outside(output) - outside(noise[0])
    assert torch.allclose(change, change[:1].expand_as(change), atol=1e-5)  # only a constant shift: no denoising
    assert outside(noise[0]).norm() > 0.5 * noise[0, :, :cfg.model.visual_dim].norm()


def test_training_warns_when_the_network_is_narrower_than_its_state(caplog):
    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    with caplog.at_level(logging.WARNING, logger="avflow.train.tasks"):
        AVFlowTask(load_config(None, ["model.d_model=128", "model.n_heads=4"]), info, progress=False)
        AVFlowTask(load_config(None, []), info, progress=False)  # published: 512 wide, no warning
    (message,) = [record.getMessage() for record in caplog.records]
    assert "model.d_model=128 is narrower than the visual state (264 dims)" in message
