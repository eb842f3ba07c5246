"""The export command's arguments and body, shared by `python -m avflow.export` and `avflow export`: the same
options, errors and exit codes either way. The exporter is imported when an export runs, so building the `avflow`
parser stays cheap.
"""

from __future__ import annotations

import argparse
import logging

from avflow.model.sampling import METHODS
from avflow.utils import run_reporting_errors

DESCRIPTION = "Turn a training checkpoint into a self-contained model directory for avflow generate / avflow infer."


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a training step directory (RUN/checkpoints/step-N), "
                             "a consolidated or imported .safetensors")
    parser.add_argument("-o", "--output", required=True, help="the model directory to write")
    parser.add_argument("--format", default="torchscript", choices=("torchscript", "aoti", "eager"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--nfe", type=int, help="network evaluations per sample (default: the checkpoint's, 16)")
    parser.add_argument("--method", choices=tuple(METHODS), help="default: the checkpoint's (euler)")
    parser.add_argument("--max-seconds", type=float, help="longest single pass; longer inputs go through windows "
                                                          "(default: the checkpoint's 1725 frames, ~20 s)")
    parser.add_argument("--batch", type=int, default=3, help="sequences (inputs x samples) per sampler call")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda: where the artifact will run")
    parser.add_argument("--vocoder", help="a BigVGAN {'generator': ...} checkpoint to include")
    parser.add_argument("--text2tokens", help="a consolidated text-to-tokens .safetensors to include, for --text")
    parser.add_argument("--face-decoder", help="a TorchScript face decoder to include, for videos")
    parser.add_argument("--avatar", metavar="[IDENTITY=]DATASET_ROOT", action="append", default=[],
                        help="a released 50h dataset root: include its Codec Avatar, for videos without the dataset; "
                             "IDENTITY= makes it that identity's own (repeat the option for several)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run_export(args: argparse.Namespace) -> None:
    from avflow.export.exporter import ExportOptions, export

    options = ExportOptions(args.format, args.dtype, args.nfe, args.method, args.max_seconds, args.batch, args.device,
                            args.vocoder, args.text2tokens, args.face_decoder, args.avatar, args.force)
    meta = export(args.checkpoint, args.output, options)
    print(f"wrote {args.output}: {meta['format']} {meta['dtype']}, {meta['rows']} x {meta['frames']} frames, "
          f"{meta['sampler']['method']} nfe={meta['sampler']['nfe']}, parity: relative error "
          f"{meta['parity']['relative_error']:.3g} (tolerance {meta['parity']['tolerance']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avflow.export", description=DESCRIPTION)
    add_export_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks instead of one line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return run_reporting_errors("python -m avflow.export", lambda: run_export(args), args.verbose)
