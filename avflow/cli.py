"""The `avflow` command: thin subcommands that call the stages.

Every subcommand takes `--config FILE` and trailing `section.key=value` overrides where a config
applies. Errors in user input end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from pathlib import Path

from avflow.config import Config, ConfigError, load_config
from avflow.data.layouts import layout_choices, layout_help
from avflow.export.command import DESCRIPTION as EXPORT_DESCRIPTION
from avflow.export.command import add_export_arguments, run_export
from avflow.runtime import fp32_matmul_precision
from avflow.utils import hold_folder, run_reporting_errors

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
# Inference commands run fp32 matmuls in TF32 on CUDA (the network itself runs in bf16 by default); the choice is
# the command's, made for its whole run, never a library call's.
TF32_COMMANDS = {"generate", "infer", "stream", "evaluate"}


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_corpus(args: argparse.Namespace) -> None:
    from avflow.data.corpus import write_corpus

    cfg = _config(args)
    root = Path(args.output or cfg.data.root)
    names = write_corpus(root, cfg.corpus)
    print(f"wrote {len(names)} segments of the demo corpus to {root}")


def cmd_train(args: argparse.Namespace) -> None:
    from avflow.train.entry import run_training

    overrides = [*args.overrides, f"trainer.init_from={args.init_from}"] if args.init_from else args.overrides
    final = run_training(args.config, overrides, resume=args.resume)
    print(f"final checkpoint: {final}")


def cmd_import_published(args: argparse.Namespace) -> None:
    from avflow.model.published import import_published

    out = import_published(args.model, args.head_vae, args.headpose_stats, args.output, dyadic=args.dyadic)
    print(f"wrote {out}; use it with avflow generate --checkpoint {out}")


def cmd_checkpoint_consolidate(args: argparse.Namespace) -> None:
    from avflow.train.checkpoint import consolidate

    print(f"wrote {consolidate(args.checkpoint, args.output)}")


def cmd_train_head_vae(args: argparse.Namespace) -> None:
    from avflow.train.batches import head_vae_path, train_head_vae_stage

    cfg = _config(args)
    out = Path(args.output) if args.output else head_vae_path(cfg)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    summary = train_head_vae_stage(cfg, out)
    print(f"head VAE written to {out} (final reconstruction loss {summary['final_recon_loss']:.4f})")


def apply_pack_data_options(cfg: Config, layout: str | None, folder: Path | None, subject: str | None,
                            identity: str | None = None) -> None:
    """cfg.data with pack's --layout, -i FOLDER, --subject and --identity, its layout (each of data.sources')
    checked to have what it needs, so a wrong layout or a missing setting fails before any work
    (`python -m launch.pack`: before queueing). The options describe one source, so not with data.sources."""
    from avflow.data.layouts import layout_named

    if cfg.data.sources:
        given = [flag for flag, value in (("--layout", layout), ("-i", folder), ("--subject", subject),
                                          ("--identity", identity)) if value]
        if given:
            raise ConfigError(f"{', '.join(given)}: describe a single dataset source, but data.sources lists "
                              f"{len(cfg.data.sources)}; expected each source's settings in data.sources")
        for index, source in enumerate(cfg.data.per_source()):
            layout_named(source.layout, f"data.sources[{index}].layout").check(source)
        return
    chosen = layout_named(layout, "--layout") if layout else layout_named(cfg.data.layout)
    cfg.data.layout = chosen.name  # an alias (demo) is recorded as the layout it names
    if folder:
        for key, value in chosen.input_settings(folder).items():
            setattr(cfg.data, key, value)
    if subject:
        cfg.data.subject = subject
    if identity:
        cfg.data.identity = identity
    cfg.data.validate()
    chosen.check(cfg.data)


def cmd_pack(args: argparse.Namespace) -> None:
    from avflow.data.pack import pack
    from avflow.data.verify import verify

    cfg = _config(args)
    if not args.verify:
        apply_pack_data_options(cfg, args.layout, args.input, args.subject, args.identity)
    if args.workers is not None:
        if args.workers < 1:
            raise ValueError(f"--workers: expected at least 1 packing process, got {args.workers}")
        cfg.pack.workers = args.workers
    if args.skip_bad:
        cfg.pack.skip_bad = True
    output = Path(args.output or cfg.loader.shards)
    if args.output:
        cfg.pack.name = output.name
    cfg.validate()
    if args.verify:
        summary = verify(output)
        print(f"{output}: every shard verified ({summary})")
        return
    manifest = pack(cfg, output)
    for split in ("train", "val"):
        part = manifest["splits"][split]
        print(f"{split}: {len(part['shards'])} shards, {part['samples']} samples, {part['hours'] * 60:.1f} min")
    if manifest.get("bad"):
        print(f"skipped {len(manifest['bad'])} bad segments (listed in {output / 'manifest.json'})")


def cmd_extract_asr(args: argparse.Namespace) -> None:
    from avflow.data.asr import extract_directory

    counts = extract_directory(args.input, args.model, layout=args.layout, device=args.device)
    print(f"token logits: {counts['written']} written, {counts['skipped']} already complete")


SAMPLER_OPTIONS = ("num_samples", "nfe", "method", "temperature", "seed", "guidance_scale", "max_input_seconds")


def _sample_overrides(args: argparse.Namespace, cfg: Config) -> Config:
    """cfg with the command's `sample.key=value` overrides, then its sampler options (--nfe, ...), applied."""
    from avflow.config import with_overrides

    cfg = with_overrides(cfg, getattr(args, "overrides", None) or [], ("sample",))
    for key in SAMPLER_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg.sample, key, value)
    return cfg.validate()


