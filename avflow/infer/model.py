"""Loading: a training checkpoint, consolidated model file or export directory -> the InferenceModel that
generation samples from, with its sampler runners built once per sampler setting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from avflow.config import Config, SampleConfig
from avflow.infer.artifacts import (
    AVATAR_FILE,
    FACE_DECODER_FILE,
    IDENTITY_AVATARS_KEY,
    TEXT2TOKENS_FILE,
    VOCODER_FILE,
    WEIGHTS_FILE,
    CompiledSampler,
    is_model_directory,
    load_compiled_sampler,
    read_export_meta,
)
from avflow.infer.sampler import GraphSampler
from avflow.model.avflow import AVFlowNet
from avflow.model.head_vae import HeadVAE, PoseDecoder
from avflow.model.io import head_vae_from_payload, identity_count, load_inference_tensors
from avflow.model.sampling import (
    FixedStepSampler,
    PreparedVelocity,
    guided,
    length_buckets,
    row_buckets,
)
from avflow.model.state import StateCodec, StateDecoder
from avflow.runtime import DTYPES, pick_device
from avflow.vocoder.bigvgan import BigVGAN
from avflow.vocoder.weights import load_vocoder_file

if TYPE_CHECKING:  # rendering is loaded only for a model that renders (benchmarks run without its packages)
    from avflow.render import CodecAvatar, FaceDecoder


@dataclass
class InferenceModel:
    """Everything generation needs, from a training checkpoint, a consolidated file or an export directory.

    A multi-identity model generates one identity at a time: `with_identity(name)` is the model whose codec and
    pose statistics are that identity's and whose conditioning carries its one-hot; it shares the network and
    the sampler runners with every other identity's.
    """

    cfg: Config
    net: AVFlowNet | None  # None for a torchscript/aoti export: its compiled loop holds the network
    codec: StateCodec
    head_vae: HeadVAE
    pose_mean: torch.Tensor
    pose_std: torch.Tensor
    device: torch.device
    dtype: torch.dtype = torch.float32
    compiled: CompiledSampler | None = None  # fixed-shape loop of a torchscript/aoti export
    vocoder: BigVGAN | None = None
    text2tokens: Any = None  # TextToTokens of the export directory, when it has one
    face_decoder: FaceDecoder | CodecAvatar | None = None  # the export directory's (this identity's), when it has one
    # An export's per-identity Codec Avatars (identity -> avatar); the identities without one show shared_face_decoder
    identity_avatars: dict[str, CodecAvatar] = field(default_factory=dict, repr=False)
    shared_face_decoder: FaceDecoder | CodecAvatar | None = field(default=None, repr=False)
    batch_rows: int = 12  # sequences (windows x samples) per sampler call
    length_bucket_count: int = 4
    compile_network: bool = False  # compile the eager network whole (fullgraph, one graph per shape)
    samplers: dict = field(default_factory=dict, repr=False)
    identity: int | None = None  # the generated identity's row in cfg.model.identities; None: not chosen, or none
    identity_table: tuple | None = field(default=None, repr=False)  # every identity's (codec, pose_mean, pose_std)

    def with_identity(self, name: str | None) -> "InferenceModel":
        """This model generating identity `name`; None: the model's only identity (an error naming the choices
        when it has several). An unknown name is one error listing the known ones."""
        names = self.cfg.model.identities
        if not names:
            if name is not None:
                raise ValueError(f"identity {name!r}: this model has one identity and no identity table "
                                 "(model.identities is empty); leave the identity out")
            return self
        if name is None:
            if len(names) > 1:
                raise ValueError(f"this model has {len(names)} identities ({', '.join(names)}); choose one "
                                 "(--identity NAME, or an item's \"identity\")")
            name = names[0]
        if name not in names:
            raise ValueError(f"identity {name!r}: unknown; this model knows {', '.join(names)}")
        row = names.index(name)
        codec, pose_mean, pose_std = self.identity_table
        return dataclasses.replace(self, codec=codec.select(row), pose_mean=pose_mean[row], pose_std=pose_std[row],
                                   identity=row, face_decoder=self._face_decoder_of(name))

    def _face_decoder_of(self, name: str) -> FaceDecoder | CodecAvatar | None:
        if not self.identity_avatars:
            return self.face_decoder
        return self.identity_avatars.get(name, self.shared_face_decoder)

    @property
    def state_decoder(self) -> StateDecoder:
        """Generated states -> log-mel, expression and head pose."""
        return StateDecoder(self.codec, PoseDecoder(self.head_vae, self.pose_mean, self.pose_std))

    def sampler(self, sample_cfg: SampleConfig) -> tuple[GraphSampler, int, list[int], int, list[int]]:
        """(loop runner, window frames, length buckets, rows per call, row counts a call is padded to) for these
        sampler settings. On CUDA every (length bucket, row count) shape is warmed up and captured here, once,
        so no request pays for a compilation or a capture."""
        if self.compiled is not None:
            self.compiled.check_settings(sample_cfg.method, sample_cfg.nfe, sample_cfg.guidance_scale)
            if sample_cfg.num_samples > self.compiled.rows:
                raise ValueError(f"{sample_cfg.num_samples} samples per input do not fit this export's batch of "
                                 f"{self.compiled.rows} sequences; export again with --batch {sample_cfg.num_samples} "
                                 "or more")
            key, frames, rows = "compiled", self.compiled.frames, self.compiled.rows
            buckets, counts = [frames], [rows]
        else:
            key = (sample_cfg.method, sample_cfg.nfe, sample_cfg.guidance_scale, sample_cfg.num_samples)
            frames, rows = sample_cfg.max_frames, max(self.batch_rows, sample_cfg.num_samples)
            buckets = length_buckets(frames, self.length_bucket_count)
            counts = row_buckets(rows, sample_cfg.num_samples)
        if key not in self.samplers:
            if self.compiled is not None:
                loop = self.compiled.loop
            else:
                velocity = PreparedVelocity(self.net, sample_cfg.method, sample_cfg.nfe, self.compile_network,
                                            max_shapes=len(buckets) * len(counts))
                loop = FixedStepSampler(guided(velocity, sample_cfg.guidance_scale), sample_cfg.method,
                                        sample_cfg.nfe, self.dtype)
            runner = GraphSampler(loop, self.device)
            if runner.use_cuda_graph:
                runner.warm_up(buckets, counts, self.cfg.model.state_dim, self.cfg.model.cond_dim, self.device)
            self.samplers[key] = runner
        return self.samplers[key], frames, buckets, rows, counts

    def stream(self, text: str | None = None, **options):
        """Speech and motion chunk by chunk while the input arrives: a `avflow.infer.stream.Stream` of
        StreamChunks. Exactly one of `text` (whole), `lines=` (an iterable of text lines, each spoken as it
        arrives), `tokens=` ((T, 29) logits at the mel frame rate) or `audio=` (a speech file, with `asr_model=`);
        options: realtime, participant_tokens, participant_features, rate, pause_scale, sample_cfg,
        first_window_s, face_decoder (see `avflow.infer.stream.open_stream`)."""
        from avflow.infer.stream import open_stream

        return open_stream(self, text, **options)


def default_dtype(device: torch.device) -> str:
    """The network's precision when none is asked: bf16 on CUDA (tensor cores; the sampler's state stays fp32,
    within 2e-2 of fp32 sampling, see docs/performance.md), fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def load_inference_model(checkpoint: str | Path, device: str = "auto", dtype: str | None = None,
                         batch_rows: int = 12, compile_network: bool = False,
                         identity: str | None = None) -> InferenceModel:
    """The EMA network, normalization and head VAE from a training step directory, a consolidated .safetensors
    file or a `python -m avflow.export` directory (with its compiled sampler, vocoder and text front end).

    `dtype` (fp32 | bf16) is the network's precision, by default bf16 on CUDA (the sampler keeps its state in
    fp32) and fp32 elsewhere; an export directory fixes it at export time. Global precision settings are left
    to the caller (the `avflow` inference commands take TF32 for fp32 matmuls).
    `compile_network` compiles the whole network (fullgraph, static shapes: once per length bucket and row
    count) for the eager sampler, which the CUDA graph then captures.
    `identity` chooses what a multi-identity model generates (`InferenceModel.with_identity`); without it, a model
    of several identities is returned unchosen, to be chosen with `with_identity` before generating.
    """
    target = pick_device(device)
    exported = is_model_directory(checkpoint)
    meta = read_export_meta(checkpoint) if exported else None
    if exported and dtype is not None and dtype != meta["dtype"]:
        raise ValueError(f"{checkpoint} was exported in {meta['dtype']}; --dtype {dtype} needs another export")
    dtype = meta["dtype"] if exported else (dtype or default_dtype(target))
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    cfg, tensors = load_inference_tensors(Path(checkpoint) / WEIGHTS_FILE if exported else checkpoint)
    compiled = load_compiled_sampler(checkpoint, meta, target) if exported else None
    net = None
    if compiled is None:  # a compiled export carries its own copy of the network
        net = AVFlowNet(cfg.model)
        net.load_state_dict(tensors["ema"])
        net = net.to(target, DTYPES[dtype]).eval()
    elif compile_network:
        raise ValueError(f"{checkpoint} is a {meta['format']} export, compiled already; --compile applies to "
                         "eager exports and checkpoints")
    head_vae, pose_mean, pose_std = head_vae_from_payload(tensors["head_vae"], cfg.head_vae, f"{checkpoint} [head_vae]",
                                                          identity_count(cfg))
    codec = StateCodec.from_state_dict(tensors["codec"], cfg.model)
    model = InferenceModel(cfg, net, codec, head_vae.to(target).eval(), pose_mean, pose_std, target, DTYPES[dtype],
                           compiled, batch_rows=batch_rows, compile_network=compile_network,
                           identity_table=(codec, pose_mean, pose_std))
    if exported:
        directory = Path(checkpoint)
        if (directory / VOCODER_FILE).is_file():
            model.vocoder = load_vocoder_file(directory / VOCODER_FILE, target)
        if (directory / FACE_DECODER_FILE).is_file():
            from avflow.render import load_face_decoder

            model.face_decoder = load_face_decoder(directory / FACE_DECODER_FILE)
        if (directory / AVATAR_FILE).is_file():
            from avflow.render import CodecAvatar

            model.face_decoder = CodecAvatar.load(directory / AVATAR_FILE, target)
        if meta.get(IDENTITY_AVATARS_KEY):
            from avflow.render import CodecAvatar

            model.shared_face_decoder = model.face_decoder
            model.identity_avatars = {name: CodecAvatar.load(directory / file, target)
                                      for name, file in meta[IDENTITY_AVATARS_KEY].items()}
        if (directory / TEXT2TOKENS_FILE).is_file():
            from avflow.infer.text2tokens import load_text2tokens

            model.text2tokens = load_text2tokens(directory / TEXT2TOKENS_FILE)
    if identity is not None or len(cfg.model.identities) <= 1:
        model = model.with_identity(identity)
    return model
