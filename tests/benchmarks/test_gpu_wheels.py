"""benchmarks/gpu_wheels.py: the list it reads, which wheels an interpreter can take, and an offline install that
leaves alone what the interpreter already has."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "benchmarks" / "gpu_wheels.py")
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)


def test_every_listed_wheel_is_pinned_and_none_is_on_the_gpu_machine_already():
    requirements = gpu_wheels.requirements()
    assert requirements and all("==" in requirement for requirement in requirements)
    names = {gpu_wheels.normalized(requirement.split("==")[0]) for requirement in requirements}
    on_the_machine = {gpu_wheels.normalized(line.split("==")[0]) for line in gpu_wheels.requirements(
        ROOT / "benchmarks" / "gpu_machine.txt")}
    assert not names & on_the_machine
    assert {"soundfile", "soxr", "num2words", "monotonic-alignment-search", "deepspeed"} <= names


def test_an_interpreter_takes_pure_wheels_its_own_cpython_and_older_abi3_builds():
    minor = sys.version_info.minor
    own, newer, older = f"cp3{minor}", f"cp3{minor + 1}", f"cp3{minor - 1}"
    cases = {
        "pure-1.0-py3-none-any.whl": True,
        f"own-1.0-{own}-{own}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": True,
        f"newer-1.0-{newer}-{newer}-manylinux_2_17_x86_64.whl": False,
        f"stable-1.0-{older}-abi3-manylinux_2_28_x86_64.whl": True,
        f"stable-1.0-{newer}-abi3-manylinux_2_28_x86_64.whl": False,
        f"mac-1.0-{own}-{own}-macosx_11_0_arm64.whl": False,
    }
    assert {name: gpu_wheels.runs_here(Path(name)) for name in cases} == cases


def fake_wheel(folder: Path, distribution: str, module: str) -> Path:
    wheel = folder / f"{distribution}-1.0-py3-none-any.whl"
    info = f"{distribution}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_install_takes_only_what_the_interpreter_lacks_with_no_index(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    fake_wheel(folder, "avflow_test_missing", "avflow_test_missing")
    fake_wheel(folder, "PyYAML", "yaml")  # installed here: a second copy would shadow it
    installed = gpu_wheels.install(tmp_path / "site", folder)
    assert installed == ["avflow_test_missing"]
    assert sorted(path.name for path in (tmp_path / "site").iterdir() if not path.name.endswith(".dist-info")) == [
        "avflow_test_missing"]
    result = subprocess.run([sys.executable, "-c", "import avflow_test_missing; print(avflow_test_missing.VALUE)"],
                            env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert result.stdout.strip() == "42"


def test_prepare_refuses_a_source_release_that_builds_a_platform_wheel(tmp_path, monkeypatch):
    """A compiled extension built here would be for this machine's Python, not the GPU machine's 3.12."""
    monkeypatch.setattr(gpu_wheels, "requirements", lambda: ["compiled==1.0"])

    def pip(command, **kwargs):
        if "wheel" in command:
            target = Path(command[command.index("--wheel-dir") + 1])
            (target / "compiled-1.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
        return subprocess.CompletedProcess(command, 0 if "wheel" in command else 1, "", "")

    monkeypatch.setattr(gpu_wheels.subprocess, "run", pip)
    with pytest.raises(SystemExit, match="compiled==1.0: its source release builds "
                                         "compiled-1.0-cp311-cp311-linux_x86_64.whl, not a pure-Python wheel"):
        gpu_wheels.prepare(tmp_path / "wheels")
    assert not (tmp_path / "wheels").exists()  # nothing half-prepared under the final name