def _load_model(args: argparse.Namespace, items_choose_identity: bool = False):
    """The model with the command's sampler overrides, its text front end and its vocoder if given, generating
    --identity (required for a model of several identities unless `items_choose_identity`)."""
    from avflow.infer.model import load_inference_model

    model = load_inference_model(args.model, args.device, args.dtype, compile_network=args.compile,
                                 identity=args.identity)
    if not items_choose_identity:
        model = model.with_identity(args.identity)
    model.cfg = _sample_overrides(args, model.cfg)
    if args.text2tokens:
        from avflow.infer.text2tokens import load_text2tokens

        model.text2tokens = load_text2tokens(args.text2tokens)
    if args.vocoder:
        from avflow.vocoder.weights import load_bigvgan

        model.vocoder = load_bigvgan(args.vocoder, model.device)
    return model


def _face_decoder(args: argparse.Namespace, model):
    """What the videos show: --avatar, --face-decoder or --procedural-face, else the export's own for the model's
    identity (or None)."""
    from avflow.render import CodecAvatar

    if args.avatar:
        return CodecAvatar.from_dataset(args.avatar, model.device, args.avatar_pose)
    if args.face_decoder:
        from avflow.render import load_face_decoder

        return load_face_decoder(args.face_decoder)
    if args.procedural_face:
        from avflow.render import ProceduralFaceDecoder

        return ProceduralFaceDecoder()
    for face in (model.face_decoder, model.shared_face_decoder, *model.identity_avatars.values()):
        if isinstance(face, CodecAvatar):
            face.pose_frame = args.avatar_pose
    return model.face_decoder


