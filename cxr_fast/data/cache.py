"""The working-resolution image cache.

Decoding a 2,500 px JPEG takes tens of milliseconds; a model trained at 224 px does that for every image in
every epoch, and on a CPU that, not the network, is the bottleneck. `prepare` therefore decodes each image
once and stores a grayscale PNG whose longest side is ``cache_size`` (never enlarged), and training reads
that instead (`read_image(cache_path or path)`). Measured on 2000x2000 radiograph JPEGs: reading + resizing
to 224 px took 23 ms of CPU per image from the original and 3.4 ms from a 448 px cached PNG (6.6x).

Files are keyed by the cache size and the SHA-256 of the original file, ``CACHE/<size>px/<sha[:2]>/<sha>.png``,
so a second `prepare` into the same folder, or of a dataset sharing images, reuses them instead of decoding again,
and one at another size writes beside the copies the old manifest points to instead of over them (an interrupted
``--size 64 --force`` used to leave the old manifest reading 64 px copies). Copies no manifest uses are removed
once a new one is in place (`remove_unused`). Manifests from before the size folder point to
``CACHE/<sha[:2]>/<sha>.png``; those keep working until prepared again.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cxr_fast.data.dedup import Fingerprint, fingerprint
from cxr_fast.data.inversion import upright_correlation
from cxr_fast.data.io import (
    MIN_SIDE,
    ImageReadError,
    read_image_size_and_colour,
    read_image_with_size,
    shrink_to,
)
from cxr_fast.errors import CxrFastError

CACHE_DIRNAME = "cache"
PNG_COMPRESS_LEVEL = 1
# Huffman coding after PNG's row filters: X-rays are noisy, so LZ77 string matching finds little to gain.
# On cxr-dev images this writes 4x faster than the default (level 6) and the files come out ~3% smaller.
PNG_COMPRESS_TYPE = zlib.Z_HUFFMAN_ONLY
# Without a cache, images are still decoded in full (to catch damage) but at reduced scale where the format
# allows: the fingerprint only needs a 32x32 thumbnail.
FINGERPRINT_DECODE_SIDE = 256


# What `store` writes: a copy, or the partial file of one a kill interrupted. Only these are ever removed, so a
# file of the user's that happens to sit in the folder is left alone.
_COPY_NAME = re.compile(r"\.?(?P<sha>[0-9a-f]{64})\.png(\.\d+\.\d+\.partial)?")


def cache_path_for(cache_dir: str | os.PathLike, sha256: str, cache_size: int) -> Path:
    return Path(cache_dir) / f"{cache_size}px" / sha256[:2] / f"{sha256}.png"


def cached_size(original_size: tuple[int, int], cache_size: int) -> tuple[int, int]:
    """(width, height) of the cached copy of an image of ``original_size``: aspect kept, never enlarged, and the
    short side never below the reader's MIN_SIDE (a 256x210 film cached at 64 became 64x52, which training then
    refused to read)."""
    width, height = original_size
    scale = max(cache_size / max(width, height), MIN_SIDE / min(width, height))
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def store(
    image: Image.Image,
    cache_dir: str | os.PathLike,
    sha256: str,
    cache_size: int,
    original_size: tuple[int, int] | None = None,
) -> Path:
    """Store ``image`` shrunk to ``cache_size`` (unless a matching copy is there); return the cached path.

    ``original_size``: the full-resolution size, when ``image`` was decoded at reduced scale already; it fixes
    the cached size, so it never depends on how the image happened to be decoded.
    """
    path = cache_path_for(cache_dir, sha256, cache_size)
    expected = cached_size(original_size or image.size, cache_size)
    if _is_valid_copy(path, expected):
        return path
    small = shrink_to(image, cache_size)
    if small.size != expected:
        small = image.resize(expected, Image.Resampling.LANCZOS, reducing_gap=3.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: parallel workers may store the same image (exact duplicates), and a reader must
    # never see half a file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        small.save(partial, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_COMPRESS_TYPE)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # only left behind when saving failed (a full disk, say)
    return path


def _is_valid_copy(path: Path, expected_size: tuple[int, int]) -> bool:
    """A cached file is reused only when it decodes completely as an 8-bit grayscale PNG of the expected size.

    The size check catches a copy made when the size rule differed (before the short side was kept at MIN_SIDE);
    decoding it (cheap at cache size) catches a copy cut short by a disk error or an interrupted sync, which would
    otherwise fail in training.
    """
    try:
        with Image.open(path) as cached:
            if cached.format != "PNG" or cached.mode != "L" or cached.size != expected_size:
                return False
            cached.load()
            return True
    except (OSError, ValueError, SyntaxError):
        return False


def remove_unused(cache_dir: str | os.PathLike, used: set[str]) -> None:
    """Remove the cached copies under ``cache_dir`` that are not in ``used`` (absolute paths), then the folders left
    empty: copies at a ``--size`` no longer used, of images no longer in the data, or in the layout before the size
    folder. Called only once the new manifest is in place, never before: until then the old one points to them.

    Best effort: a copy that cannot be removed costs disk space, not correctness, so it never fails a finished
    `prepare`.
    """
    for folder, _, files in os.walk(os.path.abspath(cache_dir), topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            match = _COPY_NAME.fullmatch(name)
            if match and os.path.basename(folder) == match["sha"][:2] and path not in used:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # fails, as it should, unless it is empty


@dataclass
class Examined:
    """The outcome for one file: a fingerprint and sizes, or the reason it cannot be used."""

    fingerprint: Fingerprint | None = None
    width: int = 0
    height: int = 0
    cache_path: str = ""
    reason: str = ""  # an ImageReadError reason when fingerprint is None
    detail: str = ""
    colour: float = 0.0  # the share of coloured pixels (`cxr_fast.data.io.colour_share`): a photo or chart
    upright: float = 1.0  # `cxr_fast.data.inversion.upright_correlation`: below 0, a negative film


def examine_file(task: tuple[str, str | None, int]) -> Examined:
    """Decode one file completely, fingerprint it and, when ``cache_dir`` is given, store its cached copy.

    ``task`` is ``(path, cache_dir or None, cache_size)``: one argument, for ``Executor.map``.
    A failure of the file comes back as ``reason`` and ``detail``. A cache that cannot be written (a full disk, a
    read-only folder) raises `CxrFastError`: that is no fault of the image, and must stop the run instead of
    excluding every image after it as unreadable.
    """
    path, cache_dir, cache_size = task
    try:
        decode_side = cache_size if cache_size > 0 else FINGERPRINT_DECODE_SIDE
        image, (width, height), colour = read_image_size_and_colour(path, max_side=decode_side)
    except ImageReadError as error:
        return Examined(reason=error.reason, detail=error.explanation)
    except MemoryError:
        return Examined(reason="too-large", detail="not enough memory to decode the image")
    except Exception as error:  # noqa: BLE001 - one odd file (vanished, or a decoder's own error) must not stop a run
        return Examined(reason="unreadable", detail=f"{type(error).__name__}: {error}")
    try:  # our own code on a decoded image: only the file itself (hashed again) can fail, and a bug must be seen
        identity = fingerprint(path, image)
    except OSError as error:
        return Examined(reason="unreadable", detail=f"{type(error).__name__}: {error}")
    cached = ""
    if cache_dir is not None:
        expected = cached_size((width, height), cache_size)
        if image.size[0] < expected[0] or image.size[1] < expected[1]:
            # A wide film at a small --size: its copy keeps a short side of MIN_SIDE, longer than the decode gave,
            # so decode again at the copy's size rather than enlarge the small decode (a 64x38 thumbnail blown up).
            try:
                image, _ = read_image_with_size(path, max_side=max(expected))
            except Exception as error:  # noqa: BLE001 - read once already: only a file changed meanwhile fails here
                return Examined(reason="unreadable", detail=f"{type(error).__name__}: {error}")
        try:
            cached = str(store(image, cache_dir, identity.sha256, cache_size, (width, height)))
        except OSError as error:
            raise CxrFastError(f"{cache_dir}: cannot write the image cache ({error.strerror or error})") from None
    return Examined(fingerprint=identity, width=width, height=height, cache_path=cached, colour=colour,
                    upright=upright_correlation(image))
