"""Training strategies agree with single-process training: one torchrun launch of two real gloo ranks
trains a tiny AVFlowNet under ddp, fsdp and DeepSpeed ZeRO-2/3 on halves of a fixed global batch; the
losses, gradient norms and final weights must match strategy none on the full batch. Also: gradient
accumulation, activation checkpointing, DCP round trips, and ranks started from SLURM variables alone."""

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from avflow.config import Config, config_from_dict
from avflow.model.avflow import AVFlowNet
from avflow.model.flow import ot_path
from avflow.train.distributed import (
    DistInfo,
    expand_nodelist,
    init_distributed,
    read_launch_env,
    reduce_over_ranks,
    shutdown,
)
from avflow.train.parallel import build_engine, parallelize

WORLD_SIZE = 2
GLOBAL_BATCH = 8
FRAMES = 12
STEPS = 5
RESUME_STEPS = 2  # steps trained after a DCP save, once straight on and once from the reloaded state
SEED = 0
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
REPO = Path(__file__).resolve().parents[2]
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)

# name -> parallel.* overrides; each runs in the launched ranks
RUNS = {
    "ddp": {"strategy": "ddp"},
    "ddp_accumulate": {"strategy": "ddp", "grad_accumulation": 2},
    "fsdp": {"strategy": "fsdp"},
    "fsdp_checkpointed_accumulate": {"strategy": "fsdp", "activation_checkpointing": True, "grad_accumulation": 2},
    "deepspeed_zero2": {"strategy": "deepspeed", "deepspeed_config": str(REPO / "configs/deepspeed/zero2.json")},
    "deepspeed_zero3_accumulate": {"strategy": "deepspeed", "grad_accumulation": 2,
                                   "deepspeed_config": str(REPO / "configs/deepspeed/zero3.json")},
}


def tiny_config(**parallel) -> Config:
    return config_from_dict({
        "model": {"d_model": 32, "n_blocks": 2, "n_heads": 2, "ffn_hidden": 48, "time_freqs": 8, "expression_dim": 12,
                  "head_latent_dim": 8, "mel_dim": 10, "token_dim": 5, "window_back": 3, "window_ahead": 2,
                  "attention": "dense"},
        "mel": {"n_mels": 10},
        # grad_clip below the gradient norms (~0.13): every step clips
        "trainer": {"device": "cpu", "batch_size": GLOBAL_BATCH, "lr": 1e-3, "grad_clip": 0.1},
        "parallel": {"fsdp_param_dtype": "fp32", "init_timeout_s": 60, "train_timeout_s": 60, **parallel},
    })


def fixed_batch(cfg: Config) -> dict[str, torch.Tensor]:
    """The global batch with its flow-matching noise and times drawn once, so any split of it sees the same."""
    generator = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, FRAMES)
    return {"x1": torch.randn(*shape, cfg.model.state_dim, generator=generator),
            "x0": torch.randn(*shape, cfg.model.state_dim, generator=generator),
            "cond": torch.randn(*shape, cfg.model.cond_dim, generator=generator),
            "t": torch.rand(GLOBAL_BATCH, generator=generator)}


def flow_loss(model, batch: dict[str, torch.Tensor], rows: slice, sigma_min: float) -> torch.Tensor:
    """Mean L1 error of the predicted x1, as flow_matching_loss computes it, on rows of the fixed batch."""
    x1, x0, cond, t = (batch[key][rows] for key in ("x1", "x0", "cond", "t"))
    valid = torch.ones(x1.shape[:2], dtype=torch.bool)
    velocity = model(ot_path(x0, x1, t, sigma_min), t, cond, valid)
    return (velocity.float() + (1 - sigma_min) * x0 - x1).abs().mean()


def make_engine(cfg: Config, info: DistInfo):
    torch.manual_seed(SEED if info.rank == 0 else SEED + 1 + info.rank)  # ranks must start from rank 0's weights
    cfg.trainer.batch_size = GLOBAL_BATCH // info.world_size // cfg.parallel.grad_accumulation
    # eps 1e-6: with Adam's 1e-8, an element whose L1 sign terms cancel turns rounding noise into whole lr steps
    return build_engine(AVFlowNet(cfg.model), cfg, info,
                        lambda params: torch.optim.AdamW(params, lr=cfg.trainer.lr, weight_decay=0.01, eps=1e-6),
                        lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step)))


def train(engine, cfg: Config, info: DistInfo, batch: dict[str, torch.Tensor], steps: int) -> tuple[list, list]:
    """`steps` optimizer steps on the fixed batch; this rank takes its contiguous share, split in micro-batches."""
    accumulation = cfg.parallel.grad_accumulation
    micro = GLOBAL_BATCH // info.world_size // accumulation
    losses, grad_norms = [], []
    for _ in range(steps):
        total = torch.zeros(())
        for index in range(accumulation):
            start = (info.rank * accumulation + index) * micro
            sync = contextlib.nullcontext() if index == accumulation - 1 else engine.no_sync()
            with sync:
                loss = flow_loss(engine.model, batch, slice(start, start + micro), cfg.flow.sigma_min)
                engine.backward(loss)
            total += loss.detach() / accumulation
        grad_norms.append(float(engine.step()))
        losses.append(reduce_over_ranks(total, info).item() / info.world_size)
    return losses, grad_norms


def reference(**parallel) -> dict:
    cfg = tiny_config(**parallel)
    engine = make_engine(cfg, SINGLE)
    losses, grad_norms = train(engine, cfg, SINGLE, fixed_batch(cfg), STEPS)
    return {"losses": losses, "grad_norms": grad_norms, "weights": engine.full_model_state_dict()}


