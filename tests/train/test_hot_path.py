"""CPU guards for the GPU training paths: no host sync or host copy in a training step outside logging steps,
collectives on the training device, fused EMA, the MFU formula by hand, the NCCL group taking CPU tensors too."""

import contextlib
from unittest.mock import patch

import pytest
import torch
from helpers import packed_tiny_corpus
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from avflow.config import ModelConfig, load_config
from avflow.model.avflow import AVFlowNet
from avflow.model.head_vae import HeadVAE
from avflow.model.state import StateCodec
from avflow.train.batches import BatchEncoder
from avflow.train.distributed import pick_backend
from avflow.train.loop import EMA, Trainer
from avflow.train.metrics import StepMetrics, per_sequence_parameters, training_flops_per_frame

TINY = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48", "loader.segment_length=24",
        "trainer.batch_size=3", "trainer.steps=8", "trainer.warmup_steps=2", "trainer.checkpoint_every=100",
        "trainer.val_every=100", "trainer.log_every=4", "head_vae.ffn_hidden=8", "head_vae.steps=2",
        "head_vae.segment_length=16", "head_vae.batch_size=2", "corpus.train_segments=3", "corpus.val_segments=1",
        "corpus.words_per_segment=[2, 3]"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return packed_tiny_corpus(tmp_path_factory.mktemp("data"), TINY)


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


