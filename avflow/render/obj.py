"""Wavefront OBJ meshes: plain (positions and triangles) and UV-mapped (per-corner texture coordinates)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def load_obj(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices (V, 3) float32 and triangles (F, 3) long from the `v` and `f` lines of a Wavefront OBJ.

    Polygons are split into fans around their first corner; `f a/b/c`, `f a//c` and negative (relative)
    indices are accepted; every other statement (normals, texture coordinates, groups...) is ignored.
    """
    path = Path(path)
    vertices: list[list[float]] = []
    triangles: list[list[int]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if fields[0] == "v":
            try:
                vertices.append([float(value) for value in fields[1:4]])
            except ValueError:
                raise ValueError(f"{where}: expected 'v x y z' with numbers, got {line.strip()!r}") from None
            if len(fields) < 4:
                raise ValueError(f"{where}: expected 'v x y z', got {line.strip()!r}")
        elif fields[0] == "f":
            if len(fields) < 4:
                raise ValueError(f"{where}: expected a face with at least 3 corners, got {line.strip()!r}")
            corners = [_obj_vertex_index(field, len(vertices), where) for field in fields[1:]]
            triangles.extend([corners[0], corners[i], corners[i + 1]] for i in range(1, len(corners) - 1))
    if not triangles:
        raise ValueError(f"{path}: expected at least one 'f' line, found none")
    return torch.tensor(vertices, dtype=torch.float32).view(-1, 3), torch.tensor(triangles, dtype=torch.long)


def _obj_vertex_index(field: str, vertices_so_far: int, where: str) -> int:
    try:
        index = int(field.split("/", 1)[0])
    except ValueError:
        raise ValueError(f"{where}: expected a vertex index like 3 or 3/1/2, got {field!r}") from None
    resolved = index - 1 if index > 0 else vertices_so_far + index
    if index == 0 or not 0 <= resolved < vertices_so_far:
        raise ValueError(f"{where}: vertex index {index} refers to none of the {vertices_so_far} vertices defined so far")
    return resolved


