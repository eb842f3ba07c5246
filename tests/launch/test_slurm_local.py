"""Launches through a real SLURM cluster: the one-node cluster of slurm/local-cluster.sh.

Start it first (CI does):  bash slurm/local-cluster.sh start && export SLURM_CONF=/tmp/avflow-slurm/slurm.conf
Without `sinfo` or an answering cluster the tests that submit are skipped; the --dry-run tests only need
submitit. Submitted jobs run this test file's functions, pickled by value, with the test's interpreter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import soundfile

submitit = pytest.importorskip("submitit", reason="the SLURM launchers need submitit (pip install submitit)")
import cloudpickle  # noqa: E402  (installed with submitit)

from avflow.data.asr import extract_directory, recordings  # noqa: E402
from avflow.utils import atomic_path  # noqa: E402
from launch import extract_asr, train  # noqa: E402
from launch.executor import add_slurm_arguments, slurm_executor, submit, submit_array  # noqa: E402

pytestmark = pytest.mark.slurm

# The jobs cannot import this file (tests/launch is not a package on their sys.path): ship its code.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 180  # generous: two shared CPU cores also run the other tests
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slurm_partition() -> str:
    """The default partition of the running cluster; skips the test when no cluster answers."""
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM is not installed (no sinfo on PATH): apt-get install -y slurm-wlm munge, "
                    "then bash slurm/local-cluster.sh start")
    answer = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, timeout=30)
    if answer.returncode != 0:
        reason = (answer.stderr.strip().splitlines() or ["no error message"])[-1]
        pytest.skip(f"no SLURM cluster answers ({reason}): start one with "
                    "bash slurm/local-cluster.sh start and export the SLURM_CONF it prints")
    usable = [line.split() for line in answer.stdout.splitlines()
              if line.split()[1] == "up" and line.split()[2] in ("idle", "mixed", "allocated")]
    if not usable:
        pytest.skip(f"the SLURM cluster has no usable node:\n{answer.stdout}")
    default = [partition for partition, _, _ in usable if partition.endswith("*")]
    return (default or [usable[0][0]])[0].rstrip("*")


def slurm_args(partition: str, *extra: str) -> argparse.Namespace:
    """The launchers' SLURM options for a short job of one CPU per task."""
    parser = argparse.ArgumentParser()
    add_slurm_arguments(parser, default_job_dir="unused")
    return parser.parse_args(["--partition", partition, "--time", "15", "--cpus-per-task", "1", *extra])


def job_state(job_id: str) -> str:
    """SLURM's state of a job; empty once the controller has forgotten it."""
    answer = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    fields = dict(field.split("=", 1) for field in answer.stdout.split() if "=" in field)
    return fields.get("JobState", "")


def job_logs(job: submitit.Job) -> str:
    return "\n".join(f"---- {log}\n{log.read_text()[-3000:]}" for log in sorted(job.paths.folder.glob("*_log.*")))


def wait_until(condition: Callable[[], bool], job: submitit.Job, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Poll `condition`; fail with the job's state and logs when SLURM ends the job first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        state = job_state(job.job_id)
        if state in ENDED_STATES or not state:
            time.sleep(3)  # the last task may still be writing its result
            if condition():
                return
            pytest.fail(f"job {job.job_id} ended ({state or 'forgotten'}) before {what}\n{job_logs(job)}")
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id], check=False)
            pytest.fail(f"job {job.job_id} ({state}): no {what} after {timeout_s} s\n{job_logs(job)}")
        time.sleep(0.5)


def wait_for_job(job: submitit.Job, timeout_s: float = JOB_TIMEOUT_S) -> list[Any]:
    """The results of every task of `job`, once all are done; raises the error of a task that failed."""
    wait_until(job.done, job, "results from every task", timeout_s)
    return job.results()


