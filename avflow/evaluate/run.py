"""`avflow evaluate`: held-out metrics of one or more models on packed shards, side by side.

Every held-out segment is generated from its own ground-truth tokens (and, for a dyadic model, its
participant inputs), so the samples are frame-aligned with the recording and compare frame by frame
(avflow.evaluate.metrics). Results go to REPORT_DIR: items/<column>/<segment>.json (+ .npz of the
segment's expression statistics) written atomically as each segment finishes, so an interrupted run
resumes where it stopped; then report.json, report.md (one column per model plus the ground truth) and
TensorBoard scalars under tensorboard/<column>.

Held-out segments of several identities: a model with an identity table generates each segment as the segment's
identity, a model without one generates every segment as its only person, and the report adds each identity's
values beside the overall ones (report.json "identities", one more table per identity, TensorBoard
eval/<metric>/<identity>), and by default the statistics that tell people apart (mean pitch; with
evaluate.mouth_controls, the mouth-control ranges) with, per model, the identity whose ground truth each
identity's generated values are nearest (report.json "identity_likeness"). Segment i of an identity samples
with seed sample.seed + i, so an identity's values do not depend on which other identities share the shard
folder; with one identity that is the shard order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avflow.config import Config, SampleConfig
from avflow.data.asr import ASR_SAMPLE_RATE, CTCTokenizer
from avflow.data.features import resample
from avflow.data.shard_format import SPLITS, load_manifest
from avflow.data.shard_format import identities as shard_identities
from avflow.data.shard_index import BadSampleCounter, open_split, read_or_record_bad, scan_shard
from avflow.evaluate import metrics as m
from avflow.infer.artifacts import WEIGHTS_FILE, is_model_directory
from avflow.infer.generate import conditioning, generate_batch
from avflow.infer.model import InferenceModel, load_inference_model
from avflow.model.io import stored_config
from avflow.text.transcripts import edit_distance, greedy_transcript
from avflow.utils import atomic_path, hold_folder
from avflow.vocoder.bigvgan import BigVGAN
from avflow.vocoder.vocode import vocode

GROUND_TRUTH = "ground_truth"
SEGMENTS_PER_ROUND = 8  # segments sampled together: fills the sampler's batch, bounds memory
DEFAULT_METRICS = [name for name in m.METRICS if name not in ("cer", "mouth_correlation", "pitch_hz", *m.MOUTH_RANGES)]


@dataclass
class HeldOut:
    """One held-out sample of the shards: its key, identity and whole streams at the mel frame rate."""

    key: str
    identity: str  # as the sample records it, to report per identity
    arrays: dict[str, np.ndarray]
    pitch: tuple[np.ndarray, np.ndarray] | None = None  # of the vocoded recording, tracked once for every column

    def truth(self, with_pitch: bool, cfg: Config, vocoder: BigVGAN | None) -> m.Segment:
        segment = m.Segment(self.arrays["mel"], self.arrays["expression"], self.arrays["pose"],
                            self.arrays.get("expression_valid"))
        if with_pitch:
            if self.pitch is None:
                self.pitch = pitch_of(self.arrays["mel"], vocoder, cfg)
            segment.pitch = [self.pitch]
        return segment


@dataclass
class Settings:
    """What a report's numbers depend on besides the models; a resumed run must use the same."""

    shards: str
    split: str
    sample: SampleConfig  # every model samples with these settings; an identity's segment i with sample.seed + i
    max_items: int | None
    metrics: list[str]
    asr_model: str | None


def held_out_segments(shards: str | Path, split: str = "val", max_items: int | None = None,
                      identities: list[str] | None = None) -> list[HeldOut]:
    """The readable samples of `split` (only those of `identities` when given), in shard order (at most max_items)."""
    if split not in SPLITS:
        raise ValueError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    if identities:
        known = set(shard_identities(load_manifest(shards)))
        unknown = [name for name in identities if name not in known]
        if unknown:
            raise ValueError(f"--identity {', '.join(unknown)}: not in {shards}; its identities are "
                             f"{', '.join(sorted(known))}")
    shard_list = open_split(shards, split)
    counter = BadSampleCounter(1.0, f"{shards} {split} split")
    segments = []
    for path, count in zip(shard_list.paths, shard_list.samples):
        for sample in scan_shard(path, count, shard_list.dims, counter):
            if identities and sample.identity not in identities:
                continue
            arrays = read_or_record_bad(sample, counter)
            if arrays is not None:
                segments.append(HeldOut(sample.key, sample.identity,
                                        {name: np.array(value) for name, value in arrays.items()}))
            if max_items is not None and len(segments) >= max_items:
                return segments
    if not segments:
        raise ValueError(f"{shards}: no held-out segments in its {split!r} split (pack data whose names match "
                         "data.val_patterns, or pass --split)")
    return segments


