"""From loader batches (features at the mel frame rate) to model inputs: state, conditioning, masks.

The head-pose VAE is part of this step: its latent of each window's normalized pose is the diffusion
target for head motion. Expression statistics come from the shard manifest (computed while packing),
so every rank normalizes identically without a pass over the data. A multi-identity model (model.identities)
normalizes each row with its identity's statistics (the manifest's per-identity entries) and appends the
identity's one-hot to its conditioning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from avflow.config import Config
from avflow.data.shard_format import identities, load_manifest
from avflow.data.shard_index import iter_split_samples
from avflow.model.head_vae import HeadVAE
from avflow.model.io import head_vae_from_payload, identity_count, load_head_vae
from avflow.model.state import StateCodec
from avflow.train.finetune import identity_table, source_statistics
from avflow.train.head_vae import train_head_vae

log = logging.getLogger(__name__)


@dataclass
class Batch:
    state: torch.Tensor  # (B, T, state_dim)
    cond: torch.Tensor  # (B, T, cond_dim)
    valid: torch.Tensor  # (B, T) real frames
    expression_valid: torch.Tensor  # (B, T) frames whose expression code is data


class BatchEncoder:
    """Encodes feature batches into the model's normalized state and per-frame conditioning."""

    def __init__(self, cfg: Config, codec: StateCodec, head_vae: HeadVAE, pose_mean: torch.Tensor,
                 pose_std: torch.Tensor, device: torch.device, table_rows: list[int] | None = None):
        """pose_mean/pose_std: (pose_dim,), or (identities, pose_dim) for a multi-identity model. table_rows: the
        model.identities row of each identity the loader numbers (the shards' sorted names; default the same)."""
        self.cfg = cfg
        rows = table_rows if table_rows is not None else range(len(cfg.model.identities))
        self.table_rows = torch.tensor(list(rows), dtype=torch.long, device=device)
        self.codec = codec.to(device)
        self.head_vae = head_vae.to(device).eval()
        self.pose_mean, self.pose_std = pose_mean.to(device), pose_std.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> Batch:
        moved = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        valid = moved["valid"]
        names = self.cfg.model.identities
        identity, pose_mean, pose_std = None, self.pose_mean, self.pose_std
        if names:  # old shards carry no identity: all their samples are the loader's identity 0
            identity = self.table_rows[moved["identity"]] if "identity" in moved else self.table_rows[:1].expand(
                valid.shape[0])
            pose_mean, pose_std = self.pose_mean[identity][:, None], self.pose_std[identity][:, None]
        pose = (moved["pose"] - pose_mean) / pose_std
        head_latent, _ = self.head_vae.encode(pose, valid)
        state = self.codec.encode(moved["expression"], head_latent * valid[..., None], moved["mel"], identity)
        return Batch(state * valid[..., None], self._conditioning(moved, identity), valid,
                     moved["expression_valid"] & valid)

    def conditioning(self, streams: dict[str, np.ndarray], identity: int) -> torch.Tensor:
        """One whole sample's per-frame conditioning (frames, cond_dim) from its streams, `identity` the number the
        loader gives its identity: what training conditions it on."""
        moved = {name: torch.from_numpy(value)[None].to(self.device) for name, value in streams.items()}
        rows = self.table_rows[identity:identity + 1] if self.cfg.model.identities else None
        return self._conditioning(moved, rows)[0]

    def _conditioning(self, moved: dict[str, torch.Tensor], identity: torch.Tensor | None) -> torch.Tensor:
        """Tokens (and a dyadic model's participant streams), then each row's identity one-hot (identity: its
        model.identities rows; None for a model without a table)."""
        cond_parts = [moved["tokens"]]
        if self.cfg.model.dyadic:
            missing = [k for k in ("participant_tokens", "participant_features") if k not in moved]
            if missing:
                raise ValueError(f"model.dyadic=true needs participant streams in the shards; missing {missing}")
            cond_parts += [moved["participant_tokens"], moved["participant_features"]]
        if identity is not None:
            names = self.cfg.model.identities
            one_hot = torch.eye(len(names), dtype=moved["tokens"].dtype, device=self.device)[identity]  # no sync
            cond_parts.append(one_hot[:, None].expand(-1, moved["tokens"].shape[1], -1))
        cond = torch.cat(cond_parts, dim=-1)
        if cond.shape[-1] != self.cfg.model.cond_dim:
            raise ValueError(f"conditioning has {cond.shape[-1]} features per frame; model.cond_dim expects "
                             f"{self.cfg.model.cond_dim} (check model.participant_feature_dim)")
        return cond

    def identity_stats(self, identity: int) -> tuple[StateCodec, torch.Tensor, torch.Tensor]:
        """(codec, pose_mean, pose_std) of the identity the loader numbers `identity`, to decode what was generated
        for it."""
        if not self.cfg.model.identities:
            return self.codec, self.pose_mean, self.pose_std
        row = int(self.table_rows[identity])
        return self.codec.select(row), self.pose_mean[row], self.pose_std[row]


