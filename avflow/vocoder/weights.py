"""BigVGAN weights: the released `{'generator': state_dict}` checkpoint, and avflow's own vocoder file.

A released checkpoint's weight norm (legacy `weight_g`/`weight_v`, or the newer
`parametrizations.weight.original0/1`) is folded into plain weights at load time. Export writes the folded
generator as safetensors with its sizes in the metadata, so a model directory loads it without pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from avflow.utils import atomic_path, load_torch
from avflow.vocoder.bigvgan import BigVGAN, BigVGANConfig


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain weight of a weight-normed layer (dim 0): w = g * v / ||v||, the norm over every dim but 0.

    Computed in float64 and returned in v's dtype."""
    v64 = v.to(torch.float64)
    norm = v64.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return (g.to(torch.float64).view_as(norm) * v64 / norm).to(v.dtype)


_WEIGHT_NORM_FORMS = ((".weight_g", ".weight_v"),
                      (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def fold_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every weight-norm pair (legacy weight_g/weight_v or parametrization original0/original1) with
    the plain `.weight` it computes; other entries pass through. An unpaired half is kept so it is reported."""
    folded: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for key in state_dict:
        for g_suffix, v_suffix in _WEIGHT_NORM_FORMS:
            if key.endswith(g_suffix):
                prefix = key[:-len(g_suffix)]
                v_key = prefix + v_suffix
                if v_key in state_dict:
                    g, v = state_dict[key], state_dict[v_key]
                    if g.numel() != v.shape[0]:
                        raise ValueError(f"{key}: weight-norm gain has {g.numel()} elements but {v_key} has "
                                         f"{v.shape[0]} output rows")
                    folded[prefix + ".weight"] = fold_weight_norm(g, v)
                    consumed.update((key, v_key))
    for key, value in state_dict.items():
        if key not in consumed:
            folded[key] = value
    return folded


def _check_keys(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{key} (checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)})"
                       for key in set(expected) & set(state_dict)
                       if tuple(state_dict[key].shape) != tuple(expected[key].shape))
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        raise ValueError(f"{source}: not a BigVGAN generator of this configuration; " + "; ".join(parts))


def load_bigvgan(path: str | os.PathLike, device: str | torch.device = "cpu",
                 config: BigVGANConfig | None = None) -> BigVGAN:
    """Load a `{'generator': state_dict}` BigVGAN checkpoint (weights_only) into an eval-mode generator on
    `device`, folding weight norm into plain weights. `config` defaults to the base 22 kHz 80-band sizes."""
    checkpoint = load_torch(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("generator"), dict):
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: expected a {{'generator': state_dict}} BigVGAN checkpoint, found {found}")
    state_dict = fold_state_dict(checkpoint["generator"])
    model = BigVGAN(config)
    _check_keys(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval().requires_grad_(False)


VOCODER_FILE_FORMAT = "avflow-bigvgan-v1"


def save_vocoder_file(vocoder: BigVGAN, path: str | os.PathLike) -> Path:
    """The folded generator as safetensors with its sizes in the metadata (no pickle to load it back)."""
    from safetensors.torch import save_file

    metadata = {"format": VOCODER_FILE_FORMAT, "config": json.dumps(dataclasses.asdict(vocoder.config))}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in vocoder.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def load_vocoder_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> BigVGAN:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    if metadata.get("format") != VOCODER_FILE_FORMAT:
        raise ValueError(f"{path}: not an avflow vocoder file (expected format '{VOCODER_FILE_FORMAT}')")
    sizes = json.loads(metadata["config"])
    config = BigVGANConfig(**{key: tuple(tuple(v) if isinstance(v, list) else v for v in value)
                              if isinstance(value, list) else value for key, value in sizes.items()})
    model = BigVGAN(config)
    _check_keys(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)
