"""The procedural face decoder, its Lambert-shaded render, and TorchScript face decoders."""

import math

import pytest
import torch

from avflow.render import Camera, ProceduralFaceDecoder, load_face_decoder, quaternion_to_matrix, render_mesh


def _identity_poses(frames):
    pose = torch.zeros(frames, 7)
    pose[:, 0] = 1.0
    return pose


def test_jaw_open_separates_the_lips_and_lip_close_shuts_them():
    decoder = ProceduralFaceDecoder()
    expression = torch.zeros(3, 256)
    expression[1, 0] = 1.0  # jaw_open
    expression[2, 0], expression[2, 2] = 1.0, 1.0  # jaw_open with lip_close
    vertices = decoder(expression, _identity_poses(3))
    gap = (vertices[:, decoder.upper_lip_index] - vertices[:, decoder.lower_lip_index]).norm(dim=-1)
    assert gap[1] > gap[0] + 0.02
    assert gap[2] < 1e-6
    assert vertices.shape == (3, decoder.rest_vertices.shape[0], 3)


def test_head_pose_rotates_and_translates_the_mesh_as_the_quaternion_says():
    decoder = ProceduralFaceDecoder()
    expression = torch.zeros(2, 256)
    pose = _identity_poses(2)
    # Frame 1: 90 degrees about +y (w = cos 45, y = sin 45) then a 2 cm shift right: (x, y, z) -> (z, y, -x) + t.
    pose[1, :4] = torch.tensor([math.cos(math.pi / 4), 0.0, math.sin(math.pi / 4), 0.0])
    pose[1, 4:] = torch.tensor([0.02, 0.0, 0.0])
    rest, posed = decoder(expression, pose)
    x, y, z = rest.unbind(-1)
    torch.testing.assert_close(posed, torch.stack([z + 0.02, y, -x], -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(quaternion_to_matrix(pose[1, :4]) @ quaternion_to_matrix(pose[1, :4]).T, torch.eye(3))


def test_rendered_head_shows_an_open_mouth():
    decoder = ProceduralFaceDecoder()
    expression = torch.zeros(2, 256)
    expression[1, 0] = 1.0
    frames = render_mesh(decoder(expression, _identity_poses(2)), decoder.faces, decoder.vertex_colors, 64, 64,
                         Camera(focal_px=125.0))
    assert frames.shape == (2, 64, 64, 3) and frames.dtype == torch.uint8
    dark_mouth = (frames.int().sum(-1) < 120)[:, 32:, 20:44].sum(dim=(1, 2))  # the background is outside this box
    assert dark_mouth[1] > dark_mouth[0]


class _ShiftDecoder(torch.nn.Module):
    """A TorchScript-able decoder: one triangle moved by the pose's translation."""

    def __init__(self):
        super().__init__()
        self.register_buffer("faces", torch.tensor([[0, 1, 2]]))
        self.register_buffer("rest", torch.eye(3))

    def forward(self, expression: torch.Tensor, head_pose: torch.Tensor) -> torch.Tensor:
        return self.rest[None] + head_pose[:, None, 4:]


def test_face_decoders_load_from_torchscript_and_state_dicts_are_refused(tmp_path):
    scripted = tmp_path / "decoder.pt"
    torch.jit.save(torch.jit.script(_ShiftDecoder()), scripted)
    decoder = load_face_decoder(scripted)
    assert decoder(torch.zeros(2, 256), _identity_poses(2)).shape == (2, 3, 3)
    assert decoder.faces.tolist() == [[0, 1, 2]]
    state_dict = tmp_path / "weights.pt"
    torch.save(_ShiftDecoder().state_dict(), state_dict)
    with pytest.raises(ValueError, match=r"weights\.pt: expected a TorchScript face decoder"):
        load_face_decoder(state_dict)