def segment_seeds(segments: list[HeldOut], seed: int) -> list[int]:
    """Each segment's sampling seed: seed + its index among the segments of its identity."""
    seen: dict[str, int] = {}
    seeds = []
    for segment in segments:
        seeds.append(seed + seen.get(segment.identity, 0))
        seen[segment.identity] = seen.get(segment.identity, 0) + 1
    return seeds


def identity_views(model: InferenceModel, segments: list[HeldOut], source: str) -> dict[str, InferenceModel]:
    """The model generating each held-out identity: its with_identity view when it has an identity table; else the
    model itself, its one person, for every identity. An identity the table lacks is one error naming both."""
    held_out = sorted({segment.identity for segment in segments})
    names = model.cfg.model.identities
    if not names:
        return dict.fromkeys(held_out, model)
    unknown = [name for name in held_out if name not in names]
    if unknown:
        raise ValueError(f"{source}: a model of identities {', '.join(names)}; the held-out segments are also of "
                         f"{', '.join(unknown)} (evaluate its own with --identity NAME)")
    return {name: model.with_identity(name) for name in held_out}


def model_config(path: str | Path) -> Config:
    """The config a checkpoint, model file or export directory was trained with, read without its weights."""
    path = Path(path)
    return stored_config(path / WEIGHTS_FILE if is_model_directory(path) else path)


def column_labels(paths: list[str | Path]) -> list[str]:
    """One column name per model: its file or folder name, numbered when two share one."""
    labels: list[str] = []
    for path in paths:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).name) or "model"
        label, count = name, 1
        while label in labels or label == GROUND_TRUTH:
            count += 1
            label = f"{name}-{count}"
        labels.append(label)
    return labels


def training_step(path: str | Path) -> int:
    """The checkpoint's training step when its name says it (step-N), for TensorBoard; else 0."""
    match = re.search(r"step-(\d+)", str(path))
    return int(match[1]) if match else 0


def pitch_of(mel: np.ndarray, vocoder: BigVGAN | None, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    audio = vocode(torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32)), vocoder, cfg.mel).numpy()
    f0, voiced = m.pitch_track(audio, cfg.mel.sample_rate, cfg.mel.hop_length)
    return f0[:mel.shape[0]], voiced[:mel.shape[0]]


def transcript_of(mel: np.ndarray, vocoder: BigVGAN | None, cfg: Config, asr: CTCTokenizer) -> str:
    audio = vocode(torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32)), vocoder, cfg.mel).numpy()
    return greedy_transcript(asr.logits(resample(audio, cfg.mel.sample_rate, ASR_SAMPLE_RATE)))


class ItemStore:
    """items/<column>/<key>.json (scores, plus CER counts) and <key>.npz (expression statistics), written
    atomically, the .npz first: a .json marks a finished segment."""

    def __init__(self, out_dir: Path, column: str):
        self.folder = out_dir / "items" / column

    def done(self, key: str) -> bool:
        return (self.folder / f"{key}.json").is_file()

    def write(self, key: str, scores: dict[str, float], counts: dict[str, int], stats: m.GaussianStats) -> None:
        with atomic_path(self.folder / f"{key}.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, count=stats.count, total=stats.total, outer=stats.outer)
        with atomic_path(self.folder / f"{key}.json") as tmp:
            tmp.write_text(json.dumps({"scores": scores, "counts": counts}))

    def read(self, key: str) -> tuple[dict[str, float], dict[str, int], m.GaussianStats]:
        entry = json.loads((self.folder / f"{key}.json").read_text())
        with np.load(self.folder / f"{key}.npz") as stored:
            stats = m.GaussianStats(int(stored["count"]), stored["total"], stored["outer"])
        return entry["scores"], entry["counts"], stats


def _check_settings(out_dir: Path, settings: Settings, sources: dict[str, str]) -> None:
    """Record the settings and each column's source; refuse to mix results of other settings into a report."""
    path = out_dir / "settings.json"
    current = {"settings": dataclasses.asdict(settings), "sources": sources}
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous["settings"] != current["settings"]:
            raise ValueError(f"{out_dir}: holds results of other settings ({previous['settings']}); use another -o "
                             "or the same settings to resume")
        for column, source in sources.items():
            if previous["sources"].get(column, source) != source:
                raise ValueError(f"{out_dir}: column {column} holds results of {previous['sources'][column]}, not "
                                 f"{source}; use another -o")
        current["sources"] = {**previous["sources"], **sources}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(current, indent=2))


