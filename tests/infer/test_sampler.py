"""The inference sampler: fixed-step loop, CUDA-graph runner (and its eager fallback), windows and buckets."""

import pytest
import torch
from helpers import randomized

from avflow.config import ModelConfig, SampleConfig
from avflow.infer.sampler import GraphSampler, bucket_for, length_buckets, sample_sequences
from avflow.model.avflow import AVFlowNet
from avflow.model.flow import FixedStepSampler, sample

TINY = ModelConfig(d_model=32, n_blocks=2, n_heads=2, ffn_hidden=64, attention="banded")


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return randomized(AVFlowNet(TINY)).eval()


def test_length_buckets_round_windows_up():
    assert length_buckets(1725, 4) == [432, 863, 1294, 1725]
    assert length_buckets(10, 1) == [10]
    assert bucket_for(433, [432, 863]) == 863 and bucket_for(432, [432, 863]) == 432
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket_for(900, [432, 863])


@pytest.mark.parametrize("method,nfe", [("euler", 4), ("midpoint", 4)])
def test_graph_sampler_eager_fallback_equals_the_reference_sampler(tiny_net, method, nfe, monkeypatch):
    """With CUDA graphs disabled (as on CPU or with AVFLOW_NO_CUDA_GRAPH=1), the inference loop gives the
    training-side reference `sample` exactly, for the same noise."""
    monkeypatch.setenv("AVFLOW_NO_CUDA_GRAPH", "1")
    runner = GraphSampler(FixedStepSampler(tiny_net, method, nfe), torch.device("cuda"))
    assert not runner.use_cuda_graph
    cond = torch.randn(1, 40, TINY.cond_dim)
    noise = torch.randn(3, 40, TINY.state_dim)
    cfg = SampleConfig(method=method, nfe=nfe, num_samples=3, temperature=0.8)
    reference = sample(tiny_net, cond, None, TINY.state_dim, cfg, noise=noise)[0]
    ours = runner(0.8 * noise, cond.expand(3, -1, -1), torch.ones(3, 40, dtype=torch.bool))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


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


def test_fixed_step_sampler_scripts_to_the_same_function(tiny_net):
    """The TorchScript form of the loop (around a traced network) computes what the eager loop does."""
    x0, cond = torch.randn(2, 24, TINY.state_dim), torch.randn(2, 24, TINY.cond_dim)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, 20:] = False
    traced = torch.jit.trace(tiny_net, (x0, torch.rand(2), cond, valid), check_trace=False)
    scripted = torch.jit.script(FixedStepSampler(traced, "midpoint", 4))
    eager = FixedStepSampler(tiny_net, "midpoint", 4)
    torch.testing.assert_close(scripted(x0, cond, valid)[:, :20], eager(x0, cond, valid)[:, :20])


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager(tiny_net, monkeypatch):
    monkeypatch.delenv("AVFLOW_NO_CUDA_GRAPH", raising=False)
    loop = FixedStepSampler(AVFlowNet(TINY).cuda().eval(), "euler", 4)
    runner = GraphSampler(loop, torch.device("cuda"))
    x0, cond = torch.randn(3, 64, TINY.state_dim, device="cuda"), torch.randn(3, 64, TINY.cond_dim, device="cuda")
    valid = torch.ones(3, 64, dtype=torch.bool, device="cuda")
    first, second = runner(x0, cond, valid), runner(x0 * 0.5, cond, valid)
    assert runner.use_cuda_graph and len(runner.graphs) == 1
    torch.testing.assert_close(first, loop(x0, cond, valid), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, loop(x0 * 0.5, cond, valid), atol=1e-4, rtol=1e-4)


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
