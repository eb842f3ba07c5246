"""Mesh face decoders: the procedural stand-in head the demo renders, and user TorchScript decoders.

Both map (expression codes, 7-d head poses) to world-space vertices in metres that `render_mesh` draws
with Lambert shading; the released Codec Avatar (textured, its own camera) lives in codec_avatar.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch


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
                faces += [[ring(i, j), ring(i + 1, j), ring(i, j + 1)],
                          [ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)]]
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
            center = self._on_surface(torch.full_like(ring[:, :1, 0], center_x),
                                      torch.full_like(ring[:, :1, 0], center_y), lift)
            return torch.cat([center, ring], dim=1)

        inner = ellipse(half_width, half_height, 0.001 + push, mouth_x, mouth_y)
        parts = [with_center(inner, mouth_x, mouth_y, 0.001 + push), inner.clone(),
                 ellipse(half_width + lip, half_height + lip, 0.0015 + push / 2, mouth_x, mouth_y)]
        parts[1][..., 2] += 0.0005  # lips sit just in front of the mouth inside
        eye_height = 0.008 * (1 - 0.95 * blink)
        for eye_x, eye_y in self.EYE_CENTERS:
            parts.append(with_center(ellipse(0.012, eye_height, 0.001, eye_x, eye_y), eye_x, eye_y, 0.001))
            parts.append(with_center(ellipse(0.005, torch.minimum(eye_height, torch.tensor(0.005)), 0.0015,
                                             eye_x, eye_y),
                                     eye_x, eye_y, 0.0015))
        return torch.cat(parts, dim=1)

    def __call__(self, expression: torch.Tensor, head_pose: torch.Tensor) -> torch.Tensor:
        if expression.dim() != 2 or expression.shape[1] < 4:
            raise ValueError("expression: expected (T, 256) codes whose first 4 are MOUTH_CONTROLS, "
                             f"got {tuple(expression.shape)}")
        if head_pose.shape != (expression.shape[0], 7):
            raise ValueError(f"head_pose: expected ({expression.shape[0]}, 7) [quaternion w, x, y, z | translation], "
                             f"got {tuple(head_pose.shape)}")
        controls = expression[:, :4].float().cpu()
        head = self.rest_vertices[: self._head_vertices].expand(controls.shape[0], -1, -1)
        vertices = torch.cat([head, self._expressive_parts(controls)], dim=1).to(expression.device)
        pose = head_pose.to(vertices)
        return vertices @ quaternion_to_matrix(pose[:, :4]).transpose(1, 2) + pose[:, None, 4:]
