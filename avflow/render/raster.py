"""Rasterizing triangle meshes: which triangle covers each pixel, with what barycentrics, and what colour.

One pure-PyTorch z-buffer rasterizer serves every renderer (DRTK replaces it on CUDA tensors when Meta's
package is installed): the procedural head is drawn with interpolated vertex colours and Lambert shading
(`render_mesh`), the Codec Avatar with a texture sampled at interpolated per-corner UVs (`render_textured`).

Screen convention used throughout, DRTK's: x grows to the right, y grows downwards, the pixel in row r
and column c has its centre at (x, y) = (c, r) (so the image's top-left corner is at (-0.5, -0.5)), and z
is the depth in front of the camera (smaller is nearer). Coverage, depth and barycentrics are evaluated at
pixel centres.
The published conventions: docs/reference.md, "Camera and rasterization".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

# Pixel candidates evaluated at once by the fallback rasterizer: bounds memory, not correctness.
CANDIDATES_PER_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------------------------
# Rasterization


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, height: int, width: int,
              perspective: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-buffer rasterization: per pixel, the nearest covering triangle and its barycentric coordinates.

    vertices (N, V, 3) are in screen space (see the module docstring), faces (F, 3) index them. Returns an
    index image (N, H, W) long with -1 for background and barycentrics (N, H, W, 3) (zero on background).
    With `perspective` z is the camera depth of a perspective projection and barycentrics (and depth) are
    perspective-correct, i.e. those of the 3D point seen through the pixel centre: screen-space weights
    divided by each corner's depth, renormalized. Without it (an orthographic camera) they are affine in
    screen space. Triangles with a vertex at depth <= 0 (behind the camera), a non-finite vertex or zero
    screen area are skipped; on exactly equal depth the higher face index wins.
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

    # Consecutive triangles go into one chunk until their boxes hold CANDIDATES_PER_CHUNK pixels.
    drawn = candidates.nonzero()[:, 0]
    ends = candidates[drawn].cumsum(0)
    start = 0
    while start < drawn.numel():
        before = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(ends, before + CANDIDATES_PER_CHUNK, right=True)))
        chunk = drawn[start:stop]
        _rasterize_chunk(corners[chunk], mesh_of[chunk], face_of[chunk], x0[chunk], y0[chunk], box_width[chunk].long(),
                         candidates[chunk], height, width, perspective, depth_buffer, index_buffer, bary_buffer)
        start = stop
    return index_buffer.view(n_meshes, height, width), bary_buffer.view(n_meshes, height, width, 3)


def _signed_double_area(corners: torch.Tensor) -> torch.Tensor:
    a, b, c = corners[:, 0, :2], corners[:, 1, :2], corners[:, 2, :2]
    return _cross2(b - a, c - a)


def _cross2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _rasterize_chunk(corners, mesh_of, face_of, x0, y0, box_width, candidates, height, width, perspective,
                     depth_buffer, index_buffer, bary_buffer) -> None:
    """Test every pixel centre in each triangle's bounding box and merge the winners into the buffers."""
    owner = torch.repeat_interleave(torch.arange(candidates.numel(), device=corners.device), candidates)
    local = torch.arange(owner.numel(), device=corners.device) - (candidates.cumsum(0) - candidates)[owner]
    # Positions relative to the box's top-left pixel keep the edge functions' operands small (exact-ish in float32).
    width_of = box_width.index_select(0, owner)
    point = torch.stack([local % width_of, torch.div(local, width_of, rounding_mode="floor")], -1).to(corners.dtype)
    origin = torch.stack([x0, y0], -1)[:, None]
    a, b, c = (corners[:, :, :2] - origin).index_select(0, owner).unbind(1)
    weights = torch.stack([_cross2(c - b, point - b), _cross2(a - c, point - c), _cross2(b - a, point - a)], -1)
    keep = ((weights * _signed_double_area(corners).index_select(0, owner)[:, None]) >= 0).all(-1).nonzero()[:, 0]
    owner, point = owner.index_select(0, keep), point.index_select(0, keep)
    weights = weights.index_select(0, keep) / _signed_double_area(corners).index_select(0, owner)[:, None]
    px, py = x0.index_select(0, owner) + point[:, 0], y0.index_select(0, owner) + point[:, 1]
    corner_depth = corners[:, :, 2].index_select(0, owner)
    if perspective:  # 1 / depth is affine in screen space; so is each attribute divided by depth
        weights = weights / corner_depth
        inverse_depth = weights.sum(-1, keepdim=True)
        weights = weights / inverse_depth
        depth = 1.0 / inverse_depth[:, 0]
    else:
        depth = (weights * corner_depth).sum(-1)

    pixel = mesh_of.index_select(0, owner) * height * width + py.long() * width + px.long()
    face = face_of.index_select(0, owner)
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
    mesh = torch.arange(n_meshes, device=faces.device).view(-1, 1, 1).expand_as(index_image)[covered]
    corner_ids = faces[index_image[covered]] + (mesh * n_vertices)[:, None]  # (covered pixels, 3)
    corner_values = attributes.reshape(-1, channels)[corner_ids]  # (covered pixels, 3, C)
    blended = attributes.new_zeros(*index_image.shape, channels)
    blended[covered] = (barycentrics[covered].to(attributes.dtype)[..., None] * corner_values).sum(-2)
    return blended


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


