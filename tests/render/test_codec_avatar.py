"""The Codec Avatar against a straightforward re-statement of the published decoder, its camera, its
loading from the released files (both key spellings) and from a model directory, and bad assets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_avatar_state, write_synthetic_avatar

from avflow.render.codec_avatar import AvatarError, CodecAvatar, head_relative_camera, project


def _reference_decode(state, z, view):
    """The published decoder written out layer by layer from the description: weight = g * v / ||v|| with
    ||v|| over the whole tensor, untied texture biases, view-conditioned texture and warp."""
    def weight(prefix):
        v = state.get(f"{prefix}.weight_v", state.get(f"{prefix}.weight"))
        g = state.get(f"{prefix}.weight_g", state.get(f"{prefix}.g"))
        shape = (-1, 1) if v.dim() == 2 else (1, -1, 1, 1)
        return g.reshape(shape) * v / torch.sqrt((v * v).sum())

    def linear(prefix, x):
        return x @ weight(prefix).T + state[f"{prefix}.bias"]

    def leaky(x):
        return torch.where(x > 0, x, 0.2 * x)

    def upsample(prefix, x, layers, untied):
        for i in range(layers):
            x = F.conv_transpose2d(x, weight(f"{prefix}.{2 * i}"), stride=2, padding=1)
            bias = state[f"{prefix}.{2 * i}.bias"]
            x = x + (bias[None] if untied else bias[None, :, None, None])
            if i < layers - 1:
                x = leaky(x)
        return x

    n = z.shape[0]
    enc = leaky(linear("encmod.0", z))
    geometry = linear("geommod.0", enc).reshape(n, -1, 3)
    ev = torch.cat([enc, leaky(linear("viewmod.0", view))], 1)
    texture = upsample("texmod", leaky(linear("texmod2.0", ev)).reshape(n, 256, 4, 4), 8, untied=True)
    warp = upsample("warpmod", leaky(linear("warpmod2.0", ev)).reshape(n, 256, 4, 4), 6, untied=False)
    warp = F.interpolate(warp, size=(1024, 1024), mode="bilinear", align_corners=False)
    ramp = torch.tensor(np.linspace(-1, 1, 1024) * 1023 / 1024, dtype=torch.float32)
    identity = torch.stack([ramp[None, :].expand(1024, 1024), ramp[:, None].expand(1024, 1024)], -1)
    grid = torch.stack([warp[:, 0], warp[:, 1]], -1) / 1024 + identity
    texture = F.grid_sample(texture, grid, mode="bilinear", align_corners=False)
    return geometry, 255 * (texture + state["bias"] + 0.5)


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("spelling", ["weight_v", "weight"])
def test_decode_equals_the_published_decoder_restated(tmp_path, spelling):
    """Real shapes (7306 vertices, 1024 x 1024 texture), every parameter random, float32."""
    write_synthetic_avatar(tmp_path, seed=3, spelling=spelling, obj_under_decoder=spelling == "weight")
    avatar = CodecAvatar.from_dataset(tmp_path)
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(2, 256, generator=generator)
    view = F.normalize(torch.randn(2, 3, generator=generator), dim=-1)
    geometry, texture = avatar.decode(z, view)
    expected_geometry, expected_texture = _reference_decode(random_avatar_state(3, spelling), z, view)
    assert geometry.shape == (2, 7306, 3) and texture.shape == (2, 3, 1024, 1024)
    assert _relative_error(geometry, expected_geometry) < 1e-4
    assert _relative_error(texture, expected_texture) < 1e-4
    assert expected_texture.std() > 1  # the texture is not flat, so the comparison means something


def test_the_published_camera_and_default_pose():
    """Default pose: the camera sits 1 m in front of the face (view +z) and the head's origin lands on the
    principal point (2048, 1707.6) / 4; a point 100 mm to the head's right lands focal * 100 / 1000 px right."""
    default = torch.tensor([[[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 1000], [0, 0, 0, 1]]])
    rotation, translation, view = head_relative_camera(default)
    torch.testing.assert_close(view, torch.tensor([[0.0, 0.0, 1.0]]))
    points = torch.tensor([[[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0]]])
    screen = project(points, rotation, translation, 1024, 1024)
    torch.testing.assert_close(screen[0, 0], torch.tensor([512.0, 426.9, 1000.0]))
    torch.testing.assert_close(screen[0, 1, 0], torch.tensor(512.0 + 10085.45 / 4 * 0.1))
    torch.testing.assert_close(screen[0, 2, 1], torch.tensor(426.9 - 10082.49 / 4 * 0.1))  # head up = image up
    # A head turned by 90 degrees about its vertical axis sees the camera from its side: view = (-1, 0, 0).
    turn = default.clone()
    turn[0, :3, :3] = default[0, :3, :3] @ torch.tensor([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])
    torch.testing.assert_close(head_relative_camera(turn)[2], torch.tensor([[-1.0, 0.0, 0.0]]))


