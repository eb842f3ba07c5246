"""One writer per folder: while a real `avflow train`, `infer`, `pack`, `evaluate` or `stream` job works in a folder, a
second job on that folder is refused at once with one line naming the folder and the first job's pid and host,
and writes nothing there. A SIGKILLed job leaves no lock behind: the next run (a requeued SLURM job) proceeds."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reliability_inputs import CORPUS, packed, tiny_model  # noqa: F401 (fixtures)
from test_cli_errors import TINY_TRAIN

from avflow.cli import main
from avflow.utils import FolderInUseError, hold_folder

REPOSITORY = Path(__file__).resolve().parents[2]
# Runs `avflow ARGS...` with one of its steps (argv[1], module.attribute) replaced by a wait: the job is then
# under way, holding whatever it holds at that step, until the test kills it.
STALLED_JOB = """
import importlib, sys, time
module, attribute = sys.argv[1].rsplit(".", 1)
def stall(*args, **kwargs):
    print("under way", flush=True)
    time.sleep(600)
setattr(importlib.import_module(module), attribute, stall)
from avflow.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}


@contextlib.contextmanager
def stalled(step: str, argv: list[str]):
    """A real avflow job stopped at `step`, for the test's duration; SIGKILLed at the end."""
    job = subprocess.Popen([sys.executable, "-c", STALLED_JOB, step, *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=_environment())
    try:
        if job.stdout.readline().strip() != "under way":
            job.wait(timeout=60)
            pytest.fail(f"the first job ended before its stalled step: {job.stderr.read()}")
        yield job
    finally:
        job.kill()
        job.wait()


def snapshot(folder: Path) -> dict:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


def assert_refused(argv: list[str], folder: Path, holder: subprocess.Popen, capsys) -> None:
    before = snapshot(folder)
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and stderr.count("error: ") == 1, stderr
    assert last.startswith(f"avflow {argv[0]}: error: {folder}: in use by another avflow process "
                           f"(pid {holder.pid} on host {socket.gethostname()}, since "), last
    assert snapshot(folder) == before  # the refused job wrote nothing there


@pytest.fixture
def tokens_manifest(tmp_path):
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).standard_normal((50, 29)).astype(np.float32))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"item{i}", "tokens": "tokens.npy"}) + "\n" for i in range(3)))
    return items


def test_a_second_infer_job_on_the_folder_is_refused_and_a_killed_one_leaves_no_lock(tiny_model, tokens_manifest,  # noqa: F811
                                                                                     tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["infer", "--model", str(tiny_model), "--inputs", str(tokens_manifest), "-o", str(out), "--no-video",
            "--quiet"]
    with stalled("avflow.infer.batch.read_items", argv) as first:
        assert_refused(argv, out, first, capsys)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert main(argv) == 0  # the killed job's lock went with it
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(entry["id"] for entry in lines) == ["item0", "item1", "item2"]  # each item done once
    assert all(entry["status"] == "ok" for entry in lines)


def test_infer_shards_of_one_job_share_the_folder(tiny_model, tokens_manifest, tmp_path):  # noqa: F811
    out = tmp_path / "results"
    argv = ["infer", "--model", str(tiny_model), "--inputs", str(tokens_manifest), "-o", str(out), "--no-video",
            "--quiet"]
    with stalled("avflow.infer.batch.read_items", [*argv, "--shard", "0/2"]):
        assert main([*argv, "--shard", "1/2"]) == 0  # SLURM array tasks write one results file each
    assert [json.loads(line)["id"] for line in (out / "results.shard-1-of-2.jsonl").read_text().splitlines()] == [
        "item1"]


def test_a_second_pack_on_the_folder_is_refused(packed, tmp_path, capsys):  # noqa: F811
    corpus, _ = packed
    out = tmp_path / "shards"
    argv = ["pack", "-i", str(corpus), "-o", str(out), *CORPUS]
    with stalled("avflow.data.pack.list_segment_names", argv) as first:
        assert_refused(argv, out, first, capsys)


def test_a_second_training_on_the_run_dir_is_refused_and_a_requeued_one_trains(packed, tmp_path, capsys):  # noqa: F811
    corpus, shards = packed
    run_dir = tmp_path / "run"
    argv = ["train", f"data.root={corpus}", f"loader.shards={shards}", f"trainer.run_dir={run_dir}", *TINY_TRAIN]
    with stalled("avflow.train.entry.Trainer", argv) as first:
        assert_refused(argv, run_dir, first, capsys)
        assert_refused([*argv[:1], "--resume", *argv[1:]], run_dir, first, capsys)  # --resume too
        first.send_signal(signal.SIGKILL)  # a preempted job: SLURM requeues it once this process is gone
        first.wait()
        assert main([*argv[:1], "--resume", *argv[1:]]) == 0
    assert (run_dir / "checkpoints" / "step-00000002" / "meta.json").is_file()


def test_a_second_evaluation_into_the_report_folder_is_refused(packed, tiny_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "report"
    argv = ["evaluate", "--checkpoint", str(tiny_model), "--shards", str(packed[1]), "--max-items", "1", "--nfe",
            "2", "--num-samples", "1", "--metrics", "mel_l1", "-o", str(out), "--quiet"]
    with stalled("avflow.evaluate.run._check_settings", argv) as first:
        assert_refused(argv, out, first, capsys)


def test_a_second_stream_into_the_folder_is_refused_before_its_model_loads(tiny_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "stream"
    argv = ["stream", "--model", str(tiny_model), "--text", "hello there", "-o", str(out)]
    with stalled("avflow.cli._load_model", argv) as first:
        assert_refused(argv, out, first, capsys)


def test_a_process_cannot_take_its_own_folder_twice(tmp_path):
    """POSIX locks belong to the process: a second open-and-close of the lock file would drop the first lock."""
    with hold_folder(tmp_path):
        with pytest.raises(FolderInUseError, match=f"in use by another job of this process \\(pid {os.getpid()}\\)"):
            with hold_folder(tmp_path):
                pass
    with hold_folder(tmp_path):  # released at the end of the block
        pass


def test_every_rank_of_a_refused_torchrun_job_stops_with_the_one_line(packed, tmp_path):  # noqa: F811
    """Rank 0 takes the run_dir's lock for its job and tells the other ranks: when another job holds it, every rank
    exits with the same line instead of waiting for rank 0 in a collective."""
    corpus, shards = packed
    run_dir = tmp_path / "run"
    overrides = [f"data.root={corpus}", f"loader.shards={shards}", f"trainer.run_dir={run_dir}", *TINY_TRAIN]
    with stalled("avflow.train.entry.Trainer", ["train", *overrides]) as first:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                              "127.0.0.1", "--master_port", str(port), "-m", "avflow.train", "parallel.strategy=ddp",
                              *overrides], capture_output=True, text=True, timeout=240,
                             env={**_environment(), "OMP_NUM_THREADS": "1"})
    assert job.returncode != 0
    refusal = (f"python -m avflow.train: error: {run_dir}: in use by another avflow process (pid {first.pid} on host "
               f"{socket.gethostname()}")
    assert job.stderr.count(refusal) + job.stdout.count(refusal) == 2, job.stderr[-3000:]