def drtk_module():
    """Meta's DRTK when it is the real package (the PyPI name `drtk` is an unrelated placeholder)."""
    try:
        import drtk
    except ImportError:
        return None
    return drtk if all(hasattr(drtk, name) for name in ("rasterize", "render", "interpolate")) else None


def rasterize_any(screen: torch.Tensor, faces: torch.Tensor, height: int, width: int,
                  perspective: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`rasterize`, done by DRTK (perspective-correct, same conventions) on CUDA tensors when it is installed."""
    drtk = drtk_module()
    if drtk is None or not screen.is_cuda or not perspective:
        return rasterize(screen, faces, height, width, perspective)
    faces_int = faces.int()
    index_image = drtk.rasterize(screen, faces_int, height, width)
    _, barycentrics = drtk.render(screen, faces_int, index_image)  # barycentrics (N, 3, H, W)
    return index_image.long(), barycentrics.permute(0, 2, 3, 1)


def render_mesh(vertices: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor, height: int, width: int,
                camera: Camera, background: Sequence[float] = (0.12, 0.12, 0.14),
                light_dir: Sequence[float] = (0.3, 0.4, 1.0)) -> torch.Tensor:
    """Lambert-shaded images (N, H, W, 3) uint8 of world-space meshes (N, V, 3) with colours (V, 3) or (N, V, 3)
    in [0, 1]."""
    _check_mesh(vertices, faces)
    if colors.dim() == 2:
        colors = colors.expand(vertices.shape[0], -1, -1)
    if colors.shape != vertices.shape:
        raise ValueError(f"colors: expected (V, 3) or (N, V, 3) matching vertices {tuple(vertices.shape)}, "
                         f"got {tuple(colors.shape)}")
    vertices = vertices.float()
    index_image, barycentrics = rasterize_any(camera.project(vertices, height, width), faces, height, width,
                                              perspective=not camera.orthographic)
    attributes = torch.cat([colors.to(vertices), vertex_normals(vertices, faces)], dim=-1)
    pixel_attributes = interpolate(attributes, faces, index_image, barycentrics)
    lit = shade_lambert(pixel_attributes[..., 3:], torch.tensor(light_dir), pixel_attributes[..., :3])
    image = torch.where((index_image >= 0)[..., None], lit, torch.tensor(background).to(lit))
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def render_textured(screen: torch.Tensor, faces: torch.Tensor, uv: torch.Tensor, uv_faces: torch.Tensor,
                    texture: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images (N, H, W, C) float of textured meshes, black where no triangle covers the pixel.

    screen (N, V, 3) are perspective-projected vertices (z = camera depth); faces (F, 3) index them and
    uv_faces (F, 3) index uv (T, 2) per corner, so a vertex on a UV seam takes a different texture
    coordinate in each triangle. texture (N, C, Ht, Wt) has its first row at v = 1 (OBJ's v points up):
    UVs are flipped (v -> 1 - v), mapped to [-1, 1] and sampled bilinearly (align_corners False, border
    padding) at each pixel's perspective-correct UV. Values are not clamped here.
    """
    _check_mesh(screen, faces)
    if uv_faces.shape != faces.shape or uv.dim() != 2 or uv.shape[1] != 2:
        raise ValueError(f"uv (T, 2) and uv_faces {tuple(faces.shape)} expected, got {tuple(uv.shape)} and "
                         f"{tuple(uv_faces.shape)}")
    index_image, barycentrics = rasterize_any(screen, faces, height, width)
    corner_uv = uv.to(screen)[None].expand(screen.shape[0], -1, -1)
    pixel_uv = interpolate(corner_uv, uv_faces, index_image, barycentrics)
    grid = torch.stack([pixel_uv[..., 0] * 2 - 1, (1 - pixel_uv[..., 1]) * 2 - 1], dim=-1)
    sampled = F.grid_sample(texture.to(grid.dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.permute(0, 2, 3, 1) * (index_image >= 0)[..., None]