def _score_ground_truth(segments: list[HeldOut], settings: Settings, cfg: Config, store: ItemStore,
                        vocoder: BigVGAN | None, asr: CTCTokenizer | None) -> None:
    for segment in segments:
        if store.done(segment.key):
            continue
        truth = segment.truth("pitch_hz" in settings.metrics, cfg, vocoder)
        scores = m.ground_truth_scores(truth, settings.metrics, cfg.mel.frame_rate)
        counts = {}
        if asr is not None:
            reference = greedy_transcript(segment.arrays["tokens"])
            counts = {"edits": edit_distance(transcript_of(truth.mel, vocoder, cfg, asr), reference),
                      "characters": len(reference)}
        store.write(segment.key, scores, counts, m.GaussianStats().add(_valid_expression(truth)))


def _valid_expression(truth: m.Segment) -> np.ndarray:
    return truth.expression if truth.expression_valid is None else truth.expression[truth.expression_valid]


def _score_model(model: InferenceModel, views: dict[str, InferenceModel], segments: list[HeldOut],
                 settings: Settings, store: ItemStore, vocoder: BigVGAN | None, asr: CTCTokenizer | None,
                 bar: tqdm) -> None:
    cfg = model.cfg
    sample_cfg = settings.sample
    with_pitch = any(name in settings.metrics for name in m.NEEDS_AUDIO)
    seeds = segment_seeds(segments, sample_cfg.seed)
    pending = [(seed, segment) for seed, segment in zip(seeds, segments) if not store.done(segment.key)]
    for first in range(0, len(pending), SEGMENTS_PER_ROUND):
        chunk = pending[first:first + SEGMENTS_PER_ROUND]
        participant = ("participant_tokens", "participant_features") if cfg.model.dyadic else ()
        chunk_views = [views[segment.identity] for _, segment in chunk]
        conds = [conditioning(view, segment.arrays["tokens"],
                              **{name: segment.arrays.get(name) for name in participant})
                 for view, (_, segment) in zip(chunk_views, chunk)]
        samples = generate_batch(model, conds, sample_cfg, [seed for seed, _ in chunk], chunk_views)
        for (_, segment), generated in zip(chunk, samples):
            truth = segment.truth(with_pitch, cfg, vocoder)
            candidate = m.Segment(generated.mel, generated.expression, generated.head_pose)
            if with_pitch:
                candidate.pitch = [pitch_of(mel, vocoder, cfg) for mel in generated.mel]
            scores = m.segment_scores(candidate, truth, settings.metrics, cfg.mel.frame_rate)
            counts = {}
            if asr is not None:
                reference = greedy_transcript(segment.arrays["tokens"])
                counts = {"edits": sum(edit_distance(transcript_of(mel, vocoder, cfg, asr), reference)
                                       for mel in generated.mel),
                          "characters": len(reference) * len(generated.mel)}
            valid = truth.expression_valid
            stats = m.GaussianStats().add(generated.expression if valid is None else generated.expression[:, valid])
            store.write(segment.key, scores, counts, stats)
            bar.update(1)


def _summary(store: ItemStore, segments: list[HeldOut]) -> tuple[dict[str, float], m.GaussianStats]:
    per_segment, stats, edits, characters = [], m.GaussianStats(), 0, 0
    for segment in segments:
        scores, counts, segment_stats = store.read(segment.key)
        per_segment.append(scores)
        stats.merge(segment_stats)
        edits += counts.get("edits", 0)
        characters += counts.get("characters", 0)
    summary = m.mean_scores(per_segment)
    if characters:
        summary["cer"] = edits / characters
    return summary, stats


