"""The renderer at pixel level, the OBJ reader, the procedural face decoder and video writing."""

import math
import subprocess

import numpy as np
import pytest
import torch

from avflow.infer.render import (Camera, ProceduralFaceDecoder, interpolate, load_face_decoder, load_obj,
                                 quaternion_to_matrix, rasterize, render_mesh, side_by_side, write_video)


def _inside_by_same_side(point, triangle):
    """Independent coverage test: the point is on the same side of all three edges (either orientation)."""
    signs = []
    for start, end in ((0, 1), (1, 2), (2, 0)):
        (ax, ay), (bx, by) = triangle[start], triangle[end]
        signs.append((bx - ax) * (point[1] - ay) - (by - ay) * (point[0] - ax))
    return all(s >= 0 for s in signs) or all(s <= 0 for s in signs)


def test_covered_pixels_are_exactly_those_whose_centres_lie_in_the_triangle():
    triangle = [(2.3, 1.7), (12.6, 3.2), (5.1, 11.4)]
    vertices = torch.tensor([[[x, y, 1.0] for x, y in triangle]])
    index_image, _ = rasterize(vertices, torch.tensor([[0, 1, 2]]), height=14, width=16)
    expected = np.array([[_inside_by_same_side((col, row), triangle) for col in range(16)] for row in range(14)])
    assert expected.sum() > 20
    np.testing.assert_array_equal(index_image[0].numpy() == 0, expected)
    assert set(index_image.unique().tolist()) == {-1, 0}


def test_clockwise_triangles_cover_the_same_pixels():
    counter_clockwise = torch.tensor([[[1.2, 1.1, 1.0], [9.7, 2.3, 1.0], [3.4, 8.8, 1.0]]])
    clockwise = counter_clockwise[:, [0, 2, 1]]
    faces = torch.tensor([[0, 1, 2]])
    assert torch.equal(rasterize(counter_clockwise, faces, 12, 12)[0], rasterize(clockwise, faces, 12, 12)[0])


@pytest.mark.parametrize("near_first", [True, False])
def test_the_nearer_triangle_wins_where_they_overlap(near_first):
    far = [[0.0, 0.0, 5.0], [15.0, 0.0, 5.0], [0.0, 15.0, 5.0]]
    near = [[3.0, 3.0, 2.0], [15.0, 3.0, 2.0], [3.0, 15.0, 2.0]]
    vertices = torch.tensor([near + far] if near_first else [far + near])
    near_face, far_face = (0, 1) if near_first else (1, 0)
    index_image, _ = rasterize(vertices, torch.tensor([[0, 1, 2], [3, 4, 5]]), 16, 16)
    assert index_image[0, 5, 5] == near_face  # both cover (5, 5)
    assert index_image[0, 1, 1] == far_face  # only the far one covers (1, 1)
    assert index_image[0, 14, 14] == -1


def test_vertex_colours_are_interpolated_with_barycentrics_at_pixel_centres():
    vertices = torch.tensor([[[0.0, 0.0, 1.0], [10.0, 0.0, 1.0], [0.0, 10.0, 1.0]]])
    faces = torch.tensor([[0, 1, 2]])
    colors = torch.eye(3)[None]  # red, green, blue
    index_image, barycentrics = rasterize(vertices, faces, 12, 12)
    image = interpolate(colors, faces, index_image, barycentrics)
    # Pixel row 2, column 3 has its centre at (x, y) = (3, 2): weights 1 - 0.3 - 0.2, 3/10, 2/10.
    torch.testing.assert_close(image[0, 2, 3], torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(image[0, 11, 11], torch.zeros(3))  # background


def test_rasterizing_a_batch_keeps_meshes_apart():
    one = torch.tensor([[1.0, 1.0, 1.0], [7.0, 1.0, 1.0], [1.0, 7.0, 1.0]])
    index_image, _ = rasterize(torch.stack([one, one + torch.tensor([8.0, 8.0, 0.0])]), torch.tensor([[0, 1, 2]]), 16, 16)
    assert index_image[0, 2, 2] == 0 and index_image[0, 10, 10] == -1
    assert index_image[1, 2, 2] == -1 and index_image[1, 10, 10] == 0


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
    with pytest.raises(ValueError, match=r"broken\.obj:3: vertex index 5"):
        load_obj(path)
    path.write_text("v 0 0 zero\n")
    with pytest.raises(ValueError, match=r"broken\.obj:1: expected 'v x y z'"):
        load_obj(path)


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
    frames = render_mesh(decoder(expression, _identity_poses(2)), decoder.faces, decoder.vertex_colors, 64, 64, Camera(focal_px=125.0))
    assert frames.shape == (2, 64, 64, 3) and frames.dtype == torch.uint8
    dark_mouth = (frames.int().sum(-1) < 120)[:, 32:, 20:44].sum(dim=(1, 2))  # the background is outside this box
    assert dark_mouth[1] > dark_mouth[0]


def test_side_by_side_places_videos_left_to_right():
    left, right = np.zeros((4, 6, 5, 3), np.uint8), np.full((4, 6, 7, 3), 255, np.uint8)
    joined = side_by_side([left, right])
    assert joined.shape == (4, 6, 12, 3) and joined[:, :, 5:].min() == 255
    with pytest.raises(ValueError, match=r"videos\[1\]"):
        side_by_side([left, right[:3]])


def test_write_video_reads_back_with_its_frames_and_audio(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="write_video needs imageio-ffmpeg")
    fps, frames, sample_rate = 10, 15, 16000
    video = np.zeros((frames, 24, 31, 3), np.uint8)  # odd width: padded to even for yuv420p
    video[:, :, :, 0] = np.linspace(0, 255, frames, dtype=np.uint8)[:, None, None]
    audio = 0.2 * np.sin(2 * np.pi * 440 * np.arange(int(1.5 * sample_rate)) / sample_rate)
    path = tmp_path / "out" / "clip.mp4"
    write_video(path, video, fps, audio, sample_rate)

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    decoded = [np.frombuffer(frame, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for frame in reader]
    assert meta["size"] == (32, 24) and meta["fps"] == pytest.approx(fps)
    assert len(decoded) == frames
    assert abs(int(decoded[-1][12, 10, 0]) - 255) < 10 and int(decoded[0][12, 10, 0]) < 10
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path)], capture_output=True, text=True)
    assert "Audio: aac" in probe.stderr
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary files left behind


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
