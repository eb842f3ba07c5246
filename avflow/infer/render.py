"""Turning generated face codes and head poses into video.

A face decoder maps (expression code, head pose) to mesh vertices; the mesh is rasterized (DRTK on a GPU
when Meta's package is installed, otherwise a pure PyTorch z-buffer rasterizer), Lambert-shaded and
written to an .mp4 with the generated speech muxed in. The real Codec-Avatar decoder cannot be shipped,
so `ProceduralFaceDecoder` gives the demo a head whose mouth and eyes follow the interpretable controls
(MOUTH_CONTROLS) in the first four expression components.

Screen convention used throughout: x grows to the right, y grows downwards, the pixel in row r and
column c has its centre at (x, y) = (c, r), and z is the depth in front of the camera (smaller is nearer).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import soundfile
import torch

from avflow.utils import atomic_path

# Pixel candidates evaluated at once by the fallback rasterizer: bounds memory, not correctness.
CANDIDATES_PER_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------------------------
# Rasterization


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-buffer rasterization: per pixel, the nearest covering triangle and its barycentric coordinates.

    vertices (N, V, 3) are in screen space (see the module docstring), faces (F, 3) index them. Returns an
    index image (N, H, W) long with -1 for background and barycentrics (N, H, W, 3) (zero on background).
    Barycentrics are affine in screen space. Triangles with a vertex at depth <= 0 (behind the camera), a
    non-finite vertex or zero screen area are skipped; on exactly equal depth the higher face index wins.
    """
    _check_mesh(vertices, faces)
    n_meshes, n_faces = vertices.shape[0], faces.shape[0]
    device = vertices.device
    depth_buffer = torch.full((n_meshes * height * width,), math.inf, device=device)
    index_buffer = torch.full((n_meshes * height * width,), -1, dtype=torch.long, device=device)
    bary_buffer = torch.zeros((n_meshes * height * width, 3), device=device)
    if n_faces == 0 or height == 0 or width == 0:
        return index_buffer.view(n_meshes, height, width), bary_buffer.view(n_meshes, height, width, 3)

    corners = vertices[:, faces].reshape(n_meshes * n_faces, 3, 3).float()  # one row per (mesh, face)
    mesh_of = torch.arange(n_meshes, device=device).repeat_interleave(n_faces)
    face_of = torch.arange(n_faces, device=device).repeat(n_meshes)
    x0 = corners[:, :, 0].amin(1).ceil().clamp(0, width - 1)
    x1 = corners[:, :, 0].amax(1).floor().clamp(-1, width - 1)
    y0 = corners[:, :, 1].amin(1).ceil().clamp(0, height - 1)
    y1 = corners[:, :, 1].amax(1).floor().clamp(-1, height - 1)
    box_width, box_height = x1 - x0 + 1, y1 - y0 + 1
    drawable = (corners.isfinite().all(dim=(1, 2)) & (corners[:, :, 2] > 0).all(1)
                & (box_width > 0) & (box_height > 0) & (_signed_double_area(corners) != 0))
    candidates = torch.where(drawable, box_width * box_height, torch.zeros_like(box_width)).long()

    # Similar-sized boxes go into the same chunk so padding every box to the chunk's largest wastes little.
    order = torch.argsort(candidates)
    order = order[candidates[order] > 0]
    start = 0
    while start < order.numel():
        stop = start + 1
        while stop < order.numel() and (stop - start + 1) * int(candidates[order[stop]]) <= CANDIDATES_PER_CHUNK:
            stop += 1
        chunk = order[start:stop]
        largest = int(candidates[chunk].max())
        _rasterize_chunk(corners[chunk], mesh_of[chunk], face_of[chunk], x0[chunk], y0[chunk], box_width[chunk],
                         candidates[chunk], largest, height, width, depth_buffer, index_buffer, bary_buffer)
        start = stop
    return index_buffer.view(n_meshes, height, width), bary_buffer.view(n_meshes, height, width, 3)


