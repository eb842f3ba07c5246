"""Codec Avatar rendering speed at the published 1024 x 1024: decode, rasterize + texture, and both together.

    python3 benchmarks/render.py                         # CPU: 4-frame chunks, 3 timed runs each
    python3 benchmarks/render.py --device cuda --frames 60 --json render.json   # the published chunk size
    python3 benchmarks/render.py --quick                 # 2-frame chunks, one timed run: a smoke run

The avatar is the published decoder with random weights (every parameter drawn, real shapes: 7306
vertices, 1024 x 1024 texture) on a 7306-vertex ellipsoid head with a UV seam, or the real one with
`--avatar DATASET_ROOT`. Each row is the median over `--repeats` calls after one warm-up, of one chunk of
`--frames` frames with random expression codes under head poses turned up to 20 degrees from the default
pose:
- decode: `CodecAvatar.decode` (bf16 autocast on CUDA), geometry and texture;
- raster: projection, rasterization (DRTK when installed on CUDA, else the PyTorch rasterizer), UV
  interpolation and texture sampling of already decoded frames;
- render: `CodecAvatar.render`, everything including the uint8 conversion and the copy to the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys
import time

import torch

from avflow.render import CodecAvatar, TexturedMesh
from avflow.render.codec_avatar import (
    DEFAULT_HEAD_TRANSFORM,
    PUBLISHED_VERTICES,
    CodecAvatarDecoder,
    head_relative_camera,
    project,
)
from avflow.render.raster import drtk_module, render_textured
from avflow.utils import atomic_path


def ellipsoid_head(rings: int = 83, columns: int = 88) -> TexturedMesh:
    """2 + rings * columns = 7306 vertices (mm, the face towards +z), a longitude/latitude UV chart whose
    wrap-around column is a seam; poles use one UV per cap triangle."""
    polar = torch.linspace(0, math.pi, rings + 2, dtype=torch.float64)[1:-1]
    azimuth = torch.arange(columns, dtype=torch.float64) * 2 * math.pi / columns
    p, a = torch.meshgrid(polar, azimuth, indexing="ij")
    unit = torch.stack([p.sin() * a.sin(), p.cos(), p.sin() * a.cos()], -1).reshape(-1, 3)
    vertices = (torch.cat([torch.tensor([[0.0, 1, 0]]), unit.float(), torch.tensor([[0.0, -1, 0]])])
                * torch.tensor([80.0, 110, 95]))
    j = torch.arange(columns)
    ring_uv = torch.stack(torch.meshgrid(torch.arange(rings), torch.arange(columns + 1), indexing="ij"),
                          -1).reshape(-1, 2)
    uv = torch.cat([torch.stack([(j + 0.5) / columns, torch.ones(columns)], -1),
                    torch.stack([ring_uv[:, 1] / columns, 1 - (ring_uv[:, 0] + 1) / (rings + 1)], -1),
                    torch.stack([(j + 0.5) / columns, torch.zeros(columns)], -1)]).float()
    vid = lambda i, k: 1 + i * columns + k % columns  # noqa: E731
    tid = lambda i, k: columns + i * (columns + 1) + k  # noqa: E731
    bottom_v, bottom_t = vertices.shape[0] - 1, columns + rings * (columns + 1)
    faces = [torch.stack([torch.zeros_like(j), vid(0, j), vid(0, j + 1)], -1)]
    uv_faces = [torch.stack([j, tid(0, j), tid(0, j + 1)], -1)]
    i, k = [t.reshape(-1) for t in torch.meshgrid(torch.arange(rings - 1), j, indexing="ij")]
    faces += [torch.stack([vid(i, k), vid(i + 1, k), vid(i + 1, k + 1)], -1),
              torch.stack([vid(i, k), vid(i + 1, k + 1), vid(i, k + 1)], -1)]
    uv_faces += [torch.stack([tid(i, k), tid(i + 1, k), tid(i + 1, k + 1)], -1),
                 torch.stack([tid(i, k), tid(i + 1, k + 1), tid(i, k + 1)], -1)]
    faces.append(torch.stack([torch.full_like(j, bottom_v), vid(rings - 1, j + 1), vid(rings - 1, j)], -1))
    uv_faces.append(torch.stack([bottom_t + j, tid(rings - 1, j + 1), tid(rings - 1, j)], -1))
    return TexturedMesh(vertices, torch.cat(faces), uv, torch.cat(uv_faces))


def random_avatar(device: torch.device) -> CodecAvatar:
    torch.manual_seed(0)
    decoder = CodecAvatarDecoder(PUBLISHED_VERTICES)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            parameter.copy_(0.5 + torch.rand_like(parameter) if name.endswith("weight_g") else
                            torch.randn_like(parameter) * (0.1 if "bias" in name else 1.0))
    mesh = ellipsoid_head()
    return CodecAvatar(decoder, mesh.vertices, 2.0, mesh).to(device)


def head_transforms(frames: int, generator: torch.Generator) -> torch.Tensor:
    """The default pose turned by up to 20 degrees about the head's vertical axis."""
    angles = (torch.rand(frames, generator=generator) * 2 - 1) * math.radians(20)
    turn = torch.zeros(frames, 4, 4)
    turn[:, 0, 0], turn[:, 0, 2], turn[:, 2, 0], turn[:, 2, 2] = angles.cos(), angles.sin(), -angles.sin(), angles.cos()
    turn[:, 1, 1], turn[:, 3, 3] = 1.0, 1.0
    return torch.tensor(DEFAULT_HEAD_TRANSFORM) @ turn


