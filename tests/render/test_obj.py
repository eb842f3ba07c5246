"""The OBJ reader."""

import pytest
import torch

from avflow.render import load_obj


def test_obj_quads_and_slash_forms_become_triangles(tmp_path):
    path = tmp_path / "quad.obj"
    path.write_text("# a unit square and a triangle\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\n"
                    "vn 0 0 1\nf 1/1/1 2/1/1 3/1/1 4/1/1\nf 1//1 2//1 -1//1\n")
    vertices, faces = load_obj(path)
    assert vertices.dtype == torch.float32 and vertices.shape == (4, 3)
    assert faces.dtype == torch.long
    assert faces.tolist() == [[0, 1, 2], [0, 2, 3], [0, 1, 3]]


def test_obj_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nf 1 2 5\n")
    with pytest.raises(ValueError, match=r"broken\.obj:3: vertex index 5 refers"):
        load_obj(path)
    path.write_text("v 0 0 zero\n")
    with pytest.raises(ValueError, match=r"broken\.obj:1: expected 'v x y z'"):
        load_obj(path)
