"""What the one training loop trains, selected by the config's `task`: the AV-Flow network or text-to-tokens.

A task builds its network, loads its data once the model exists (so the random stream the model's
initialization draws from is the same whatever the data), turns loader batches into model inputs, computes
the loss, names the extra tensors a checkpoint carries for inference, and logs a generated sample. The
Trainer (avflow.train.loop) owns everything else: the engine and strategy, EMA, checkpoints, resume,
TensorBoard and the NaN stop.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from avflow.config import Config
from avflow.data.features import interpolate_frames
from avflow.data.loader import training_batches, validation_batches
from avflow.data.shard_format import identities, load_manifest
from avflow.data.shard_index import iter_split_samples
from avflow.evaluate import metrics
from avflow.model.avflow import AVFlowNet
from avflow.model.flow import flow_matching_loss
from avflow.model.head_vae import PoseDecoder
from avflow.model.io import model_state_tensors, model_weights, stored_config
from avflow.model.sampling import sample_sequence
from avflow.model.state import StateDecoder
from avflow.render import CodecAvatar
from avflow.render.plots import sample_figure
from avflow.text.phonemes import resolve_front_end
from avflow.train.batches import Batch, build_batch_encoder, ensure_head_vae, resolve_identities
from avflow.train.distributed import DistInfo
from avflow.train.finetune import initialize_from, load_source, train_identity_columns_only
from avflow.train.metrics import training_flops_per_frame
from avflow.train.text2tokens import Text2TokensTask
from avflow.vocoder.griffin_lim import mel_to_audio

log = logging.getLogger(__name__)

VAL_SEED = 1234  # fixed noise and times, so validation losses are comparable across steps and runs
VAL_VIDEO_FPS = 30  # the avatar's capture rate
VAL_VIDEO_SIZE = 256  # TensorBoard stores the clip as a GIF: the published camera scaled down from 1024


class AVFlowTask:
    """The two-stream AV-Flow network trained by flow matching on tokens -> (expression, head latent, mel)."""

    name = "avflow"
    loss_parts = ("expression", "head", "mel")

    def __init__(self, cfg: Config, info: DistInfo, progress: bool):
        self.cfg, self.info, self.progress = cfg, info, progress
        self.device = info.device
        self.source = load_source(cfg) if cfg.trainer.init_from else None  # (config, tensors) to start from
        self.initialized = False  # whether the trained network was built (from the source) yet
        m = cfg.model
        for stream, width in (("visual", m.visual_dim), ("audio", m.mel_dim)):
            if m.d_model < width and info.is_main:
                log.warning("model.d_model=%d is narrower than the %s state (%d dims): the output layer's velocity "
                            "spans at most %d of them, so the sampling noise in the other %d passes to the output "
                            "untouched (docs/evaluation.md)", m.d_model, stream, width, m.d_model, width - m.d_model)

    def build_model(self) -> AVFlowNet:
        """The network; the first one built (the one trained) starts from trainer.init_from when set."""
        net = AVFlowNet(self.cfg.model)
        if self.source is not None and not self.initialized:
            initialize_from(net, self.cfg, self.source[0], self.source[1]["ema"])
            if self.cfg.trainer.finetune == "identity":
                train_identity_columns_only(net, self.cfg)
            self.initialized = True
        return net

    def load_data(self) -> None:
        """The head VAE (its own stage, `ensure_head_vae`, or trainer.init_from's), the batch encoder and this
        rank's training stream."""
        vae_path = None if self.source else ensure_head_vae(self.cfg, self.progress, self.info.is_main,
                                                             self.info.device)
        self.encoder = build_batch_encoder(self.cfg, vae_path, self.device, self.source)
        self.train_batches = training_batches(self.cfg.loader.shards, self.cfg, self.info.rank, self.info.world_size)
        self.avatar = None  # only the main rank logs samples
        if self.cfg.evaluate.avatar and self.info.is_main:
            self.avatar = CodecAvatar.from_dataset(self.cfg.evaluate.avatar, self.device, self.cfg.evaluate.avatar_pose)

    def prepare(self, features: dict[str, Any]) -> Batch:
        return self.encoder(features)

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None):
        return flow_matching_loss(model, batch.state, batch.cond, batch.valid, self.cfg.flow, self.cfg.model,
                                  batch.expression_valid, generator)

    @staticmethod
    def frames(batch: Batch) -> torch.Tensor:
        return batch.valid

    def validation_batches(self) -> Iterable[dict[str, Any]]:
        return validation_batches(self.cfg.loader.shards, self.cfg, self.info.rank, self.info.world_size)

    def checkpoint_tensors(self) -> dict[str, Any]:
        encoder = self.encoder
        return model_state_tensors(encoder.codec, encoder.head_vae.state_dict(), encoder.pose_mean, encoder.pose_std)

    def flops_per_frame(self, parameters: int) -> float:
        return training_flops_per_frame(self.cfg.model, parameters)

    def decoder_for(self, identity: int) -> StateDecoder:
        """Sampled states -> outputs, decoded with the statistics of the identity the loader numbers `identity`."""
        codec, pose_mean, pose_std = self.encoder.identity_stats(identity)
        return StateDecoder(codec, PoseDecoder(self.encoder.head_vae, pose_mean, pose_std))

    def log_sample(self, writer, model: AVFlowNet, step: int) -> None:
        """Generate the first validation window from its tokens: audio (Griffin-Lim), a plot vs. the recording
        and, with evaluate.avatar, the Codec Avatar rendering the generated motion."""
        features = next(iter(validation_batches(self.cfg.loader.shards, self.cfg)), None)
        if features is None:
            return
        batch = self.encoder(features)
        frames = int(batch.valid[0].sum())
        one = dataclasses.replace(self.cfg.sample, num_samples=1)
        decoder = self.decoder_for(int(features.get("identity", [0])[0]))
        generated = decoder(sample_sequence(model, batch.cond[0, :frames], self.cfg.model.state_dim, one, VAL_SEED,
                                            decoder.with_poses))
        mel, expression, pose = generated.mel[0], generated.expression[0], generated.head_pose[0]
        recorded = decoder.codec.decode(batch.state[0, :frames].float().cpu())
        audio = mel_to_audio(torch.from_numpy(mel).T.contiguous(), self.cfg.mel)
        writer.add_audio("val/sample_audio", audio[None], step, sample_rate=self.cfg.mel.sample_rate)
        writer.add_figure("val/sample", sample_figure(mel, expression, pose, self.cfg.mel.frame_rate,
                                                      recorded["mel"].numpy()), step)
        if self.avatar is not None:
            frame_rate = self.cfg.mel.frame_rate
            clip_frames = max(1, round(frames / frame_rate * VAL_VIDEO_FPS))
            expression = interpolate_frames(expression, frame_rate, clip_frames, VAL_VIDEO_FPS)
            pose_30 = interpolate_frames(pose, frame_rate, clip_frames, VAL_VIDEO_FPS)
            video = self.avatar.render_pose7(expression, pose_30, VAL_VIDEO_SIZE, VAL_VIDEO_SIZE)
            writer.add_video("val/sample_video", torch.from_numpy(video).permute(0, 3, 1, 2)[None], step,
                             fps=VAL_VIDEO_FPS)
        for name, value in self.held_out_scores(model).items():
            writer.add_scalar(name, value, step)

    @torch.no_grad()
    def held_out_scores(self, model: AVFlowNet) -> dict[str, float]:
        """evaluate.val_metrics (avflow.evaluate.metrics, as `avflow evaluate` computes them) on the first
        evaluate.val_items whole validation segments (cut to sample.max_frames), each generated as its own
        identity, one sample each from fixed noise, sampled as `avflow evaluate` samples them
        (avflow.model.sampling): val/<metric>, and val_ground_truth/<metric> for the ground truth's own values."""
        cfg, x = self.cfg, self.cfg.evaluate
        names = list(x.val_metrics)
        if x.val_items == 0 or not names:
            return {}
        conditioning = ("tokens", "participant_tokens", "participant_features") if cfg.model.dyadic else ("tokens",)
        streams = ("mel", "expression", "pose", "expression_valid", *conditioning)
        one = dataclasses.replace(cfg.sample, num_samples=1)
        generated_scores, truth_scores = [], []
        split = iter_split_samples(cfg.loader.shards, "val", streams, cfg.loader.max_bad_fraction)
        numbers = list(identities(load_manifest(cfg.loader.shards)))  # the loader numbers identities in this order
        for held_out in itertools.islice(split, x.val_items):
            frames = min(held_out.arrays["mel"].shape[0], cfg.sample.max_frames)
            arrays = {name: value[:frames] for name, value in held_out.arrays.items()}
            number = numbers.index(held_out.identity)  # generated as its own identity, as training conditions it
            decoder = self.decoder_for(number)
            cond = self.encoder.conditioning({name: arrays[name] for name in conditioning}, number)
            sample = decoder(sample_sequence(model, cond, cfg.model.state_dim, one, VAL_SEED, decoder.with_poses))
            generated = metrics.Segment(sample.mel, sample.expression, sample.head_pose)
            truth = metrics.Segment(arrays["mel"], arrays["expression"], arrays["pose"], arrays["expression_valid"])
            if any(name in metrics.NEEDS_AUDIO for name in names):
                generated.pitch = [self._pitch(generated.mel[0])]
                truth.pitch = [self._pitch(truth.mel)]
            generated_scores.append(metrics.segment_scores(generated, truth, names, cfg.mel.frame_rate))
            truth_scores.append(metrics.ground_truth_scores(truth, names, cfg.mel.frame_rate))
        scores = {f"val/{name}": value for name, value in metrics.mean_scores(generated_scores).items()}
        scores.update({f"val_ground_truth/{name}": value for name, value in metrics.mean_scores(truth_scores).items()})
        return scores

    def _pitch(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        audio = mel_to_audio(torch.from_numpy(mel).T.contiguous(), self.cfg.mel).numpy()
        f0, voiced = metrics.pitch_track(audio, self.cfg.mel.sample_rate, self.cfg.mel.hop_length)
        return f0[:mel.shape[0]], voiced[:mel.shape[0]]


def resolved_config(cfg: Config) -> Config:
    """A copy of cfg with choices that depend on this machine or the data made concrete, so the run records what
    it trained with: text2tokens.front_end=auto becomes phoneme or character, model.identities the shards'."""
    resolved = copy.deepcopy(cfg)
    resolved.text2tokens.front_end = resolve_front_end(cfg.text2tokens.front_end)
    if cfg.task == "avflow":
        source = stored_config(model_weights(cfg.trainer.init_from)) if cfg.trainer.init_from else None
        if source is not None:
            resolved.head_vae = source.head_vae  # the run keeps the source's head VAE (its latents are the target)
        resolve_identities(resolved, load_manifest(cfg.loader.shards), source.model.identities if source else [])
    return resolved


def build_task(cfg: Config, info: DistInfo, progress: bool) -> AVFlowTask | Text2TokensTask:
    if cfg.task == "text2tokens":
        return Text2TokensTask(cfg, info, progress)
    return AVFlowTask(cfg, info, progress)