def median_seconds(work, repeats: int, device: torch.device) -> float:
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    work()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--frames", type=int, help="frames per chunk (default: 60 on CUDA as published, 4 on CPU)")
    parser.add_argument("--repeats", type=int, help="timed runs per row (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="2-frame chunks, one timed run: a smoke run")
    parser.add_argument("--avatar", help="a released 50h dataset root (default: random weights, real shapes)")
    parser.add_argument("--json", help="also write the results to this file, rewritten after every row")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    frames = args.frames or (2 if args.quick else 60 if device.type == "cuda" else 4)
    repeats = args.repeats or (1 if args.quick else 3)
    avatar = CodecAvatar.from_dataset(args.avatar, device) if args.avatar else random_avatar(device)
    generator = torch.Generator().manual_seed(1)
    expression = torch.randn(frames, 256, generator=generator)
    transforms = head_transforms(frames, generator)
    rotation, translation, view = head_relative_camera(transforms.to(device))
    geometry, texture = avatar.decode(expression, view)

    def rasterize_decoded():
        screen = project(geometry * avatar.vert_std + avatar.vert_mean, rotation, translation, 1024, 1024)
        return render_textured(screen, avatar.faces, avatar.uv, avatar.uv_faces, texture, 1024, 1024)

    coverage = (rasterize_decoded().sum(-1) > 0).float().mean().item()
    results = {
        "command": "python3 benchmarks/render.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
        "rasterizer": "drtk" if device.type == "cuda" and drtk_module() is not None else "pytorch",
        "size": [1024, 1024], "frames_per_chunk": frames, "face_coverage": round(coverage, 3),
        "frames_per_s": {}, "ms_per_frame": {},
    }
    print(f"{results['device']}, rasterizer {results['rasterizer']}, {frames} frames per chunk, face covers "
          f"{100 * coverage:.0f}% of the frame", flush=True)
    parts = {"decode": lambda: avatar.decode(expression, view), "raster": rasterize_decoded,
             "render": lambda: avatar.render(expression, transforms, chunk=frames)}
    for part, work in parts.items():
        seconds = median_seconds(work, repeats, device)
        results["frames_per_s"][part] = round(frames / seconds, 3)
        results["ms_per_frame"][part] = round(1000 * seconds / frames, 2)
        print(f"{part:>6}: {results['frames_per_s'][part]:9.2f} frames/s  "
              f"{results['ms_per_frame'][part]:9.1f} ms/frame", flush=True)
        if args.json:
            with atomic_path(args.json) as tmp:
                tmp.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
