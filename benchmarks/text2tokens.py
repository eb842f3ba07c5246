"""Held-out quality of the text-to-tokens model on the demo corpus, per decoder and front end.

    python benchmarks/text2tokens.py                       # flow + regression decoders, character front end
    python benchmarks/text2tokens.py --variants flow:character flow:phoneme regression:character
    python benchmarks/text2tokens.py --val-segments 60     # a fresh demo corpus with 60 held-out sentences

Expects the demo shards (`avflow demo`, or `avflow corpus` + `avflow pack --layout demo`) at loader.shards of
configs/text2tokens_demo.yaml; with --val-segments N it writes and packs the demo corpus with N held-out
segments into a temporary folder instead (the training segments are the same: every segment is a pure
function of the corpus seed, its split and its index). For each variant it trains that config with the
shared Trainer (one process, wall time measured), then generates every held-out sentence from its text
through the public inference path (`load_text2tokens(...).token_logits`, seed 0) and reports:
- CER: character error rate of the greedy CTC decoding of the generated logits against the sentence, as
  words separated by single spaces (transcripts.json of the corpus), edits summed over all sentences;
- total duration error: |generated frames - corpus frames| / corpus frames over all held-out sentences,
  and the mean of the per-sentence absolute relative errors.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from avflow.config import load_config
from avflow.data.corpus import write_corpus
from avflow.data.layouts.fifty_h import is_validation
from avflow.data.pack import pack
from avflow.data.shard_index import iter_split_arrays
from avflow.infer.text2tokens import load_text2tokens
from avflow.text.normalize import normalize_text
from avflow.text.transcripts import character_error_rate, greedy_transcript
from avflow.train.loop import Trainer

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "text2tokens_demo.yaml"


def held_out(cfg) -> tuple[list[str], list[int]]:
    """The held-out sentences (sorted by segment name, the shards' order) and their lengths in mel frames."""
    transcripts = json.loads((Path(cfg.data.root) / "transcripts.json").read_text())
    names = sorted(name for name in transcripts if is_validation(name, cfg.data.val_patterns))
    frames = [arrays["tokens"].shape[0] for arrays in iter_split_arrays(cfg.loader.shards, "val", ("tokens",))]
    if len(frames) != len(names):
        raise ValueError(f"{cfg.loader.shards}: {len(frames)} held-out segments, but transcripts.json names "
                         f"{len(names)}")
    return [transcripts[name] for name in names], frames


def write_demo_shards(val_segments: int, work: Path) -> list[str]:
    """The demo corpus with `val_segments` held-out segments, packed; returns the data.* overrides for it."""
    data = [f"data.root={work / 'corpus'}", f"loader.shards={work / 'shards'}", f"corpus.val_segments={val_segments}"]
    cfg = load_config(CONFIG, data)
    write_corpus(cfg.data.root, cfg.corpus)
    pack(cfg, cfg.loader.shards, progress=False)
    return data


def run_variant(decoder: str, front_end: str, overrides: list[str], work: Path) -> dict[str, float]:
    run_dir = work / f"{decoder}-{front_end}"
    cfg = load_config(CONFIG, [f"text2tokens.decoder={decoder}", f"text2tokens.front_end={front_end}",
                               f"trainer.run_dir={run_dir}", *overrides])
    started = time.perf_counter()
    checkpoint = Trainer(cfg, progress=False).fit()
    train_seconds = time.perf_counter() - started
    model = load_text2tokens(checkpoint)
    sentences, frames = held_out(cfg)
    hypotheses, generated = [], []
    started = time.perf_counter()
    for sentence in sentences:
        logits = model.token_logits(sentence, seed=0)
        hypotheses.append(greedy_transcript(logits))
        generated.append(logits.shape[0])
    generate_seconds = time.perf_counter() - started
    return {
        "cer": character_error_rate(hypotheses, [normalize_text(s) for s in sentences]),
        "total_duration_error": abs(sum(generated) - sum(frames)) / sum(frames),
        "mean_sentence_duration_error": sum(abs(g - f) / f for g, f in zip(generated, frames)) / len(frames),
        "train_seconds": train_seconds,
        "generate_seconds_per_sentence": generate_seconds / len(sentences),
        "parameters": sum(p.numel() for p in model.net.parameters()),
        "sentences": len(sentences),
        "wrong": [(h, normalize_text(s)) for h, s in zip(hypotheses, sentences) if h != normalize_text(s)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["flow:character", "regression:character"],
                        help="DECODER:FRONT_END pairs (decoder flow|regression, front end character|phoneme)")
    parser.add_argument("--val-segments", type=int, help="write a fresh demo corpus with this many held-out segments")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/text2tokens_demo.yaml")
    args = parser.parse_args()
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    with tempfile.TemporaryDirectory(prefix="t2t-bench-") as work:
        overrides = list(args.overrides)
        if args.val_segments is not None:
            overrides = write_demo_shards(args.val_segments, Path(work)) + overrides
        for variant in args.variants:
            decoder, _, front_end = variant.partition(":")
            scores = run_variant(decoder, front_end, overrides, Path(work))
            wrong = scores.pop("wrong")
            print(f"{variant}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in scores.items()), flush=True)
            for hypothesis, reference in wrong:
                print(f"    generated '{hypothesis}' for '{reference}'")


if __name__ == "__main__":
    main()