@pytest.fixture(scope="module")
def avatar_root(tmp_path_factory):
    return write_synthetic_avatar(tmp_path_factory.mktemp("avatar"))


def test_render_shows_the_face_on_a_black_background_and_a_saved_avatar_renders_the_same(avatar_root, tmp_path):
    avatar = CodecAvatar.from_dataset(avatar_root)
    expression = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
    images = avatar.render(expression, height=128, width=128)
    assert images.shape == (2, 128, 128, 3) and images.dtype == torch.uint8
    # The 160 x 220 mm head 1 m away: about 50 x 70 px at 128 / 1024 of the published focal length.
    covered = images.int().sum(-1) > 0
    assert 0.15 < covered.float().mean() < 0.4
    assert covered[0, 53, 64] and not covered[0, 2, 2] and not covered[0, 125, 64]
    avatar.save(tmp_path / "avatar.safetensors")
    again = CodecAvatar.load(tmp_path / "avatar.safetensors")
    assert torch.equal(again.render(expression, height=128, width=128), images)


def _break(root, what):
    if what == "renamed key":
        state = torch.load(root / "decoder" / "dec_params.pt")
        state["texmod.4.weight_vv"] = state.pop("texmod.4.weight_v")
        torch.save(state, root / "decoder" / "dec_params.pt")
    elif what == "truncated mean":
        data = (root / "decoder" / "vert_mean.bin").read_bytes()
        (root / "decoder" / "vert_mean.bin").write_bytes(data[:1000])
    elif what == "other obj":
        obj = (root / "face_topo_small_neck.obj").read_text()
        (root / "face_topo_small_neck.obj").write_text("v 0 0 0\n" + obj)
    else:
        (root / what).unlink()


BROKEN = {
    "decoder/dec_params.pt": r"decoder/dec_params\.pt: missing",
    "decoder/vert_mean.bin": r"decoder/vert_mean\.bin: missing",
    "decoder/vert_var.txt": r"decoder/vert_var\.txt: missing",
    "face_topo_small_neck.obj": r"face_topo_small_neck\.obj: missing",
    "renamed key": r"dec_params\.pt: missing key texmod\.4\.weight_v or texmod\.4\.weight "
                   r".*unexpected keys texmod\.4\.weight_vv",
    "truncated mean": r"vert_mean\.bin: has 1000 bytes, expected 7306 x 3 float32 = 87672 bytes",
    "other obj": r"face_topo_small_neck\.obj: has 7307 vertices, expected 7306",
}


@pytest.fixture(scope="module")
def pristine_avatar(tmp_path_factory):
    root = write_synthetic_avatar(tmp_path_factory.mktemp("pristine"))
    return {path.relative_to(root): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.mark.parametrize("what", BROKEN)
def test_each_bad_asset_gets_one_error_naming_its_file(pristine_avatar, tmp_path, what):
    for relative, data in pristine_avatar.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(data)
    _break(tmp_path, what)
    with pytest.raises(AvatarError, match=BROKEN[what]) as caught:
        CodecAvatar.from_dataset(tmp_path)
    assert "\n" not in str(caught.value)


def test_every_problem_is_listed_at_once(tmp_path):
    write_synthetic_avatar(tmp_path)
    for what in ("decoder/vert_var.txt", "truncated mean", "renamed key"):
        _break(tmp_path, what)
    with pytest.raises(AvatarError) as caught:
        CodecAvatar.from_dataset(tmp_path)
    message = str(caught.value)
    assert all(part in message for part in ("vert_var.txt: missing", "vert_mean.bin: has 1000", "texmod.4.weight_vv"))

