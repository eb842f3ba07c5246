"""The released 50h subject's Codec Avatar: expression codes -> textured head mesh -> images.

The 256-d expression codes AV-Flow generates are latent codes of this personalized decoder, shipped in
the released 50h dataset (decoder/dec_params.pt, decoder/vert_mean.bin, decoder/vert_var.txt and
face_topo_small_neck.obj). Everything here follows the published system as docs/reference.md states it
("The 50h Codec Avatar", "Camera and rasterization"): its layers, its weight norm (over the whole tensor,
not torch's per-channel one), its untied biases, its view-conditioned texture and warp field, its camera
and its rasterization conventions. A model directory stores the same avatar in one safetensors file
(`save` / `load`), so inference needs no dataset.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avflow.data.features import pose7_to_rigid
from avflow.render.obj import TexturedMesh, load_textured_obj
from avflow.render.raster import render_textured

# Published decoder sizes (docs/reference.md, "The 50h Codec Avatar").
EXPRESSION_DIM = 256
PUBLISHED_VERTICES = 7306
VIEW_FEATURES = 8
TEXTURE_SIZE = 1024
TEXTURE_CHANNELS = (256, 256, 128, 128, 64, 64, 32, 8, 3)  # 4 x 4 -> 1024 x 1024
WARP_CHANNELS = (256, 256, 128, 128, 64, 64, 2)  # 4 x 4 -> 256 x 256
SEED_SIZE = 4
LEAKY_SLOPE = 0.2

# Published camera: a 4096 x 4096 capture camera rendered at 1/4 (focal and principal point divided by 4).
IMAGE_SIZE = 1024
FOCAL_PX = (10085.45 / 4, 10082.49 / 4)
PRINCIPAL_PX = (2048.0 / 4, 1707.6 / 4)
# Published head transform when there is no pose: the head 1 m in front of the camera, facing it (mm).
DEFAULT_HEAD_TRANSFORM = ((1.0, 0.0, 0.0, 0.0), (0.0, -1.0, 0.0, 0.0), (0.0, 0.0, -1.0, 1000.0), (0.0, 0.0, 0.0, 1.0))
PUBLISHED_CHUNK = 60  # frames decoded and rasterized at once by the published renderer (GPU)
CPU_CHUNK = 4  # ~0.1 GB of activations per 1024 x 1024 frame

# Dataset files, relative to the dataset root; the published code moved the obj next to its model code.
DECODER_FILE = "decoder/dec_params.pt"
MEAN_FILE = "decoder/vert_mean.bin"
VARIANCE_FILE = "decoder/vert_var.txt"
TOPOLOGY_NAME = "face_topo_small_neck.obj"
TOPOLOGY_PLACES = (TOPOLOGY_NAME, f"decoder/{TOPOLOGY_NAME}")
POSE_FRAMES = ("camera", "relative")
AVATAR_FORMAT = "avflow-codec-avatar-1"


class AvatarError(ValueError):
    """The avatar files are unusable; the message lists every problem found."""


class LinearWN(nn.Module):
    """Linear layer with the published weight norm: weight = g * v / ||v||, ||v|| over the whole tensor,
    g one value per output feature (out, 1)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features, device=device))
        self.weight_g = nn.Parameter(torch.empty(out_features, 1, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(), self.bias)


class ConvTransposeWN(nn.Module):
    """Transposed convolution (kernel 4, stride 2, padding 1: doubles the size) with the published weight
    norm (whole-tensor ||v||, g (1, out, 1, 1)); an untied bias has one value per output channel and pixel."""

    def __init__(self, in_channels: int, out_channels: int, out_size: int | None = None, device=None):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(in_channels, out_channels, 4, 4, device=device))
        self.weight_g = nn.Parameter(torch.empty(1, out_channels, 1, 1, device=device))
        bias_shape = (out_channels,) if out_size is None else (out_channels, out_size, out_size)
        self.bias = nn.Parameter(torch.empty(*bias_shape, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm()
        y = F.conv_transpose2d(x, weight, stride=2, padding=1)
        return y + (self.bias[None] if self.bias.dim() == 3 else self.bias[None, :, None, None])


def _upsampler(channels: tuple[int, ...], untied_bias: bool, device) -> nn.Sequential:
    """Transposed convolutions from SEED_SIZE, LeakyReLU between them (not after the last): indices 0, 2, 4..."""
    layers: list[nn.Module] = []
    size = SEED_SIZE
    for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        size *= 2
        if index:
            layers.append(nn.LeakyReLU(LEAKY_SLOPE))
        layers.append(ConvTransposeWN(c_in, c_out, size if untied_bias else None, device))
    return nn.Sequential(*layers)


class CodecAvatarDecoder(nn.Module):
    """The published decoder; its state-dict keys are those of decoder/dec_params.pt (weight_v/weight_g)."""

    def __init__(self, vertices: int = PUBLISHED_VERTICES, device=None):
        super().__init__()
        self.vertices = vertices
        seed = TEXTURE_CHANNELS[0] * SEED_SIZE * SEED_SIZE
        joint = EXPRESSION_DIM + VIEW_FEATURES
        self.encmod = nn.Sequential(LinearWN(EXPRESSION_DIM, EXPRESSION_DIM, device), nn.LeakyReLU(LEAKY_SLOPE))
        self.geommod = nn.Sequential(LinearWN(EXPRESSION_DIM, 3 * vertices, device))
        self.viewmod = nn.Sequential(LinearWN(3, VIEW_FEATURES, device), nn.LeakyReLU(LEAKY_SLOPE))
        self.texmod2 = nn.Sequential(LinearWN(joint, seed, device), nn.LeakyReLU(LEAKY_SLOPE))
        self.texmod = _upsampler(TEXTURE_CHANNELS, untied_bias=True, device=device)
        self.warpmod2 = nn.Sequential(LinearWN(joint, WARP_CHANNELS[0] * SEED_SIZE * SEED_SIZE, device),
                                      nn.LeakyReLU(LEAKY_SLOPE))
        self.warpmod = _upsampler(WARP_CHANNELS, untied_bias=False, device=device)
        self.bias = nn.Parameter(torch.empty(3, TEXTURE_SIZE, TEXTURE_SIZE, device=device))

    def forward(self, expression: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(geometry (N, V, 3) normalized, texture (N, 3, 1024, 1024) in 0..255 before any clamping)."""
        n = expression.shape[0]
        encoding = self.encmod(expression)
        geometry = self.geommod(encoding).view(n, self.vertices, 3)
        joint = torch.cat([encoding, self.viewmod(view)], dim=1)
        texture = self.texmod(self.texmod2(joint).view(n, TEXTURE_CHANNELS[0], SEED_SIZE, SEED_SIZE))
        warp = self.warpmod(self.warpmod2(joint).view(n, WARP_CHANNELS[0], SEED_SIZE, SEED_SIZE))
        # The sampling grid stays float32 under bf16 autocast: bf16 near 1.0 resolves 1/128, i.e. 4 texels.
        warp = F.interpolate(warp.float(), size=(TEXTURE_SIZE, TEXTURE_SIZE), mode="bilinear", align_corners=False)
        grid = warp.permute(0, 2, 3, 1) / TEXTURE_SIZE + _identity_grid(TEXTURE_SIZE, TEXTURE_SIZE, warp)
        texture = F.grid_sample(texture.float(), grid, mode="bilinear", align_corners=False)
        return geometry, 255.0 * (texture + self.bias.float() + 0.5)


def _identity_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(1, H, W, 2) grid_sample grid of the published identity warp: x = linspace(-1, 1, W) * (W - 1) / W
    (pixel centres under align_corners False), y likewise."""
    x = torch.linspace(-1, 1, width, device=like.device, dtype=like.dtype) * (width - 1) / width
    y = torch.linspace(-1, 1, height, device=like.device, dtype=like.dtype) * (height - 1) / height
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)[None]


def expected_decoder_shapes(vertices: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the published decoder's state dict (weight_v/weight_g spelling)."""
    with torch.device("meta"):
        decoder = CodecAvatarDecoder(vertices)
    return {key: tuple(value.shape) for key, value in decoder.state_dict().items()}


def canonical_decoder_state(state: dict, vertices: int, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in the weight_v/weight_g spelling with g in its published shape, and every problem
    (missing, unexpected or mis-shaped keys; either spelling, and a flat g, are accepted)."""
    expected = expected_decoder_shapes(vertices)
    canonical: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    used: set[str] = set()
    for key, shape in expected.items():
        prefix, name = key.rsplit(".", 1) if "." in key else ("", key)
        spellings = [key] + ([f"{prefix}.weight"] if name == "weight_v" else [f"{prefix}.g"] if name == "weight_g"
                             else [])
        found = next((spelling for spelling in spellings if spelling in state), None)
        if found is None:
            problems.append(f"{source}: missing key {' or '.join(spellings)} of shape {shape}")
            continue
        used.add(found)
        value = state[found]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{source}: key {found} is not a tensor")
            continue
        if name == "weight_g" and value.dim() == 1 and value.numel() == math.prod(shape):
            value = value.reshape(shape)  # older files store g flat
        if tuple(value.shape) != shape:
            problems.append(f"{source}: key {found} has shape {tuple(value.shape)}, expected {shape}")
            continue
        canonical[key] = value.float()
    unexpected = sorted(set(state) - used)
    if unexpected:
        problems.append(f"{source}: unexpected keys {', '.join(unexpected)}")
    return canonical, problems


def head_relative_camera(head_transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotation R (N, 3, 3), translation t (N, 3) of M = Rt H with Rt = [I | 0], and the unit view vector
    (N, 3): the camera position c = -R^T t in head space, normalized."""
    rotation, translation = head_transform[:, :3, :3], head_transform[:, :3, 3]
    camera = -(rotation.transpose(1, 2) @ translation[..., None])[..., 0]
    return rotation, translation, F.normalize(camera, dim=-1)


def project(vertices: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor, height: int,
            width: int) -> torch.Tensor:
    """Head-space vertices (N, V, 3) -> screen space (x, y in DRTK pixels, z = camera depth) of the published
    camera, whose intrinsics are scaled from 1024 x 1024 to (height, width) as the published ones were from 4096."""
    camera = vertices @ rotation.transpose(1, 2) + translation[:, None]
    depth = camera[..., 2]
    x = FOCAL_PX[0] * width / IMAGE_SIZE * camera[..., 0] / depth + PRINCIPAL_PX[0] * width / IMAGE_SIZE
    y = FOCAL_PX[1] * height / IMAGE_SIZE * camera[..., 1] / depth + PRINCIPAL_PX[1] * height / IMAGE_SIZE
    return torch.stack([x, y, depth], dim=-1)


class CodecAvatar(nn.Module):
    """The decoder with its mean geometry, geometry std and UV-mapped topology, rendered by the published camera.

    pose_frame says what the head poses given to `render_pose7` are: "camera" (the published capture
    camera's head transforms in mm, as in the 50h data and what a model trained on it generates) or
    "relative" (only their rotation counts, applied to the published default pose: for models trained on
    data in another frame, e.g. the demo corpus).
    """

    def __init__(self, decoder: CodecAvatarDecoder, vert_mean: torch.Tensor, vert_std: float | torch.Tensor,
                 mesh: TexturedMesh, pose_frame: str = "camera"):
        super().__init__()
        if pose_frame not in POSE_FRAMES:
            raise ValueError(f"pose_frame: expected one of {POSE_FRAMES}, got {pose_frame!r}")
        self.decoder = decoder.eval()
        self.pose_frame = pose_frame
        self.register_buffer("vert_mean", vert_mean.float())
        self.register_buffer("vert_std", torch.as_tensor(vert_std, dtype=torch.float32).reshape(()))
        self.register_buffer("faces", mesh.faces)
        self.register_buffer("uv", mesh.uv.float())
        self.register_buffer("uv_faces", mesh.uv_faces)

    # ------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_dataset(cls, root: str | os.PathLike, device: str | torch.device = "cpu",
                     pose_frame: str = "camera") -> "CodecAvatar":
        """The avatar from the released 50h dataset root; every problem with its files in one AvatarError."""
        root = Path(root)
        if not root.is_dir():
            raise AvatarError(f"{root}: no such dataset directory (expected the released 50h dataset root with "
                              f"{DECODER_FILE}, {MEAN_FILE}, {VARIANCE_FILE} and {TOPOLOGY_NAME})")
        problems: list[str] = []
        topology = next((root / place for place in TOPOLOGY_PLACES if (root / place).is_file()), None)
        for relative in (DECODER_FILE, MEAN_FILE, VARIANCE_FILE):
            if not (root / relative).is_file():
                problems.append(f"{root / relative}: missing")
        if topology is None:
            problems.append(f"{root / TOPOLOGY_NAME}: missing (looked at the root and under decoder/)")

        state = None
        if (root / DECODER_FILE).is_file():
            try:
                state = torch.load(root / DECODER_FILE, map_location="cpu", weights_only=True)
            except Exception as error:  # torch raises many types for corrupt or foreign files
                problems.append(f"{root / DECODER_FILE}: not a readable torch state dict ({error})".splitlines()[0])
            if state is not None and not isinstance(state, dict):
                problems.append(f"{root / DECODER_FILE}: expected a state dict, got {type(state).__name__}")
                state = None
        mesh = None
        if topology is not None:
            try:
                mesh = load_textured_obj(topology)
            except (ValueError, OSError) as error:
                problems.append(str(error))

        # The vertex count every file must agree on: the decoder's, else the obj's, else the published one.
        geometry_out = state.get("geommod.0.weight_v", state.get("geommod.0.weight")) if state is not None else None
        if isinstance(geometry_out, torch.Tensor) and geometry_out.dim() == 2 and geometry_out.shape[0] % 3 == 0:
            vertices, counted_by = geometry_out.shape[0] // 3, f"{root / DECODER_FILE} (geommod.0)"
        elif mesh is not None:
            vertices, counted_by = mesh.vertices.shape[0], str(topology)
        else:
            vertices, counted_by = PUBLISHED_VERTICES, "the published avatar"
        canonical = None
        if state is not None:
            canonical, key_problems = canonical_decoder_state(state, vertices, str(root / DECODER_FILE))
            problems += key_problems
        if mesh is not None and mesh.vertices.shape[0] != vertices:
            problems.append(f"{topology}: has {mesh.vertices.shape[0]} vertices, "
                            f"expected {vertices} as in {counted_by}")
        mean = None
        if (root / MEAN_FILE).is_file():
            size, expected = (root / MEAN_FILE).stat().st_size, vertices * 3 * 4
            if size != expected:
                problems.append(f"{root / MEAN_FILE}: has {size} bytes, expected {vertices} x 3 float32 = {expected} "
                                f"bytes as in {counted_by}")
            else:
                mean = torch.from_numpy(np.fromfile(root / MEAN_FILE, dtype="<f4").reshape(vertices, 3).copy())
        variance = None
        if (root / VARIANCE_FILE).is_file():
            text = (root / VARIANCE_FILE).read_text().split()
            try:
                variance = float(text[0]) if len(text) == 1 else None
            except ValueError:
                variance = None
            if variance is None or not variance > 0 or not math.isfinite(variance):
                problems.append(f"{root / VARIANCE_FILE}: expected one positive number (a variance), got "
                                f"{' '.join(text)[:40]!r}")
        for name, tensor in (("decoder", canonical), ("mean", mean)):
            values = tensor.values() if isinstance(tensor, dict) else [tensor] if tensor is not None else []
            if any(not torch.isfinite(value).all() for value in values):
                problems.append(f"{root / (DECODER_FILE if name == 'decoder' else MEAN_FILE)}: contains NaN or inf")
        if problems:
            raise AvatarError(f"{root}: not a usable Codec Avatar: " + "; ".join(problems))
        return cls._assemble(canonical, vertices, mean, math.sqrt(variance), mesh, device, pose_frame)

    @classmethod
    def _assemble(cls, canonical, vertices, mean, std, mesh, device, pose_frame) -> "CodecAvatar":
        with torch.device("meta"):
            decoder = CodecAvatarDecoder(vertices)
        decoder.load_state_dict(canonical, assign=True)
        return cls(decoder, mean, std, mesh, pose_frame).to(device)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file (decoder weights, mean, std, mesh) that `load` reads back; written atomically."""
        from safetensors.torch import save_file

        from avflow.utils import atomic_path

        tensors = {f"decoder.{key}": value for key, value in self.decoder.state_dict().items()}
        tensors.update({"vert_mean": self.vert_mean, "vert_std": self.vert_std, "mesh.faces": self.faces,
                        "mesh.uv": self.uv, "mesh.uv_faces": self.uv_faces})
        with atomic_path(path) as tmp:
            save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(tmp),
                      metadata={"format": AVATAR_FORMAT})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             pose_frame: str = "camera") -> "CodecAvatar":
        """An avatar written by `save` (a model directory's avatar.safetensors)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise AvatarError(f"{path}: not a readable avatar file ({error})") from error
        mesh_keys = ("vert_mean", "vert_std", "mesh.faces", "mesh.uv", "mesh.uv_faces")
        missing = [key for key in mesh_keys if key not in tensors]
        if missing:
            raise AvatarError(f"{path}: not an avflow avatar file: missing {', '.join(missing)}")
        vertices = tensors["vert_mean"].shape[0]
        state = {key[len("decoder."):]: value for key, value in tensors.items() if key.startswith("decoder.")}
        canonical, problems = canonical_decoder_state(state, vertices, str(path))
        faces, uv, uv_faces = tensors["mesh.faces"], tensors["mesh.uv"], tensors["mesh.uv_faces"]
        if faces.shape != uv_faces.shape or faces.max() >= vertices or uv_faces.max() >= uv.shape[0]:
            problems.append(f"{path}: mesh indices out of range or faces {tuple(faces.shape)} and uv_faces "
                            f"{tuple(uv_faces.shape)} differ")
        if problems:
            raise AvatarError("; ".join(problems))
        mesh = TexturedMesh(torch.empty(vertices, 3), faces, uv, uv_faces)
        return cls._assemble(canonical, vertices, tensors["vert_mean"], tensors["vert_std"], mesh, device, pose_frame)

    # ------------------------------------------------------------------------------------------------------
    # Decoding and rendering

    @property
    def device(self) -> torch.device:
        return self.vert_mean.device

    @torch.no_grad()
    def decode(self, expression: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """expression (N, 256), view (N, 3) unit head-to-camera vectors in head space -> geometry (N, V, 3)
        before de-normalization and texture (N, 3, 1024, 1024) in 0..255 (unclamped), float32. On CUDA the
        decoder runs in bf16 autocast."""
        if expression.dim() != 2 or expression.shape[1] != EXPRESSION_DIM or view.shape != (expression.shape[0], 3):
            raise ValueError(f"expression (N, {EXPRESSION_DIM}) and view (N, 3) expected, got "
                             f"{tuple(expression.shape)} and {tuple(view.shape)}")
        expression, view = expression.to(self.device, torch.float32), view.to(self.device, torch.float32)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext())
        with autocast:
            geometry, texture = self.decoder(expression, view)
        return geometry.float(), texture.float()

    @torch.no_grad()
    def render(self, expression: torch.Tensor, head_transform: torch.Tensor | None = None, height: int | None = None,
               width: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """uint8 images (N, H, W, 3) of expression codes (N, 256) under head transforms (N, 4, 4) (head space
        to the published camera, mm; default the published default pose), by the published camera at
        1024 x 1024 unless height/width say otherwise; `chunk` frames at a time (60 on CUDA as published)."""
        frames = expression.shape[0]
        if head_transform is None:
            head_transform = torch.tensor(DEFAULT_HEAD_TRANSFORM).expand(frames, 4, 4)
        if head_transform.shape != (frames, 4, 4):
            raise ValueError(f"head_transform: expected ({frames}, 4, 4), got {tuple(head_transform.shape)}")
        height, width = height or IMAGE_SIZE, width or IMAGE_SIZE
        chunk = chunk or (PUBLISHED_CHUNK if self.device.type == "cuda" else CPU_CHUNK)
        images = torch.empty(frames, height, width, 3, dtype=torch.uint8)
        for start in range(0, frames, chunk):
            part = slice(start, start + chunk)
            rotation, translation, view = head_relative_camera(head_transform[part].to(self.device, torch.float32))
            geometry, texture = self.decode(expression[part], view)
            vertices = geometry * self.vert_std + self.vert_mean
            screen = project(vertices, rotation, translation, height, width)
            image = render_textured(screen, self.faces, self.uv, self.uv_faces, texture, height, width)
            images[part] = image.clamp(0, 255).round().to(torch.uint8).cpu()
        return images

    def render_pose7(self, expression: np.ndarray, head_pose: np.ndarray, height: int | None = None,
                     width: int | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 frames for expression codes (T, 256) and 7-d head poses (T, 7) [quaternion |
        translation], read according to `pose_frame`."""
        transforms = torch.from_numpy(pose7_to_rigid(np.asarray(head_pose, dtype=np.float64))).float()
        if self.pose_frame == "relative":
            transforms[:, :3, 3] = 0.0
            transforms = torch.tensor(DEFAULT_HEAD_TRANSFORM) @ transforms
        return self.render(torch.from_numpy(np.asarray(expression, dtype=np.float32)), transforms, height,
                           width).numpy()
