"""`avflow demo`: the whole system on a laptop CPU in minutes.

Writes the procedural corpus (50h layout), prepares it through the normal ingestion path, trains a
small model, generates three samples for each held-out sentence from text, and compares the trained
model with its own untrained initialization against the corpus ground truth.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from avflow.config import Config
from avflow.data.corpus import write_corpus
from avflow.infer.evaluate import evaluate
from avflow.infer.generate import generate, load_inference_model, tokens_from_text, write_outputs
from avflow.model.avflow import AVFlowNet
from avflow.train.loop import Trainer


def run_demo(cfg: Config, output: Path) -> dict[str, dict[str, float]]:
    started = time.perf_counter()
    root = Path(cfg.data.root)
    print(f"[1/4] writing the demo corpus to {root}")
    write_corpus(root, cfg.corpus)
    transcripts = json.loads((root / "transcripts.json").read_text())

    print(f"[2/4] training a {cfg.model.n_blocks}-block d={cfg.model.d_model} model for {cfg.trainer.steps} steps "
          f"in {cfg.trainer.run_dir}")
    trainer = Trainer(cfg, resume=True)
    checkpoint = trainer.fit()

    print("[3/4] evaluating on held-out segments (3 samples each)")
    torch.manual_seed(cfg.trainer.seed)
    untrained = AVFlowNet(cfg.model).to(trainer.device)
    results = {
        "untrained": evaluate(untrained, trainer.data.codec, trainer.data.val, cfg, cfg.sample),
        "trained": evaluate(trainer.ema or trainer.model, trainer.data.codec, trainer.data.val, cfg, cfg.sample),
    }
    print(f"{'':>10}  {'mel L1 (lower is better)':>25}  {'mouth correlation (higher is better)':>37}")
    for name, scores in results.items():
        print(f"{name:>10}  {scores['mel_l1']:>25.3f}  {scores['mouth_correlation']:>37.3f}")

    print(f"[4/4] generating from the held-out sentences' text into {output}")
    model = load_inference_model(checkpoint, cfg.trainer.device)
    for name in trainer.data.val_names:
        sentence = transcripts[name]
        written = write_outputs(generate(model, tokens_from_text(sentence, cfg.mel.frame_rate)), output, name, cfg)
        print(f"  '{sentence}': {', '.join(p.name for p in written if p.suffix == '.wav')}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; outputs (.wav, .npz, .png) in {output}, "
          f"TensorBoard logs in {Path(cfg.trainer.run_dir) / 'tensorboard'}")
    return results
