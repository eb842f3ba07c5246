"""Real 2-process training under torchrun (gloo, CPU): every strategy trains the tiny demo setup, and a
run whose rank is SIGKILLed mid-training resumes to the same final weights as an uninterrupted run."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import packed_tiny_corpus
from safetensors.numpy import load_file
from torch.distributed.checkpoint import FileSystemReader

from avflow.train.checkpoint import consolidate, latest_checkpoint, read_meta, verify_checkpoint

TINY = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48", "loader.segment_length=24",
        "trainer.batch_size=2", "trainer.warmup_steps=2", "trainer.lr=1e-3", "trainer.log_every=5",
        "head_vae.ffn_hidden=8", "head_vae.steps=2", "head_vae.segment_length=16", "head_vae.batch_size=2",
        "corpus.train_segments=4", "corpus.val_segments=2", "corpus.words_per_segment=[2, 3]",
        "data.segments_per_shard=1", "parallel.fsdp_param_dtype=fp32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A packed tiny corpus and a head VAE shared by every run, so only the main model trains."""
    return packed_tiny_corpus(tmp_path_factory.mktemp("data"), TINY)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(run_dir: Path, overrides: list[str], resume: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "avflow.train", *(["--resume"] if resume else []),
               *overrides, f"trainer.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def final_weights(run_dir: Path, out: Path) -> dict:
    return load_file(str(consolidate(latest_checkpoint(run_dir), out)))


@pytest.mark.parametrize("strategy, extra", [("ddp", []), ("ddp", ["trainer.async_checkpoint=true"]), ("fsdp", []),
                                             ("deepspeed", [])])
def test_strategy_trains_and_checkpoints(data, tmp_path, strategy, extra):
    overrides = TINY + data + [f"parallel.strategy={strategy}", "trainer.steps=6", "trainer.checkpoint_every=3",
                               "trainer.val_every=3", *extra]
    finish(torchrun(tmp_path / "run", overrides))
    final = latest_checkpoint(tmp_path / "run")
    meta = read_meta(final)
    assert meta["step"] == 6 and meta["world_size"] == 2
    saved = FileSystemReader(final).read_metadata().state_dict_metadata
    for rank in range(2):  # each rank's own position and random state
        assert f"loader_rank{rank}.batches" in saved and f"rng_rank{rank}.cpu" in saved
    # the ranks hash their own files: together every file is recorded, and each digest is right
    assert set(meta["files"]) == {path.name for path in final.iterdir()} - {"meta.json"}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(meta["files"])
    verify_checkpoint(final)
    # complete step directories only: no staging leftovers, also when writes were asynchronous
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    weights = final_weights(tmp_path / "run", tmp_path / "model.safetensors")
    assert weights["ema/out_a.weight"].shape == (80, 32)


def children_training(run_dir: Path) -> list[int]:
    """PIDs of the rank processes (not the torchrun agent) of a run."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if str(run_dir) in command and "torch.distributed.run" not in command:
                pids.append(int(entry.name))
    return pids


def test_sigkilled_rank_resumes_to_the_uninterrupted_weights(data, tmp_path):
    overrides = TINY + data + ["parallel.strategy=ddp", "trainer.steps=120", "trainer.checkpoint_every=20",
                               "trainer.val_every=1000", "trainer.keep_checkpoints=10"]
    finish(torchrun(tmp_path / "whole", overrides))

    interrupted = torchrun(tmp_path / "killed", overrides)
    deadline = time.time() + 180
    while latest_checkpoint(tmp_path / "killed") is None:
        assert interrupted.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(children_training(tmp_path / "killed")[0], signal.SIGKILL)
    interrupted.communicate(timeout=120)
    assert interrupted.returncode != 0
    killed_at = read_meta(latest_checkpoint(tmp_path / "killed"))["step"]
    assert killed_at < 120

    output = finish(torchrun(tmp_path / "killed", overrides, resume=True))
    assert f"resumed from {tmp_path / 'killed' / 'checkpoints'}" in output
    whole = final_weights(tmp_path / "whole", tmp_path / "whole.safetensors")
    resumed = final_weights(tmp_path / "killed", tmp_path / "resumed.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], resumed[name], err_msg=name)
