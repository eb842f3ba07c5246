"""python -m launch.infer: the sbatch script of a dry run, each array task's shard of the manifest, and a
real array on the SLURM cluster of slurm/local-cluster.sh (skipped when none answers)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit", reason="the SLURM launchers need submitit (pip install submitit)")

from helpers import tiny_model_file  # noqa: E402

from avflow.cli import build_parser  # noqa: E402
from launch import infer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 300  # two shared CPU cores; every task imports torch and loads the model
# Line index -> item; the empty text is a bad item. With 2 shards, lines 0 and 2 go to task 0, 1 and 3 to task 1.
ITEMS = [{"id": "first", "text": "hello there"}, {"id": "blank", "text": ""},
         {"id": "second", "text": "good morning"}, {"id": "third", "text": "see you soon"}]
GOOD = {"first", "second", "third"}


def write_items(folder: Path) -> Path:
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors",
                           ["sample.max_frames=128", "sample.window_overlap=8"])


def test_dry_run_prints_an_array_of_one_gpu_tasks_and_the_shard_command(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    model.touch()  # a dry run only checks that it exists
    items = write_items(tmp_path)
    assert infer.main(["--array", "2", "--gpus-per-node", "1", "--partition", "gpu", "--time", "45",
                       "--job-dir", str(tmp_path / "jobs"), "--dry-run",
                       "--", "--model", str(model), "--inputs", str(items), "-o", str(tmp_path / "out"), "--no-video",
                       "--nfe", "8"]) == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    expected = {"#SBATCH --array=0-1%2", "#SBATCH --gpus-per-node=1", "#SBATCH --nodes=1",
                "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --time=45",
                "#SBATCH --signal=USR2@120", "#SBATCH --requeue"}
    assert expected <= set(lines), script
    assert any(line.startswith("srun ") and "submitit.core._submit" in line and str(tmp_path / "jobs") in line
               for line in lines), script
    assert lines[-1] == (f"# array task I (0 <= I < 2) runs: avflow infer --model {model} --inputs {items} "
                         f"-o {tmp_path / 'out'} --no-video --nfe 8 --device cuda --quiet --shard I/2")
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "out").exists()  # a dry run submits nothing


def test_more_tasks_than_lines_are_cut_to_one_task_per_line(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    model.touch()
    items = write_items(tmp_path)
    assert infer.main(["--array", "9", "--partition", "cpu", "--time", "10", "--dry-run",
                       "--", "--model", str(model), "--inputs", str(items), "-o", str(tmp_path / "out"),
                       "--procedural-face"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --array=0-3%4" in lines
    assert not any(line.startswith("#SBATCH --gpus") for line in lines)
    assert lines[-1].endswith("--procedural-face --device cpu --quiet --shard I/4")


# (launcher arguments, change to the `avflow infer` arguments after `--`, what the error names)
@pytest.mark.parametrize("launcher, change, named", [
    (["--array", "0"], lambda argv, tmp: argv, "--array: expected at least 1 task, got 0"),
    (["--array", "2"], lambda argv, tmp: argv + ["--inputs", str(tmp / "absent.jsonl")], "--inputs:"),
    (["--array", "2"], lambda argv, tmp: argv + ["--model", str(tmp / "absent.safetensors")], "--model:"),
    (["--array", "2"], lambda argv, tmp: [arg for arg in argv if arg != "--no-video"], "face decoder"),
    (["--array", "2"], lambda argv, tmp: argv + ["--inputs", str(tmp / "empty.jsonl")], "is empty"),
    (["--array", "2"], lambda argv, tmp: argv + ["--shard", "0/2"], "each array task gets its own --shard"),
    (["--array", "2"], lambda argv, tmp: [arg for arg in argv if arg != "--inputs" and not arg.endswith(".jsonl")]
     + ["--text", "hello"], "--inputs: the array splits a manifest"),
    (["--array", "2"], lambda argv, tmp: argv + ["--device", "cuda"], "--device cuda: the array tasks get no GPU"),
])
def test_bad_arguments_stop_the_launch_with_the_reason(tmp_path, capsys, launcher, change, named):
    (tmp_path / "model.safetensors").touch()
    (tmp_path / "empty.jsonl").touch()
    infer_argv = ["--model", str(tmp_path / "model.safetensors"), "--inputs", str(write_items(tmp_path)),
                  "-o", str(tmp_path / "out"), "--no-video"]
    with pytest.raises(SystemExit) as stopped:
        infer.main([*launcher, "--partition", "cpu", "--time", "10", "--dry-run", "--", *change(infer_argv, tmp_path)])
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err


def test_avflow_infer_arguments_without_the_separator_are_refused_with_where_they_go(tmp_path, capsys):
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(SystemExit) as stopped:
        infer.main(["--array", "2", "--partition", "cpu", "--time", "10", "--dry-run",
                    "--model", str(tmp_path / "model.safetensors")])
    assert stopped.value.code == 2
    assert "expected `--` and then the `avflow infer` arguments" in capsys.readouterr().err


def test_any_avflow_infer_option_reaches_every_task_unchanged(tmp_path):
    model = tmp_path / "model.safetensors"
    model.touch()
    items = write_items(tmp_path)
    given = ["--model", str(model), "--inputs", str(items), "-o", str(tmp_path / "out"), "--no-video", "--compile",
             "--max-input-seconds", "30", "--avatar-pose", "relative", "--guidance-scale", "1.5"]
    task = infer.shard_task(infer.parse_arguments(["--array", "2", "--partition", "cpu", "--time", "10", "--", *given]))
    assert task.infer_argv == ["infer", *given, "--device", "cpu", "--quiet"]
    parsed = build_parser().parse_args([*task.infer_argv, "--shard", "1/2"])
    assert (parsed.compile, parsed.max_input_seconds, parsed.avatar_pose, parsed.guidance_scale) == (True, 30.0,
                                                                                                     "relative", 1.5)
    # A --device of the user's own, even abbreviated, is kept as the only one.
    for device, gpus in ((["--device", "auto"], "0"), (["--dev", "cuda"], "1")):
        args = infer.parse_arguments(["--array", "2", "--gpus-per-node", gpus, "--partition", "cpu", "--time", "10",
                                      "--", *given, *device])
        assert infer.shard_task(args).infer_argv == ["infer", *given, *device, "--quiet"]


def test_an_unknown_avflow_infer_option_is_refused_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    submitted = []
    monkeypatch.setattr(infer, "slurm_executor", lambda *args, **kwargs: submitted.append(args))
    monkeypatch.setattr(infer, "submit_array", lambda *args: submitted.append(args))
    model = tmp_path / "model.safetensors"
    model.touch()
    with pytest.raises(SystemExit) as stopped:
        infer.main(["--array", "2", "--partition", "cpu", "--time", "10", "--job-dir", str(tmp_path / "jobs"),
                    "--", "--model", str(model), "--inputs", str(write_items(tmp_path)), "-o", str(tmp_path / "out"),
                    "--no-video", "--compiel"])
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == ["avflow infer: error: unrecognized arguments: --compiel"]
    assert submitted == [] and not (tmp_path / "jobs").exists() and not (tmp_path / "out").exists()


def launch_args(model: Path, items: Path, output: Path, *extra: str, infer_extra: tuple[str, ...] = ()):
    return infer.parse_arguments(["--array", "2", "--time", "15", "--cpus-per-task", "1", *extra,
                                  "--", "--model", str(model), "--inputs", str(items), "-o", str(output), "--no-video",
                                  *infer_extra])


def check_every_item_recorded_once(output: Path) -> None:
    """Each good item: one ok entry whose outputs are the files of RESULTS/<id>/; the bad one: one error."""
    entries = [json.loads(line) for path in sorted(output.glob("results*.jsonl"))
               for line in path.read_text().splitlines()]
    assert Counter(entry["id"] for entry in entries) == Counter(item["id"] for item in ITEMS)
    by_id = {entry["id"]: entry for entry in entries}
    for item_id in GOOD:
        assert by_id[item_id]["status"] == "ok"
        on_disk = sorted(str(path.relative_to(output)) for path in (output / item_id).iterdir())
        assert sorted(by_id[item_id]["outputs"]) == on_disk and any(name.endswith(".wav") for name in on_disk)
    assert by_id["blank"]["status"] == "error" and by_id["blank"]["error"]
    assert sorted(path.name for path in output.iterdir() if path.is_dir()) == sorted(GOOD)


def test_array_tasks_split_the_manifest_and_a_rerun_redoes_nothing(model_file, tmp_path):
    output = tmp_path / "results"
    args = launch_args(model_file, write_items(tmp_path), output, "--partition", "cpu")
    task = infer.shard_task(args)
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")  # each task a local job, as SLURM would run it

    def run(shard: int) -> dict:
        return executor.submit(task, shard).result()

    assert run(0) == {"ok": ["first", "second"], "error": []}
    assert run(1) == {"ok": ["third"], "error": ["blank"]}
    check_every_item_recorded_once(output)
    recorded = {path.name: path.read_text() for path in output.glob("results*.jsonl")}
    written = {path: path.stat().st_mtime_ns for path in output.glob("*/*")}
    assert run(0) == {"ok": ["first", "second"], "error": []}  # a requeued task finds its items done
    assert {path.name: path.read_text() for path in output.glob("results*.jsonl")} == recorded
    assert {path: path.stat().st_mtime_ns for path in output.glob("*/*")} == written


def test_a_task_runs_avflow_infer_with_the_options_given_after_the_separator(model_file, tmp_path):
    output = tmp_path / "results"
    args = launch_args(model_file, write_items(tmp_path), output, "--partition", "cpu",
                       infer_extra=("--max-input-seconds", "0.01"))
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    assert executor.submit(infer.shard_task(args), 0).result() == {"ok": [], "error": ["first", "second"]}
    errors = [json.loads(line)["error"] for line in (output / "results.shard-0-of-2.jsonl").read_text().splitlines()]
    assert len(errors) == 2 and all("max_input_seconds=0.01" in error for error in errors), errors


@pytest.fixture(scope="module")
def slurm_partition() -> str:
    """The default partition of the running cluster; skips the test when no cluster answers."""
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM is not installed: apt-get install -y slurm-wlm munge, "
                    "then bash slurm/local-cluster.sh start")
    answer = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=30)
    partitions = [line.split()[0] for line in answer.stdout.splitlines() if line.split()[1:] == ["up"]]
    if answer.returncode != 0 or not partitions:
        pytest.skip("no SLURM cluster answers: bash slurm/local-cluster.sh start and export the SLURM_CONF it prints")
    default = [partition for partition in partitions if partition.endswith("*")]
    return (default or partitions)[0].rstrip("*")


def job_logs(jobs) -> str:
    logs = sorted(log for job in jobs for log in job.paths.folder.glob(f"{job.job_id}_*_log.*"))
    return "\n".join(f"---- {log}\n{log.read_text()[-3000:]}" for log in logs)


@pytest.mark.slurm
def test_a_slurm_array_produces_every_good_item_once_and_reports_the_bad_one(slurm_partition, model_file, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(REPO)  # the tasks run where the job was submitted, and import launch.infer from there
    output = tmp_path / "results"
    args = launch_args(model_file, write_items(tmp_path), output, "--partition", slurm_partition,
                       "--job-dir", str(tmp_path / "jobs"))
    jobs = infer.submit_inference(args)
    assert len(jobs) == 2
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *(job.job_id for job in jobs)], check=False)
            pytest.fail(f"the array did not finish in {JOB_TIMEOUT_S} s\n{job_logs(jobs)}")
        time.sleep(1)
    assert [job.result() for job in jobs] == [{"ok": ["first", "second"], "error": []},
                                              {"ok": ["third"], "error": ["blank"]}], job_logs(jobs)
    check_every_item_recorded_once(output)


@pytest.mark.slurm
def test_a_preempted_task_is_requeued_and_does_only_what_was_left(slurm_partition, model_file, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean"]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": word, "text": f"the {word} is here"}) + "\n" for word in words))
    output = tmp_path / "results"
    args = infer.parse_arguments(["--array", "1", "--time", "15", "--cpus-per-task", "1",
                                  "--partition", slurm_partition, "--job-dir", str(tmp_path / "jobs"),
                                  "--", "--model", str(model_file), "--inputs", str(items), "-o", str(output),
                                  "--no-video"])
    [job] = infer.submit_inference(args)
    results = output / "results.shard-0-of-1.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (results.is_file() and results.read_text().strip()):
        if job.done() or time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id], check=False)
            pytest.fail(f"no item was recorded before the job ended or {JOB_TIMEOUT_S} s passed\n{job_logs([job])}")
        time.sleep(0.2)
    job._interrupt()  # what SLURM does on preemption: SIGTERM, then the USR2 that submitit requeues on
    # The requeued run records what is left; the interrupted run's stored failure is gone once it starts.
    while len(results.read_text().splitlines()) < len(words) or not job.done():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id], check=False)
            pytest.fail(f"the requeued job did not finish in {JOB_TIMEOUT_S} s\n{job_logs([job])}")
        time.sleep(1)
    assert job.result() == {"ok": words, "error": []}, job_logs([job])
    logs = job_logs([job])
    assert "Calling checkpoint method" in logs
    rerun = re.search(r"(\d+) items done, 0 failed, (\d+) already recorded", logs)
    assert rerun and int(rerun[2]) >= 1 and int(rerun[1]) + int(rerun[2]) == len(words), logs
    entries = [json.loads(line) for line in results.read_text().splitlines()]
    assert Counter(entry["id"] for entry in entries) == Counter(words)
    assert sorted(path.name for path in output.iterdir() if path.is_dir()) == sorted(words)