class HostTraffic(TorchDispatchMode):
    """Records what waits on the device when run there: a value read back to the host (item, bool, tolist, ...)
    and a tensor made from host data (torch.tensor, new_tensor: a pageable copy to the device). `paused()`
    leaves out host work that is not device work (the loader's)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.events: list[str] = []
        self.recording = True
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda tensor, *a, _real=real, _name=name, **k:
                                self._record(_name) or _real(tensor, *a, **k))

    def _record(self, event: str) -> None:
        if self.recording:
            self.events.append(event)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self._record("host copy")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self.recording = False
        try:
            with _disable_current_modes():
                yield
        finally:
            self.recording = True


def test_a_training_step_with_its_loader_waits_on_the_device_only_at_the_logging_step(tmp_path, shards, monkeypatch):
    """The whole `avflow train` step, loader included (its batches are host data, read outside the recording):
    steps between logging steps neither read a device value back nor copy a host value in; the logging step's
    flush reads its window once."""
    trainer = Trainer(load_config(None, TINY + shards + [f"trainer.run_dir={tmp_path / 'run'}"]), progress=False)
    loader = trainer.train_iter
    recorder = HostTraffic(monkeypatch)

    def loader_outside_the_recording():
        while True:
            with recorder.paused():
                batch = next(loader)
            yield batch

    trainer.train_iter = loader_outside_the_recording()
    per_step = []
    with recorder:
        for step in range(8):
            before = len(recorder.events)
            trainer.train_step(step)
            per_step.append(recorder.events[before:])
        flush_start = len(recorder.events)
        metrics = trainer.flush_metrics()
    monkeypatch.undo()
    assert per_step == [[]] * 8
    assert recorder.events[flush_start:] == ["tolist", "tolist"]  # the window's sums and its first non-finite step
    assert metrics["steps"] == 8 and metrics["loss"] > 0


@pytest.mark.cuda
def test_cuda_training_steps_make_no_synchronizing_call(tmp_path, shards):
    """The real thing the tests above approximate on a CPU (run by benchmarks/gpu_check.sh): between logging
    steps, a training step on a CUDA device makes no call that waits for it."""
    trainer = Trainer(load_config(None, TINY + shards + [f"trainer.run_dir={tmp_path / 'run'}"]), progress=False)
    assert trainer.device.type == "cuda"
    for step in range(2):  # warm-up: allocator, cuBLAS handles, fused optimizer state
        trainer.train_step(step)
    trainer.flush_metrics()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            trainer.train_step(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    metrics = trainer.flush_metrics()
    assert metrics["steps"] == 4 and metrics["loss"] > 0


@pytest.mark.parametrize("identities", [[], ["alice", "bob"]])
def test_the_batch_encoder_keeps_the_codec_statistics_on_the_training_device(identities):
    """Only the batch itself crosses to the device at each step (`meta` stands for it): the expression statistics
    (and a multi-identity model's per-identity statistics and one-hot table) were moved there once."""
    cfg = load_config(None, TINY + [f"model.identities=[{', '.join(identities)}]"])
    dim, count = cfg.model.expression_dim, max(len(identities), 1)
    codec = StateCodec(torch.zeros(count, dim), torch.ones(count, dim), torch.full((count,), cfg.mel.norm_mean),
                       torch.full((count,), cfg.mel.norm_std), cfg.model)
    pose_dim = cfg.head_vae.pose_dim
    pose_shape = (count, pose_dim) if identities else (pose_dim,)
    encoder = BatchEncoder(cfg, codec, HeadVAE(cfg.head_vae), torch.zeros(pose_shape), torch.ones(pose_shape),
                           torch.device("meta"))
    frames = 6
    batch = {"valid": torch.ones(2, frames, dtype=torch.bool), "pose": torch.zeros(2, frames, pose_dim),
             "expression": torch.zeros(2, frames, dim), "mel": torch.zeros(2, frames, cfg.model.mel_dim),
             "tokens": torch.zeros(2, frames, cfg.model.token_dim),
             "expression_valid": torch.ones(2, frames, dtype=torch.bool)}
    if identities:
        batch["identity"] = torch.tensor([1, 0])
    copied = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        moved = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and moved.device.type == "meta":
            copied.append(self.shape)
        return moved

    with patch.object(torch.Tensor, "to", recording_to):
        encoded = encoder(batch)
    assert encoded.state.device.type == "meta"
    assert sorted(copied) == sorted(value.shape for value in batch.values())


def test_step_metrics_build_and_reduce_on_the_training_device():
    """Everything handed to the collectives lives on the training device (`meta` here: a CPU tensor fails)."""
    reduced = []

    def reduce(values):
        reduced.append(values.device.type)
        raise StopIteration  # meta tensors cannot be read back; the devices are what is checked

    metrics = StepMetrics(("expression", "mel"), torch.device("meta"), reduce, reduce)
    loss = torch.zeros((), device="meta")
    metrics.add_micro_batch(0, loss, [loss, loss], torch.ones(2, 5, dtype=torch.bool, device="meta"))
    metrics.add_step(torch.zeros((), device="meta"), 0.0)
    with pytest.raises(StopIteration):
        metrics.flush(1)
    assert reduced == ["meta"]


def test_step_metrics_report_the_first_non_finite_step_and_means():
    metrics = StepMetrics(("mel",), torch.device("cpu"), lambda v: v, lambda v: v)
    for step, loss in enumerate([1.0, 3.0]):
        metrics.add_micro_batch(step, torch.tensor(loss), [torch.tensor(loss / 2)], torch.ones(4, dtype=torch.bool))
        metrics.add_step(torch.tensor(2.0 * step), 0.5)
    assert metrics.flush(1) == {"loss": 2.0, "loss_mel": 1.0, "frames": 8.0, "grad_norm": 1.0, "data_wait_s": 0.5,
                                "steps": 2}
    for step, loss in [(7, 1.0), (8, float("nan")), (9, float("inf"))]:
        metrics.add_micro_batch(step, torch.tensor(loss), [torch.tensor(loss)], torch.ones(4, dtype=torch.bool))
    with pytest.raises(FloatingPointError, match="step 8: the loss is nan"):
        metrics.flush(1)


def test_nccl_process_groups_take_cpu_tensors_too():
    cfg = load_config(None, [])
    assert pick_backend(cfg, torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert pick_backend(cfg, torch.device("cpu")) == "gloo"


def test_ema_update_is_the_per_parameter_lerp():
    torch.manual_seed(0)
    weights = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    ema = EMA(weights, decay=0.9)
    new = {name: torch.randn_like(value) for name, value in weights.items()}
    ema.update(new, step=1000)
    for name in weights:
        torch.testing.assert_close(ema.params[name], weights[name] * 0.9 + new[name] * 0.1)


def test_mfu_counts_per_frame_parameters_by_hand():
    """The published network: 67,935,576 parameters, of which the time embedding (128*512 + 512 + 512*512 + 512
    = 328,704) and 32 adaLN Linears (512*1536 + 1536 = 787,968 each) run once per sequence."""
    cfg = ModelConfig()
    net = AVFlowNet(cfg)
    per_sequence = sum(p.numel() for name, p in net.named_parameters() if "time_embed" in name or "ada_ln" in name)
    assert per_sequence_parameters(cfg) == per_sequence == 328_704 + 32 * 787_968
    per_frame = 67_935_576 - 25_543_680
    attention = 2 * 8 * 12 * 512 * 25  # two streams x 8 blocks x 12 d w, band of 16 + 1 + 8
    assert training_flops_per_frame(cfg, 67_935_576) == 6 * per_frame + attention == 256_808_976


def test_zero3_with_compiled_blocks_is_refused():
    from avflow.train.distributed import DistInfo
    from avflow.train.parallel import deepspeed_config

    cfg = load_config(None, ["parallel.strategy=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero3.json",
                             "parallel.compile=true"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)
    with pytest.raises(ValueError, match="ZeRO-3 .* expected parallel.compile=false"):
        deepspeed_config(cfg, info)
    cfg.parallel.compile = False
    assert deepspeed_config(cfg, info)["zero_optimization"]["stage"] == 3


def test_a_dit_block_compiles_as_one_graph(monkeypatch):
    """apply_compile asks for fullgraph=True: a graph break in a block is an error, not a silent slowdown; and a
    block compiled so computes what the eager block does."""
    from avflow.model.dit import DiTBlock
    from avflow.train.parallel import apply_compile

    options = []
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **k: options.append(k) or real_compile(self, **k))

    torch.manual_seed(0)
    block = DiTBlock(32, 2, 64, 0.0, 16, 8, 10000.0, "banded")
    holder = torch.nn.ModuleList([block])
    x, time_embedding = torch.randn(2, 40, 32), torch.randn(2, 32)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        expected = block(x, time_embedding)
        apply_compile(holder)
        torch.testing.assert_close(block(x, time_embedding), expected, atol=1e-5, rtol=1e-5)
    assert block._compiled_call_impl is not None and options == [{"fullgraph": True}]
