"""Evaluation against ground truth on held-out segments: mel L1 and mouth-control correlation.

Samples are generated from each segment's own token timeline, so they are frame-aligned with its
recorded mel and expression codes and can be compared frame by frame.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from avflow.config import Config, SampleConfig
from avflow.model.avflow import AVFlowNet
from avflow.model.flow import sample
from avflow.model.state import StateCodec
from avflow.train.batches import Batch

# jaw_open, lip_round, lip_close: driven by the letters. Blink (index 3) is random and is left out.
SPEECH_MOUTH_CONTROLS = (0, 1, 2)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


@torch.no_grad()
def evaluate(net: AVFlowNet, codec: StateCodec, batches: Iterable[Batch], cfg: Config,
             sample_cfg: SampleConfig) -> dict[str, float]:
    """Mean over segments and samples of the log-mel L1 and the mouth-control Pearson correlation.

    `batches` hold whole segments (one window per segment, padding masked), as encoded for training.
    """
    net.eval()
    device = next(net.parameters()).device
    mel_errors, correlations = [], []
    for batch in batches:
        for row in range(batch.state.shape[0]):
            frames = int(batch.valid[row].sum())
            truth = codec.decode(batch.state[row, :frames].float().cpu())
            generator = torch.Generator(device=device).manual_seed(sample_cfg.seed)
            states = sample(net, batch.cond[row:row + 1, :frames].to(device), None, cfg.model.state_dim, sample_cfg,
                            generator)[0].float().cpu()
            generated = codec.decode(states)
            for index in range(states.shape[0]):
                mel_errors.append((generated["mel"][index] - truth["mel"]).abs().mean().item())
                for control in SPEECH_MOUTH_CONTROLS:
                    correlations.append(pearson(generated["expression"][index, :, control].numpy(),
                                                truth["expression"][:, control].numpy()))
    if not mel_errors:
        raise ValueError("evaluation: no validation segments in the shards")
    return {"mel_l1": float(np.mean(mel_errors)), "mouth_correlation": float(np.mean(correlations))}
