"""Sampling: per-frame conditioning -> N samples of log-mel, expression and head pose at the mel frame rate.

Inputs come from avflow.infer.inputs and results are written by avflow.infer.outputs; this file only
samples from a loaded InferenceModel.
"""

from __future__ import annotations

import numpy as np
import torch

from avflow.config import SampleConfig
from avflow.infer.model import InferenceModel
from avflow.model.sampling import sample_sequences, sequence_noise
from avflow.model.state import Generated
from avflow.text.token_labels import TOKEN_LABELS


def conditioning(model: InferenceModel, tokens: np.ndarray, participant_tokens: np.ndarray | None = None,
                 participant_features: np.ndarray | None = None) -> np.ndarray:
    """Per-frame conditioning at the mel frame rate: the actor's tokens, and for a dyadic model the participant's
    tokens and normalized SMIRK features (all already at the mel frame rate; cut to the shortest)."""
    dyadic = model.cfg.model.dyadic
    given = participant_tokens is not None or participant_features is not None
    if dyadic and (participant_tokens is None or participant_features is None):
        raise ValueError("this is a dyadic model: it needs the participant's tokens and SMIRK features as well as "
                         "the actor's input")
    if given and not dyadic:
        raise ValueError("participant inputs were given, but this model is monadic (model.dyadic=false)")
    parts = [tokens] + ([participant_tokens, participant_features] if dyadic else [])
    frames = min(part.shape[0] for part in parts)
    identities = model.cfg.model.identities
    if identities:
        if model.identity is None:
            model.with_identity(None)  # raises: the model has several identities, and none was chosen
        parts.append(np.broadcast_to(np.eye(len(identities), dtype=np.float32)[model.identity],
                                     (frames, len(identities))))
    cond = np.concatenate([part[:frames] for part in parts], axis=1).astype(np.float32)
    if cond.shape[1] != model.cfg.model.cond_dim:
        raise ValueError(f"conditioning has {cond.shape[1]} features per frame; the model expects "
                         f"{model.cfg.model.cond_dim} (tokens {len(TOKEN_LABELS)}"
                         + (f" + participant tokens {len(TOKEN_LABELS)} + features "
                            f"{model.cfg.model.participant_feature_dim}" if dyadic else "")
                         + (f" + identities {len(identities)})" if identities else ")"))
    return cond


@torch.no_grad()
def generate_batch(model: InferenceModel, conds: list[np.ndarray], sample_cfg: SampleConfig | None = None,
                   seeds: list[int] | None = None, identities: list[InferenceModel] | None = None) -> list[Generated]:
    """N samples for each conditioning sequence (T_i, cond_dim), sampled together in length-bucketed batches;
    `identities`: each input's `model.with_identity` view, whose statistics decode it (default: `model`'s).

    Each input's noise comes from its own seed (default sample.seed), so its samples do not depend on
    which other inputs share its batch, on the batch size, on the device, or on how many samples are drawn
    (`sequence_noise`: sample i of every run with the same seed starts from the same noise).
    """
    sample_cfg = sample_cfg or model.cfg.sample
    seeds = seeds if seeds is not None else [sample_cfg.seed] * len(conds)
    state_dim, n = model.cfg.model.state_dim, sample_cfg.num_samples
    noises = [sample_cfg.temperature * sequence_noise(seed, n, cond.shape[0], state_dim)
              for cond, seed in zip(conds, seeds)]
    runner, frames, buckets, rows, row_counts = model.sampler(sample_cfg)
    sampled = sample_sequences(runner, [torch.from_numpy(c).to(model.device) for c in conds],
                               [noise.to(model.device) for noise in noises], frames, sample_cfg.window_overlap,
                               buckets, rows, row_counts, window_map=model.state_decoder.with_poses)
    return [view.state_decoder(item) for item, view in zip(sampled, identities or [model] * len(sampled))]


def generate(model: InferenceModel, tokens: np.ndarray, sample_cfg: SampleConfig | None = None) -> Generated:
    """N samples for one monadic input's token logits (T, 29) at the mel frame rate."""
    return generate_batch(model, [conditioning(model, tokens)], sample_cfg)[0]
