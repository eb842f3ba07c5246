"""Evaluation against ground truth on held-out segments: mel L1 and mouth-control correlation.

Samples are generated from each segment's own token timeline, so they are frame-aligned with its
recorded mel and expression codes and can be compared frame by frame.
"""

from __future__ import annotations

import numpy as np
import torch

from avflow.config import Config, SampleConfig
from avflow.model.avflow import AVFlowNet
from avflow.model.flow import sample
from avflow.model.state import StateCodec

# jaw_open, lip_round, lip_close: driven by the letters. Blink (index 3) is random and is left out.
SPEECH_MOUTH_CONTROLS = (0, 1, 2)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


@torch.no_grad()
def evaluate(net: AVFlowNet, codec: StateCodec, segments: list[torch.Tensor], cfg: Config,
             sample_cfg: SampleConfig) -> dict[str, float]:
    """Mean over segments and samples of the log-mel L1 and the mouth-control Pearson correlation.

    `segments` are prepared (F, state + cond + 1) tensors, as the trainer uses them.
    """
    net.eval()
    device = next(net.parameters()).device
    state_dim, cond_dim = cfg.model.state_dim, cfg.model.cond_dim
    mel_errors, correlations = [], []
    for frames in segments:
        truth = codec.decode(frames[:, :state_dim])
        cond = frames[None, :, state_dim:state_dim + cond_dim].to(device)
        generator = torch.Generator(device=device).manual_seed(sample_cfg.seed)
        states = sample(net, cond, None, state_dim, sample_cfg, generator)[0].float().cpu()
        generated = codec.decode(states)
        for index in range(states.shape[0]):
            mel_errors.append((generated["mel"][index] - truth["mel"]).abs().mean().item())
            for control in SPEECH_MOUTH_CONTROLS:
                correlations.append(pearson(generated["expression"][index, :, control].numpy(),
                                            truth["expression"][:, control].numpy()))
    return {"mel_l1": float(np.mean(mel_errors)), "mouth_correlation": float(np.mean(correlations))}
