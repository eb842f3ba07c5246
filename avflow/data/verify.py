"""`avflow pack --verify`: re-read every shard a manifest lists and check it against the manifest and the format."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from avflow.data.shard_format import (
    MANIFEST,
    REQUIRED_STREAMS,
    SAMPLE_CHECKSUM,
    SPLITS,
    STORED_DTYPES,
    identities,
    iter_shard_samples,
    load_manifest,
    sample_identity,
    sample_key,
)
from avflow.utils import file_sha256


def verify(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Re-read every shard of the manifest: size, sha256, tar structure, member dims and counts, per split and
    per identity.

    Returns per-split totals; raises ValueError naming every bad shard and why.
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    summary: dict[str, Any] = {"shards": 0, "samples": 0, "frames": 0}
    problems = []
    for split in SPLITS:
        totals = {"shards": 0, "samples": 0, "frames": 0}
        per_identity: dict[str, Counter] = {}  # name -> its segments and frames in this split's shards
        for entry in manifest["splits"][split]["shards"]:
            path = shard_dir / entry["file"]
            try:
                samples, frames = _verify_shard(path, entry, manifest["dims"], per_identity)
            except (ValueError, OSError, tarfile.TarError) as error:
                problems.append(f"{path}: {error}")
                continue
            totals["shards"] += 1
            totals["samples"] += samples
            totals["frames"] += frames
        for key in ("samples", "frames"):
            if not problems and totals[key] != manifest["splits"][split][key]:
                problems.append(f"{shard_dir / MANIFEST}: split {split} lists {manifest['splits'][split][key]} "
                                f"{key}, its shards hold {totals[key]}")
        if not problems:
            problems += _identity_problems(shard_dir / MANIFEST, manifest, split, per_identity)
        totals["hours"] = totals["frames"] / manifest["frame_rate"] / 3600.0
        summary[split] = totals
        for key in ("shards", "samples", "frames"):
            summary[key] += totals[key]
    if problems:
        raise ValueError(f"{shard_dir}: {len(problems)} bad shard(s):\n" + "\n".join(problems))
    return summary


def _identity_problems(manifest_path: Path, manifest: dict[str, Any], split: str,
                       found: dict[str, Counter]) -> list[str]:
    """Where the manifest's per-identity segments and hours of `split` differ from what the shards hold."""
    listed = identities(manifest)
    problems = [f"{manifest_path}: split {split} holds samples of identity {name!r}, which the manifest does not list"
                for name in sorted(set(found) - set(listed))]
    for name, entry in listed.items():
        counts = found.get(name, Counter())
        hours = counts["frames"] / manifest["frame_rate"] / 3600.0
        if counts["segments"] != entry["segments"][split]:
            problems.append(f"{manifest_path}: identity {name!r} lists {entry['segments'][split]} {split} segments, "
                            f"its shards hold {counts['segments']}")
        elif not math.isclose(hours, entry["hours"][split], rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"{manifest_path}: identity {name!r} lists {entry['hours'][split]} {split} hours, its "
                            f"shards hold {hours}")
    return problems


def _verify_shard(path: Path, entry: dict[str, Any], dims: dict[str, int],
                  per_identity: dict[str, Counter]) -> tuple[int, int]:
    """(samples, frames) of one shard, adding each identity's segments and frames to `per_identity`; or
    ValueError/OSError saying what is wrong with the shard."""
    if not path.is_file():
        raise ValueError("file missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ValueError(f"size {size} bytes; the manifest expects {entry['bytes']}")
    if file_sha256(path) != entry["sha256"]:
        raise ValueError("sha256 differs from the manifest (file changed or corrupted)")
    samples = frames = 0
    counts: dict[str, Counter] = {}
    for key, members in iter_shard_samples(path):
        header = _sample_header(key, members)
        sample_frames = _verify_sample(key, header, members, dims)
        identity = counts.setdefault(sample_identity(header), Counter())
        identity["segments"] += header["chunk"] == 0
        identity["frames"] += sample_frames
        frames += sample_frames
        samples += 1
    if (samples, frames) != (entry["samples"], entry["frames"]):
        raise ValueError(f"holds {samples} samples / {frames} frames; the manifest expects "
                         f"{entry['samples']} / {entry['frames']}")
    for name, count in counts.items():
        per_identity.setdefault(name, Counter()).update(count)
    return samples, frames


def _sample_header(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    if "json" not in members:
        raise ValueError(f"sample {key}: no {key}.json header")
    header = json.loads(members["json"])
    if not isinstance(header, dict):
        raise ValueError(f"sample {key}: {key}.json is not a JSON object")
    if not isinstance(sample_identity(header), str):
        raise ValueError(f"sample {key}: identity {header['identity']!r}; expected a name")
    return header


def _verify_sample(key: str, header: dict[str, Any], members: dict[str, bytes], dims: dict[str, int]) -> int:
    """The sample's frame count, after checking its header and every array's dtype and shape."""
    segment, chunk, chunks = header.get("segment"), header.get("chunk"), header.get("chunks")
    if not (isinstance(segment, str) and isinstance(chunk, int) and isinstance(chunks, int)
            and key == sample_key(segment, chunk, chunks)):
        raise ValueError(f"sample {key}: header names segment {segment!r} chunk {chunk!r} of {chunks!r}, "
                         f"which gives a different key")
    frames = header.get("frames")
    streams = set(header.get("streams", []))
    missing = [stream for stream in REQUIRED_STREAMS if stream not in streams or f"{stream}.npy" not in members]
    missing += [stream for stream in streams if f"{stream}.npy" not in members]
    if missing:
        raise ValueError(f"sample {key}: missing {', '.join(sorted(set(missing)))}")
    digests = header.get(SAMPLE_CHECKSUM, {})
    for stream in sorted(streams):
        if stream in digests and hashlib.sha256(members[f"{stream}.npy"]).hexdigest() != digests[stream]:
            raise ValueError(f"sample {key}: {stream} bytes differ from their {SAMPLE_CHECKSUM} recorded at pack time")
        values = np.load(io.BytesIO(members[f"{stream}.npy"]), allow_pickle=False)
        expected_shape = (frames,) if stream == "expression_valid" else (frames, dims.get(stream))
        expected_dtype = np.dtype(STORED_DTYPES.get(stream, values.dtype))
        if values.shape != expected_shape or values.dtype != expected_dtype:
            raise ValueError(f"sample {key}: {stream} is {values.dtype} {values.shape}; expected "
                             f"{expected_dtype} {expected_shape}")
    return frames
