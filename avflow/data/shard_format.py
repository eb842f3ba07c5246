"""The packed shard format (shards/README.md): file and member names, stream dtypes, sample encoding with its
checksum, and the manifest. Packing (avflow.data.pack) writes it; verification (avflow.data.verify) and the
loader's index (avflow.data.shard_index) read it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from avflow.config import DEFAULT_IDENTITY

FORMAT = "avflow-shards-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
CHUNK_SEPARATOR = "__c"  # webdataset cuts keys at the first dot, so chunk keys use no dot
STORED_DTYPES = {  # stream -> dtype inside the tar; float16 where its rounding is far below the data's noise
    "mel": np.float16,
    "expression": np.float16,
    "pose": np.float32,  # the quaternion's w sits near 1 and moves by less than float16's step there
    "tokens": np.float16,
    "expression_valid": np.bool_,
    "participant_tokens": np.float16,
    "participant_features": np.float16,
    "participant_mel": np.float16,
}
REQUIRED_STREAMS = ("mel", "expression", "pose", "tokens")
OPTIONAL_STREAMS = ("participant_tokens", "participant_features", "participant_mel")
# Each sample's header records this digest of every .npy member's bytes, which the loader checks on the
# bytes it reads anyway; shards packed before it existed carry none and are repacked by the next pack.
SAMPLE_CHECKSUM = "sha256"
# A multi-source pack's sample keys are IDENTITY-SEGMENT, so equal segment names of two roots stay apart; a
# single-source pack keeps the segment names as keys, as before identities existed.
IDENTITY_SEPARATOR = "-"


def shard_file_name(name: str, split: str, index: int) -> str:
    return f"{name}-{split}-{index:06d}.tar"


def sample_key(segment: str, chunk: int, chunks: int) -> str:
    """`segment` for a segment stored whole, `segment__c000`, `segment__c001`, ... for one stored in chunks."""
    return segment if chunks == 1 else f"{segment}{CHUNK_SEPARATOR}{chunk:03d}"


def encode_sample(segment: str, chunk: int, chunks: int, start: int, arrays: dict[str, np.ndarray], *,
                  frame_rate: float, layout: str, split: str, identity: str) -> dict[str, bytes]:
    """One sample's tar members: KEY.STREAM.npy per stream and the KEY.json header, which records the sample's
    identity and the sha256 of every .npy member."""
    key = sample_key(segment, chunk, chunks)
    frames = arrays["mel"].shape[0]
    members = {}
    for stream, values in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        members[f"{key}.{stream}.npy"] = buffer.getvalue()
    header = {"segment": segment, "chunk": chunk, "chunks": chunks, "start_frame": start, "frames": frames,
              "frame_rate": frame_rate, "layout": layout, "split": split, "identity": identity,
              "streams": sorted(arrays),
              SAMPLE_CHECKSUM: {stream: hashlib.sha256(members[f"{key}.{stream}.npy"]).hexdigest()
                                for stream in sorted(arrays)}}
    members[f"{key}.json"] = json.dumps(header, sort_keys=True).encode()
    return members


def add_members(tar: tarfile.TarFile, members: dict[str, bytes]) -> None:
    """Append members in sorted order with fixed metadata, so equal input gives equal bytes."""
    for member in sorted(members):
        info = tarfile.TarInfo(member)
        info.size = len(members[member])
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(members[member]))


def iter_shard_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member suffix: bytes}) per sample of a shard, checking that each sample's members are contiguous."""
    seen: set[str] = set()
    key, members = None, {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                raise ValueError(f"member {info.name!r} is not a regular file")
            member_key, dot, suffix = info.name.partition(".")
            if not dot or not suffix:
                raise ValueError(f"member {info.name!r} has no '.suffix' (expected KEY.STREAM.npy or KEY.json)")
            if member_key != key:
                if key is not None:
                    yield key, members
                if member_key in seen:
                    raise ValueError(f"sample {member_key!r} is split into non-contiguous members")
                seen.add(member_key)
                key, members = member_key, {}
            members[suffix] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def load_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `shard_dir/manifest.json`, checking that it is an avflow shard manifest."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (expected the output folder of `avflow pack`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}); expected an {FORMAT} manifest") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {found!r}")
    missing = [key for key in ("dims", "frame_rate", "splits", "stats") if key not in manifest]
    missing += [f"splits.{split}" for split in SPLITS if split not in manifest.get("splits", {})]
    if missing:
        raise ValueError(f"{path}: manifest lacks {', '.join(missing)}")
    if "identities" in manifest and not _well_formed_identities(manifest["identities"]):
        raise ValueError(f"{path}: identities: expected {{name: {{\"segments\", \"hours\", \"stats\"}}}} for at "
                         f"least one identity, got {json.dumps(manifest['identities'])[:200]}")
    return manifest


def _well_formed_identities(listed: Any) -> bool:
    """Whether a manifest's "identities" maps at least one name to an entry with segments, hours and stats."""
    return isinstance(listed, dict) and bool(listed) and all(
        isinstance(entry, dict) and all(isinstance(entry.get(key), dict) for key in ("segments", "hours", "stats"))
        for entry in listed.values())


def sample_identity(header: dict[str, Any]) -> str:
    """The identity a sample header records; samples packed before identities existed are DEFAULT_IDENTITY's."""
    return header.get("identity", DEFAULT_IDENTITY)


def identities(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's identities, sorted by name: {name: {"segments": {split: n}, "hours": {split: h}, "stats"}},
    with "stats" in the format of the top-level "stats" (train split). A manifest written before identities
    existed describes one identity, DEFAULT_IDENTITY, holding every segment, with the top-level stats."""
    if "identities" in manifest:
        return {name: manifest["identities"][name] for name in sorted(manifest["identities"])}
    splits = manifest["splits"]
    return {DEFAULT_IDENTITY: {"segments": {split: splits[split].get("segments", 0) for split in SPLITS},
                               "hours": {split: splits[split].get("hours", 0.0) for split in SPLITS},
                               "stats": manifest["stats"]}}
