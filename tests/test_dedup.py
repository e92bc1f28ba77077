"""Duplicate detection: copies survive resizing and re-encoding; different images and phantoms stay apart."""

import io

import numpy as np
from PIL import Image, ImageEnhance

from cxr_fast.data.dedup import (
    Fingerprint,
    file_sha256,
    fingerprint,
    group_duplicates,
    hamming_distance,
    near_pairs,
    perceptual_hash,
    thumbnail_correlation,
    thumbnail_of,
)
from cxr_fast.data.io import read_image


def textured_image(seed: int, width: int = 160, height: int = 128) -> Image.Image:
    """Random detail at four scales (a 1/f-like spectrum, as photographs and radiographs have).

    Not a single smooth blob: in an image with no detail beyond a 6x6 grid, most of the 256 hash bits
    compare near-zero coefficients and flip at any edit, which no real X-ray resembles.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros((height, width))
    for cells, weight in [(4, 1.0), (8, 0.5), (16, 0.25), (32, 0.125)]:
        noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        total += weight * np.asarray(noise.resize((width, height), Image.Resampling.BICUBIC), dtype=float)
    total = (total - total.min()) / (total.max() - total.min()) * 255
    return Image.fromarray(total.astype(np.uint8))


def fingerprint_of(tmp_path, name: str, image: Image.Image, **save_args) -> Fingerprint:
    path = tmp_path / name
    image.save(path, **save_args)
    return fingerprint(path, read_image(path))


def reencoded(image: Image.Image, scale: float, quality: int) -> Image.Image:
    width, height = image.size
    buffer = io.BytesIO()
    image.resize((int(width * scale), int(height * scale)), Image.Resampling.BILINEAR).save(
        buffer, "JPEG", quality=quality
    )
    return Image.open(buffer)


def test_resized_reencoded_copy_groups_with_its_original(tmp_path):
    original = textured_image(0, 400, 320)
    prints = [
        fingerprint_of(tmp_path, "original.png", original),
        fingerprint_of(tmp_path, "small.jpg", reencoded(original, 0.4, 70)),
        fingerprint_of(tmp_path, "brighter.png", ImageEnhance.Brightness(original).enhance(1.1)),
        fingerprint_of(tmp_path, "contrast.png", ImageEnhance.Contrast(original).enhance(1.3)),
        fingerprint_of(tmp_path, "other.png", textured_image(1, 400, 320)),
    ]
    assert len({p.sha256 for p in prints}) == 5  # no byte-identical files here: the pHash must do the work
    assert group_duplicates(prints) == [0, 0, 0, 0, 4]


def test_exact_copies_group_by_sha256_even_without_near_matching(tmp_path):
    image = textured_image(2)
    a = fingerprint_of(tmp_path, "a.png", image)
    b = fingerprint_of(tmp_path, "b.png", image)
    assert a.sha256 == b.sha256 == file_sha256(tmp_path / "a.png")
    assert group_duplicates([a, b], threshold=-1) == [0, 0]


def test_different_images_do_not_group(tmp_path):
    prints = [fingerprint_of(tmp_path, f"{seed}.png", textured_image(seed)) for seed in range(40)]
    assert group_duplicates(prints) == list(range(40))


def test_different_phantoms_do_not_group():
    # Phantoms share one anatomy: the case where a plain 64-bit pHash confuses different images.
    from cxr_fast.data.synth import make_phantom

    images = [
        Image.fromarray(make_phantom(label, i, size=128)[0])
        for label in ("Normal", "COVID-19")
        for i in range(15)
    ]
    prints = []
    for i, image in enumerate(images):
        thumb = image.resize((32, 32), Image.Resampling.BOX)
        prints.append(Fingerprint(str(i), perceptual_hash(image), thumb.tobytes()))
    assert len(near_pairs(prints)) == 0
    # ... while a re-encoded phantom is still found
    copy = reencoded(images[0], 0.5, 75).convert("L")
    prints.append(
        Fingerprint("copy", perceptual_hash(copy), copy.resize((32, 32), Image.Resampling.BOX).tobytes())
    )
    assert near_pairs(prints).tolist() == [[0, 30]]


def test_groups_are_transitive():
    # A~B and B~C (but not A~C directly) still makes one group: union-find over all near pairs.
    thumbnail = bytes(range(256)) * 4
    a = "0" * 64
    b = "f" * 10 + "0" * 54  # 40 bits from a
    c = "f" * 20 + "0" * 44  # 40 bits from b, 80 from a
    d = "f" * 64
    assert hamming_distance(a, b) == 40 and hamming_distance(b, c) == 40 and hamming_distance(a, c) == 80
    prints = [Fingerprint(str(i), h, thumbnail) for i, h in enumerate([c, d, a, b])]
    assert near_pairs(prints).tolist() == [[0, 3], [2, 3]]
    assert group_duplicates(prints) == [0, 1, 0, 0]


def test_thumbnail_correlation_vetoes_hash_collisions():
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    prints = [Fingerprint("a", "0" * 64, ramp.tobytes()), Fingerprint("b", "0" * 64, ramp.T.copy().tobytes())]
    assert thumbnail_correlation(prints[0].thumbnail, prints[1].thumbnail) < 0.1
    assert group_duplicates(prints) == [0, 1]


def test_near_pairs_handles_tiny_inputs():
    assert near_pairs([]).shape == (0, 2)
    assert group_duplicates([]) == []


def test_near_pairs_is_the_same_in_any_block_size():
    # more images than one block (256 rows) is the usual case: pairs across and within blocks must all be found
    thumbnail = bytes(range(256)) * 4
    a, b, c, d = "0" * 64, "f" * 10 + "0" * 54, "f" * 20 + "0" * 44, "f" * 64
    prints = [Fingerprint(str(i), h, thumbnail) for i, h in enumerate([c, d, a, b, d, a])]
    # within 48 bits: c~b, a~b, a~a; d~d; (c~a is 80 bits)
    expected = [[0, 3], [1, 4], [2, 3], [2, 5], [3, 5]]
    for block in (1, 2, 4, 256):
        assert near_pairs(prints, block=block).tolist() == expected, block


def test_threshold_is_the_largest_distance_still_near():
    thumbnail = bytes(range(256)) * 4
    base = "0" * 64
    at = "f" * 12 + "0" * 52  # 48 bits
    beyond = "f" * 12 + "8" + "0" * 51  # 49 bits
    assert hamming_distance(base, at) == 48 and hamming_distance(base, beyond) == 49
    prints = [Fingerprint(str(i), h, thumbnail) for i, h in enumerate([base, at, beyond])]
    assert near_pairs(prints).tolist() == [[0, 1], [1, 2]]
    assert group_duplicates(prints[::2]) == [0, 1]
    # threshold 0: equal hashes only (still near-copy detection; below 0 it is off)
    same_hash = [Fingerprint("x", base, thumbnail), Fingerprint("y", base, thumbnail)]
    assert group_duplicates(same_hash, threshold=0) == [0, 0]
    assert group_duplicates(same_hash, threshold=-1) == [0, 1]


def test_perceptual_hash_is_the_sign_of_the_low_dct_frequencies_against_their_median():
    from scipy.fft import dctn

    image = textured_image(3, 32, 32)
    coefficients = dctn(np.asarray(image, dtype=np.float64), norm="ortho")[:16, :16].ravel()
    bits = coefficients > np.median(coefficients[1:])  # the DC term left out of the median
    assert perceptual_hash(image) == np.packbits(bits).tobytes().hex()


def test_thumbnail_averages_every_source_pixel():
    # BOX: each thumbnail pixel is the mean of its block, so a copy at another resolution gives the same thumbnail
    pixels = np.random.default_rng(4).integers(0, 256, (96, 64)).astype(np.uint8)
    expected = pixels.reshape(32, 3, 32, 2).mean(axis=(1, 3))
    thumbnail = np.asarray(thumbnail_of(Image.fromarray(pixels)), dtype=np.float64)
    assert np.abs(thumbnail - expected).max() < 1  # Pillow averages in fixed point: within one grey level



def phantom_prints(n: int = 40) -> list[Fingerprint]:
    """Phantoms of one anatomy, every fifth a re-encoded copy of the one before: many pairs pass the hash test and
    correlate close to any threshold, where a shortcut in the thumbnail test would show."""
    from cxr_fast.data.synth import make_phantom

    images = []
    for i in range(n):
        image = Image.fromarray(make_phantom(("Normal", "COVID-19")[i % 2], i // 2, size=96)[0])
        images.append(reencoded(images[-1], 0.6, 70).convert("L") if i % 5 == 4 else image)
    thumbnails = [thumbnail_of(image) for image in images]
    return [Fingerprint(str(i), perceptual_hash(t), t.tobytes()) for i, t in enumerate(thumbnails)]


def near_pairs_and_correlated(monkeypatch, prints, *args) -> tuple[list, int]:
    """near_pairs' result, and how many pairs it correlated in full."""
    from cxr_fast.data import dedup

    correlated = []
    exact = dedup._correlations
    monkeypatch.setattr(dedup, "_correlations", lambda a, b, i, j: correlated.append(len(i)) or exact(a, b, i, j))
    return near_pairs(prints, *args).tolist(), sum(correlated)


