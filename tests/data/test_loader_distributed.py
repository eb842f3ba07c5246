"""Two real processes launched by torchrun (gloo on localhost) stream the same shards: disjoint train
shards, lockstep steps, and validation that reads every sample exactly once across ranks."""

import datetime
import socket
import subprocess
import sys

import torch.distributed as dist
from test_loader import WINDOW, row_ids, sample_key, small_config, write_shards

from avflow.data.loader import training_batches, validation_batches

WORLD_SIZE = 2
NUM_WORKERS = 2  # 2 ranks x 2 workers = 4 consumers, one per train shard
TRAIN_SHARDS = [[12] * 20 for _ in range(4)]  # 12 frames < window: one window per sample
VAL_SHARDS = [[40, 12], [20], [33, 7, 16]]
STEPS = 6  # 3 batches per worker: 12 windows, within the 20 samples of its first-epoch shard


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_rank(shard_dir: str) -> None:
    """One rank, with RANK/WORLD_SIZE/MASTER_* set by torchrun."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        cfg = small_config(num_workers=NUM_WORKERS)
        stream = iter(training_batches(shard_dir, cfg, dist.get_rank(), dist.get_world_size()))
        shards, steps = set(), 0
        for _ in range(STEPS):
            batch = next(stream)
            frames = batch["valid"].sum().reshape(1)
            dist.all_reduce(frames)  # stands in for DDP's gradient all-reduce: a rank without data would hang here
            shards |= {ident // 100 for ident in row_ids(batch)}
            steps += 1
        val_keys = [key for batch in validation_batches(shard_dir, cfg, dist.get_rank(), dist.get_world_size())
                    for key in batch["keys"]]
        reports = [None] * WORLD_SIZE
        dist.all_gather_object(reports, {"shards": shards, "steps": steps, "val_keys": val_keys})
        assert [report["steps"] for report in reports] == [STEPS] * WORLD_SIZE
        assert not reports[0]["shards"] & reports[1]["shards"], reports
        assert reports[0]["shards"] | reports[1]["shards"] == set(range(len(TRAIN_SHARDS)))
        owned = [set(report["val_keys"]) for report in reports]
        expected = {sample_key("val", shard, index)
                    for shard, frames in enumerate(VAL_SHARDS) for index in range(len(frames))}
        assert not owned[0] & owned[1] and owned[0] | owned[1] == expected
        windows = sum(len(report["val_keys"]) for report in reports)
        assert windows == sum(-(-count // WINDOW) for frames in VAL_SHARDS for count in frames)
    finally:
        dist.destroy_process_group()


def test_two_ranks_read_disjoint_shards_in_lockstep_and_split_validation(tmp_path):
    shard_dir = write_shards(tmp_path, TRAIN_SHARDS, VAL_SHARDS)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
              "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(shard_dir)]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


if __name__ == "__main__":
    run_rank(sys.argv[1])
