"""The import rule of the README, checked on every import statement in avflow (those inside functions too):
imports only point down the stages, and training and inference are siblings."""

import ast
from pathlib import Path

import avflow

BOTTOM = {"config", "runtime", "utils", "optional"}
# stage -> the stages it may import, as the README's layout section states them
ALLOWED = {
    "config": BOTTOM, "runtime": BOTTOM, "utils": BOTTOM, "optional": BOTTOM,
    "text": BOTTOM,
    "data": BOTTOM | {"text"},
    # the network and the vocoders are siblings: neither imports the other
    "model": BOTTOM | {"text", "data"},
    "vocoder": BOTTOM | {"text", "data"},
    "render": BOTTOM | {"text", "data", "model", "vocoder"},
    "infer": BOTTOM | {"text", "data", "model", "vocoder", "render"},
    "export": BOTTOM | {"text", "data", "model", "vocoder", "render", "infer"},
    # training's validation renders the avatar clip and uses the pure metric functions
    "train": BOTTOM | {"text", "data", "model", "vocoder", "render", "evaluate.metrics"},
    "evaluate": BOTTOM | {"text", "data", "model", "vocoder", "render", "infer", "export"},
    "demo": BOTTOM | {"text", "data", "model", "vocoder", "render", "infer", "export", "train", "evaluate"},
    "cli": BOTTOM | {"text", "data", "model", "vocoder", "render", "infer", "export", "train", "evaluate", "demo"},
}
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