def test_the_reduced_thumbnail_bound_drops_no_pair_the_exact_test_keeps(monkeypatch):
    from cxr_fast.data import dedup

    prints = phantom_prints()
    for threshold, min_correlation in ((48, 0.99), (80, 0.97), (104, 0.95), (128, 0.9)):
        found, bounded = near_pairs_and_correlated(monkeypatch, prints, threshold, min_correlation)
        with monkeypatch.context() as patch:
            patch.setattr(dedup, "_REDUCED_MARGIN", np.inf)  # no bound: every candidate correlated, as before it
            unbounded, candidates = near_pairs_and_correlated(patch, prints, threshold, min_correlation)
        assert found == unbounded
        if min_correlation > 0.9:
            assert bounded < candidates  # 8 of 58 candidates at the defaults (the 8 copies), 630 of 780 at 0.95
    assert len(near_pairs(prints)) == 8 and len(near_pairs(prints, 104, 0.95)) > 200  # and some pairs lie near 0.95


def test_pairs_across_two_lists_are_those_of_both_joined_and_only_they_are_compared(monkeypatch):
    from cxr_fast.data import dedup
    from cxr_fast.data.dedup import near_pairs_across

    prints = phantom_prints()
    first, second = prints[:17], prints[17:]
    joined = near_pairs(first + second, 104, 0.95)
    across = joined[(joined[:, 0] < 17) & (joined[:, 1] >= 17)] - [0, 17]
    assert len(across) > 3
    compared = []
    count = dedup._popcount64
    monkeypatch.setattr(dedup, "_popcount64", lambda values: compared.append(values.size) or count(values))
    assert near_pairs_across(first, second, 104, 0.95).tolist() == across.tolist()
    assert sum(compared) == 17 * 23 * 4  # each pair across once, 4 hash words each; none within a list
    assert near_pairs_across([], second).shape == near_pairs_across(first, []).shape == (0, 2)


def test_a_pair_at_the_correlation_threshold_whose_whole_difference_the_bound_sees_is_kept():
    # Thumbnails constant on 2x2 squares: the reduced thumbnails keep all of their difference, so the bound has no
    # slack, and a pair correlating at exactly min_correlation sits on it (only float rounding either side).
    from cxr_fast.data.dedup import _correlations, _standardised

    rng = np.random.default_rng(3)
    for _ in range(20):
        coarse = rng.integers(0, 200, (16, 16))
        other = coarse + rng.integers(0, 40, (16, 16))
        a, b = (np.kron(x, np.ones((2, 2))).astype(np.uint8).tobytes() for x in (coarse, other))
        rows = _standardised([a, b])
        at = float(_correlations(rows, rows, np.array([0]), np.array([1]))[0])
        prints = [Fingerprint("a", "0" * 64, a), Fingerprint("b", "0" * 64, b)]
        assert near_pairs(prints, min_correlation=at).tolist() == [[0, 1]]
        assert near_pairs(prints, min_correlation=np.nextafter(np.float32(at), np.float32(2))).tolist() == []