def _signed_double_area(corners: torch.Tensor) -> torch.Tensor:
    a, b, c = corners[:, 0, :2], corners[:, 1, :2], corners[:, 2, :2]
    return _cross2(b - a, c - a)


def _cross2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _rasterize_chunk(corners, mesh_of, face_of, x0, y0, box_width, candidates, largest, height, width,
                     depth_buffer, index_buffer, bary_buffer) -> None:
    """Test every pixel centre in each triangle's bounding box and merge the winners into the buffers."""
    offset = torch.arange(largest, device=corners.device)
    in_box = offset[None, :] < candidates[:, None]
    px = x0[:, None] + (offset[None, :] % box_width[:, None])
    py = y0[:, None] + torch.div(offset[None, :], box_width[:, None], rounding_mode="floor")
    point = torch.stack([px, py], dim=-1)
    a, b, c = corners[:, None, 0, :2], corners[:, None, 1, :2], corners[:, None, 2, :2]
    area = _signed_double_area(corners)[:, None]
    weights = torch.stack([_cross2(c - b, point - b), _cross2(a - c, point - c), _cross2(b - a, point - a)], -1)
    weights = weights / area[..., None]
    inside = in_box & (weights >= 0).all(-1)
    depth = (weights * corners[:, None, :, 2]).sum(-1)

    pixel = (mesh_of[:, None] * height * width + py.long() * width + px.long())[inside]
    depth, face, weights = depth[inside], face_of[:, None].expand_as(inside)[inside], weights[inside]
    nearest = torch.full_like(depth_buffer, math.inf).scatter_reduce(0, pixel, depth, "amin")
    wins = (depth == nearest[pixel]) & (depth < depth_buffer[pixel])
    winning_face = torch.full_like(index_buffer, -1).scatter_reduce(0, pixel[wins], face[wins], "amax")
    wins &= face == winning_face[pixel]
    depth_buffer[pixel[wins]] = depth[wins]
    index_buffer[pixel[wins]] = face[wins]
    bary_buffer[pixel[wins]] = weights[wins]


