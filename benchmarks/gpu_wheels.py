"""The wheels the GPU machine lacks: fetched where PyPI is reachable, installed there with no index.

    python3 benchmarks/gpu_wheels.py prepare         # download into benchmarks/wheels/ (git-ignored)
    python3 benchmarks/gpu_wheels.py install DIR     # install those this python lacks into DIR (offline)

The list is benchmarks/gpu_machine_wheels.txt. `prepare` takes each CPython 3.12 manylinux x86_64 wheel from the
index, or builds the wheel of a source-only release here, which must then be pure Python. `install` skips a wheel
whose distribution this python already has (a second copy first on PYTHONPATH would shadow the machine's own) or
whose tags it cannot run. Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIST = HERE / "gpu_machine_wheels.txt"
WHEELS = HERE / "wheels"
PYTHON_VERSION, ABI = "3.12", "cp312"  # the GPU machine's CPython
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT_MB = 64.0  # what travels to the device beside the working tree


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path = LIST) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def wheel_for(requirement: str, folder: Path) -> Path | None:
    name, _, version = requirement.partition("==")
    for wheel in folder.glob("*.whl"):
        wheel_name, wheel_version = wheel.name.split("-")[:2]
        if normalized(wheel_name) == normalized(name) and (not version or wheel_version == version):
            return wheel
    return None


def prepare(folder: Path = WHEELS, python: str = sys.executable) -> list[Path]:
    """Every listed wheel into a fresh `folder`, replaced only once all of them are there."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for requirement in requirements():
        download = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest",
                    str(partial), "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", ABI]
        download += [argument for platform in PLATFORMS for argument in ("--platform", platform)]
        if subprocess.run([*download, requirement], capture_output=True, text=True).returncode != 0:
            built = subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(partial),
                                    requirement], capture_output=True, text=True)
            if built.returncode != 0:
                raise SystemExit(f"{requirement}: the index has neither a CPython {PYTHON_VERSION} wheel nor a "
                                 f"buildable source release:\n{built.stderr.strip()}")
            wheel = wheel_for(requirement, partial)
            if wheel is None or not wheel.name.endswith("-none-any.whl"):
                raise SystemExit(f"{requirement}: its source release builds {wheel.name if wheel else 'no wheel'}, "
                                 "not a pure-Python wheel, so it would not run on the GPU machine")
        elif wheel_for(requirement, partial) is None:
            raise SystemExit(f"{requirement}: pip reported a download but no matching wheel is in {partial}")
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    wheels = sorted(folder.glob("*.whl"))
    megabytes = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f"{len(wheels)} wheels, {megabytes:.1f} MB, in {folder}")
    if megabytes > CARRY_LIMIT_MB - 8:
        print(f"warning: over {CARRY_LIMIT_MB - 8:.0f} MB: with the working tree they may not travel to the device")
    return wheels


def runs_here(wheel: Path) -> bool:
    """Whether this interpreter can install the wheel: pure Python, its own CPython, or an abi3 build for an
    older one, on Linux x86_64."""
    python_tag, abi_tag, platform_tag = wheel.name[:-len(".whl")].split("-")[-3:]
    if platform_tag != "any" and not (sys.platform == "linux" and platform_tag.endswith("x86_64")):
        return False
    if abi_tag == "none":
        return True
    version = sys.version_info
    own = f"cp{version.major}{version.minor}"
    if abi_tag == "abi3":
        return any(tag.startswith("cp3") and int(tag[3:]) <= version.minor for tag in python_tag.split("."))
    return own in python_tag.split(".")


def install(target: Path, folder: Path = WHEELS) -> list[str]:
    """The prepared wheels this python lacks, installed into `target` (put it first on PYTHONPATH)."""
    have = {normalized(distribution.metadata["Name"]) for distribution in importlib.metadata.distributions()}
    missing = [wheel for wheel in sorted(folder.glob("*.whl")) if normalized(wheel.name.split("-")[0]) not in have]
    usable = [wheel for wheel in missing if runs_here(wheel)]
    for wheel in sorted(set(missing) - set(usable)):
        print(f"skipped {wheel.name}: not for this python ({sys.version.split()[0]}) or platform")
    if usable:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                        str(target), *map(str, usable)], check=True)
    names = [wheel.name.split("-")[0] for wheel in usable]
    print(f"installed {len(names)} wheels into {target}: {' '.join(names) or '-'}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="download the wheels into benchmarks/wheels/")
    install_command = commands.add_parser("install", help="install those this python lacks into DIR")
    install_command.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare()
    else:
        install(args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
