"""The images a model learned from, kept in its run bundle so an evaluation elsewhere can leave them out.

Public chest X-ray collections are assembled from one another, so "external" test sets often contain the very
radiographs a model trained on, resized or re-encoded on the way. Scored on them, the model looks better than it
is. Every run bundle therefore holds a fingerprint of each training and valid image (`SEEN_FILE`): the sha256 of
the original file and the perceptual hash and thumbnail that `cxr_fast.data.dedup` uses to find near copies. The
check then works without the training images themselves, which a shared bundle does not carry.

The fingerprints are of the image as the model reads it (the manifest's cached copy when there is one); the
near-copy test is measured on resized and re-encoded copies (see `cxr_fast.data.dedup`), so a copy at another
resolution is still found. Crops and burnt-in annotations are not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_fast.data.cache import FINGERPRINT_DECODE_SIDE
from cxr_fast.data.dedup import HASH_SIDE, Fingerprint, near_pairs_across, perceptual_hash, thumbnail_of
from cxr_fast.data.io import read_image
from cxr_fast.data.manifest import image_column, read_manifest
from cxr_fast.errors import CxrFastError, read_tensors
from cxr_fast.outputs import write_tensors

SEEN_FILE = "seen_images.safetensors"
SEEN_SPLITS = ("train", "valid")  # valid images choose the kept epoch and the temperature: seen too


def manifest_fingerprints(items: pd.DataFrame) -> list[Fingerprint]:
    """Fingerprints of manifest rows: the manifest's sha256 of the original file, the hash of the image read."""
    out = []
    for sha256, file in zip(items["sha256"], image_column(items), strict=True):
        thumbnail = thumbnail_of(read_image(file, max_side=FINGERPRINT_DECODE_SIDE))  # as prepare fingerprints
        out.append(Fingerprint(sha256=sha256, phash=perceptual_hash(thumbnail), thumbnail=thumbnail.tobytes()))
    return out


def seen_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows a model trained on this manifest has seen."""
    return manifest[manifest["split"].isin(SEEN_SPLITS)]


def write_seen(run_dir: Path, manifest: pd.DataFrame) -> int:
    """Store the fingerprints of the manifest's train and valid images in the bundle; returns how many."""
    fingerprints = manifest_fingerprints(seen_rows(manifest))

    def as_bytes(values: list[bytes], width: int) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), width).copy())

    write_tensors({
        "sha256": as_bytes([bytes.fromhex(f.sha256) for f in fingerprints], 32),
        "phash": as_bytes([bytes.fromhex(f.phash) for f in fingerprints], 32),
        "thumbnail": as_bytes([f.thumbnail for f in fingerprints], HASH_SIDE * HASH_SIDE),
    }, run_dir / SEEN_FILE)
    return len(fingerprints)


def read_seen(run_dir: Path) -> list[Fingerprint] | None:
    """The bundle's fingerprints, or None for a bundle made before they were stored."""
    path = run_dir / SEEN_FILE
    if not path.is_file():
        return None
    tensors = read_tensors(path, "list of seen images")
    try:
        rows = zip(tensors["sha256"].numpy(), tensors["phash"].numpy(), tensors["thumbnail"].numpy(), strict=True)
        return [Fingerprint(sha256=s.tobytes().hex(), phash=p.tobytes().hex(), thumbnail=t.tobytes()) for s, p, t in rows]
    except (KeyError, ValueError, OSError) as e:
        raise CxrFastError(f"{path}: not a readable list of seen images ({e})") from None


def seen_fingerprints(run_dir: Path, train_data: str | Path) -> list[Fingerprint] | None:
    """From the bundle; for an older bundle, from its training manifest `train_data` when that is at hand;
    else None."""
    stored = read_seen(run_dir)
    if stored is not None:
        return stored
    try:
        train_manifest = read_manifest(train_data)
    except CxrFastError:  # moved or deleted: a shared bundle without its data
        return None
    return manifest_fingerprints(seen_rows(train_manifest))


def match_seen(items: pd.DataFrame, seen: list[Fingerprint]) -> pd.Series:
    """For each row of `items`: "identical" (same file bytes as a seen image), "near copy", or "" (new)."""
    new = manifest_fingerprints(items)
    seen_sha256 = {f.sha256 for f in seen}
    match = np.array(["identical" if f.sha256 in seen_sha256 else "" for f in new], dtype=object)
    # Only pairs across the two lists: near_pairs(seen + new) also compared every pair within the training images,
    # most of the work when a model trained on many images is checked against a few.
    near = near_pairs_across(seen, new)[:, 1]
    match[near[match[near] == ""]] = "near copy"
    return pd.Series(match, index=items.index)
