"""Find duplicate images: exact copies (same bytes) and near copies (resized, re-encoded, re-exposed).

Public X-ray collections are assembled from other collections, so the same radiograph often appears twice,
sometimes under two labels. A copy in the training split and another in the test split inflates every
score, so duplicates are grouped here and `split` keeps each group in one split.

Each image gets a `Fingerprint`:

- ``sha256`` of the file bytes: equal bytes are always one group.
- ``phash``: a 256-bit DCT perceptual hash. The image is shrunk to 32x32, its 2-D DCT taken, and the 16x16
  lowest frequencies compared with their median; resizing and re-encoding leave those, and so most bits,
  unchanged.
- ``thumbnail``: that 32x32 image itself (1,024 bytes).

Two images are near copies when their hashes differ in at most ``threshold`` bits (default 48 of 256) AND
their thumbnails correlate at ``min_correlation`` or more (default 0.99). Groups are the connected components
(union-find): A~B and B~C puts A, B and C together.

Why two tests, and 256 bits rather than the classic 64: chest X-rays share one layout (bright mediastinum,
dark lungs, shoulders), and synthetic phantoms even more so, which makes their low frequencies alike.
Measured on cxr-dev (886 distinct radiographs) and 300 phantoms from `synth`, against copies of 100 images
each (resized to 60% + JPEG q70, gamma 0.8, contrast x1.3):

- 64-bit pHash: 22 pairs of *different* radiographs within 6 bits (13 across labels, which would have been
  excluded as label conflicts), while copies were up to 6 bits apart. No threshold separates them.
- 256-bit pHash: distinct radiographs >= 56 bits apart, but distinct phantoms down to 24, and copies up to
  38 bits apart. Good enough to pick candidates, not to decide.
- 32x32 thumbnail correlation: copies >= 0.994; distinct radiographs <= 0.959, distinct phantoms <= 0.981.

Not detected: crops and burnt-in annotations (they move both measures as far as a different image does).
Images with no detail finer than a few blobs have mostly near-zero DCT coefficients whose bits flip at
any edit; radiographs and phantoms have plenty of detail, a featureless gradient does not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

HASH_SIDE = 32  # images are reduced to this (the thumbnail) before the DCT
HASH_FREQUENCIES = 16  # 16x16 low frequencies -> 256 bits
HASH_BITS = HASH_FREQUENCIES**2
DEFAULT_THRESHOLD = 48
DEFAULT_MIN_CORRELATION = 0.99


@dataclass(frozen=True)
class Fingerprint:
    sha256: str  # of the file bytes, 64 hex digits
    phash: str  # 256-bit perceptual hash, 64 hex digits
    thumbnail: bytes  # 32x32 uint8 grayscale, row-major


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike, image: Image.Image) -> Fingerprint:
    """Fingerprint of a file and its decoded image (see `cxr_fast.data.io.read_image`)."""
    thumbnail = thumbnail_of(image)
    return Fingerprint(
        sha256=file_sha256(path), phash=perceptual_hash(thumbnail), thumbnail=thumbnail.tobytes()
    )


def thumbnail_of(image: Image.Image) -> Image.Image:
    # BOX averages every source pixel: the thumbnail does not depend on the resolution it came from.
    return image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX, reducing_gap=2.0)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` is the DCT of a length-n signal x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(HASH_SIDE)


def perceptual_hash(image: Image.Image) -> str:
    """256-bit DCT pHash of an image (any mode, any size), as 64 hex digits."""
    small = image if image.size == (HASH_SIDE, HASH_SIDE) and image.mode == "L" else thumbnail_of(image)
    pixels = np.asarray(small, dtype=np.float64)
    frequencies = (_DCT @ pixels @ _DCT.T)[:HASH_FREQUENCIES, :HASH_FREQUENCIES].ravel()
    # The DC term (overall brightness) is left out of the median so a brightness shift cannot flip the
    # comparison of every other coefficient.
    bits = frequencies > np.median(frequencies[1:])
    return np.packbits(bits).tobytes().hex()


def hamming_distance(a: str, b: str) -> int:
    """Number of differing bits between two hashes from `perceptual_hash`."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def thumbnail_correlation(a: bytes, b: bytes) -> float:
    """Pearson correlation of two thumbnails (1.0 for identical up to brightness and contrast)."""
    return float(_standardised([a, b]).prod(axis=0).sum())


