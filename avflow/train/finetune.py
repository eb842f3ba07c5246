"""Training from a trained model (trainer.init_from): its network, head VAE and statistics, with new identities.

The identity embedding is the input projections' last len(model.identities) columns (ModelConfig.identities), so
adding an identity adds a column to each projection. A new identity's column starts at the mean of the trained
ones (zeros from a model without a table, whose one identity lives in the biases): it starts as an average person
of the trained model. With trainer.finetune=identity only those columns train; every other weight, the other
identities' columns included, stays bit-identical.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from avflow.config import Config
from avflow.model.avflow import AVFlowNet
from avflow.model.io import identity_count, load_inference_tensors, model_weights

log = logging.getLogger(__name__)

IDENTITY_PROJECTIONS = ("input_proj_v.weight", "input_proj_a.weight")


def load_source(cfg: Config) -> tuple[Config, dict[str, Any]]:
    """(config, inference tensors) of trainer.init_from, an AV-Flow model of the same architecture."""
    return load_inference_tensors(model_weights(cfg.trainer.init_from), task="avflow")


def identity_table(source_identities: list[str], shard_identities: list[str]) -> list[str]:
    """model.identities of a run: the source model's table (its column order kept) plus the shards' new names,
    sorted; without a source table, the shards' names."""
    if not source_identities:
        return list(shard_identities)
    return list(source_identities) + sorted(set(shard_identities) - set(source_identities))


def initialize_from(net: AVFlowNet, cfg: Config, source_cfg: Config, source_weights: dict[str, torch.Tensor]) -> None:
    """Load the source network into `net`, its identity columns mapped by name and new identities added."""
    names, known = cfg.model.identities, source_cfg.model.identities
    state = dict(source_weights)
    for key in IDENTITY_PROJECTIONS:
        weight = state[key]
        shared = weight[:, :weight.shape[1] - len(known)]
        trained = weight[:, shared.shape[1]:]
        average = trained.mean(1) if known else torch.zeros(weight.shape[0], dtype=weight.dtype)
        columns = [trained[:, known.index(name)] if name in known else average for name in names]
        state[key] = torch.cat([shared, torch.stack(columns, 1)], 1) if columns else shared
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"trainer.init_from={cfg.trainer.init_from}: its network differs from this run's model.* "
                         f"({str(error).splitlines()[-1].strip()})") from None
    added = [name for name in names if name not in known]
    log.info("initialized from %s%s", cfg.trainer.init_from,
             f"; new identities {added} start at the trained identities' mean embedding" if added else "")


def train_identity_columns_only(net: AVFlowNet, cfg: Config) -> None:
    """Freeze every weight but the identity columns of the input projections (their other columns' gradients are
    zeroed, so Adam without weight decay leaves them exactly as they are)."""
    count = len(cfg.model.identities)
    if count == 0:
        raise ValueError("trainer.finetune=identity: this model has no identity table (model.identities is empty; "
                         "the shards and the trainer.init_from model name one identity between them)")
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    for key in IDENTITY_PROJECTIONS:
        weight = net.get_parameter(key)
        weight.requires_grad_(True)
        weight.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:, :-count]), grad[:, -count:]], 1))


def source_statistics(source_cfg: Config, tensors: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The source model's statistics by identity name ({} for a model without a table: its one identity has no
    name, so the run's identities take theirs from the shards)."""
    names = source_cfg.model.identities
    if not names:
        return {}
    codec, vae = tensors["codec"], tensors["head_vae"]
    count = identity_count(source_cfg)
    return {name: {"expression_mean": codec["expression_mean"].reshape(count, -1)[i],
                   "expression_std": codec["expression_std"].reshape(count, -1)[i],
                   "mel_mean": codec["mel_mean"].reshape(count)[i], "mel_std": codec["mel_std"].reshape(count)[i],
                   "pose_mean": vae["pose_mean"].reshape(count, -1)[i],
                   "pose_std": vae["pose_std"].reshape(count, -1)[i]}
            for i, name in enumerate(names)}
