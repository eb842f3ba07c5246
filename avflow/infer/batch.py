"""Batch inference jobs: a manifest of items -> per-item outputs and a results.jsonl, resumable.

    {"id": "greeting", "text": "Hello there."}
    {"id": "reply", "audio": "clips/reply.wav"}
    {"id": "take3", "tokens": "tokens/take3.npy", "seed": 7}
    {"id": "dyad1", "tokens": "a.npy", "participant_tokens": "b.npy", "participant_features": "b_smirk.npy"}
    {"id": "bob-hello", "text": "Hello.", "identity": "bob"}

An item's "identity" chooses who a multi-identity model generates (default: the job's `--identity`, or the
model's only identity); items of different identities are sampled together.

Relative paths are relative to the manifest. Each item's outputs are written into a hidden staging
folder and renamed to RESULTS/<id>/ only when complete, then one line is appended to the results file,
so an interrupted job leaves no partial output under a final name and a re-run skips every item
already recorded (ok or failed; `retry_errors` retries the failed ones). Bad items (missing, empty or
unreadable file, empty text, wrong shapes, longer than sample.max_input_seconds) are recorded with their
reason and never stop the job; a repeated id is recorded once, under its line (line-N), never over the
first item's result. With a shard I/N the
job takes the items whose line index % N == I and writes results.shard-I-of-N.jsonl, so SLURM array
tasks never write the same file.

Each results file has one writer: a job holds its lock (avflow.utils.hold_folder) while it runs, and a second
job on the same folder and shard is refused. A failed item's entry says the failure's cause: "input" (the item
itself: its file, text or shape) is skipped by a rerun unless `retry_errors`; "output" (writing its outputs
failed) is retried by every rerun. A full or read-only disk stops the job with a DiskError after recording the
item it hit, so nothing is sampled only to fail again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avflow.infer.generate import conditioning, generate_batch
from avflow.infer.inputs import (
    check_duration,
    check_text_length,
    participant_features_from_file,
    tokens_for_text,
    tokens_from_audio,
    tokens_from_file,
)
from avflow.infer.model import InferenceModel
from avflow.infer.outputs import write_outputs
from avflow.render import CodecAvatar, FaceDecoder
from avflow.utils import DiskError, disk_error, hold_folder, reporting_disk_errors

log = logging.getLogger(__name__)

SOURCES = ("text", "audio", "tokens")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ITEMS_PER_ROUND = 32  # items prepared and sampled together: enough to fill length buckets, bounded memory
STAGING_PREFIX = ".staging-"
RESULTS_FILE = re.compile(r"^results(\.shard-\d+-of-\d+)?\.jsonl$")  # ids that would name a results file
RETRIED_CAUSES = ("output",)  # failures outside the item: a rerun tries the item again


@dataclass
class Item:
    index: int
    id: str
    spec: dict
    error: str | None = None
    cause: str = "input"  # of the error: "input" (the item's own data) or "output" (writing its outputs)
    cond: np.ndarray | None = None
    seed: int = 0
    model: InferenceModel | None = None  # the job's model generating this item's identity
    timings: dict = field(default_factory=dict)


def results_name(shard: tuple[int, int] | None) -> str:
    return "results.jsonl" if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def read_items(path: str | Path, shard: tuple[int, int] | None = None) -> list[Item]:
    """The manifest's items (of this shard). Lines that are not items become items with an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such items file (expected JSON lines with an id and text/audio/tokens)")
    items: list[Item] = []
    seen: dict[str, int] = {}  # id -> line index of its first item
    for index, line in enumerate(path.read_text().splitlines()):
        if not line.strip() or (shard is not None and index % shard[1] != shard[0]):
            continue
        where = f"{path.name} line {index + 1}"
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as error:
            items.append(Item(index, f"line-{index + 1}", {}, f"{where}: not JSON ({error.msg})"))
            continue
        if not isinstance(spec, dict):
            items.append(Item(index, f"line-{index + 1}", {}, f"{where}: expected a JSON object with an \"id\" and "
                                                              f"one of {', '.join(SOURCES)}, got {line.strip()[:60]}"))
            continue
        item_id = str(spec.get("id", ""))
        if RESULTS_FILE.match(item_id):
            items.append(Item(index, f"line-{index + 1}", {}, f"{where}: id {item_id!r} is the name of a results "
                                                              "file; choose another id"))
            continue
        if not ID_PATTERN.match(item_id):
            items.append(Item(index, f"line-{index + 1}", {}, f"{where}: expected an \"id\" of letters, digits, "
                                                              f"'.', '_' or '-' (max 128), got {item_id!r}"))
            continue
        if item_id in seen:  # recorded under its line, so the first item's result stays the one under the id
            items.append(Item(index, f"line-{index + 1}", {}, f"{where}: duplicate id {item_id!r} (first on line "
                                                              f"{seen[item_id] + 1}); this line is not processed"))
            continue
        seen[item_id] = index
        item = Item(index, item_id, spec)
        given = [key for key in SOURCES if key in spec]
        if len(given) != 1:
            item.error = f"{where}: expected exactly one of {', '.join(SOURCES)}, got {given or 'none'}"
        items.append(item)
    return items


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def prepare(item: Item, model: InferenceModel, base: Path, asr_model: str | None) -> None:
    """Fill item.cond from its text, audio or tokens (and participant inputs), or item.error with the reason."""
    cfg, spec = model.cfg, item.spec
    started = time.perf_counter()
    try:
        item.seed = int(spec.get("seed", cfg.sample.seed))
        if "identity" in spec and not isinstance(spec["identity"], str):
            raise ValueError(f"identity: expected a name, got {spec['identity']!r}")
        item.model = model.with_identity(spec["identity"]) if "identity" in spec else model
        if "text" in spec:
            if not isinstance(spec["text"], str):
                raise ValueError(f"text: expected a string, got {type(spec['text']).__name__}")
            rate = float(spec.get("rate", 1.0))
            check_text_length(spec["text"], rate, cfg)
            tokens = tokens_for_text(model, spec["text"], rate=rate, pause_scale=float(spec.get("pause_scale", 1.0)),
                                     seed=item.seed)
        elif "audio" in spec:
            tokens = tokens_from_audio(_resolve(base, spec["audio"]), asr_model, cfg.data.token_fps, cfg.mel.frame_rate,
                                       max_seconds=cfg.sample.max_input_seconds)
        else:
            tokens = tokens_from_file(_resolve(base, spec["tokens"]), cfg.data.token_fps, cfg.mel.frame_rate)
        check_duration(tokens.shape[0], cfg, next(key for key in SOURCES if key in spec))
        participant = {}
        if "participant_tokens" in spec:
            participant["participant_tokens"] = tokens_from_file(_resolve(base, spec["participant_tokens"]),
                                                                 cfg.data.token_fps, cfg.mel.frame_rate)
        if "participant_features" in spec:
            participant["participant_features"] = participant_features_from_file(
                _resolve(base, spec["participant_features"]), cfg)
        item.cond = conditioning(item.model, tokens, **participant)
    except (ValueError, TypeError, OSError, EOFError, RuntimeError) as error:  # TypeError: e.g. "seed": [1]
        item.error = str(error) or type(error).__name__
    item.timings["prepare_s"] = round(time.perf_counter() - started, 4)