def head_vae_path(cfg: Config) -> Path:
    return Path(cfg.trainer.head_vae) if cfg.trainer.head_vae else Path(cfg.trainer.run_dir) / "head_vae.pt"


def codec_from_manifest(manifest: dict, cfg: Config) -> StateCodec:
    """The one-identity codec: the manifest's expression statistics and the published mel constants."""
    stats = manifest["stats"]["expression"]
    return StateCodec(torch.tensor(stats["mean"]).float(), torch.tensor(stats["std"]).float().clamp_min(1e-4),
                      cfg.mel.norm_mean, cfg.mel.norm_std, cfg.model)


def identity_statistics(cfg: Config, manifest: dict, known: dict[str, dict[str, torch.Tensor]] | None = None
                        ) -> tuple[StateCodec, torch.Tensor, torch.Tensor]:
    """(codec, pose_mean, pose_std) of a multi-identity model, a row per model.identities name: the statistics in
    `known` (a fine-tuned model's, kept), else the identity's own from the manifest, with its mel's own level and
    spread in place of the published constants (each voice differs)."""
    entries, known = identities(manifest), known or {}
    rows = []
    for name in cfg.model.identities:
        if name in known:
            rows.append(known[name])
            continue
        stats = entries[name]["stats"]
        mel_mean, mel_std = scalar_stats(stats["mel"])
        rows.append({"expression_mean": torch.tensor(stats["expression"]["mean"]),
                     "expression_std": torch.tensor(stats["expression"]["std"]).clamp_min(1e-4),
                     "mel_mean": torch.tensor(mel_mean), "mel_std": torch.tensor(mel_std),
                     "pose_mean": torch.tensor(stats["pose"]["mean"]),
                     "pose_std": torch.tensor(stats["pose"]["std"]).clamp_min(1e-4)})
    table = {key: torch.stack([row[key].float() for row in rows]) for key in rows[0]}
    codec = StateCodec(table["expression_mean"], table["expression_std"], table["mel_mean"], table["mel_std"],
                       cfg.model)
    return codec, table["pose_mean"], table["pose_std"]


def scalar_stats(per_bin: dict) -> tuple[float, float]:
    """Mean and std over all bins of a feature from its per-bin mean and std (equal frame counts per bin), the
    form the published mel constants take: one level and one spread for every bin."""
    mean = torch.tensor(per_bin["mean"], dtype=torch.float64)
    second_moment = (torch.tensor(per_bin["std"], dtype=torch.float64) ** 2 + mean ** 2).mean()
    overall = mean.mean()
    return float(overall), max(float((second_moment - overall ** 2).clamp_min(0).sqrt()), 1e-4)