def _standardised(thumbnails: Sequence[bytes]) -> np.ndarray:
    """Thumbnails as zero-mean unit-norm float32 rows, so a dot product is a correlation."""
    rows = np.frombuffer(b"".join(thumbnails), dtype=np.uint8).reshape(len(thumbnails), -1).astype(np.float32)
    rows -= rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    # A flat thumbnail correlates with nothing (its row stays zero); identical flat images share a sha256.
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def _hash_words(hashes: Sequence[str]) -> np.ndarray:
    """Hex hashes → uint64 array [n, HASH_BITS // 64] for vectorised XOR + popcount."""
    words = HASH_BITS // 64
    joined = bytes.fromhex("".join(hashes))
    if len(joined) != len(hashes) * words * 8:
        raise ValueError(f"perceptual hashes must be {HASH_BITS // 4} hex digits each")
    return np.frombuffer(joined, dtype=">u8").astype(np.uint64).reshape(len(hashes), words)


def _popcount64(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(*values.shape, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1)


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def near_pairs(
    fingerprints: Sequence[Fingerprint],
    threshold: int = DEFAULT_THRESHOLD,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
    block: int = 256,
) -> np.ndarray:
    """Index pairs (i < j) of near copies, shape [n_pairs, 2], sorted.

    Every pair is compared (exact, no index that could miss one), in blocks of rows: 20,000 images make
    200 million hash comparisons, 2-4 seconds of vectorised XOR + popcount on 2 cores. Only the pairs
    within ``threshold`` bits have their thumbnails correlated.
    """
    if len(fingerprints) < 2:
        return np.empty((0, 2), dtype=np.int64)
    return _near_pairs(fingerprints, fingerprints, threshold, min_correlation, block, same=True)


def near_pairs_across(
    first: Sequence[Fingerprint],
    second: Sequence[Fingerprint],
    threshold: int = DEFAULT_THRESHOLD,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
    block: int = 256,
) -> np.ndarray:
    """Index pairs (i into ``first``, j into ``second``) of near copies, shape [n_pairs, 2], sorted.

    The pairs `near_pairs` of the two lists joined would find across them, with the same test, but only those are
    compared: len(first) x len(second) pairs, not half the square of the total. A model trained on 80,000 films
    checked against 2,000 new ones makes 160 million comparisons instead of 3.4 billion.
    """
    if not len(first) or not len(second):
        return np.empty((0, 2), dtype=np.int64)
    return _near_pairs(first, second, threshold, min_correlation, block, same=False)


def _near_pairs(first, second, threshold: int, min_correlation: float, block: int, same: bool) -> np.ndarray:
    """Near pairs between `first` (rows, `block` at a time) and `second`; `same`: they are one list, and each pair
    is looked at once (only columns j > i)."""
    words, thumbnails = _hash_words([f.phash for f in first]), _standardised([f.thumbnail for f in first])
    other_words, other_thumbnails = (words, thumbnails) if same else (
        _hash_words([f.phash for f in second]), _standardised([f.thumbnail for f in second]))
    reduced = _reduced(thumbnails)
    other_reduced = reduced if same else _reduced(other_thumbnails)
    pairs = [np.empty((0, 2), dtype=np.int64)]
    for start in range(0, len(words), block):
        rows = words[start : start + block]
        first_column = start if same else 0  # within one list, columns before the block's rows were compared already
        distances = np.zeros((len(rows), len(other_words) - first_column), dtype=np.uint16)
        for word in range(words.shape[1]):
            distances += _popcount64(rows[:, word, None] ^ other_words[None, first_column:, word])
        i, j = np.nonzero(distances <= threshold)
        i, j = i + start, j + first_column
        if same:
            keep = j > i
            i, j = i[keep], j[keep]
        similar = _similar(thumbnails, other_thumbnails, reduced, other_reduced, i, j, min_correlation)
        pairs.append(np.stack([i[similar], j[similar]], axis=1).astype(np.int64))
    return np.concatenate(pairs)


# A standardised thumbnail summed over 2x2-pixel squares and halved is its projection onto an orthonormal basis
# (16 x 16 = 256 numbers), and a projection is never longer than the vector: |P(a - b)|^2 <= |a - b|^2 =
# |a|^2 + |b|^2 - 2 a.b <= 2 - 2 a.b (rows of `_standardised` have length 1, or 0). A pair whose projections lie
# further apart than 2 (1 - min_correlation) therefore cannot correlate at min_correlation, and is dropped after
# reading a quarter of the bytes. Alike images make many candidates: 3 % of all pairs of 20,000 phantoms (one
# anatomy) pass the hash test, and correlating them took 14 of `prepare`'s 39 s; under 0.4 % of them pass this
# bound. The margin covers float32 rounding of both sides (the bound's slack came to at most 2e-6 over 3 million
# phantom pairs), so a pair the exact test would keep is never dropped: the pairs found are the same as without it.
_REDUCED_MARGIN = 1e-3


def _reduced(thumbnails: np.ndarray) -> np.ndarray:
    """Standardised thumbnails [n, HASH_SIDE**2] projected onto 2x2-pixel squares: [n, (HASH_SIDE // 2)**2]."""
    side = HASH_SIDE // 2
    return thumbnails.reshape(len(thumbnails), side, 2, side, 2).sum(axis=(2, 4)).reshape(len(thumbnails), -1) / 2


def _similar(thumbnails: np.ndarray, other_thumbnails: np.ndarray, reduced: np.ndarray, other_reduced: np.ndarray,
             i: np.ndarray, j: np.ndarray, min_correlation: float, chunk: int = 8192) -> np.ndarray:
    """Whether thumbnails[i] and other_thumbnails[j] correlate at `min_correlation` or more, pair by pair: the
    exact test (`_correlations`) for the pairs the bound on their reduced thumbnails leaves in."""
    limit = 2 * (1 - min_correlation) + _REDUCED_MARGIN
    out = np.zeros(len(i), dtype=bool)
    for start in range(0, len(i), chunk):
        a, b = i[start : start + chunk], j[start : start + chunk]
        gap = reduced[a] - other_reduced[b]
        close = np.flatnonzero(np.einsum("pk,pk->p", gap, gap) <= limit)
        out[start + close] = _correlations(thumbnails, other_thumbnails, a[close], b[close]) >= min_correlation
    return out


def _correlations(thumbnails: np.ndarray, other_thumbnails: np.ndarray, i: np.ndarray, j: np.ndarray,
                  chunk: int = 8192) -> np.ndarray:
    """Row-wise dot products thumbnails[i] . other_thumbnails[j], in chunks so the gathered rows stay small."""
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), chunk):
        a, b = thumbnails[i[start : start + chunk]], other_thumbnails[j[start : start + chunk]]
        out[start : start + chunk] = np.einsum("pk,pk->p", a, b)
    return out


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving keeps the trees flat
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        root_i, root_j = self.find(i), self.find(j)
        if root_i != root_j:
            # The smaller index becomes the root, so the result does not depend on the order of unions.
            self.parent[max(root_i, root_j)] = min(root_i, root_j)


def group_duplicates(
    fingerprints: Sequence[Fingerprint],
    threshold: int = DEFAULT_THRESHOLD,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
) -> list[int]:
    """Group index per item: exact copies and near copies (see module doc) share one.

    The group index is the smallest item index in the group, so it is deterministic for a given order.
    ``threshold < 0`` turns near-copy detection off (exact copies only).
    """
    sets = UnionFind(len(fingerprints))
    first_with_sha: dict[str, int] = {}
    for index, item in enumerate(fingerprints):
        sets.union(first_with_sha.setdefault(item.sha256, index), index)
    if threshold >= 0:
        for i, j in near_pairs(fingerprints, threshold, min_correlation):
            sets.union(int(i), int(j))
    return [sets.find(i) for i in range(len(fingerprints))]
