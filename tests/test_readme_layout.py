"""The README's layout table is complete and true: every package, module and top-level folder is listed, and
every path it names exists. A file added without a line in the table fails here."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "avflow"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def layout_rows() -> list[tuple[list[str], str]]:
    """(the paths of the first column, the text of the second) per row of the README's layout table."""
    rows = []
    for line in _section("Layout").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and line.startswith("|") and cells[0] not in ("path", "---"):
            rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1]))
    return rows


def _modules(folder: Path) -> list[str]:
    """What a package row must name: its modules as `name.py`, its sub-packages as `name/`."""
    names = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".py" and not path.name.startswith("__"):
            names.append(path.name)
        elif path.is_dir() and (path / "__init__.py").is_file():
            names.append(f"{path.name}/")
            names.extend(f"{path.name}/{name}" for name in _modules(path) if not name.endswith("/"))
    return names


def _tracked_top_level() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    if not listed.strip():
        pytest.skip("not a git checkout")
    return {name.split("/")[0] + "/" for name in listed.splitlines() if "/" in name}


def test_every_package_and_module_of_avflow_is_in_the_layout_table():
    rows = layout_rows()
    named = {path for paths, _ in rows for path in paths}
    missing = []
    for path in sorted(PACKAGE.iterdir()):
        if path.suffix == ".py" and not path.name.startswith("__"):
            if f"avflow/{path.name}" not in named:
                missing.append(f"avflow/{path.name}")
        elif path.is_dir() and (path / "__init__.py").is_file():
            row = [text for paths, text in rows if f"avflow/{path.name}/" in paths]
            if not row:
                missing.append(f"avflow/{path.name}/")
                continue
            mentioned = set(re.findall(r"`([^`]+)`", row[0]))
            missing.extend(f"avflow/{path.name}/{name}" for name in _modules(path) if name not in mentioned)
    assert not missing, "README layout table lacks: " + ", ".join(missing)


def test_every_top_level_folder_and_config_folder_is_in_the_layout_table():
    named = {path for paths, _ in layout_rows() for path in paths}
    wanted = _tracked_top_level() | {f"configs/{p.name}/" for p in (ROOT / "configs").iterdir() if p.is_dir()}
    missing = sorted(wanted - named - {"avflow/"})  # avflow's own rows are checked above, one per module
    assert not missing, "README layout table lacks: " + ", ".join(missing)


def test_every_path_the_layout_table_names_exists():
    gone = []
    for paths, text in layout_rows():
        gone.extend(path for path in paths if not (ROOT / path).exists())
        for package in (path for path in paths if path.startswith("avflow/") and path.endswith("/")):
            gone.extend(f"{package}{name}" for name in re.findall(r"`([\w/]+(?:\.py|/))`", text)
                        if not (ROOT / package / name).exists())
    assert not gone, "README layout table names what does not exist: " + ", ".join(gone)