class ResultsLog:
    """The job's results file: one JSON line per finished item, flushed and synced as it is written."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None):
        self.path = out_dir / results_name(shard)
        self.recorded = {}
        for path in sorted(out_dir.glob("results*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write: that item is simply done again
                self.recorded[entry["id"]] = entry

    def record(self, entry: dict) -> None:
        with reporting_disk_errors(self.path), open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.recorded[entry["id"]] = entry


def run_batch(model: InferenceModel, items_path: str | Path, out_dir: str | Path, *,
              shard: tuple[int, int] | None = None, face_decoder: FaceDecoder | CodecAvatar | None = None,
              identity_faces: bool = False, asr_model: str | None = None, retry_errors: bool = False,
              progress: bool = True) -> dict[str, int]:
    """Process the manifest with the model (and its vocoder); returns counts of ok, error and skipped items.
    Videos show `face_decoder`, or with `identity_faces` each item's identity's own (an export's per-identity
    avatars); neither: no video.
    Raises FolderInUseError when another job writes this folder's results file, DiskError when the disk is full
    or read-only."""
    out_dir = Path(out_dir)
    with hold_folder(out_dir, f".{results_name(shard)}.lock"):
        return _run_locked(model, items_path, out_dir, shard, face_decoder, identity_faces, asr_model, retry_errors,
                           progress)


def _retried(previous: dict, retry_errors: bool) -> bool:
    return previous["status"] != "ok" and (retry_errors or previous.get("cause") in RETRIED_CAUSES)


def _run_locked(model: InferenceModel, items_path: str | Path, out_dir: Path, shard: tuple[int, int] | None,
                face_decoder: FaceDecoder | CodecAvatar | None, identity_faces: bool, asr_model: str | None,
                retry_errors: bool, progress: bool) -> dict[str, int]:
    for stale in out_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale)
    results = ResultsLog(out_dir, shard)
    items = read_items(items_path, shard)
    counts = {"ok": 0, "error": 0, "skipped": 0}
    pending = []
    for item in items:
        previous = results.recorded.get(item.id)
        if previous is not None and not _retried(previous, retry_errors):
            counts["skipped"] += 1
        elif item.error is None and (out_dir / item.id).is_dir():
            # Renamed into place but not recorded (stopped in between): the folder is complete.
            results.record({"id": item.id, "status": "ok", "outputs": _listing(out_dir, item.id),
                            "timings": {}, "recovered": True})
            counts["ok"] += 1
        else:
            pending.append(item)
    base = Path(items_path).parent
    bar = tqdm(total=len(pending), desc="infer", unit="item", disable=not progress)
    for first in range(0, len(pending), ITEMS_PER_ROUND):
        round_items = pending[first:first + ITEMS_PER_ROUND]
        for item in round_items:
            if item.error is None:
                prepare(item, model, base, asr_model)
        good = [item for item in round_items if item.error is None]
        generated = {}
        if good:
            started = time.perf_counter()
            samples = generate_batch(model, [item.cond for item in good], model.cfg.sample,
                                     [item.seed for item in good], [item.model for item in good])
            generated = dict(zip((item.id for item in good), samples))
            share = (time.perf_counter() - started) / len(good)  # the batches are shared: each item's share
            for item in good:
                item.timings["sample_s"] = round(share, 4)
        for item in round_items:
            stop = None
            if item.error is None:
                face = item.model.face_decoder if identity_faces else face_decoder
                stop = _write_item(item, generated[item.id], model, out_dir, face)
            entry = {"id": item.id, "status": "error" if item.error else "ok", "timings": item.timings}
            if item.error:
                entry["error"], entry["cause"] = item.error, item.cause
                log.warning("item %s: %s", item.id, item.error)
            else:
                entry["outputs"] = _listing(out_dir, item.id)
                seconds = item.cond.shape[0] / model.cfg.mel.frame_rate
                entry["audio_seconds"] = round(seconds, 3)
                entry["real_time_factor"] = round(sum(item.timings.values()) / seconds, 5)  # wall s per s of audio
            results.record(entry)
            counts[entry["status"]] += 1
            bar.update(1)
            if stop is not None:
                bar.close()
                raise stop
    bar.close()
    return counts


def _listing(out_dir: Path, item_id: str) -> list[str]:
    return sorted(str(path.relative_to(out_dir)) for path in (out_dir / item_id).iterdir())


def _write_item(item: Item, generated, model: InferenceModel, out_dir: Path, face_decoder) -> DiskError | None:
    """Write the item's outputs, or set its error (cause "output"); returns the DiskError that stops the job
    when the disk is full or read-only."""
    started = time.perf_counter()
    staging = out_dir / f"{STAGING_PREFIX}{item.id}"
    full_disk = None
    try:
        write_outputs(generated, staging, item.id, model.cfg, model.vocoder, face_decoder, plot=False)
        final = out_dir / item.id
        if final.exists():
            shutil.rmtree(final)  # an unrecorded earlier attempt (retry of a failed item)
        staging.rename(final)
    except (ValueError, OSError, RuntimeError) as error:
        full_disk = disk_error(out_dir / item.id, error)
        item.error, item.cause = f"writing outputs: {full_disk or error}", "output"
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    item.timings["write_s"] = round(time.perf_counter() - started, 4)
    return full_disk