@pytest.mark.parametrize("gpus, tasks_per_node, expected_tasks", [(4, None, 4), (0, 3, 3), (0, None, 1)])
def test_train_dry_run_prints_the_sbatch_script(tmp_path, capsys, gpus, tasks_per_node, expected_tasks):
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "trainer.steps=5", "--nodes", "2",
            "--gpus-per-node", str(gpus), "--partition", "gpu-long", "--time", "90", "--cpus-per-task", "6",
            "--job-dir", str(tmp_path / "jobs"), "--signal-delay-s", "300", "--dry-run", f"trainer.run_dir={tmp_path}"]
    if tasks_per_node:
        argv += ["--tasks-per-node", str(tasks_per_node)]
    assert train.main(argv) == 0
    script = capsys.readouterr().out
    lines = set(script.splitlines())
    expected = {"#SBATCH --nodes=2", f"#SBATCH --ntasks-per-node={expected_tasks}", "#SBATCH --partition=gpu-long",
                "#SBATCH --time=90", "#SBATCH --cpus-per-task=6", "#SBATCH --signal=USR2@300", "#SBATCH --requeue"}
    assert expected <= lines, script
    assert ("#SBATCH --gpus-per-node=4" in lines) == bool(gpus)
    assert any(line.startswith("srun ") and "submitit.core._submit" in line and str(tmp_path / "jobs") in line
               for line in lines), script
    assert not (tmp_path / "jobs").exists()  # a dry run submits nothing


def test_extract_asr_dry_run_prints_an_array_over_the_recordings(tmp_path, capsys):
    (tmp_path / "data" / "audio").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (tmp_path / "data" / "audio" / f"{name}.wav").touch()  # a dry run only lists them
    assert extract_asr.main(["-i", str(tmp_path / "data"), "--model", str(tmp_path), "--tasks", "8",
                             "--partition", "cpu", "--time", "30", "--dry-run"]) == 0
    lines = set(capsys.readouterr().out.splitlines())
    assert {"#SBATCH --array=0-2%3", "#SBATCH --partition=cpu", "#SBATCH --signal=USR2@120"} <= lines


def report_task() -> dict[str, Any]:
    """What a task of a job sees: its SLURM rank and the rank and world that submitit derives from it."""
    environment = submitit.JobEnvironment()
    return {"procid": int(os.environ["SLURM_PROCID"]), "rank": environment.global_rank,
            "local_rank": environment.local_rank, "world_size": environment.num_tasks, "job_id": environment.job_id}


def test_two_tasks_run_with_their_ranks_and_the_job_id_is_logged(slurm_partition, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="launch.executor")
    executor = slurm_executor(slurm_args(slurm_partition), tmp_path, "avflow-test-ranks", tasks_per_node=2)
    job = submit(executor, report_task)
    assert f"submitted job {job.job_id} (2 tasks)" in caplog.text
    reports = wait_for_job(job)
    assert [report["procid"] for report in reports] == [0, 1]
    for report in reports:
        assert report["rank"] == report["local_rank"] == report["procid"]
        assert report["world_size"] == 2 and report["job_id"] == job.job_id


class CountSteps(submitit.helpers.Checkpointable):
    """Counts to `steps`, one step every STEP_S, with its progress in a file the way training keeps
    checkpoints; like launch.train.Training, its checkpoint hook keeps no state, so a requeued run
    continues from the file."""

    STEP_S = 0.5

    def __call__(self, progress_file: Path, steps: int) -> dict[str, int]:
        progress = json.loads(progress_file.read_text()) if progress_file.exists() else {"step": 0, "runs": 0}
        progress["runs"] += 1
        while True:
            with atomic_path(progress_file) as tmp:
                tmp.write_text(json.dumps(progress))
            if progress["step"] == steps:
                return progress
            time.sleep(self.STEP_S)
            progress["step"] += 1


def progress_of(progress_file: Path) -> dict[str, int]:
    return json.loads(progress_file.read_text()) if progress_file.exists() else {"step": 0, "runs": 0}


def test_a_preempted_job_is_requeued_and_resumes_from_its_progress(slurm_partition, tmp_path):
    progress_file, steps = tmp_path / "progress.json", 16
    executor = slurm_executor(slurm_args(slurm_partition), tmp_path / "jobs", "avflow-test-requeue")
    job = submit(executor, CountSteps(), progress_file, steps)
    wait_until(lambda: progress_of(progress_file)["step"] >= 3, job, "3 steps of progress")
    job._interrupt()  # what SLURM does on preemption: SIGTERM, then the USR2 that submitit requeues on
    wait_until(lambda: progress_of(progress_file)["runs"] == 2, job, "a second run")
    interrupted_at = progress_of(progress_file)["step"]
    assert 3 <= interrupted_at < steps
    assert wait_for_job(job) == [{"step": steps, "runs": 2}]
    assert "Requeued job" in job_logs(job)