def _scores(stores: dict[str, ItemStore], truth_store: ItemStore, segments: list[HeldOut],
            metrics: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Each column's and the ground truth's values over `segments`."""
    truth, truth_stats = _summary(truth_store, segments)
    columns = {}
    for column, store in stores.items():
        summary, stats = _summary(store, segments)
        if "expression_frechet" in metrics:
            summary["expression_frechet"] = m.frechet_distance(*stats.mean_covariance(), *truth_stats.mean_covariance())
        columns[column] = {name: summary[name] for name in metrics if name in summary}
    return columns, {name: truth[name] for name in metrics if name in truth}


def evaluate_models(models: dict[str, InferenceModel], segments: list[HeldOut], settings: Settings, out_dir: str | Path,
                    vocoder: BigVGAN | None = None, sources: dict[str, str] | None = None,
                    steps: dict[str, int] | None = None, progress: bool = True) -> dict:
    """Score every model (column name -> model) and the ground truth on the segments; write and return the report."""
    out_dir = Path(out_dir)
    m.check_metric_names(settings.metrics, "metrics")
    views = {column: identity_views(model, segments, (sources or {}).get(column, column))
             for column, model in models.items()}
    with hold_folder(out_dir):  # one evaluation writes a report folder at a time
        _check_settings(out_dir, settings, sources or {column: "in memory" for column in models})
        asr = CTCTokenizer(settings.asr_model) if settings.asr_model and "cer" in settings.metrics else None
        cfg = next(iter(models.values())).cfg
        truth_store = ItemStore(out_dir, GROUND_TRUTH)
        _score_ground_truth(segments, settings, cfg, truth_store, vocoder, asr)
        stores = {column: ItemStore(out_dir, column) for column in models}
        pending = sum(not store.done(segment.key) for store in stores.values() for segment in segments)
        with tqdm(total=pending, desc="evaluate", unit="segment", disable=not progress) as bar:
            for column, model in models.items():
                _score_model(model, views[column], segments, settings, stores[column], vocoder, asr, bar)
        columns, truth = _scores(stores, truth_store, segments, settings.metrics)
        report = {"settings": dataclasses.asdict(settings), "segments": [segment.key for segment in segments],
                  "columns": columns, GROUND_TRUTH: truth,
                  "metrics": {name: dataclasses.asdict(m.METRICS[name]) for name in settings.metrics}}
        by_identity: dict[str, list[HeldOut]] = {}
        for segment in segments:
            by_identity.setdefault(segment.identity, []).append(segment)
        if len(by_identity) > 1:
            report["identities"] = {}
            for identity, own in sorted(by_identity.items()):
                identity_columns, identity_truth = _scores(stores, truth_store, own, settings.metrics)
                report["identities"][identity] = {"segments": len(own), "columns": identity_columns,
                                                  GROUND_TRUTH: identity_truth}
            report["identity_likeness"] = identity_likeness(report)
        with atomic_path(out_dir / "report.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2, allow_nan=True))
        with atomic_path(out_dir / "report.md") as tmp:
            tmp.write_text(markdown_table(report) + "\n")
        _write_tensorboard(out_dir, report, steps or {})
        return report


def identity_likeness(report: dict) -> dict[str, dict[str, dict[str, str]]]:
    """Per column and identity statistic (m.IDENTITY_STATISTICS), the identity whose ground-truth values each
    identity's generated values are nearest (Euclidean distance over the statistic's metrics): a model that keeps
    people apart maps every identity to itself. A statistic with a metric missing or not finite is left out."""
    parts = report["identities"]
    likeness: dict[str, dict[str, dict[str, str]]] = {}
    for column in report["columns"]:
        for statistic, names in m.IDENTITY_STATISTICS.items():
            truths = {identity: np.array([part[GROUND_TRUTH].get(name, math.nan) for name in names])
                      for identity, part in parts.items()}
            generated = {identity: np.array([part["columns"][column].get(name, math.nan) for name in names])
                         for identity, part in parts.items()}
            if not all(np.isfinite(values).all() for values in [*truths.values(), *generated.values()]):
                continue
            likeness.setdefault(column, {})[statistic] = {
                identity: min(truths, key=lambda other: float(np.linalg.norm(values - truths[other])))
                for identity, values in generated.items()}
    return likeness


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def markdown_table(report: dict) -> str:
    """One row per metric: which way is better, each model's value and the ground truth's where it applies; then,
    for segments of several identities, the same table for each identity's segments."""
    tables = [_table(report["metrics"], report["columns"], report[GROUND_TRUTH])]
    for identity, part in report.get("identities", {}).items():
        tables.append(f"identity {identity} ({part['segments']} segments):\n\n"
                      + _table(report["metrics"], part["columns"], part[GROUND_TRUTH]))
    likeness = report.get("identity_likeness")
    if likeness:
        names = list(report["identities"])
        lines = ["identity likeness (the identity whose ground truth each identity's generated value is nearest):",
                 "", "| model | statistic | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for column, statistics in likeness.items():
            for name, nearest in statistics.items():
                lines.append(f"| {column} | {name} | " + " | ".join(nearest[identity] for identity in names) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _table(metrics: dict, columns: dict[str, dict[str, float]], truth: dict[str, float]) -> str:
    lines = ["| metric | better | " + " | ".join(columns) + " | ground truth |",
             "|---|---|" + "---:|" * (len(columns) + 1)]
    for name, metric in metrics.items():
        values = [_format(columns[column].get(name)) for column in columns]
        lines.append(f"| {name} | {metric['better']} | " + " | ".join(values) + f" | {_format(truth.get(name))} |")
    return "\n".join(lines)


def _write_tensorboard(out_dir: Path, report: dict, steps: dict[str, int]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    identities = report.get("identities", {})
    for column, values in [*report["columns"].items(), (GROUND_TRUTH, report[GROUND_TRUTH])]:
        with SummaryWriter(str(out_dir / "tensorboard" / column)) as writer:
            for name, value in values.items():
                writer.add_scalar(f"eval/{name}", value, steps.get(column, 0))
            for identity, part in identities.items():
                own = part[GROUND_TRUTH] if column == GROUND_TRUTH else part["columns"][column]
                for name, value in own.items():
                    writer.add_scalar(f"eval/{name}/{identity}", value, steps.get(column, 0))


def evaluate_checkpoints(checkpoints: list[str | Path], shards: str | Path, out_dir: str | Path, *, split: str = "val",
                         sample: SampleConfig | None = None, max_items: int | None = None,
                         metrics: list[str] | None = None, asr_model: str | Path | None = None,
                         vocoder: BigVGAN | None = None, device: str = "auto", progress: bool = True,
                         identities: list[str] | None = None) -> dict:
    """`avflow evaluate`: load each model, score it on the held-out segments (only those of `identities` when
    given) with the sampler settings `sample` (default: SampleConfig's), write the report."""
    if asr_model is not None and not Path(asr_model).is_dir():
        raise FileNotFoundError(f"--asr-model {asr_model}: no such wav2vec2 model directory")
    sample = Config(sample=sample or SampleConfig()).validate().sample
    if max_items is not None and max_items < 1:
        raise ValueError(f"--max-items: expected at least 1, got {max_items}")
    configs = [model_config(path) for path in checkpoints]
    for path, cfg in zip(checkpoints, configs):
        if cfg.task != "avflow":
            raise ValueError(f"{path}: a {cfg.task} model; avflow evaluate needs an AV-Flow model (task avflow)")
    segments = held_out_segments(shards, split, max_items, identities)
    mouth = any(cfg.evaluate.mouth_controls for cfg in configs)
    several = len({segment.identity for segment in segments}) > 1
    names = list(metrics) if metrics else DEFAULT_METRICS + (["cer"] if asr_model else []) + (
        ["mouth_correlation"] if mouth else []) + (
        ["pitch_hz", *(m.MOUTH_RANGES if mouth else ())] if several else [])
    m.check_metric_names(names, "--metrics")
    if "cer" in names and asr_model is None:
        raise ValueError("the cer metric needs --asr-model: a local wav2vec2 CTC model directory")
    settings = Settings(str(Path(shards).resolve()), split, sample, max_items, names,
                        str(Path(asr_model).resolve()) if asr_model else None)
    labels = column_labels(checkpoints)
    models = {label: load_inference_model(path, device) for label, path in zip(labels, checkpoints)}
    return evaluate_models(models, segments, settings, out_dir, vocoder,
                           sources={label: str(Path(path).resolve()) for label, path in zip(labels, checkpoints)},
                           steps={label: training_step(path) for label, path in zip(labels, checkpoints)},
                           progress=progress)
