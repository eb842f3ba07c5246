"""CPU guards for the GPU sampling paths: no stray CPU tensor or host sync (the `meta` device), the prepared
network computes what the plain one does, FlexAttention's block structure is built once per length, and a
warmed compiled sampler never recompiles."""

import dataclasses

import pytest
import torch
import torch._dynamo.testing
from helpers import TINY_NETWORK as TINY
from helpers import tiny_model_file
from torch._dynamo.utils import counters

from avflow.infer.model import default_dtype, load_inference_model
from avflow.infer.sampler import GraphSampler
from avflow.model import attention
from avflow.model.avflow import AVFlowNet
from avflow.model.sampling import (
    FixedStepSampler,
    PreparedVelocity,
    guided,
    integrate,
    row_buckets,
    sample_sequences,
)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_the_inference_loop_runs_on_the_meta_device(tmp_path, guidance_scale):
    """The loop as generate/infer build it, with network and inputs on `meta`: any tensor made on the CPU
    inside it (like a step-time buffer that did not follow the network) or any host sync fails here."""
    path = tiny_model_file(tmp_path / "tiny.safetensors",
                           [f"sample.guidance_scale={guidance_scale}", "flow.cond_dropout=0.1"])
    model = load_inference_model(path, "meta")
    runner, frames, buckets, rows, row_counts = model.sampler(model.cfg.sample)
    cond = [torch.zeros(n, model.cfg.model.cond_dim, device="meta") for n in (30, 90)]
    noise = [torch.zeros(2, n, model.cfg.model.state_dim, device="meta") for n in (30, 90)]
    out = sample_sequences(runner, cond, noise, frames, model.cfg.sample.window_overlap, buckets, rows, row_counts)
    assert [tuple(o.shape) for o in out] == [(2, 30, 344), (2, 90, 344)] and out[0].device.type == "meta"
    assert next(model.head_vae.parameters()).device.type == "meta"  # poses decode where the samples are


def test_cuda_inference_defaults_to_bf16_and_elsewhere_to_fp32():
    assert default_dtype(torch.device("cuda", 0)) == "bf16"
    assert default_dtype(torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("method,nfe", [("euler", 4), ("midpoint", 6)])
def test_precomputed_time_conditioning_equals_the_network(tiny_net, method, nfe):
    """Every evaluation the loop makes (each step time, midpoint half steps too) gives what the network gives
    when it embeds t itself, with padding and guidance."""
    x0, cond = torch.randn(3, 37, TINY.state_dim), torch.randn(3, 37, TINY.cond_dim)
    valid = torch.ones(3, 37, dtype=torch.bool)
    valid[2, 25:] = False
    prepared = PreparedVelocity(tiny_net, method, nfe)
    for scale in (1.0, 1.5):
        plain_loop = FixedStepSampler(guided(tiny_net, scale), method, nfe)
        prepared_loop = FixedStepSampler(guided(prepared, scale), method, nfe)
        expected, got = plain_loop(x0, cond, valid), prepared_loop(x0, cond, valid)
        # float32 summation order only: the batch of grid times is embedded apart from the batch of rows
        torch.testing.assert_close(got[valid], expected[valid], atol=2e-6 * expected.abs().max().item(), rtol=1e-5)


def test_row_buckets_pad_few_rows_a_little_and_cap_at_the_batch():
    assert row_buckets(12, 3) == [3, 6, 12]
    assert row_buckets(12, 1) == [1, 2, 4, 8, 12]
    assert row_buckets(10, 3) == [3, 6, 9]
    with pytest.raises(ValueError, match="do not fit a batch"):
        row_buckets(2, 3)


def test_flex_block_structure_is_built_once_per_length_and_equals_the_banded_network(tiny_net, monkeypatch):
    """Compiled FlexAttention (it compiles on CPU) over padded batches of several lengths per bucket equals
    the banded SDPA network, and the band's block structure is evaluated once per bucket length, not per
    forward (16 forwards per call here)."""
    from torch.nn.attention import flex_attention

    flex_net = AVFlowNet(dataclasses.replace(TINY, attention="flex"))
    flex_net.load_state_dict(tiny_net.state_dict())
    flex_net.eval()
    builds = []
    real_create = flex_attention.create_block_mask
    monkeypatch.setattr(flex_attention, "create_block_mask",
                        lambda *a, **k: builds.append(k["Q_LEN"]) or real_create(*a, **k))
    attention._band_blocks.cache_clear()
    lengths = [150, 200, 256, 300, 384]
    conds = [torch.randn(n, TINY.cond_dim) for n in lengths]
    noises = [torch.randn(2, n, TINY.state_dim) for n in lengths]
    loops = [FixedStepSampler(PreparedVelocity(net, "euler", 8), "euler", 8) for net in (flex_net, tiny_net)]
    with torch.no_grad():
        flex, banded = (sample_sequences(loop, conds, noises, 384, 32, [256, 384], max_rows=2, row_counts=[2])
                        for loop in loops)
    assert sorted(builds) == [256, 384]
    for got, expected in zip(flex, banded):
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)


