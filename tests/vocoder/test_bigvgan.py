"""BigVGAN vocoder: equivalence with the official generator, weight-norm folding, shapes, key errors."""

import pytest
import torch

from avflow.config import MelConfig
from avflow.vocoder.bigvgan import BigVGAN, BigVGANConfig
from avflow.vocoder.vocode import vocode
from avflow.vocoder.weights import fold_weight_norm, load_bigvgan

# The base 22 kHz 80-band structure with narrow channels (32 -> 16 -> 8 -> 4 -> 2).
TINY = BigVGANConfig(upsample_initial_channel=32)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter (SnakeBeta logs start at zero, so defaults would hide them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("weight_g"):  # per-row weight norms around 1 keep the signal alive
                gain = 0.02 if name.startswith("conv_post") else 1.0  # and the output clear of tanh saturation
                parameter.copy_(gain * (0.5 + torch.rand(parameter.shape, generator=generator)))
            else:
                scale = 0.3 if name.endswith(("alpha", "beta")) else 0.15
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def _log_mel(frames: int, seed: int = 1) -> torch.Tensor:
    return -5.5 + 2.0 * torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed))


def test_matches_official_generator(tmp_path):
    pytest.importorskip("bigvgan", reason="equivalence test needs the official `bigvgan` package")
    from bigvgan.bigvgan import BigVGAN as OfficialBigVGAN
    from bigvgan.env import AttrDict

    h = AttrDict(num_mels=80, upsample_rates=list(TINY.upsample_rates),
                 upsample_kernel_sizes=list(TINY.upsample_kernel_sizes),
                 upsample_initial_channel=TINY.upsample_initial_channel, resblock="1",
                 resblock_kernel_sizes=list(TINY.resblock_kernel_sizes),
                 resblock_dilation_sizes=[list(d) for d in TINY.resblock_dilation_sizes],
                 activation="snakebeta", snake_logscale=True, use_bias_at_final=True, use_tanh_at_final=True)
    official = OfficialBigVGAN(h, use_cuda_kernel=False)
    _randomize(official, seed=0)
    state = official.state_dict()
    assert "conv_pre.weight_g" in state and "conv_pre.weight_v" in state  # legacy weight norm, as released
    assert "resblocks.0.activations.5.downsample.lowpass.filter" in state
    path = tmp_path / "bigvgan_generator.pt"
    torch.save({"generator": state}, path)

    ours = load_bigvgan(path, config=TINY)
    assert not any(key.endswith(("weight_g", "weight_v")) for key in ours.state_dict())

    official.eval()
    official.remove_weight_norm()
    mel = _log_mel(24)
    with torch.no_grad():
        expected = official(mel)
        actual = ours(mel)
    assert actual.shape == expected.shape == (1, 1, 24 * 256)
    assert expected.std() > 0.05 and expected.abs().max() < 0.99  # a live signal, not saturated by tanh
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_fold_weight_norm_matches_definition():
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(6, 4, 5, generator=generator)
    g = torch.rand(6, 1, 1, generator=generator) + 0.5
    norms = torch.sqrt((v ** 2).sum(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(fold_weight_norm(g, v), g * v / norms)
    # ConvTranspose weights are (in, out, k): the legacy default still normalises over all dims but 0.
    vt = torch.randn(8, 3, 16, generator=generator)
    gt = torch.rand(8, 1, 1, generator=generator)
    torch.testing.assert_close(fold_weight_norm(gt, vt), gt * vt / vt.flatten(1).norm(dim=1)[:, None, None])


def test_output_length_and_vocode(tmp_path):
    model = BigVGAN(TINY)
    _randomize(model, seed=2)
    assert model(_log_mel(7)).shape == (1, 1, 7 * 256)
    assert model(torch.randn(2, 80, 3)).shape == (2, 1, 3 * 256)
    torch.save({"generator": model.state_dict()}, tmp_path / "plain.pt")  # already-folded weights load too
    loaded = load_bigvgan(tmp_path / "plain.pt", config=TINY)
    cfg = MelConfig()
    mel = _log_mel(10)[0].T  # frames first
    audio = vocode(mel, loaded, cfg)
    assert audio.shape == (10 * 256,) and audio.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(audio, model.eval()(mel.T[None])[0, 0])
    fallback = vocode(_log_mel(12)[0].T, None, cfg)
    assert fallback.shape == (12 * 256,)


def test_key_errors_name_the_key(tmp_path):
    state = BigVGAN(TINY).state_dict()
    bad = dict(state)
    bad["resblocks.4.convs2.1.weight"] = torch.zeros(3, 3, 3)
    del bad["conv_post.bias"]
    bad["extra.weight"] = torch.zeros(1)
    torch.save({"generator": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as error:
        load_bigvgan(tmp_path / "bad.pt", config=TINY)
    message = str(error.value)
    assert "mis-shaped" in message and "resblocks.4.convs2.1.weight" in message
    assert "missing" in message and "conv_post.bias" in message
    assert "unexpected" in message and "extra.weight" in message
    torch.save({"model": state}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="generator"):
        load_bigvgan(tmp_path / "wrong.pt", config=TINY)
    # The default (base) sizes reject a tiny checkpoint by shape.
    torch.save({"generator": state}, tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="conv_pre.weight"):
        load_bigvgan(tmp_path / "tiny.pt")


def test_anti_aliasing_filters_run_as_one_grouped_convolution_per_resampler(monkeypatch):
    """Each resampler is one depthwise convolution over all channels (GPU kernels are tuned for that layout),
    and equals filtering every channel on its own."""
    import torch.nn.functional as F

    from avflow.vocoder.bigvgan import Downsample2x, Upsample2x

    torch.manual_seed(0)
    x = torch.randn(2, 5, 40)
    groups = []
    for name in ("conv1d", "conv_transpose1d"):
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _real=real, **k: groups.append(k.get("groups")) or _real(*a, **k))
    up, down = Upsample2x(), Downsample2x()
    grouped_up, grouped_down = up(x), down(x)
    assert groups == [5, 5]
    monkeypatch.undo()
    for channel in range(5):
        alone = x[:, channel:channel + 1]
        torch.testing.assert_close(grouped_up[:, channel:channel + 1], up(alone))
        torch.testing.assert_close(grouped_down[:, channel:channel + 1], down(alone))
