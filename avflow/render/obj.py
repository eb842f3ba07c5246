"""Wavefront OBJ meshes: plain (positions and triangles) and UV-mapped (per-corner texture coordinates)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TexturedMesh:
    """Positions (V, 3), triangles (F, 3) into them, texture coordinates (T, 2) and per-corner UV indices
    (F, 3) into those: a vertex on a UV seam has one position and a different UV in each of its triangles."""

    vertices: torch.Tensor
    faces: torch.Tensor
    uv: torch.Tensor
    uv_faces: torch.Tensor


def load_obj(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices (V, 3) float32 and triangles (F, 3) long from the `v` and `f` lines of a Wavefront OBJ.

    Polygons are split into fans around their first corner; `f a/b/c`, `f a//c` and negative (relative)
    indices are accepted; every other statement (normals, texture coordinates, groups...) is ignored.
    """
    vertices, triangles, _, _ = _read_obj(Path(path), with_uv=False)
    return vertices, triangles


def load_textured_obj(path: str | os.PathLike) -> TexturedMesh:
    """A UV-mapped OBJ (`v`, `vt`, and `f a/ta b/tb c/tc` with a texture index at every corner) as a TexturedMesh."""
    return TexturedMesh(*_read_obj(Path(path), with_uv=True))


def _read_obj(path: Path, with_uv: bool):
    vertices: list[list[float]] = []
    uvs: list[list[float]] = []
    triangles: list[list[int]] = []
    uv_triangles: list[list[int]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if fields[0] == "v":
            vertices.append(_numbers(fields, 3, where, "'v x y z'", line))
        elif fields[0] == "vt" and with_uv:
            uvs.append(_numbers(fields, 2, where, "'vt u v'", line))
        elif fields[0] == "f":
            if len(fields) < 4:
                raise ValueError(f"{where}: expected a face with at least 3 corners, got {line.strip()!r}")
            corners = [_obj_index(field, 0, len(vertices), where, "vertex") for field in fields[1:]]
            triangles.extend([corners[0], corners[i], corners[i + 1]] for i in range(1, len(corners) - 1))
            if with_uv:
                uv_corners = [_obj_index(field, 1, len(uvs), where, "texture") for field in fields[1:]]
                uv_triangles.extend([uv_corners[0], uv_corners[i], uv_corners[i + 1]]
                                    for i in range(1, len(corners) - 1))
    if not triangles:
        raise ValueError(f"{path}: expected at least one 'f' line, found none")
    as_long = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
    return (torch.tensor(vertices, dtype=torch.float32).view(-1, 3), as_long(triangles),
            torch.tensor(uvs, dtype=torch.float32).view(-1, 2), as_long(uv_triangles) if with_uv else None)


def _numbers(fields: list[str], count: int, where: str, form: str, line: str) -> list[float]:
    try:
        values = [float(value) for value in fields[1:count + 1]]
    except ValueError:
        raise ValueError(f"{where}: expected {form} with numbers, got {line.strip()!r}") from None
    if len(values) < count:
        raise ValueError(f"{where}: expected {form}, got {line.strip()!r}")
    return values


def _obj_index(field: str, slot: int, defined_so_far: int, where: str, kind: str) -> int:
    """The 0-based `kind` index in position `slot` of a face corner like 3, 3/1, 3//2 or 3/1/2."""
    parts = field.split("/")
    try:
        index = int(parts[slot])
    except (ValueError, IndexError):
        raise ValueError(f"{where}: expected a {kind} index in the corner {field!r} (like 3/1/2)") from None
    resolved = index - 1 if index > 0 else defined_so_far + index
    if index == 0 or not 0 <= resolved < defined_so_far:
        raise ValueError(f"{where}: {kind} index {index} refers to none of the {defined_so_far} defined so far")
    return resolved