def test_a_warmed_compiled_sampler_never_recompiles(tmp_path):
    """After warm-up of every (length bucket, row count), inputs of many lengths and batch compositions reuse
    the compiled graphs: no recompilation (which past Dynamo's limit would fall back to eager)."""
    path = tiny_model_file(tmp_path / "tiny.safetensors", ["sample.max_frames=64", "sample.window_overlap=8",
                                                           "sample.num_samples=1"])
    model = load_inference_model(path, "cpu", batch_rows=2, compile_network=True)
    model.length_bucket_count = 2
    runner, frames, buckets, rows, row_counts = model.sampler(model.cfg.sample)
    assert (buckets, row_counts) == ([32, 64], [1, 2])
    torch._dynamo.reset()
    counters.clear()
    runner.warm_up(buckets, row_counts, model.cfg.model.state_dim, model.cfg.model.cond_dim, model.device)
    assert counters["stats"]["unique_graphs"] == len(buckets) * len(row_counts)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([5], [64], [31, 33], [20, 7], [64, 64, 64], [150], [1, 2, 3, 40]):
            conds = [torch.randn(n, model.cfg.model.cond_dim) for n in lengths]
            noises = [torch.randn(1, n, model.cfg.model.state_dim) for n in lengths]
            sample_sequences(runner, conds, noises, frames, 8, buckets, rows, row_counts)
    assert counters["stats"]["unique_graphs"] == len(buckets) * len(row_counts)


def test_the_recompile_limit_covers_every_scheduler_shape(tmp_path):
    """16 shapes (4 length buckets x 4 row counts) exceed Dynamo's default limit of 8: the sampler raises it."""
    path = tiny_model_file(tmp_path / "tiny.safetensors", ["sample.num_samples=1"])
    model = load_inference_model(path, "cpu", batch_rows=8, compile_network=True)
    with torch._dynamo.config.patch(recompile_limit=8):
        _, _, buckets, _, row_counts = model.sampler(model.cfg.sample)
        assert len(buckets) * len(row_counts) == 16
        assert torch._dynamo.config.recompile_limit >= 16


def test_graph_warm_up_runs_every_scheduler_shape_once_in_order():
    """GraphSampler.warm_up runs every (rows, frames) shape through the sampler once (on CPU: eagerly)."""
    seen = []
    runner = GraphSampler(lambda x0, cond, valid: seen.append(tuple(x0.shape[:2])) or x0, torch.device("cpu"))
    runner.warm_up([32, 64], [1, 2], 5, 3, torch.device("cpu"))
    assert seen == [(1, 32), (2, 32), (1, 64), (2, 64)]


def test_loading_a_model_leaves_the_fp32_matmul_precision_to_the_caller(tmp_path, monkeypatch):
    """A library call never flips the process-wide TF32 switch (the fp32 work after it would silently lose
    precision, and compiled functions guarding on it would recompile); the inference commands set it for their
    run only. The CUDA branch is taken with the device faked as CUDA and the moves kept on the CPU."""
    import avflow.infer.model as infer_model
    from avflow.cli import main
    from avflow.runtime import fp32_matmul_precision

    model_file = tiny_model_file(tmp_path / "tiny.safetensors")
    monkeypatch.setattr(infer_model, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
    with fp32_matmul_precision("ieee"):
        try:
            infer_model.load_inference_model(model_file, "cuda", "fp32")
        except (RuntimeError, AssertionError):
            pass  # whatever needs a real CUDA device after the precision choice
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        seen = []
        monkeypatch.setattr("avflow.cli.cmd_generate",
                            lambda args: seen.append(torch.backends.cuda.matmul.fp32_precision))
        main(["generate", "--model", str(model_file), "--text", "hi", "-o", str(tmp_path / "out")])
        assert seen == ["tf32"] and torch.backends.cuda.matmul.fp32_precision == "ieee"


@pytest.mark.parametrize("method,nfe", [("euler", 4), ("midpoint", 4)])
def test_graph_sampler_eager_fallback_equals_the_reference_sampler(tiny_net, method, nfe, monkeypatch):
    """With CUDA graphs disabled (as on CPU or with AVFLOW_NO_CUDA_GRAPH=1), the runner gives the plain loop's
    samples exactly, for the same noise."""
    monkeypatch.setenv("AVFLOW_NO_CUDA_GRAPH", "1")
    runner = GraphSampler(FixedStepSampler(tiny_net, method, nfe), torch.device("cuda"))
    assert not runner.use_cuda_graph
    cond = torch.randn(1, 40, TINY.cond_dim)
    noise = torch.randn(3, 40, TINY.state_dim)
    reference = integrate(tiny_net, 0.8 * noise, cond.expand(3, -1, -1), None, method, nfe)
    ours = runner(0.8 * noise, cond.expand(3, -1, -1), torch.ones(3, 40, dtype=torch.bool))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


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
