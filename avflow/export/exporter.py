"""A training checkpoint -> a self-contained model directory (layout in avflow.infer.artifacts).

The compiled artifact has one fixed shape, (rows, frames): the inference scheduler pads every batch to
it, so one artifact (and on CUDA one captured graph) serves every input. Before anything is written
under the output name, the artifact is loaded back from disk and its samples are compared with the
float32 eager sampler on random inputs with a padded row; the export fails if the largest error
exceeds the tolerance of its dtype, and the error is recorded in export.json either way it passes.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch

import avflow
from avflow.config import Config
from avflow.infer.artifacts import (
    AOTI_FILE,
    AVATAR_FILE,
    CONFIG_FILE,
    DIGESTS_KEY,
    EXPORT_FORMAT_VERSION,
    FACE_DECODER_FILE,
    FORMATS,
    IDENTITY_AVATARS_KEY,
    META_FILE,
    TEXT2TOKENS_FILE,
    TORCHSCRIPT_FILE,
    VOCODER_FILE,
    WEIGHTS_FILE,
    file_digests,
    identity_avatar_file,
    load_compiled_sampler,
    read_export_meta,
)
from avflow.model.avflow import AVFlowNet
from avflow.model.io import load_inference_tensors, write_model_file
from avflow.model.sampling import FixedStepSampler, guided
from avflow.render import CodecAvatar, load_face_decoder
from avflow.runtime import DTYPES, pick_device
from avflow.text.token_labels import TOKEN_LABELS
from avflow.utils import reporting_disk_errors
from avflow.vocoder.weights import load_bigvgan, save_vocoder_file

log = logging.getLogger(__name__)

# Largest |artifact - fp32 eager| over the sampled states after the whole loop, relative to the largest
# |fp32 eager| value. fp32 differs only by kernel order; bf16 keeps ~3 significant digits per step (the
# full-size network at 16 steps measured 0.7%, see docs/performance.md).
PARITY_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
PARITY_SEED = 0


class ExportError(ValueError):
    """The export could not be made or failed its parity check; nothing was written under the output name."""


@dataclasses.dataclass
class ExportOptions:
    format: str = "torchscript"
    dtype: str = "fp32"
    nfe: int | None = None  # default: the checkpoint's sample.nfe (published: 16)
    method: str | None = None
    max_seconds: float | None = None  # default: the checkpoint's sample.max_frames (published: 1725, ~20 s)
    batch: int = 3  # sequences per call (inputs x samples): the published 3 samples of one input
    device: str = "auto"
    vocoder: str | None = None
    text2tokens: str | None = None
    face_decoder: str | None = None
    # Released 50h dataset roots whose Codec Avatars the directory carries: "ROOT" for every identity, and for a
    # model of several identities "IDENTITY=ROOT" for that identity's own
    avatars: list[str] = dataclasses.field(default_factory=list)
    force: bool = False

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format: expected one of {FORMATS}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch < 1:
            raise ValueError(f"--batch: expected at least 1 sequence per call, got {self.batch}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"--max-seconds: expected a positive duration, got {self.max_seconds}")


def _parity_inputs(rows: int, frames: int, state_dim: int, cond_dim: int, device: torch.device):
    generator = torch.Generator().manual_seed(PARITY_SEED)
    x0 = torch.randn(rows, frames, state_dim, generator=generator)
    cond = torch.randn(rows, frames, cond_dim, generator=generator)
    valid = torch.ones(rows, frames, dtype=torch.bool)
    valid[-1, frames // 2:] = False  # the scheduler pads short inputs: the masks must hold in the artifact too
    return x0.to(device), cond.to(device), valid.to(device)


def _write_artifact(staging: Path, fmt: str, velocity: torch.nn.Module, method: str, nfe: int, dtype: torch.dtype,
                    example: tuple[torch.Tensor, ...]) -> None:
    x0, cond, valid = example
    args = (x0.to(dtype), torch.rand(x0.shape[0], device=x0.device).to(dtype), cond.to(dtype), valid)
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(velocity, args, check_trace=False)
            # Through memory: torch.jit.save to a file aborts the whole process when a write fails (a full disk),
            # and a failed Python write is an error avflow reports
            buffer = io.BytesIO()
            torch.jit.save(torch.jit.script(FixedStepSampler(traced, method, nfe, dtype)), buffer)
            (staging / TORCHSCRIPT_FILE).write_bytes(buffer.getbuffer())
        elif fmt == "aoti":
            program = torch.export.export(velocity, args)
            torch._inductor.aoti_compile_and_package(program, package_path=str(staging / AOTI_FILE))


def export(checkpoint: str | Path, output: str | Path, options: ExportOptions) -> dict:
    """Write the model directory `output` from `checkpoint`; returns its export.json contents."""
    options.validate()
    output = Path(output)
    if output.exists() and not options.force:
        raise FileExistsError(f"{output} exists; pass --force to replace it")
    cfg, tensors = load_inference_tensors(checkpoint)
    avatars = {name: CodecAvatar.from_dataset(root)  # bad assets fail first
               for name, root in avatar_roots(options.avatars, cfg.model.identities).items()}
    device = pick_device(options.device)
    sample = cfg.sample
    sample.nfe = options.nfe or sample.nfe
    sample.method = options.method or sample.method
    if options.max_seconds is not None:
        sample.max_frames = math.ceil(options.max_seconds * cfg.mel.frame_rate)
        if sample.window_overlap >= sample.max_frames // 2:
            sample.window_overlap = sample.max_frames // 4
            log.info("windows of %d frames: overlap reduced to %d frames", sample.max_frames, sample.window_overlap)
    cfg.validate()
    dtype = DTYPES[options.dtype]
    # FlexAttention cannot be traced or exported; the banded SDPA path computes the same function.
    compiled_attention = "banded" if options.format != "eager" else cfg.model.attention
    reference = AVFlowNet(cfg.model)
    reference.load_state_dict(tensors["ema"])
    reference = reference.to(device).eval()
    exported_cfg = dataclasses.replace(cfg.model, attention=compiled_attention)
    network = AVFlowNet(exported_cfg)
    network.load_state_dict(tensors["ema"])
    network = network.to(device, dtype).eval()
    rows, frames = options.batch, sample.max_frames
    example = _parity_inputs(rows, frames, cfg.model.state_dim, cfg.model.cond_dim, device)

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"-o {output}: {output.parent} is a file, not a folder") from None
    with reporting_disk_errors(output):
        return _write_export(checkpoint, output, options, cfg, tensors, avatars, example, reference, network,
                             compiled_attention)


def _write_export(checkpoint: str | Path, output: Path, options: ExportOptions, cfg: Config, tensors: dict,
                  avatars: dict[str | None, CodecAvatar], example: tuple[torch.Tensor, ...], reference: AVFlowNet,
                  network: AVFlowNet, compiled_attention: str) -> dict:
    """Write the directory under a staging name, check it (parity; digests read back), then rename it to `output`;
    returns its export.json contents."""
    sample, dtype, device = cfg.sample, DTYPES[options.dtype], example[0].device
    rows, frames = example[0].shape[:2]
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        log.info("exporting %s as %s %s, %s x %d frames, %s nfe=%d", checkpoint, options.format, options.dtype, rows,
                 frames, sample.method, sample.nfe)
        velocity = guided(network, sample.guidance_scale)
        _write_artifact(staging, options.format, velocity, sample.method, sample.nfe, dtype, example)
        meta = {
            "format_version": EXPORT_FORMAT_VERSION, "format": options.format, "dtype": options.dtype,
            "device": device.type, "rows": rows, "frames": frames, "attention": compiled_attention,
            "sampler": {"method": sample.method, "nfe": sample.nfe, "guidance_scale": sample.guidance_scale},
            "token_labels": list(TOKEN_LABELS), "source": str(checkpoint),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "avflow_version": avflow.__version__, "torch_version": torch.__version__,
        }
        compiled = load_compiled_sampler(staging, meta, device)
        loop = compiled.loop if compiled is not None else FixedStepSampler(velocity, sample.method, sample.nfe, dtype)
        truth = FixedStepSampler(guided(reference, sample.guidance_scale), sample.method, sample.nfe)
        with torch.no_grad():
            x0, cond, valid = example
            expected = truth(x0, cond, valid)[valid]
            max_abs = (loop(x0, cond, valid)[valid] - expected).abs().max().item()
        error = max_abs / max(expected.abs().max().item(), 1e-12)
        tolerance = PARITY_TOLERANCE[options.dtype]
        meta["parity"] = {"relative_error": error, "max_abs_error": max_abs, "tolerance": tolerance,
                          "against": "float32 eager sampler, random noise and conditioning, one row half padded; "
                                     "relative_error = max |difference| / max |float32 eager|"}
        if not error <= tolerance:
            raise ExportError(f"parity check failed: the {options.format} {options.dtype} sampler differs from the "
                              f"float32 eager sampler by {error:.3g} of its largest value (tolerance {tolerance}); "
                              f"{output} was not written")
        log.info("parity: relative error %.3g (tolerance %g), max abs error %.3g", error, tolerance, max_abs)
        write_model_file(cfg, tensors, staging / WEIGHTS_FILE, source=str(checkpoint))
        cfg.save(staging / CONFIG_FILE, tools=False)
        if options.vocoder:
            save_vocoder_file(load_bigvgan(options.vocoder), staging / VOCODER_FILE)
        if options.text2tokens:
            from avflow.infer.text2tokens import load_text2tokens

            load_text2tokens(options.text2tokens)  # refuse a file that would fail later, at inference
            shutil.copyfile(options.text2tokens, staging / TEXT2TOKENS_FILE)
        if options.face_decoder:
            load_face_decoder(options.face_decoder)
            shutil.copyfile(options.face_decoder, staging / FACE_DECODER_FILE)
        for name, avatar in avatars.items():
            avatar.save(staging / (AVATAR_FILE if name is None else identity_avatar_file(name)))
        if any(name is not None for name in avatars):
            meta[IDENTITY_AVATARS_KEY] = {name: identity_avatar_file(name) for name in avatars if name is not None}
        meta["files"] = sorted(path.name for path in staging.iterdir()) + [META_FILE]
        meta[DIGESTS_KEY] = file_digests(staging)
        (staging / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        read_export_meta(staging)  # what was written reads back with the digests it records
        _replace_directory(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return meta


def avatar_roots(values: list[str], identities: list[str]) -> dict[str | None, str]:
    """--avatar values -> {identity, or None for every identity: dataset root}. A value "NAME=ROOT" names an identity
    of the model's table; a model without a table, or a second avatar for the same identities, is refused."""
    roots: dict[str | None, str] = {}
    for value in values:
        name, separator, root = value.partition("=")
        if not (separator and name and "/" not in name):
            name, root = None, value
        elif not identities:
            raise ValueError(f"--avatar {value}: this model has one identity and no identity table; pass the dataset "
                             "root alone")
        elif name not in identities:
            raise ValueError(f"--avatar {value}: unknown identity {name!r}; this model knows {', '.join(identities)}")
        if name in roots:
            raise ValueError(f"--avatar {value}: a second avatar for "
                             f"{'every identity' if name is None else 'identity ' + repr(name)}")
        roots[name] = root
    return roots


def _replace_directory(staging: Path, output: Path) -> None:
    """Rename the complete staging directory onto `output`; an old `output` is removed only afterwards."""
    if not output.exists():
        staging.rename(output)
        return
    retired = output.with_name(f".{output.name}.replaced")
    if retired.exists():
        shutil.rmtree(retired)
    output.rename(retired)
    staging.rename(output)
    shutil.rmtree(retired)
