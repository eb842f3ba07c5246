"""The model directory written by `python -m avflow.export`, and loading its compiled sampler.

A model directory is self-contained: it needs avflow and torch, never the training checkpoint or the
original config file. export.json records the sha256 of every other file; loading checks them before anything
is read, so a damaged file (a flipped bit in sampler.ts would run silently) is refused, named. Directories
exported before digests were recorded load unchecked.

    export.json            what was exported: format, dtype, sampler, fixed shape, parity error, versions
    config.yaml            the full config (model, mel, normalization settings, sampler defaults)
    model.safetensors      EMA weights, expression/mel statistics and the head VAE with pose statistics
    sampler.ts             --format torchscript: the whole fixed-step loop around the traced network
    velocity.pt2           --format aoti: the network as an AOTInductor package (the loop runs in Python)
    vocoder.safetensors    optional BigVGAN generator (weight norm folded), its sizes in the metadata
    text2tokens.safetensors  optional text-to-tokens model, so --text needs no other file
    face_decoder.ts        optional TorchScript face decoder, so videos need no other file
    avatar.safetensors     optional Codec Avatar (decoder weights, mean geometry, std, UV mesh), so videos of
                           the released subject need no dataset
    avatar-NAME.safetensors  optional, a model of several identities: identity NAME's own Codec Avatar (the
                           others show avatar.safetensors, when there is one)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from avflow.model.sampling import FixedStepSampler
from avflow.runtime import DTYPES
from avflow.utils import file_sha256

EXPORT_FORMAT_VERSION = 1
META_FILE = "export.json"
DIGESTS_KEY = "sha256"  # export.json: {file name: sha256} of every other file
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "sampler.ts"
AOTI_FILE = "velocity.pt2"
VOCODER_FILE = "vocoder.safetensors"
TEXT2TOKENS_FILE = "text2tokens.safetensors"
FACE_DECODER_FILE = "face_decoder.ts"
AVATAR_FILE = "avatar.safetensors"
IDENTITY_AVATARS_KEY = "identity_avatars"  # export.json: {identity: its avatar file}
FORMATS = ("eager", "torchscript", "aoti")


def identity_avatar_file(identity: str) -> str:
    """The file of an identity's own Codec Avatar in a model directory."""
    return f"avatar-{identity}.safetensors"


def is_model_directory(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_export_meta(directory: str | Path) -> dict:
    """export.json of a model directory whose files match their recorded digests; ValueError naming the first
    file that does not (or the unreadable export.json)."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable avflow export ({error})") from error
    if meta.get("format_version") != EXPORT_FORMAT_VERSION or meta.get("format") not in FORMATS:
        raise ValueError(f"{path}: expected an avflow export of format version {EXPORT_FORMAT_VERSION} with format "
                         f"one of {FORMATS}, got version {meta.get('format_version')} format {meta.get('format')}")
    for name, digest in sorted(meta.get(DIGESTS_KEY, {}).items()):
        file = Path(directory) / name
        if not file.is_file():
            raise ValueError(f"{file}: missing (the export lists it)")
        if file_sha256(file) != digest:
            raise ValueError(f"{file}: sha256 differs from the one recorded at export (damaged or replaced); "
                             "export the model again")
    return meta


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file of a model directory except export.json, which records them."""
    return {path.name: file_sha256(path) for path in sorted(directory.iterdir())
            if path.is_file() and path.name != META_FILE}


@dataclass
class CompiledSampler:
    """A fixed-shape sampling loop from a model directory: `rows` sequences of `frames` frames per call."""

    loop: torch.nn.Module
    method: str
    nfe: int
    guidance_scale: float
    rows: int
    frames: int

    def check_settings(self, method: str, nfe: int, guidance_scale: float) -> None:
        asked, fixed = (method, nfe, guidance_scale), (self.method, self.nfe, self.guidance_scale)
        if asked != fixed:
            raise ValueError(f"this model directory was exported for method={fixed[0]} nfe={fixed[1]} "
                             f"guidance_scale={fixed[2]}; asked for method={asked[0]} nfe={asked[1]} "
                             f"guidance_scale={asked[2]}: export again, or with --format eager for free settings")


def load_compiled_sampler(directory: str | Path, meta: dict, device: torch.device) -> CompiledSampler | None:
    """The directory's compiled loop on `device`, or None for an eager export."""
    directory = Path(directory)
    sampler = meta["sampler"]
    if meta["format"] == "eager":
        return None
    if meta["format"] == "torchscript":
        loop = torch.jit.load(str(directory / TORCHSCRIPT_FILE), map_location=device)
    else:
        if device.type != meta["device"]:
            raise ValueError(f"{directory}: the AOTInductor package was compiled for {meta['device']}, not "
                             f"{device.type}; export again on a {device.type} machine or use --format torchscript")
        velocity = torch._inductor.aoti_load_package(str(directory / AOTI_FILE))
        loop = FixedStepSampler(velocity, sampler["method"], sampler["nfe"], DTYPES[meta["dtype"]]).to(device)
    return CompiledSampler(loop.eval(), sampler["method"], sampler["nfe"], sampler["guidance_scale"], meta["rows"],
                           meta["frames"])