def _check_speaking(args: argparse.Namespace) -> None:
    """--rate and --pause-scale of a --text input, refused by name before the model is loaded."""
    for option, value in (("--rate", args.rate), ("--pause-scale", args.pause_scale)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{option}: expected a positive number, got {value}")


def cmd_generate(args: argparse.Namespace) -> None:
    from avflow.infer.generate import generate
    from avflow.infer.inputs import (
        check_duration,
        check_text_length,
        tokens_for_text,
        tokens_from_audio,
        tokens_from_file,
    )
    from avflow.infer.outputs import write_outputs

    _check_speaking(args)
    model = _load_model(args)
    face = _face_decoder(args, model)  # bad assets fail here, before anything is generated or written
    cfg = model.cfg
    if args.tokens:
        tokens = tokens_from_file(args.tokens, cfg.data.token_fps, cfg.mel.frame_rate)
        name = Path(args.tokens).stem
    elif args.text is not None:
        check_text_length(args.text, args.rate, cfg)
        tokens = tokens_for_text(model, args.text, args.rate, args.pause_scale, cfg.sample.seed)
        name = args.name
    else:
        tokens = tokens_from_audio(args.audio, args.asr_model, cfg.data.token_fps, cfg.mel.frame_rate,
                                   max_seconds=cfg.sample.max_input_seconds)
        name = Path(args.audio).stem
    check_duration(tokens.shape[0], cfg, "input")
    started = time.perf_counter()
    generated = generate(model, tokens, cfg.sample)
    elapsed = time.perf_counter() - started
    written = write_outputs(generated, args.output, name, cfg, model.vocoder, face)
    seconds = tokens.shape[0] / cfg.mel.frame_rate
    print(f"{cfg.sample.num_samples} samples of {seconds:.2f} s in {elapsed:.2f} s; "
          f"wrote {len(written)} files to {args.output}")


def cmd_infer(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from avflow.infer.batch import parse_shard, run_batch

    shard = parse_shard(args.shard) if args.shard else None
    _check_speaking(args)
    model = _load_model(args, items_choose_identity=args.inputs is not None)
    items = args.inputs
    with tempfile.TemporaryDirectory() as scratch:
        if items is None:  # one item from --text / --audio / --tokens, as a one-line manifest
            if args.text is not None:
                source = {"text": args.text, "rate": args.rate, "pause_scale": args.pause_scale}
            else:
                source = ({"audio": str(Path(args.audio).resolve())} if args.audio
                          else {"tokens": str(Path(args.tokens).resolve())})
            items = Path(scratch) / "items.jsonl"
            items.write_text(json.dumps({"id": args.name, **source}) + "\n")
        face = None if args.no_video else _face_decoder(args, model)
        # The export's avatars, not one given here: each item shows its own identity's
        identity_faces = not args.no_video and face is model.face_decoder and bool(model.identity_avatars)
        if not args.no_video and face is None and not identity_faces:
            raise ValueError("videos need a face decoder: pass --avatar DATASET_ROOT, --face-decoder FILE or "
                             "--procedural-face, export the model with --avatar or --face-decoder, or pass --no-video")
        counts = run_batch(model, items, args.output, shard=shard, face_decoder=None if identity_faces else face,
                           identity_faces=identity_faces, asr_model=args.asr_model,
                           retry_errors=args.retry_errors, progress=not args.quiet)
    print(f"{counts['ok']} items done, {counts['error']} failed, {counts['skipped']} already recorded; "
          f"results in {Path(args.output) / 'results*.jsonl'}")


def cmd_stream(args: argparse.Namespace) -> None:
    from avflow.config import parse_overrides
    from avflow.infer.inputs import participant_features_from_file, tokens_from_file
    from avflow.infer.stream import stream_sample_config
    from avflow.infer.stream_writer import StreamWriter

    if args.num_samples not in (None, 1):
        raise ValueError(f"--num-samples {args.num_samples}: avflow stream speaks one sample")
    if args.realtime and args.text is not None:
        raise ValueError("--realtime feeds --tokens and --audio files at their real pace; text arrives as it is "
                         "given (--text - reads it line by line from stdin)")
    with hold_folder(args.output):  # one stream writes an output folder at a time, refused before loading
        given = {key for key, _ in parse_overrides(args.overrides)}
        model = _load_model(args)
        face = _face_decoder(args, model)  # bad assets fail here, before anything is generated or written
        cfg = model.cfg
        windows_given = bool(given & {"sample.max_frames", "sample.window_overlap"})
        options = {"sample_cfg": stream_sample_config(cfg.sample, cfg.mel.frame_rate, windows_given),
                   "first_window_s": args.first_window, "face_decoder": face, "realtime": args.realtime,
                   "rate": args.rate, "pause_scale": args.pause_scale}
        if args.participant_tokens:
            options["participant_tokens"] = tokens_from_file(args.participant_tokens, cfg.data.token_fps,
                                                             cfg.mel.frame_rate)
        if args.participant_features:
            options["participant_features"] = participant_features_from_file(args.participant_features, cfg)
        if args.text == "-":
            stream = model.stream(lines=sys.stdin, **options)
        elif args.text is not None:
            stream = model.stream(args.text, **options)
        elif args.tokens:
            tokens = tokens_from_file(args.tokens, cfg.data.token_fps, cfg.mel.frame_rate)
            stream = model.stream(tokens=tokens, **options)
        else:
            stream = model.stream(audio=args.audio, asr_model=args.asr_model, **options)
        writer = StreamWriter(args.output, cfg, video=face is not None)
        try:
            for chunk in stream:
                writer.add(chunk)
        finally:
            summary = stream.summary()
            written = writer.close(summary)
    first = summary["first_audio_s"]
    print(f"{summary['audio_seconds']:.2f} s of speech, first audio after "
          f"{'-' if first is None else f'{first:.3f}'} s, real-time factor {summary['real_time_factor'] or 0:.3f}; "
          f"wrote {', '.join(path.name for path in written)} to {args.output}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from avflow.config import SampleConfig
    from avflow.evaluate.run import evaluate_checkpoints, markdown_table

    vocoder = None
    if args.vocoder:
        from avflow.vocoder.weights import load_bigvgan

        vocoder = load_bigvgan(args.vocoder)
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
    sample = _sample_overrides(args, Config(sample=SampleConfig())).sample
    report = evaluate_checkpoints(args.checkpoints, args.shards, args.output, split=args.split, sample=sample,
                                  max_items=args.max_items,
                                  metrics=metrics, asr_model=args.asr_model, vocoder=vocoder, device=args.device,
                                  progress=not args.quiet, identities=args.identities)
    print(markdown_table(report))
    print(f"{len(report['segments'])} held-out segments; "
          f"report.json, report.md and TensorBoard scalars in {args.output}")


def cmd_demo(args: argparse.Namespace) -> None:
    from avflow.demo import run_demo

    run_demo(_config(args), Path(args.output))


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """One subcommand's own parser: launchers check the arguments they pass through to it with its checks."""
    return _parsers()[1][name]


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `avflow` parser and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(prog="avflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser, default: Path | None = None) -> None:
        sub.add_argument("--config", type=Path, default=default,
                         help="YAML config" + (f" (default {default})" if default else ""))
        sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    sub = commands.add_parser("corpus", help="write the procedural demo corpus in the 50h layout")
    with_config(sub)
    sub.add_argument("-o", "--output", help="dataset root (default: data.root)")
    sub.set_defaults(run=cmd_corpus)

    sub = commands.add_parser("train", help="train AV-Flow (one process, or every rank under torchrun/SLURM)")
    with_config(sub)
    sub.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in trainer.run_dir")
    sub.add_argument("--init-from", type=Path, metavar="CKPT",
                     help="start from a trained model (step directory, model file or export; trainer.init_from): "
                          "identities the shards add get new embedding columns; trainer.finetune=identity trains "
                          "only those")
    sub.set_defaults(run=cmd_train)

    sub = commands.add_parser("checkpoint", help="checkpoint tools")
    checkpoint_commands = sub.add_subparsers(dest="checkpoint_command", required=True)
    consolidate = checkpoint_commands.add_parser(
        "consolidate", help="one safetensors inference file (EMA weights, normalization, head VAE, config) "
                            "from a training checkpoint of any strategy")
    consolidate.add_argument("checkpoint", type=Path, help="RUN/checkpoints/step-N")
    consolidate.add_argument("-o", "--output", type=Path, required=True, help="e.g. model.safetensors")
    consolidate.set_defaults(run=cmd_checkpoint_consolidate)
    published = checkpoint_commands.add_parser(
        "import-published", help="an avflow model file from the released AV-Flow weights")
    published.add_argument("--model", type=Path, required=True, help="av_flow_ckpt_50h.pt or checkpoints/iter-N.pth")
    published.add_argument("--head-vae", type=Path, required=True, help="head_vae/iter-0500000.pt")
    published.add_argument("--headpose-stats", type=Path, required=True, help="headpose/headpose_normstats/")
    published.add_argument("--dyadic", action="store_true", help="the dyadic (actor + participant) model")
    published.add_argument("-o", "--output", type=Path, required=True, help="e.g. av_flow_50h.safetensors")
    published.set_defaults(run=cmd_import_published)

    sub = commands.add_parser("train-head-vae", help="train the head-pose VAE on the training segments")
    with_config(sub)
    sub.add_argument("-o", "--output", help="checkpoint path (default: trainer.head_vae or <run_dir>/head_vae.pt)")
    sub.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    sub.set_defaults(run=cmd_train_head_vae)

    sub = commands.add_parser("pack", help="pack a dataset layout into WebDataset shards (or --verify them)")
    with_config(sub)
    sub.add_argument("--layout", choices=layout_choices(), help=f"{layout_help()} (default: data.layout)")
    sub.add_argument("-i", "--input", type=Path,
                     help="dataset folder of the layout, or the manifest file (default: data.root)")
    sub.add_argument("-o", "--output", help="shard folder, e.g. shards/NAME (default: loader.shards)")
    sub.add_argument("--subject", help="Audio2Photoreal subject under -i ROOT (with --layout a2p; not needed when "
                                       "-i is the subject's own folder)")
    sub.add_argument("--identity", help="whose data it is, where the layout names nobody (a 50h root; default: "
                                        "data.identity). Several roots in one folder: data.sources")
    sub.add_argument("--workers", type=int, help="packing processes (default: pack.workers)")
    sub.add_argument("--skip-bad", action="store_true", help="skip and count unreadable segments")
    sub.add_argument("--verify", action="store_true", help="re-read every shard and check counts, per identity "
                                                           "too, and checksums")
    sub.set_defaults(run=cmd_pack)

    sub = commands.add_parser("extract-asr", help="write wav2vec2 CTC token logits next to a dataset's audio")
    sub.add_argument("-i", "--input", required=True, type=Path,
                     help="dataset folder of the layout, or the manifest file")
    sub.add_argument("--model", required=True, type=Path, help="local wav2vec2 CTC model directory")
    sub.add_argument("--layout", choices=layout_choices(), default="50h", help=f"{layout_help()} (default: 50h)")
    sub.add_argument("--device", default="cpu")
    sub.set_defaults(run=cmd_extract_asr)

    def with_sampler_options(sub: argparse.ArgumentParser) -> None:
        """The sampler options, with SampleConfig's defaults (`sample.key=value` overrides set the others)."""
        from avflow.model.sampling.methods import METHODS

        sub.add_argument("--num-samples", type=int, help="samples per input (default sample.num_samples)")
        sub.add_argument("--nfe", type=int, help="network evaluations per sample (default sample.nfe)")
        sub.add_argument("--method", choices=tuple(METHODS), help="ODE sampler (default sample.method)")
        sub.add_argument("--temperature", type=float, help="scale of the initial noise (default sample.temperature)")
        sub.add_argument("--seed", type=int, help="noise seed (default sample.seed)")

    def with_model(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("overrides", nargs="*", metavar="sample.key=value", help="sampler config overrides")
        sub.add_argument("--model", "--checkpoint", dest="model", required=True, type=Path,
                         help="an export directory (python -m avflow.export), a .safetensors model "
                              "or RUN/checkpoints/step-N")
        sub.add_argument("--identity", help="who a multi-identity model generates (one of its model.identities; "
                                            "avflow infer: the default of items without an \"identity\")")
        sub.add_argument("--asr-model", type=Path, help="local wav2vec2 CTC model directory (for audio inputs)")
        sub.add_argument("--text2tokens", type=Path, help="a text-to-tokens .safetensors for text inputs (an export "
                                                          "directory may carry one; without either, rule-based timing)")
        sub.add_argument("--vocoder", type=Path, help="BigVGAN 22 kHz 80-band generator checkpoint "
                                                      "({'generator': ...}); default: the export's, else Griffin-Lim")
        video = sub.add_mutually_exclusive_group()
        video.add_argument("--face-decoder", type=Path, help="TorchScript face decoder (expression, head pose) -> "
                                                             "vertices, with a `faces` tensor: also write .mp4 videos")
        video.add_argument("--procedural-face", action="store_true",
                           help="render the demo's procedural head (driven by the demo corpus's mouth controls)")
        video.add_argument("--avatar", type=Path, metavar="DATASET_ROOT",
                           help="render the released 50h subject's Codec Avatar (decoder/ and face_topo_small_neck.obj "
                                "of the released dataset): 1024 x 1024 .mp4 videos")
        sub.add_argument("--avatar-pose", choices=("camera", "relative"), default="camera",
                         help="Codec Avatar head poses: camera = the 50h capture camera's head transforms (mm), as a "
                              "model trained on the 50h data generates; relative = only their rotation, on the "
                              "published default pose (models trained on other data, e.g. the demo corpus)")
        with_sampler_options(sub)
        sub.add_argument("--guidance-scale", type=float, help="default sample.guidance_scale")
        sub.add_argument("--max-input-seconds", type=float,
                         help="longest input accepted, in seconds of speech (default sample.max_input_seconds: 600)")
        sub.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        sub.add_argument("--dtype", choices=("fp32", "bf16"),
                         help="network precision (default: bf16 on CUDA, fp32 elsewhere; an export fixes its own)")
        sub.add_argument("--compile", action="store_true",
                         help="torch.compile the whole network (eager exports and checkpoints; once per length bucket "
                              "and row count, at load on CUDA)")

    def with_source(sub: argparse.ArgumentParser, required: bool) -> None:
        source = sub.add_mutually_exclusive_group(required=required)
        source.add_argument("--tokens", type=Path, help="token logits .npy, (M, 29) or (channels, M, 29) at 50 Hz")
        source.add_argument("--text", help="text to speak (avflow stream: - reads it line by line from stdin)")
        sub.add_argument("--rate", type=float, default=1.0, help="speaking rate for --text (2.0: twice as fast)")
        sub.add_argument("--pause-scale", type=float, default=1.0,
                         help="pause length for --text (needs a text-to-tokens model)")
        source.add_argument("--audio", type=Path, help="speech .wav to re-synthesize (needs --asr-model)")
        return source

    sub = commands.add_parser("generate", help="generate speech and motion from tokens, text or audio")
    with_model(sub)
    with_source(sub, required=True)
    sub.add_argument("-o", "--output", type=Path, default=Path("outputs"))
    sub.add_argument("--name", default="text", help="file stem for --text outputs")
    sub.set_defaults(run=cmd_generate)

    sub = commands.add_parser("infer", help="batch inference over a manifest of items (resumable), or one item")
    with_model(sub)
    with_source(sub, required=True).add_argument(
        "--inputs", type=Path, help="items.jsonl: one JSON object per line with an id and text, audio or tokens")
    sub.add_argument("-o", "--output", type=Path, required=True, help="results folder: <id>/ outputs and results.jsonl")
    sub.add_argument("--name", default="item", help="the id of a single --text/--audio/--tokens item")
    sub.add_argument("--no-video", action="store_true", help="skip the .mp4 renders")
    sub.add_argument("--shard", help="I/N: only the items whose line index %% N == I (one SLURM array task)")
    sub.add_argument("--retry-errors", action="store_true", help="retry items recorded as failed")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.set_defaults(run=cmd_infer)

    sub = commands.add_parser("stream", help="speech and motion out while the input arrives: stream.wav as it "
                                             "grows, then stream.npz, stream.mp4 and latency.json")
    with_model(sub)
    with_source(sub, required=True)
    sub.add_argument("-o", "--output", type=Path, required=True, help="folder for stream.wav, .npz, .mp4, latency.json")
    sub.add_argument("--realtime", action="store_true", help="feed --tokens/--audio files at their real pace")
    sub.add_argument("--first-window", type=float, metavar="SECONDS",
                     help="a shorter first window, to cut the wait for the first audio (default: off)")
    sub.add_argument("--participant-tokens", type=Path, help="dyadic models: the participant's token logits .npy")
    sub.add_argument("--participant-features", type=Path,
                     help="dyadic models: the participant's SMIRK features .npy (frames, 58) at 30 fps")
    sub.set_defaults(run=cmd_stream)

    sub = commands.add_parser("evaluate", help="held-out metrics (speech, motion, synchrony) of models side by side")
    sub.add_argument("--checkpoint", "--model", dest="checkpoints", action="append", required=True, type=Path,
                     help="a training step directory, .safetensors model or export directory; repeat to compare")
    sub.add_argument("--shards", required=True, type=Path, help="packed shards (avflow pack) with held-out segments")
    sub.add_argument("--split", default="val", help="the shard split to evaluate on (default val)")
    with_sampler_options(sub)
    sub.add_argument("overrides", nargs="*", metavar="sample.key=value", help="sampler config overrides")
    sub.add_argument("--max-items", type=int, help="evaluate only the first N held-out segments")
    sub.add_argument("--identity", dest="identities", action="append", metavar="NAME",
                     help="evaluate only this identity's held-out segments; repeat for several (default: all; "
                          "the report has per-identity tables when they are of several)")
    sub.add_argument("--asr-model", type=Path, help="local wav2vec2 CTC model directory: adds the character error rate")
    sub.add_argument("--vocoder", type=Path,
                     help="BigVGAN checkpoint for the pitch and CER audio (default Griffin-Lim)")
    sub.add_argument("--metrics", help="comma-separated subset (default: every metric that applies)")
    sub.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    sub.add_argument("-o", "--output", type=Path, required=True, help="report folder (resumable)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.set_defaults(run=cmd_evaluate)

    sub = commands.add_parser("export", help=EXPORT_DESCRIPTION, description=EXPORT_DESCRIPTION)
    add_export_arguments(sub)
    sub.set_defaults(run=run_export)

    sub = commands.add_parser("demo", help="corpus -> train a small model on CPU -> generate -> evaluate")
    with_config(sub, DEMO_CONFIG)
    sub.add_argument("-o", "--output", default="demo_out", help="where generated samples go")
    sub.set_defaults(run=cmd_demo)
    return parser, commands.choices


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Any error ends it with one line on stderr and a non-zero exit: status 2 for bad
    input, 1 for anything else; -v shows the traceback instead."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    precision = fp32_matmul_precision("tf32") if args.command in TF32_COMMANDS else contextlib.nullcontext()
    with precision:
        return run_reporting_errors(f"avflow {args.command}", lambda: args.run(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
