"""`avflow demo`: the whole system on a laptop CPU in minutes.

Writes the procedural corpus (50h layout), packs it into shards through the normal ingestion path,
trains a small model from the shards, compares it with its own untrained initialization against the
corpus ground truth on held-out segments (avflow.evaluate), trains the text-to-tokens model on the same shards
(configs/text2tokens_demo.yaml), and generates three samples per held-out sentence from its text through it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from avflow.config import Config, load_config
from avflow.data.corpus import write_corpus
from avflow.data.layouts.fifty_h import is_validation
from avflow.data.pack import pack
from avflow.data.shard_index import iter_split_arrays
from avflow.evaluate.run import DEFAULT_METRICS, Settings, evaluate_models, held_out_segments, markdown_table
from avflow.infer.generate import generate
from avflow.infer.model import load_inference_model
from avflow.infer.outputs import write_outputs
from avflow.infer.text2tokens import evaluate_text2tokens, load_text2tokens
from avflow.model.avflow import AVFlowNet
from avflow.render import ProceduralFaceDecoder
from avflow.train.loop import Trainer

TEXT2TOKENS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "text2tokens_demo.yaml"


def text2tokens_config(cfg: Config) -> Config:
    """The demo's text-to-tokens run: configs/text2tokens_demo.yaml on the demo's shards, in <run_dir>/text2tokens."""
    return load_config(TEXT2TOKENS_CONFIG, [f"data.root={cfg.data.root}", f"loader.shards={cfg.loader.shards}",
                                            f"trainer.run_dir={Path(cfg.trainer.run_dir) / 'text2tokens'}",
                                            f"trainer.device={cfg.trainer.device}"])


def run_demo(cfg: Config, output: Path) -> dict[str, dict[str, float]]:
    started = time.perf_counter()
    root = Path(cfg.data.root)
    print(f"[1/6] writing the demo corpus to {root}")
    write_corpus(root, cfg.corpus)
    transcripts = json.loads((root / "transcripts.json").read_text())

    print(f"[2/6] packing it into shards in {cfg.loader.shards}")
    manifest = pack(cfg, cfg.loader.shards)
    print(f"  {manifest['splits']['train']['hours'] * 60:.1f} min train, "
          f"{manifest['splits']['val']['hours'] * 60:.1f} min held out")

    print(f"[3/6] training a {cfg.model.n_blocks}-block d={cfg.model.d_model} model for {cfg.trainer.steps} steps "
          f"in {cfg.trainer.run_dir}")
    trainer = Trainer(cfg, resume=True)
    checkpoint = trainer.fit()

    print(f"[4/6] evaluating on held-out segments ({cfg.sample.num_samples} samples each) against the untrained "
          f"initialization")
    model = load_inference_model(checkpoint, cfg.trainer.device)
    model.cfg.sample = cfg.sample  # this demo's sampler settings, also for a run resumed from older checkpoints
    torch.manual_seed(cfg.trainer.seed)
    untrained = dataclasses.replace(model, net=AVFlowNet(cfg.model).to(model.device).eval(), samplers={})
    names = DEFAULT_METRICS + (["mouth_correlation"] if cfg.evaluate.mouth_controls else [])
    settings = Settings(str(Path(cfg.loader.shards).resolve()), "val", cfg.sample, None, names, None)
    report_dir = output / "evaluation"
    shutil.rmtree(report_dir, ignore_errors=True)  # the models may differ from a previous run's
    report = evaluate_models({"untrained": untrained, "trained": model}, held_out_segments(cfg.loader.shards), settings,
                             report_dir, sources={"untrained": f"initialization of seed {cfg.trainer.seed}",
                                                  "trained": str(checkpoint)})
    print(markdown_table(report))
    results: dict[str, dict[str, float]] = {**report["columns"], "ground_truth": report["ground_truth"]}

    t2t_cfg = text2tokens_config(cfg)
    print(f"[5/6] training the text-to-tokens model ({t2t_cfg.text2tokens.front_end} front end, "
          f"{t2t_cfg.text2tokens.decoder} decoder) for {t2t_cfg.trainer.steps} steps in {t2t_cfg.trainer.run_dir}")
    t2t_trainer = Trainer(t2t_cfg, resume=True)
    text2tokens = load_text2tokens(t2t_trainer.fit(), t2t_trainer.device)
    held_out_names = sorted(n for n in transcripts if is_validation(n, cfg.data.val_patterns))
    frames = [arrays["tokens"].shape[0]
              for arrays in iter_split_arrays(cfg.loader.shards, "val", ("tokens",), cfg.loader.max_bad_fraction)]
    t2t_scores = evaluate_text2tokens(text2tokens, [transcripts[name] for name in held_out_names], frames)
    print(f"  held-out sentences: CER of the generated tokens {t2t_scores['cer']:.1%}, "
          f"total duration error {t2t_scores['duration_error']:.1%}")
    results["text2tokens"] = t2t_scores

    print(f"[6/6] generating from the held-out sentences' text into {output}")
    face = ProceduralFaceDecoder()
    for index, name in enumerate(held_out_names):
        sentence = transcripts[name]
        tokens = text2tokens.token_logits(sentence, seed=cfg.sample.seed + index)
        written = write_outputs(generate(model, tokens), output, name, cfg, face_decoder=face)
        print(f"  '{sentence}': {', '.join(p.name for p in written if p.name.endswith('_samples.mp4'))}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; outputs (.wav, .npz, .png, .mp4) in {output}, "
          f"TensorBoard logs in {Path(cfg.trainer.run_dir) / 'tensorboard'}")
    return results
