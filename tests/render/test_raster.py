"""The rasterizer at pixel level: coverage, occlusion, barycentrics, batches."""

import numpy as np
import pytest
import torch

from avflow.render import interpolate, rasterize


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
    index_image, _ = rasterize(torch.stack([one, one + torch.tensor([8.0, 8.0, 0.0])]), torch.tensor([[0, 1, 2]]),
                               16, 16)
    assert index_image[0, 2, 2] == 0 and index_image[0, 10, 10] == -1
    assert index_image[1, 2, 2] == -1 and index_image[1, 10, 10] == 0
