"""The textured rasterizer (no DRTK) against images worked out by hand: UV orientation and texel centres,
seams through per-corner UV indices, occlusion under the published camera, perspective-correct UVs."""

import torch

from avflow.render import rasterize, render_textured
from avflow.render.codec_avatar import DEFAULT_HEAD_TRANSFORM, head_relative_camera, project

QUAD = torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_a_screen_filling_quad_shows_its_texture_texel_for_texel():
    """Corners on the image's outer edges (pixel centres at integers, so the corners are at -0.5 and
    W - 0.5) with UVs (0, 1) top left ... (0, 0) bottom left: with v flipped, texture row 0 is the image's
    top row and pixel (i, j) samples texel (i, j) at its centre, exactly."""
    size = 6
    screen = torch.tensor([[[-0.5, -0.5, 2.0], [size - 0.5, -0.5, 2.0], [size - 0.5, size - 0.5, 2.0],
                            [-0.5, size - 0.5, 2.0]]])
    uv = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    texture = torch.arange(3 * size * size, dtype=torch.float32).view(1, 3, size, size)
    image = render_textured(screen, QUAD, uv, QUAD, texture, size, size)
    torch.testing.assert_close(image[0], texture[0].permute(1, 2, 0))


def test_a_seam_gives_a_shared_vertex_a_different_uv_in_each_triangle():
    """Both triangles share corners 0 and 2, but their UV indices point into different halves of a texture
    that is red on the left and blue on the right: each triangle shows its own half, no blend across."""
    screen = torch.tensor([[[0.0, 0.0, 1.0], [9.0, 0.0, 1.0], [9.0, 9.0, 1.0], [0.0, 9.0, 1.0]]])
    uv = torch.tensor([[0.1, 0.5], [0.2, 0.6], [0.3, 0.4], [0.7, 0.5], [0.8, 0.6], [0.9, 0.4]])
    uv_faces = torch.tensor([[0, 1, 2], [3, 5, 4]])  # the second triangle's corners 0, 2, 3 use the right half
    texture = torch.zeros(1, 3, 4, 4)
    texture[0, 0, :, :2], texture[0, 2, :, 2:] = 1.0, 1.0
    image = render_textured(screen, QUAD, uv, uv_faces, texture, 12, 12)
    red, blue, black = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0]), torch.zeros(3)
    torch.testing.assert_close(image[0, 2, 7], red)  # above the diagonal: the first triangle
    torch.testing.assert_close(image[0, 7, 2], blue)  # below it: the second
    torch.testing.assert_close(image[0, 4, 10], black)  # beyond the quad's right edge x = 9
    assert image[0, :10, :10].sum(-1).min() > 0  # every pixel centre inside the quad (edges included) is textured


def _cube(half: float):
    """A cube centred on the head origin, each face with its own 4 UV corners in a column of a 6-texel texture."""
    corners = torch.tensor([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)])
    quads = {"front": [1, 5, 7, 3], "back": [4, 0, 2, 6], "right": [5, 4, 6, 7],
             "left": [0, 1, 3, 2], "top": [3, 7, 6, 2], "bottom": [0, 4, 5, 1]}
    faces, uv, uv_faces = [], [], []
    for column, quad in enumerate(quads.values()):
        base = len(uv)
        u = (column + 0.5) / 6
        uv += [[u, 0.5]] * 4
        faces += [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
        uv_faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    return corners, torch.tensor(faces), torch.tensor(uv), torch.tensor(uv_faces), list(quads)


def test_a_cube_seen_by_the_published_camera_shows_its_nearer_face():
    corners, faces, uv, uv_faces, names = _cube(100.0)
    texture = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6).expand(1, 3, 1, 6) * 10 + 10
    rotation, translation, _ = head_relative_camera(torch.tensor(DEFAULT_HEAD_TRANSFORM)[None])
    for order in (faces, faces.flip(0)):  # whichever face comes first, the nearer one wins
        flipped_uv = uv_faces if order is faces else uv_faces.flip(0)
        screen = project(corners[None], rotation, translation, 64, 64)
        image = render_textured(screen, order, uv, flipped_uv, texture, 64, 64)
        # The head's origin lands on the principal point (512, 426.9) / 16; the front face (z = +100 mm, 900 mm
        # from the camera) hides the back one there.
        assert image[0, 27, 32, 0] == 10 * names.index("front") + 10
        # The front face spans focal * 100 / 900 = 17.5 px each side of the centre; outside the back face's
        # 14.3 px but inside it, only the front; beyond both, black.
        assert image[0, 27, 32 + 16, 0] == 10 * names.index("front") + 10
        assert image[0, 27, 32 + 19].sum() == 0


def test_uvs_are_perspective_correct_where_affine_ones_would_differ():
    """A square receding from depth 1 (left edge, u = 0) to depth 3 (right edge, u = 1) over screen x 0..8.
    The pixel at the screen midpoint x = 4 (row 2) sees u = (0.5 / 3) / (0.5 / 1 + 0.5 / 3) = 0.25, not the affine
    0.5; a 4-texel gradient [0, 10, 20, 30] sampled bilinearly there (texel coordinate 4u - 0.5) gives 5, not 15."""
    screen = torch.tensor([[[0.0, 0.0, 1.0], [8.0, 0.0, 3.0], [8.0, 8.0, 3.0], [0.0, 8.0, 1.0]]])
    uv = torch.tensor([[0.0, 0.5], [1.0, 0.5], [1.0, 0.5], [0.0, 0.5]])
    texture = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 1, 1, 4)
    image = render_textured(screen, QUAD, uv, QUAD, texture, 9, 9)
    torch.testing.assert_close(image[0, 2, 4, 0], torch.tensor(5.0))
    index_image, affine = rasterize(screen, QUAD, 9, 9, perspective=False)
    corner_u = uv[QUAD[index_image[0, 2, 4]], 0]
    torch.testing.assert_close((affine[0, 2, 4] * corner_u).sum(), torch.tensor(0.5))


def test_drtk_is_used_only_when_the_real_package_is_there_and_tensors_are_on_cuda(monkeypatch):
    """The PyPI `drtk` is an unrelated placeholder without the API: it is ignored. The real one (its three
    functions) is picked up, but CPU tensors still go through the PyTorch rasterizer."""
    import sys
    import types

    from avflow.render.raster import drtk_module, rasterize_any

    monkeypatch.setitem(sys.modules, "drtk", types.ModuleType("drtk"))
    assert drtk_module() is None
    calls = []
    real = types.ModuleType("drtk")
    for name in ("rasterize", "render", "interpolate"):
        setattr(real, name, lambda *args, name=name: calls.append(name))
    monkeypatch.setitem(sys.modules, "drtk", real)
    assert drtk_module() is real
    screen = torch.tensor([[[0.0, 0.0, 1.0], [9.0, 0.0, 1.0], [9.0, 9.0, 1.0], [0.0, 9.0, 1.0]]])
    index_image, _ = rasterize_any(screen, QUAD, 10, 10)
    assert calls == [] and torch.equal(index_image, rasterize(screen, QUAD, 10, 10)[0])
