"""What a GPU machine or a slim image can run without the packages only some features need: the model, sampling,
training, strategies, rendering, export and the GPU check's benchmarks import with nothing but torch, numpy,
scipy, pyyaml, safetensors, tqdm, tensorboard and matplotlib; a feature whose package is missing fails with one
error naming the package and the feature."""

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The packages a bare GPU machine is promised to have (issue 19), as distributions.
PRESENT = {"torch", "numpy", "scipy", "pyyaml", "safetensors", "tqdm", "tensorboard", "matplotlib"}
GPU_PATH_MODULES = ["avflow.model.avflow", "avflow.model.flow", "avflow.infer.model", "avflow.infer.sampler",
                    "avflow.infer.generate", "avflow.vocoder.bigvgan", "avflow.vocoder.weights",
                    "avflow.vocoder.vocode", "avflow.train.loop", "avflow.train.parallel",
                    "avflow.render", "avflow.render.video", "avflow.export.exporter"]
BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Block())
"""


def _normalized(distribution: str) -> str:
    return distribution.lower().replace("_", "-")


def blocked_import_names() -> set[str]:
    """Top-level import names of every package avflow declares (extras too) but PRESENT, from installed metadata."""
    by_distribution: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            by_distribution.setdefault(_normalized(distribution), set()).add(module)
    names = set()
    for requirement in importlib.metadata.requires("avflow"):
        distribution = _normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
        if distribution not in PRESENT:
            names |= {name for name in by_distribution.get(distribution, {distribution.replace("-", "_")})
                      if not name.startswith("_")}
    return names


def run_blocked(blocked: set[str], code: str) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=sorted(blocked)) + code
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def gpu_check_benchmarks() -> list[str]:
    return sorted(set(re.findall(r"benchmarks/\w+\.py", (ROOT / "benchmarks" / "gpu_check.sh").read_text())))


def test_the_blocked_set_covers_every_declared_package_but_the_gpu_machines():
    blocked = blocked_import_names()
    assert {"soundfile", "soxr", "librosa", "phonemizer", "num2words", "monotonic_alignment_search", "moviepy",
            "imageio_ffmpeg", "deepspeed", "submitit", "webdataset"} <= blocked
    assert not {"torch", "numpy", "scipy", "yaml", "safetensors", "tqdm", "tensorboard", "matplotlib"} & blocked


def test_gpu_path_modules_and_the_gpu_check_benchmarks_import_with_only_the_gpu_machines_packages():
    benchmarks = gpu_check_benchmarks()
    assert "benchmarks/sample.py" in benchmarks and "benchmarks/train_throughput.py" in benchmarks
    code = f"""
import contextlib, importlib, io, runpy, sys
failures = []
for module in {GPU_PATH_MODULES!r}:
    try:
        importlib.import_module(module)
    except Exception as error:
        failures.append(f"{{module}}: {{error!r}}")
for script in {benchmarks!r}:
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (0, None):
            failures.append(f"{{script}} --help: exit {{exit.code}}")
    except Exception as error:
        failures.append(f"{{script}}: {{error!r}}")
print("\\n".join(failures))
"""
    result = run_blocked(blocked_import_names(), code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_a_feature_without_its_package_names_the_package_and_the_feature(tmp_path):
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF")
    code = f"""
import json
from avflow.data.features import load_wav, resample
from avflow.text.phonemes import resolve_front_end
from avflow.text.normalize import number_words
from avflow.optional import MissingPackageError
messages = []
for call in (lambda: load_wav({str(wav)!r}), lambda: resample([0.0, 1.0], 48000, 16000), lambda: number_words(7)):
    try:
        call()
    except MissingPackageError as error:
        messages.append(str(error))
print(json.dumps({{"messages": messages, "front_end": resolve_front_end("auto")}}))
"""
    result = run_blocked({"soundfile", "soxr", "num2words", "phonemizer"}, code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["messages"] == [
        "reading audio files needs the Python package soundfile, which is not installed (pip install soundfile)",
        "resampling audio needs the Python package soxr, which is not installed (pip install soxr)",
        "reading numbers in text needs the Python package num2words, which is not installed (pip install num2words)"]
    assert report["front_end"] == "character"  # phonemes are optional: letters are the fallback


@pytest.mark.parametrize("command", [["corpus", "-o", "{tmp}/corpus"]])
def test_a_command_without_a_package_it_needs_ends_with_one_line(tmp_path, command):
    argv = [part.format(tmp=tmp_path) for part in command]
    result = run_blocked({"soundfile"}, f"import sys\nfrom avflow.cli import main\nsys.exit(main({argv!r}))")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "avflow corpus: error: writing wav files needs the Python package soundfile, which is not installed "
        "(pip install soundfile)"]