def interpolate(attributes: torch.Tensor, faces: torch.Tensor, index_image: torch.Tensor,
                barycentrics: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes (N, V, C) blended at each pixel by its barycentrics: (N, H, W, C), zero on background."""
    if attributes.dim() != 3:
        raise ValueError(f"attributes: expected (N, V, C), got shape {tuple(attributes.shape)}")
    n_meshes, n_vertices, channels = attributes.shape
    covered = index_image >= 0
    corner_ids = faces[index_image.clamp(min=0)]  # (N, H, W, 3)
    flat_ids = corner_ids + (torch.arange(n_meshes, device=faces.device) * n_vertices).view(-1, 1, 1, 1)
    corner_values = attributes.reshape(-1, channels)[flat_ids]  # (N, H, W, 3, C)
    blended = (barycentrics.to(attributes.dtype)[..., None] * corner_values).sum(-2)
    return blended * covered[..., None]


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit normals (N, V, 3): area-weighted sum of the adjacent faces' normals (counter-clockwise = outward)."""
    _check_mesh(vertices, faces)
    a, b, c = vertices[:, faces[:, 0]], vertices[:, faces[:, 1]], vertices[:, faces[:, 2]]
    face_normals = torch.cross(b - a, c - a, dim=-1)
    normals = torch.zeros_like(vertices)
    for corner in range(3):
        normals.index_add_(1, faces[:, corner], face_normals)
    return torch.nn.functional.normalize(normals, dim=-1)


def shade_lambert(normals: torch.Tensor, light_dir: torch.Tensor, albedo: torch.Tensor,
                  ambient: float = 0.3) -> torch.Tensor:
    """Diffuse shading albedo * (ambient + (1 - ambient) * max(0, n . l)); ambient keeps unlit sides readable."""
    light = torch.nn.functional.normalize(light_dir.to(normals), dim=-1)
    facing = (torch.nn.functional.normalize(normals, dim=-1) * light).sum(-1, keepdim=True).clamp(min=0)
    return albedo * (ambient + (1.0 - ambient) * facing)


def _check_mesh(vertices: torch.Tensor, faces: torch.Tensor) -> None:
    if vertices.dim() != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices: expected (N, V, 3), got shape {tuple(vertices.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3 or faces.dtype != torch.long:
        raise ValueError(f"faces: expected (F, 3) long, got shape {tuple(faces.shape)} {faces.dtype}")
    if faces.numel() and (faces.min() < 0 or faces.max() >= vertices.shape[1]):
        raise ValueError(f"faces: indices must lie in [0, {vertices.shape[1]}), got [{faces.min()}, {faces.max()}]")


# ----------------------------------------------------------------------------------------------------------
# Camera and the full render


@dataclass(frozen=True)
class Camera:
    """A camera at (0, 0, distance) looking at the origin; world y is up and z points towards the camera.

    focal_px is the focal length in pixels. An orthographic camera uses the scale a perspective one has at
    the origin (focal_px / distance), so switching between them keeps the subject's size.
    """

    focal_px: float = 500.0
    distance: float = 0.5
    orthographic: bool = False

    def project(self, vertices: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """World vertices (..., 3) -> screen space (..., 3) with z = depth along the viewing direction."""
        depth = self.distance - vertices[..., 2]
        scale = self.focal_px / (self.distance if self.orthographic else depth)
        x = (width - 1) / 2 + scale * vertices[..., 0]
        y = (height - 1) / 2 - scale * vertices[..., 1]
        return torch.stack([x, y, depth], dim=-1)


def _drtk_module():
    """Meta's DRTK when it is the real package (the PyPI name `drtk` is an unrelated placeholder)."""
    try:
        import drtk
    except ImportError:
        return None
    return drtk if all(hasattr(drtk, name) for name in ("rasterize", "render", "interpolate")) else None


def _rasterize_any(screen: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    """DRTK on CUDA tensors when available, otherwise the PyTorch rasterizer; same outputs either way."""
    drtk = _drtk_module()
    if drtk is None or not screen.is_cuda:
        return rasterize(screen, faces, height, width)
    faces_int = faces.int()
    index_image = drtk.rasterize(screen, faces_int, height, width)
    _, barycentrics = drtk.render(screen, faces_int, index_image)  # barycentrics (N, 3, H, W)
    return index_image.long(), barycentrics.permute(0, 2, 3, 1)


def render_mesh(vertices: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor, height: int, width: int,
                camera: Camera, background: Sequence[float] = (0.12, 0.12, 0.14),
                light_dir: Sequence[float] = (0.3, 0.4, 1.0)) -> torch.Tensor:
    """Lambert-shaded images (N, H, W, 3) uint8 of world-space meshes (N, V, 3) with colours (V, 3) or (N, V, 3) in [0, 1]."""
    _check_mesh(vertices, faces)
    if colors.dim() == 2:
        colors = colors.expand(vertices.shape[0], -1, -1)
    if colors.shape != vertices.shape:
        raise ValueError(f"colors: expected (V, 3) or (N, V, 3) matching vertices {tuple(vertices.shape)}, "
                         f"got {tuple(colors.shape)}")
    vertices = vertices.float()
    index_image, barycentrics = _rasterize_any(camera.project(vertices, height, width), faces, height, width)
    attributes = torch.cat([colors.to(vertices), vertex_normals(vertices, faces)], dim=-1)
    pixel_attributes = interpolate(attributes, faces, index_image, barycentrics)
    lit = shade_lambert(pixel_attributes[..., 3:], torch.tensor(light_dir), pixel_attributes[..., :3])
    image = torch.where((index_image >= 0)[..., None], lit, torch.tensor(background).to(lit))
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# Meshes and face decoders


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


@runtime_checkable
class FaceDecoder(Protocol):
    """Maps expression codes (T, 256) and head poses (T, 7) [quaternion w, x, y, z | translation in metres]
    to world-space vertices (T, V, 3) in metres; `faces` (F, 3) long triangulates them."""

    faces: torch.Tensor

    def __call__(self, expression: torch.Tensor, head_pose: torch.Tensor) -> torch.Tensor: ...


def load_face_decoder(path: str | os.PathLike) -> FaceDecoder:
    """A TorchScript face decoder (torch.jit.save of a module with a `faces` buffer); plain state dicts cannot
    be run without their architecture, so they are refused with an explanation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such face decoder file")
    try:
        decoder = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise ValueError(f"{path}: expected a TorchScript face decoder (torch.jit.save); state dicts and other "
                         f"files are not supported ({error})") from error
    if not isinstance(getattr(decoder, "faces", None), torch.Tensor):
        raise ValueError(f"{path}: expected the TorchScript decoder to have a `faces` (F, 3) tensor attribute")
    return decoder


def quaternion_to_matrix(quaternion: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) from quaternions (..., 4) in w, x, y, z order (normalized first)."""
    norm = quaternion.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ValueError("quaternion: expected non-zero quaternions (w, x, y, z), got a zero one")
    w, x, y, z = (quaternion / norm).unbind(-1)
    rows = [[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]]
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


SKIN, LIPS, MOUTH_INSIDE = (0.86, 0.69, 0.58), (0.72, 0.32, 0.33), (0.18, 0.05, 0.07)
EYE_WHITE, IRIS = (0.95, 0.95, 0.93), (0.22, 0.32, 0.48)


class ProceduralFaceDecoder:
    """A stand-in head (an ellipsoid with a nose, lips, a mouth opening and eyes, about 570 vertices, metres).

    The four interpretable controls (MOUTH_CONTROLS, expression[:, 0..3], clamped to [0, 1]) move it:
    jaw_open lengthens the mouth opening vertically, lip_round narrows it and pushes the lips forward,
    lip_close presses it shut, blink squashes the eyes. The mouth and eyes are thin patches that follow the
    ellipsoid's surface just in front of it. The head pose then moves the whole mesh rigidly.
    """

    RADII = (0.075, 0.1, 0.085)  # half width, half height, half depth
    MOUTH_CENTER = (0.0, -0.045)
    EYE_CENTERS = ((-0.027, 0.022), (0.027, 0.022))
    RING_CORNERS = 20

    def __init__(self, latitudes: int = 16, longitudes: int = 28) -> None:
        parts = [self._head(latitudes, longitudes)]
        parts += [self._disk(MOUTH_INSIDE), self._annulus(LIPS)]
        for _ in self.EYE_CENTERS:
            parts += [self._disk(EYE_WHITE), self._disk(IRIS)]
        offsets = np.cumsum([0] + [part[0].shape[0] for part in parts[:-1]])
        self.rest_vertices = torch.tensor(np.concatenate([part[0] for part in parts]), dtype=torch.float32)
        self.faces = torch.tensor(np.concatenate([part[1] + offset for part, offset in zip(parts, offsets)]))
        self.vertex_colors = torch.tensor(np.concatenate([np.tile(part[2], (part[0].shape[0], 1)) for part in parts]),
                                          dtype=torch.float32)
        self._head_vertices = parts[0][0].shape[0]
        corners = self.RING_CORNERS
        # Inner lip ring: the annulus' first ring; its top and bottom corners are the "lip" vertices.
        self.upper_lip_index = self._head_vertices + (corners + 1) + corners // 4
        self.lower_lip_index = self._head_vertices + (corners + 1) + 3 * corners // 4

    def _head(self, latitudes: int, longitudes: int):
        """UV ellipsoid with counter-clockwise (outward) faces, poles at +-y, longitude 0 facing +z."""
        polar = np.linspace(0, np.pi, latitudes + 1)[1:-1]
        azimuth = np.linspace(0, 2 * np.pi, longitudes, endpoint=False)
        p, a = np.meshgrid(polar, azimuth, indexing="ij")
        unit = np.stack([np.sin(p) * np.sin(a), np.cos(p), np.sin(p) * np.cos(a)], -1).reshape(-1, 3)
        unit = np.concatenate([[[0, 1, 0]], unit, [[0, -1, 0]]])
        nose = 1 + 0.2 * np.exp(-((unit[:, 0] / 0.12) ** 2 + ((unit[:, 1] - 0.05) / 0.15) ** 2)) * (unit[:, 2] > 0)
        vertices = unit * np.array(self.RADII) * nose[:, None]
        ring = lambda i, j: 1 + i * longitudes + j % longitudes  # noqa: E731 - grid index of ring i, column j
        faces = [[0, ring(0, j), ring(0, j + 1)] for j in range(longitudes)]
        for i in range(latitudes - 2):
            for j in range(longitudes):
                faces += [[ring(i, j), ring(i + 1, j), ring(i, j + 1)], [ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)]]
        bottom = len(vertices) - 1
        faces += [[bottom, ring(latitudes - 2, j + 1), ring(latitudes - 2, j)] for j in range(longitudes)]
        return vertices, np.array(faces), np.array(SKIN)

    def _disk(self, color):
        """Unit disk in the xy plane: centre then one ring, counter-clockwise seen from +z."""
        angles = np.linspace(0, 2 * np.pi, self.RING_CORNERS, endpoint=False)
        vertices = np.concatenate([[[0.0, 0.0, 0.0]], np.stack([np.cos(angles), np.sin(angles), 0 * angles], -1)])
        n = self.RING_CORNERS
        return vertices, np.array([[0, 1 + j, 1 + (j + 1) % n] for j in range(n)]), np.array(color)

    def _annulus(self, color):
        """Inner ring (z = 0) then outer ring (z = 1): the deformation places them; topology only here."""
        angles = np.linspace(0, 2 * np.pi, self.RING_CORNERS, endpoint=False)
        ring = np.stack([np.cos(angles), np.sin(angles), 0 * angles], -1)
        vertices = np.concatenate([ring, ring + [0, 0, 1]])
        n = self.RING_CORNERS
        faces = [[j, n + j, n + (j + 1) % n] for j in range(n)] + [[j, n + (j + 1) % n, (j + 1) % n] for j in range(n)]
        return vertices, np.array(faces), np.array(color)

    def _on_surface(self, x: torch.Tensor, y: torch.Tensor, lift: float | torch.Tensor) -> torch.Tensor:
        """Points on the front of the ellipsoid (without the nose) at (x, y), raised by `lift` metres in z."""
        rx, ry, rz = self.RADII
        x, y, lift = torch.broadcast_tensors(x, y, torch.as_tensor(lift, dtype=x.dtype))
        z = rz * (1 - (x / rx) ** 2 - (y / ry) ** 2).clamp(min=0).sqrt() + lift
        return torch.stack([x, y, z], dim=-1)

    def _expressive_parts(self, controls: torch.Tensor) -> torch.Tensor:
        """(T, mouth + eye vertices, 3): the patches shaped by the controls, in the head's rest frame."""
        jaw, round_, close, blink = controls.clamp(0, 1)[:, :, None].unbind(1)
        n = self.RING_CORNERS
        angles = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
        cos, sin = angles.cos()[None], angles.sin()[None]
        mouth_x, mouth_y = self.MOUTH_CENTER
        half_width = 0.021 * (1 - 0.4 * round_)
        half_height = (0.002 + 0.012 * jaw + 0.006 * round_) * (1 - close)
        push = 0.004 * round_
        lip = 0.005

        def ellipse(width, height, lift, center_x, center_y):
            return self._on_surface(center_x + width * cos, center_y + height * sin, lift)

        def with_center(ring, center_x, center_y, lift):
            center = self._on_surface(torch.full_like(ring[:, :1, 0], center_x), torch.full_like(ring[:, :1, 0], center_y), lift)
            return torch.cat([center, ring], dim=1)

        inner = ellipse(half_width, half_height, 0.001 + push, mouth_x, mouth_y)
        parts = [with_center(inner, mouth_x, mouth_y, 0.001 + push), inner.clone(),
                 ellipse(half_width + lip, half_height + lip, 0.0015 + push / 2, mouth_x, mouth_y)]
        parts[1][..., 2] += 0.0005  # lips sit just in front of the mouth inside
        eye_height = 0.008 * (1 - 0.95 * blink)
        for eye_x, eye_y in self.EYE_CENTERS:
            parts.append(with_center(ellipse(0.012, eye_height, 0.001, eye_x, eye_y), eye_x, eye_y, 0.001))
            parts.append(with_center(ellipse(0.005, torch.minimum(eye_height, torch.tensor(0.005)), 0.0015, eye_x, eye_y),
                                     eye_x, eye_y, 0.0015))
        return torch.cat(parts, dim=1)

    def __call__(self, expression: torch.Tensor, head_pose: torch.Tensor) -> torch.Tensor:
        if expression.dim() != 2 or expression.shape[1] < 4:
            raise ValueError(f"expression: expected (T, 256) codes whose first 4 are MOUTH_CONTROLS, got {tuple(expression.shape)}")
        if head_pose.shape != (expression.shape[0], 7):
            raise ValueError(f"head_pose: expected ({expression.shape[0]}, 7) [quaternion w, x, y, z | translation], "
                             f"got {tuple(head_pose.shape)}")
        controls = expression[:, :4].float().cpu()
        head = self.rest_vertices[: self._head_vertices].expand(controls.shape[0], -1, -1)
        vertices = torch.cat([head, self._expressive_parts(controls)], dim=1).to(expression.device)
        pose = head_pose.to(vertices)
        return vertices @ quaternion_to_matrix(pose[:, :4]).transpose(1, 2) + pose[:, None, 4:]


# ----------------------------------------------------------------------------------------------------------
# Video


def side_by_side(videos: Sequence[np.ndarray]) -> np.ndarray:
    """Videos (T, H, W_i, 3) placed left to right into one (T, H, sum W_i, 3), for comparing samples."""
    if not videos:
        raise ValueError("videos: expected at least one (T, H, W, 3) video, got none")
    arrays = [np.asarray(video) for video in videos]
    first = arrays[0].shape
    for number, array in enumerate(arrays):
        if array.ndim != 4 or array.shape[-1] != 3 or array.shape[:2] != first[:2]:
            raise ValueError(f"videos[{number}]: expected shape ({first[0]}, {first[1]}, W, 3) like videos[0], got {array.shape}")
    return np.concatenate(arrays, axis=2)


def write_video(path: str | os.PathLike, frames: np.ndarray | torch.Tensor, fps: float,
                audio: np.ndarray | None = None, sample_rate: int | None = None) -> None:
    """An H.264 .mp4 of frames (T, H, W, 3) uint8, with `audio` (samples,) or (samples, channels) muxed in as AAC.

    Uses the ffmpeg bundled with imageio-ffmpeg so no system ffmpeg is needed; odd sizes are padded by one
    black row/column (yuv420p needs even sizes); the file appears under `path` only once complete.
    """
    try:
        import imageio_ffmpeg
    except ImportError as error:
        raise RuntimeError("write_video needs the imageio-ffmpeg package (pip install imageio-ffmpeg)") from error
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"frames: expected a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    if audio is not None and not sample_rate:
        raise ValueError("sample_rate: expected the audio's sample rate in Hz when audio is given")
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    with tempfile.TemporaryDirectory() as scratch:
        video = Path(scratch) / "video.mp4"
        writer = imageio_ffmpeg.write_frames(str(video), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p", macro_block_size=1, quality=None,
                                             output_params=["-crf", "18"])
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        if audio is not None:
            wav, muxed = Path(scratch) / "audio.wav", Path(scratch) / "muxed.mp4"
            soundfile.write(wav, np.asarray(audio, dtype=np.float32), int(sample_rate))
            command = [ffmpeg, "-y", "-loglevel", "error", "-i", str(video), "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0",
                       "-c:v", "copy", "-c:a", "aac", "-shortest", str(muxed)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{path}: ffmpeg could not mux the audio in: {result.stderr.strip()}")
            video = muxed
        with atomic_path(path) as tmp:
            shutil.copyfile(video, tmp)