def test_extract_asr_array_writes_the_files_of_extract_asr(slurm_partition, tmp_path, tiny_wav2vec2):
    datasets = [tmp_path / "array", tmp_path / "local"]
    for dataset in datasets:
        (dataset / "audio").mkdir(parents=True)
        for seed, name in enumerate(("a", "b", "c")):
            audio = np.random.default_rng(seed).uniform(-0.5, 0.5, (16000 + 4000 * seed, 2))
            soundfile.write(dataset / "audio" / f"{name}.wav", audio, 16000, subtype="FLOAT")
    shares = extract_asr.split_recordings(datasets[0], "50h", tasks=2)
    assert [[wav.stem for wav, _ in share] for share in shares] == [["a", "c"], ["b"]]
    executor = slurm_executor(slurm_args(slurm_partition), tmp_path / "jobs", "avflow-test-extract-asr")
    jobs = submit_array(executor, extract_asr.TokenExtraction(tiny_wav2vec2, "cpu"), shares)
    assert [wait_for_job(job) for job in jobs] == [[{"written": 2, "skipped": 0}], [{"written": 1, "skipped": 0}]]
    extract_directory(datasets[1], tiny_wav2vec2, progress=False)
    for (wav, token_path), (_, expected_path) in zip(*(recordings(dataset, "50h") for dataset in datasets)):
        np.testing.assert_array_equal(np.load(token_path), np.load(expected_path), err_msg=wav.name)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


TRAIN_TINY = ["model.d_model=32", "model.n_blocks=2", "model.n_heads=2", "model.ffn_hidden=48",
              "loader.segment_length=24", "trainer.batch_size=2", "trainer.warmup_steps=2", "trainer.lr=1e-3",
              "trainer.steps=150", "trainer.checkpoint_every=10", "trainer.val_every=1000",
              "trainer.keep_checkpoints=20", "head_vae.ffn_hidden=8", "head_vae.steps=2",
              "head_vae.segment_length=16", "head_vae.batch_size=2", "corpus.train_segments=4",
              "corpus.val_segments=2", "corpus.words_per_segment=[2, 3]", "data.segments_per_shard=1",
              "parallel.strategy=ddp"]


def test_preempted_two_task_training_resumes_to_the_uninterrupted_weights(slurm_partition, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from avflow.cli import main
    from avflow.train.checkpoint import consolidate, latest_checkpoint, read_meta

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # same kernels, so the same floating-point sums, in both runs
    data = [f"data.root={tmp_path / 'corpus'}", f"loader.shards={tmp_path / 'shards'}"]
    assert main(["corpus", *TRAIN_TINY, *data]) == 0
    assert main(["pack", *TRAIN_TINY, *data]) == 0
    overrides = TRAIN_TINY + data

    reference = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "avflow.train", *overrides, f"trainer.run_dir={tmp_path / 'whole'}"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    run_dir = tmp_path / "preempted"
    executor = slurm_executor(slurm_args(slurm_partition), tmp_path / "jobs", "avflow-test-train", tasks_per_node=2)
    job = submit(executor, train.Training(None, overrides + [f"trainer.run_dir={run_dir}"]))
    wait_until(lambda: latest_checkpoint(run_dir) is not None, job, "a first checkpoint", timeout_s=240)
    job._interrupt()  # preemption: SLURM signals the job, submitit requeues it
    results = wait_for_job(job, timeout_s=300)
    assert all(Path(result).name == "step-00000150" for result in results)
    assert "Requeued job" in job_logs(job) and "resumed from" in job_logs(job)
    assert read_meta(latest_checkpoint(run_dir))["world_size"] == 2

    whole = load_file(str(consolidate(latest_checkpoint(tmp_path / "whole"), tmp_path / "whole.safetensors")))
    resumed = load_file(str(consolidate(latest_checkpoint(run_dir), tmp_path / "resumed.safetensors")))
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], resumed[name], err_msg=name)
