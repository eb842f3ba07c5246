"""The import rule of the README (its "| stage | may import |" table), checked on every import statement in
avflow (those inside functions too): imports only point down the stages, and training and inference are
siblings."""

import ast
import re
from pathlib import Path

import avflow

README = Path(__file__).resolve().parents[1] / "README.md"


def _allowed_from_readme() -> dict[str, set[str]]:
    """stage -> the stages it may import, read from the README's "| stage | may import |" table, so the rule a
    reader sees is the rule this test enforces. `evaluate/metrics.py` in a cell is the module `evaluate.metrics`;
    the first row's stages (the bottom) may be imported by all."""
    def names(cell: str) -> set[str]:
        return {name.removesuffix(".py").replace("/", ".") for name in re.findall(r"`([^`]+)`", cell)}

    lines = README.read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if re.match(r"\|\s*stage\s*\|\s*may import\s*\|", line))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        stages, imports = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append((names(stages), names(imports)))
    bottom = rows[0][0]  # the first row's stages: every stage may import them
    return {stage: imports | bottom for stages, imports in rows for stage in stages}


ALLOWED = _allowed_from_readme()
PACKAGE = Path(avflow.__file__).parent


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "avflow"


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [name for name in names if name.startswith("avflow.")]


def test_every_import_points_down_the_stages():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts)
        stage = _stage(module)
        if stage in ("avflow", "__init__", "__main__"):
            continue
        assert stage in ALLOWED, f"avflow/{stage}: a stage the README's import table does not list"
        allowed = ALLOWED[stage]
        for name in _imported(ast.parse(path.read_text())):
            target = _stage(name)
            if target == stage or target in allowed or any(f"{name}.".startswith(f"avflow.{a}.") for a in allowed):
                continue
            wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_pure_metrics_import_no_stage():
    source = (PACKAGE / "evaluate" / "metrics.py").read_text()
    assert _imported(ast.parse(source)) == []