def run_rank(output: str) -> None:
    """One launched rank: train every strategy of RUNS, check a DCP round trip, rank 0 saves the results."""
    info = init_distributed(tiny_config())
    results = {}
    try:
        for name, parallel in RUNS.items():
            if parallel["strategy"] == "deepspeed" and not HAS_DEEPSPEED:
                continue
            cfg = tiny_config(**parallel)
            batch = fixed_batch(cfg)
            engine = make_engine(cfg, info)
            losses, grad_norms = train(engine, cfg, info, batch, STEPS)
            weights = engine.full_model_state_dict()
            checkpoint = Path(output).parent / f"dcp-{name}"
            dcp.save(engine.checkpoint_states(), checkpoint_id=checkpoint)
            straight_on, _ = train(engine, cfg, info, batch, RESUME_STEPS)
            restored = make_engine(cfg, info)
            dcp.load(restored.checkpoint_states(), checkpoint_id=checkpoint)
            resumed, _ = train(restored, cfg, info, batch, RESUME_STEPS)
            results[name] = {"losses": losses, "grad_norms": grad_norms, "straight_on": straight_on,
                             "resumed": resumed, "weights": weights}
            dist.barrier()
        if info.is_main:
            torch.save(results, output)
    finally:
        shutdown(info)


def check_srun_rank() -> None:
    """One rank started with only SLURM variables (as srun would), no torchrun."""
    info = init_distributed(tiny_config())
    assert (info.is_distributed, info.world_size) == (True, WORLD_SIZE), info
    assert reduce_over_ranks(torch.tensor(float(info.rank)), info).item() == 1.0  # ranks 0 + 1
    assert reduce_over_ranks(torch.tensor(float(info.rank)), info, "min").item() == 0.0
    shutdown(info)
    shutdown(info)  # idempotent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("parallel") / "results.pt"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
              "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(output)]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=240, cwd=REPO,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return torch.load(output, weights_only=True)


@pytest.fixture(scope="module")
def single_process() -> dict:
    return reference()


def assert_same_weights(weights: dict, expected: dict) -> None:
    assert list(weights) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_match_single_process_training(name, launched, single_process):
    if name not in launched:
        pytest.skip("deepspeed is not installed")
    run = launched[name]
    assert run["losses"] == pytest.approx(single_process["losses"], rel=1e-4)
    assert run["grad_norms"] == pytest.approx(single_process["grad_norms"], rel=1e-4)
    assert_same_weights(run["weights"], single_process["weights"])
    assert run["resumed"] == pytest.approx(run["straight_on"], rel=1e-6)


def test_accumulating_two_half_batches_equals_one_full_batch(single_process):
    accumulated = reference(grad_accumulation=2)
    assert accumulated["losses"] == pytest.approx(single_process["losses"], rel=1e-5)
    assert_same_weights(accumulated["weights"], single_process["weights"])


def test_activation_checkpointing_keeps_losses_and_keys(single_process):
    checkpointed = reference(activation_checkpointing=True)
    assert checkpointed["losses"] == pytest.approx(single_process["losses"], rel=1e-6)
    assert_same_weights(checkpointed["weights"], single_process["weights"])


def test_checkpointing_and_compile_keep_state_dict_keys():
    cfg = tiny_config(activation_checkpointing=True, compile=True)
    plain_keys = list(AVFlowNet(cfg.model).state_dict())
    assert list(parallelize(AVFlowNet(cfg.model), cfg, SINGLE).state_dict()) == plain_keys


def test_strategy_without_launcher_is_refused():
    with pytest.raises(RuntimeError, match="parallel.strategy=ddp needs a process group"):
        parallelize(AVFlowNet(tiny_config().model), tiny_config(strategy="ddp"), SINGLE)


def test_slurm_environment_gives_rank_world_and_rendezvous():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[07-08,11],login1"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.source) == (5, 8, 1, "slurm")
    assert launch.master_port == 20000 + 123456 % 20000
    assert launch.master_addr == "gpu07"
    assert read_launch_env({**env, "MASTER_PORT": "29500", "MASTER_ADDR": "head"}).master_port == 29500


def test_srun_environment_without_torchrun_forms_a_process_group():
    launcher_names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_")
    base = {key: value for key, value in os.environ.items() if not key.startswith(launcher_names)}
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, __file__, "--srun-rank"], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**base, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(WORLD_SIZE),
                                   "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "localhost",
                                   "MASTER_PORT": port})
             for rank in range(WORLD_SIZE)]
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0] * WORLD_SIZE, "\n".join(outputs)[-4000:]


def test_torchrun_environment_wins_over_slurm_and_nothing_means_single_process():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}
    assert read_launch_env(torchrun).source == "torchrun"
    assert read_launch_env({}).source == "single"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2"),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a"},
     "SLURM_PROCID='x'"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "a"}, "SLURM_JOB_ID"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"}, "SLURM_JOB_NODELIST"),
])
def test_inconsistent_environment_names_the_variable(env, message):
    with pytest.raises(RuntimeError, match=message):
        read_launch_env(env)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu-a[8-10],cpu1", ["gpu-a8", "gpu-a9", "gpu-a10", "cpu1"]),
    ("r[1-2]n[001-002]", ["r1n001", "r1n002", "r2n001", "r2n002"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_malformed_nodelist_is_refused():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist("node[01-")


if __name__ == "__main__":
    if sys.argv[1] == "--srun-rank":
        check_srun_rank()
    else:
        run_rank(sys.argv[1])
