"""`avflow demo`: the whole system on a laptop CPU in minutes.

Writes the procedural corpus (50h layout), packs it into shards through the normal ingestion path,
trains a small model from the shards, compares it with its own untrained initialization against the
corpus ground truth on held-out segments, and generates three samples per held-out sentence from text.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from avflow.config import Config
from avflow.data.corpus import write_corpus
from avflow.data.layouts.fifty_h import is_validation
from avflow.data.loader import validation_batches
from avflow.data.shards import pack
from avflow.infer.evaluate import evaluate
from avflow.infer.generate import generate, load_inference_model, tokens_from_text, write_outputs
from avflow.infer.render import ProceduralFaceDecoder
from avflow.model.avflow import AVFlowNet
from avflow.train.loop import Trainer


def run_demo(cfg: Config, output: Path) -> dict[str, dict[str, float]]:
    started = time.perf_counter()
    root = Path(cfg.data.root)
    print(f"[1/5] writing the demo corpus to {root}")
    write_corpus(root, cfg.corpus)
    transcripts = json.loads((root / "transcripts.json").read_text())

    print(f"[2/5] packing it into shards in {cfg.data.shards}")
    manifest = pack(cfg, cfg.data.shards)
    print(f"  {manifest['splits']['train']['hours'] * 60:.1f} min train, {manifest['splits']['val']['hours'] * 60:.1f} min held out")

    print(f"[3/5] training a {cfg.model.n_blocks}-block d={cfg.model.d_model} model for {cfg.trainer.steps} steps "
          f"in {cfg.trainer.run_dir}")
    trainer = Trainer(cfg, resume=True)
    checkpoint = trainer.fit()

    print("[4/5] evaluating on held-out segments (3 samples each)")
    whole_segments = copy.deepcopy(cfg)
    whole_segments.data.segment_length = cfg.sample.max_frames
    held_out = [trainer.encoder(batch) for batch in validation_batches(cfg.data.shards, whole_segments)]
    torch.manual_seed(cfg.trainer.seed)
    untrained = AVFlowNet(cfg.model).to(trainer.device)
    codec = trainer.encoder.codec
    results = {
        "untrained": evaluate(untrained, codec, held_out, cfg, cfg.sample),
        "trained": evaluate(trainer.ema_model(), codec, held_out, cfg, cfg.sample),
    }
    print(f"{'':>10}  {'mel L1 (lower is better)':>25}  {'mouth correlation (higher is better)':>37}")
    for name, scores in results.items():
        print(f"{name:>10}  {scores['mel_l1']:>25.3f}  {scores['mouth_correlation']:>37.3f}")

    print(f"[5/5] generating from the held-out sentences' text into {output}")
    model = load_inference_model(checkpoint, cfg.trainer.device)
    face = ProceduralFaceDecoder()
    for name in sorted(n for n in transcripts if is_validation(n, cfg.data.val_patterns)):
        sentence = transcripts[name]
        written = write_outputs(generate(model, tokens_from_text(sentence, cfg.mel.frame_rate)), output, name, cfg,
                                face_decoder=face)
        print(f"  '{sentence}': {', '.join(p.name for p in written if p.name.endswith('_samples.mp4'))}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; outputs (.wav, .npz, .png, .mp4) in {output}, "
          f"TensorBoard logs in {Path(cfg.trainer.run_dir) / 'tensorboard'}")
    return results