def resolve_identities(cfg: Config, manifest: dict, source_identities: list[str]) -> None:
    """model.identities checked against the shards' identities (and trainer.init_from's table, kept in its
    order): filled in when they make a table of several and the config names none (logged), refused in one line
    when the config names another table."""
    shard_names = sorted(identities(manifest))
    table = identity_table(source_identities, shard_names)
    if cfg.model.identities:
        if cfg.model.identities != table:
            source = f" and trainer.init_from's table {source_identities}" if source_identities else ""
            raise ValueError(f"model.identities={cfg.model.identities} does not match the identities of the shards "
                             f"in {cfg.loader.shards}{source}: expected {table}")
    elif len(table) > 1:
        log.info("model.identities: %s, from the shards' manifest%s (one learned embedding each)", table,
                 " and trainer.init_from" if source_identities else "")
        cfg.model.identities = table


def train_head_vae_stage(cfg: Config, output: Path, progress: bool = True, device: str | torch.device = "cpu") -> dict:
    """The head-pose VAE stage: a VAE trained on the poses of loader.shards' train split, written to `output`.
    `avflow train-head-vae` runs it alone; `avflow train` runs it first, on its training device, when it has no VAE
    yet."""
    split = list(iter_split_samples(cfg.loader.shards, "train", ("pose",), cfg.loader.max_bad_fraction))
    names = [sample.identity for sample in split]
    return train_head_vae([sample.arrays["pose"] for sample in split], cfg.head_vae, output, seed=cfg.trainer.seed,
                          device=str(device), progress=progress, identities=names if len(set(names)) > 1 else None)


def ensure_head_vae(cfg: Config, progress: bool = True, is_main: bool = True,
                    device: str | torch.device = "cpu") -> Path:
    """The head VAE the batch encoder needs, as an explicit step of training that says in the log what it does:
    trainer.head_vae when set (it must exist), else <run_dir>/head_vae.pt, reused when there (a resumed run)
    and otherwise trained once by rank 0 while the other ranks wait."""
    vae_path = head_vae_path(cfg)
    if cfg.trainer.head_vae:
        if not vae_path.is_file():
            raise FileNotFoundError(f"trainer.head_vae={vae_path}: no such head-VAE checkpoint")
        log.info("head-pose VAE: %s (trainer.head_vae)", vae_path)
    elif vae_path.is_file():
        log.info("head-pose VAE: reusing %s", vae_path)
    elif is_main:
        try:  # before training, not after: a run_dir that cannot be written fails in seconds
            vae_path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            raise NotADirectoryError(f"trainer.run_dir={cfg.trainer.run_dir}: cannot be a folder ({error})") from None
        log.info("head-pose VAE stage: training it into %s first (`avflow train-head-vae` runs this stage alone)",
                 vae_path)
        train_head_vae_stage(cfg, vae_path, progress, device)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's VAE
    return vae_path


def build_batch_encoder(cfg: Config, vae_path: Path | None, device: torch.device,
                        source: tuple[Config, dict] | None = None) -> BatchEncoder:
    """The batch encoder from the head VAE at `vae_path` and the normalization statistics of the shard manifest;
    with `source` (trainer.init_from's config and tensors), from its head VAE and its identities' statistics."""
    known = {}
    if source is None:
        head_vae, pose_mean, pose_std = load_head_vae(vae_path, cfg.head_vae)
    else:
        source_cfg, tensors = source
        head_vae, pose_mean, pose_std = head_vae_from_payload(tensors["head_vae"], source_cfg.head_vae,
                                                              cfg.trainer.init_from, identity_count(source_cfg))
        known = source_statistics(source_cfg, tensors)
    manifest = load_manifest(cfg.loader.shards)
    names = cfg.model.identities
    if not names:
        if pose_mean.dim() != 1:
            raise ValueError(f"head-pose VAE {vae_path}: trained on {pose_mean.shape[0]} identities, expected the "
                             f"one-identity VAE of {cfg.loader.shards} (unset trainer.head_vae to train one)")
        return BatchEncoder(cfg, codec_from_manifest(manifest, cfg), head_vae, pose_mean, pose_std, device)
    codec, pose_mean, pose_std = identity_statistics(cfg, manifest, known)
    shard_names = sorted(identities(manifest))
    return BatchEncoder(cfg, codec, head_vae, pose_mean, pose_std, device, [names.index(name) for name in shard_names])
