"""Read any chest X-ray file (PNG, JPEG, DICOM) into one form: an 8-bit grayscale PIL image (mode "L").

Everything downstream (hashing, caching, training, attribution) relies on this single reader, so the
conversions that silently go wrong elsewhere are handled here once:

- 16-bit PNGs are stretched from their actual value range to 0..255. PIL's own ``convert("L")`` clips
  values above 255, which turns a 12-bit X-ray into a white sheet.
- EXIF orientation is applied, so a phone photo of a film is upright.
- DICOM pixel data goes through the Modality LUT (rescale slope/intercept), then the VOI window the
  radiographer chose, and MONOCHROME1 (bright = air) is inverted so that bone is always bright.
- Colour is lost in the grey image, so `read_image_and_colour` measures it first: predict and serve flag a photo or
  chart (`colour_warning`), which would otherwise be predicted as a film, and prepare names it in a warning.
- A file that cannot be used raises `ImageReadError` with a short machine-readable ``reason``; the manifest
  builder turns those into exclusions instead of crashing halfway through a dataset.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cxr_fast.errors import CxrFastError

# Suffixes the toolkit treats as images when it looks for files. The reader itself decides by content,
# so a DICOM without a suffix is still read (see `is_dicom`).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

# Smaller than this on either side and an image carries no usable anatomy (icons, thumbnails, masks
# of the wrong file): such files are excluded rather than upscaled.
MIN_SIDE = 64
# Checked from the header before any pixel is decoded: a decompression bomb (a small file claiming
# gigapixels) must not get the chance to exhaust memory. 64 MP is far above any real radiograph (~10 MP).
MAX_PIXELS = 64_000_000
ORIENTATION_TAG = 0x0112

MIN_GREY_LEVELS = 64  # an 8-bit reading of a 16-bit colour PNG with fewer levels than this lost its data
# A radiograph's pixels spread over many grey values: in 886 cxr-dev films and 300 lung-masks films the two
# commonest values hold 2-63 % of the pixels (black borders, burnt-out labels). A lung mask, a blank sheet or a
# drawing put into an X-ray folder holds 100 %, and would be trained on, or predicted, as an X-ray.
MAX_TWO_LEVEL_SHARE = 0.9
# A radiograph is grey: its channels, where a file has three, are equal (a grey film saved as a colour JPEG keeps
# them equal to the level: 0 spread in all 886 cxr-dev and 300 lung-masks films re-encoded at JPEG quality 20-95).
# A pixel whose channels spread over more than COLOUR_SPREAD levels is coloured; an image with at least
# COLOUR_SHARE of them (a photo, a chart, a colour-map figure, a strongly tinted scan) is read as grey and predicted
# all the same, so predict and serve flag it (`colour_warning`) and prepare names it. A thin annotation (a red
# arrow: 0.5 %) is not flagged.
COLOUR_SPREAD = 48
COLOUR_SHARE = 0.01
REASONS = ("empty", "not-an-image", "truncated", "unreadable", "too-small", "too-large", "not-a-radiograph")


class ImageReadError(CxrFastError):
    """A file that cannot be used as an image; ``reason`` is one of `REASONS`."""

    def __init__(self, path: str | os.PathLike, reason: str, explanation: str):
        assert reason in REASONS, reason
        self.path = Path(path)
        self.reason = reason
        self.explanation = explanation
        super().__init__(f"{path}: {explanation}")


def image_stem(path: str | os.PathLike) -> str:
    """The file name without an image suffix. Other "suffixes" are part of the name: `Path.stem` would cut a DICOM
    UID (1.2.840.….123) or a PACS name (IMG.001) at its last dot, and files that differ only there would collide."""
    path = Path(path)
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name


def is_dicom(path: str | os.PathLike) -> bool:
    """True for the 'DICM' magic at byte 128 (DICOM files often have no suffix), for a .dcm/.dicom suffix on a file
    that does not start like a PNG, JPEG, TIFF or BMP, or for a file that starts with a bare DICOM element (a DICOM
    without preamble, from an older archive or PACS export, whatever its name)."""
    path = Path(path)
    if _has_dicom_magic(path) or _starts_like_bare_dicom(path):
        return True
    return path.suffix.lower() in DICOM_SUFFIXES and not _starts_like_pil_image(path)


def _starts_like_bare_dicom(path: Path) -> bool:
    """A dataset written without preamble starts with a little-endian element of group 0002 (file meta) or 0008
    (identification), followed by an explicit VR (two capital letters) or an implicit 4-byte length."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    vr = head[4:6]
    return (vr.isalpha() and vr.isupper()) or struct.unpack("<I", head[4:8])[0] < 0x10000


PIL_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")  # PNG, JPEG, TIFF (2 orders), BMP


def _starts_like_pil_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4).startswith(PIL_SIGNATURES)
    except OSError:
        return False


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Read PNG/JPEG/DICOM (and other PIL formats) as an 8-bit grayscale image (mode "L").

    ``max_side``: when given, the image is shrunk so its longest side is at most this (never enlarged).
    JPEGs are then decoded at reduced scale by libjpeg, several times faster for large radiographs; the
    whole file is still decoded, so a truncated file is still detected.

    Raises `ImageReadError` (a `CxrFastError`) with ``.reason`` in `REASONS`.
    """
    image, _ = read_image_with_size(path, max_side=max_side)
    return image


def read_image_with_size(
    path: str | os.PathLike, max_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """`read_image` plus the original (width, height), after EXIF orientation, before any shrinking."""
    image, original_size, _ = _read(path, max_side, measure_colour=False)
    return image, original_size


def read_image_and_colour(path: str | os.PathLike) -> tuple[Image.Image, float]:
    """`read_image` plus the share of the file's pixels that are coloured (`colour_share`; 0 for a grey file), which
    the grey image no longer shows."""
    image, _, colour = _read(path, None, measure_colour=True)
    return image, colour


def read_image_size_and_colour(
    path: str | os.PathLike, max_side: int | None = None
) -> tuple[Image.Image, tuple[int, int], float]:
    """`read_image_with_size` plus the share of coloured pixels, as `read_image_and_colour` measures it."""
    return _read(path, max_side, measure_colour=True)


def colour_warning(share: float) -> str | None:
    """The warning for an image whose `colour_share` says it is no grey radiograph; None for one that is grey."""
    if not share >= COLOUR_SHARE:  # NaN (not measured: a manifest cell left blank) makes no claim
        return None
    return (f"a colour image ({share:.0%} of its pixels are coloured): a photo, chart or figure rather than a grey "
            "radiograph; the prediction is not to be trusted")


def colour_share(rgb: np.ndarray) -> float:
    """Share of the pixels of an [H, W, 3] uint8 array whose channels spread over more than `COLOUR_SPREAD` levels."""
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)  # uint8: max >= min, so no wrap-around
    return float(np.count_nonzero(spread > COLOUR_SPREAD)) / max(1, spread.size)


def _read(path: str | os.PathLike, max_side: int | None,
          measure_colour: bool) -> tuple[Image.Image, tuple[int, int], float]:
    path = Path(path)
    try:
        size_on_disk = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "unreadable", "file not found") from None
    except OSError as error:
        raise ImageReadError(path, "unreadable", f"cannot open file ({error.strerror or error})") from None
    if size_on_disk == 0:
        raise ImageReadError(path, "empty", "file is empty (0 bytes)")

    if is_dicom(path):
        image, colour = _read_dicom(path, measure_colour)
        original_size = image.size
    else:
        image, original_size, colour = _read_with_pil(path, max_side, measure_colour)
    _check_grey_levels(path, image)  # before shrinking, whose smoothing gives a mask's edges other values
    if max_side is not None and max(image.size) > max_side:
        image = shrink_to(image, max_side)
    return image, original_size, colour


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header only, without decoding pixels (EXIF rotation not applied)."""
    path = Path(path)
    if is_dicom(path):
        dataset = _dcmread(path, stop_before_pixels=True)
        try:
            return int(dataset.Columns), int(dataset.Rows)
        except (AttributeError, TypeError, ValueError):
            raise ImageReadError(path, "not-an-image", "DICOM file lacks valid Rows/Columns") from None
    try:
        with _open_with_pil(path) as image:
            return image.size
    except ImageReadError:
        raise
    except Exception as error:  # noqa: BLE001 - any parser failure means the header is unusable
        raise _classify_pil_error(path, error) from None


def read_mask(path: str | os.PathLike) -> Image.Image:
    """A label image (a lung mask: 0 background, 1 lung, 2 lesion) decoded as stored, with the reader's guards (the
    megapixel limit, read from the header, and an `ImageReadError` for a file PIL cannot decode) but none of its
    conversions or checks for a radiograph, which a mask of two or three values would fail."""
    path = Path(path)
    try:
        with _open_with_pil(path) as image:
            return image.copy()  # decoded, and detached from the file the with-block closes
    except ImageReadError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many types for damaged files
        raise _classify_pil_error(path, error) from None


def shrink_to(image: Image.Image, max_side: int) -> Image.Image:
    """Resize so the longest side is ``max_side``, aspect kept; a small enough image is returned as is."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1:
        return image
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: a fast box pre-reduction, then Lanczos; indistinguishable from pure Lanczos here.
    return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# --- PIL formats -------------------------------------------------------------------------------------


def _open_with_pil(path: Path) -> Image.Image:
    with warnings.catch_warnings():
        # We apply our own, stricter limit (MAX_PIXELS) right after opening; PIL's warning would be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:  # over twice PIL's own limit: worded as our limit is
            claimed = re.search(r"\((\d+) pixels\)", str(error))
            count = f"{int(claimed.group(1)) / 1e6:.0f} megapixels" if claimed else "too many pixels"
            raise ImageReadError(
                path, "too-large", f"header claims {count}, more than the {MAX_PIXELS / 1e6:.0f} megapixel limit"
            ) from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageReadError(
            path,
            "too-large",
            f"header claims {width}x{height} pixels, more than the {MAX_PIXELS / 1e6:.0f} megapixel limit",
        )
    return image


def _read_with_pil(path: Path, max_side: int | None,
                   measure_colour: bool) -> tuple[Image.Image, tuple[int, int], float]:
    # A truncated X-ray loaded with this flag on is silently padded with grey and then trained on, so the
    # toolkit insists on it being off (other libraries sometimes switch it on globally).
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with _open_with_pil(path) as image:
            _check_min_side(path, image.size)
            sixteen_bit_colour = _is_16_bit_colour_png(image)  # before getexif, which empties image.tile
            width, height = image.size
            # EXIF orientations 5-8 turn the picture by 90 degrees: width and height swap. Pillow's TIFF reader
            # turns TIFFs itself and already gives the upright size.
            turned = image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
            if turned and image.format == "TIFF":
                # Pillow 13 scrambles a TIFF it turns when it maps the file into memory; read from bytes, it turns
                # it right (and, either way, its size is already the upright one)
                image = Image.open(io.BytesIO(path.read_bytes()))
            elif turned:
                width, height = height, width
            if max_side is not None and image.format == "JPEG" and image.mode in ("L", "RGB", "CMYK"):
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the requested size; a square
                # request keeps it large enough whatever the orientation.
                image.draft(image.mode, (max_side, max_side))
            image.load()
            # exif_transpose always returns a new image, detached from the file the with-block closes.
            image = ImageOps.exif_transpose(image)
            gray = _to_gray8(image)
    except ImageReadError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many types for damaged files
        raise _classify_pil_error(path, error) from None
    if sixteen_bit_colour:
        _check_high_byte_levels(path, gray)
    # measured outside the catch-all above: a bug here must stop the run, not exclude the image
    return gray, (width, height), _pil_colour_share(image) if measure_colour else 0.0


GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _pil_colour_share(image: Image.Image) -> float:
    if image.mode in GREY_MODES:
        return 0.0
    rgb = image.convert("RGBA").convert("RGB") if image.mode in ("P", "PA") else image.convert("RGB")
    return colour_share(np.asarray(rgb))


def _is_16_bit_colour_png(image: Image.Image) -> bool:
    raw_mode = image.tile[0][3] if image.format == "PNG" and image.tile else None
    return isinstance(raw_mode, str) and raw_mode.endswith(";16B") and not raw_mode.startswith("I")


def _check_high_byte_levels(path: Path, gray: Image.Image) -> None:
    """Pillow reads a 16-bit RGB or gray+alpha PNG as 8 bits, keeping each sample's high byte. That is fine for
    data filling 16 bits, but 10- or 12-bit detector values come out as a nearly black sheet of 4-16 grey levels,
    which is no X-ray to train on and no longer matches its own 8-bit copy as a duplicate."""
    low, high = gray.getextrema()
    if high - low + 1 < MIN_GREY_LEVELS:
        raise ImageReadError(path, "unreadable",
                             f"16-bit colour PNG whose values fill only the low bits: Pillow keeps the high byte, "
                             f"{high - low + 1} grey levels; save it as 16-bit grayscale or 8-bit")


def _check_grey_levels(path: Path, gray: Image.Image) -> None:
    counts = sorted(gray.histogram(), reverse=True)
    share = (counts[0] + counts[1]) / max(1, gray.width * gray.height)
    if share >= MAX_TWO_LEVEL_SHARE:
        values = "one grey value" if counts[1] == 0 else "two grey values"
        raise ImageReadError(path, "not-a-radiograph",
                             f"{share:.0%} of its pixels take {values}: a mask, a blank sheet or a drawing, "
                             "not a radiograph")


def _check_min_side(path: Path, size: tuple[int, int]) -> None:
    if min(size) < MIN_SIDE:
        raise ImageReadError(
            path,
            "too-small",
            f"image is {size[0]}x{size[1]} pixels; at least {MIN_SIDE} px per side is needed",
        )


def _classify_pil_error(path: Path, error: Exception) -> ImageReadError:
    if isinstance(error, UnidentifiedImageError):
        return ImageReadError(
            path, "not-an-image", "not an image file PIL can identify (PNG, JPEG, DICOM, ...)"
        )
    text = str(error)
    lowered = text.lower()
    if "truncated" in lowered or "broken data stream" in lowered or isinstance(error, EOFError):
        return ImageReadError(path, "truncated", f"image data is truncated or damaged ({text})")
    return ImageReadError(path, "unreadable", f"cannot decode image ({type(error).__name__}: {text})")


def _to_gray8(image: Image.Image) -> Image.Image:
    """Any PIL mode → mode "L" uint8, keeping the full dynamic range of high-bit-depth images."""
    mode = image.mode
    if mode == "L":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_stretch_to_uint8(np.asarray(image)))
    if mode == "LA":
        return image.getchannel("L")
    if mode in ("P", "PA"):
        # Palette images: go through RGBA so transparency and the palette colours resolve properly.
        image = image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    # RGB, RGBA, CMYK, YCbCr, LAB, HSV: alpha is dropped, colour converted with ITU-R 601 luma.
    return image.convert("RGB").convert("L")


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the array's actual min..max onto 0..255.

    The actual range, not the container's: 16-bit files usually hold 10-, 12- or 14-bit detector data, which
    divided by 65535 would come out nearly black.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(
            finite, values, np.nanmin(np.where(finite, values, np.nan)) if finite.any() else 0.0
        )
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --- DICOM -------------------------------------------------------------------------------------------


def dicom_patient_id(path: str | os.PathLike) -> str:
    """The DICOM header's PatientID (0010,0020), stripped; "" for other files or when it is absent."""
    path = Path(path)
    if not is_dicom(path):
        return ""
    try:
        dataset = _dcmread(path, stop_before_pixels=True)
    except ImageReadError:
        return ""
    return str(dataset.get("PatientID", "") or "").strip()


def _dcmread(path: Path, stop_before_pixels: bool = False):
    import pydicom  # imported here: pydicom is only needed when a DICOM file turns up
    from pydicom.errors import InvalidDicomError

    try:
        # force=True accepts files without the 128-byte preamble (common in older archives).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except InvalidDicomError as error:
        raise ImageReadError(path, "not-an-image", f"not a valid DICOM file ({error})") from None
    except EOFError as error:
        raise ImageReadError(path, "truncated", f"DICOM file ends early ({error})") from None
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise ImageReadError(
            path, "unreadable", f"cannot parse DICOM ({type(error).__name__}: {error})"
        ) from None
    for warning in caught:
        # Compressed pixel data cut short: pydicom warns and returns what it parsed, which may be nothing at all
        if "End of file reached before delimiter" in str(warning.message):
            raise ImageReadError(path, "truncated", "DICOM file ends early: its compressed pixel data stops "
                                                    "before the end marker (a copy cut short?)")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return dataset


def _read_dicom(path: Path, measure_colour: bool) -> tuple[Image.Image, float]:
    dataset = _dcmread(path)
    _name_the_transfer_syntax_it_was_read_with(dataset)
    if (
        "PixelData" not in dataset
        and "FloatPixelData" not in dataset
        and "DoubleFloatPixelData" not in dataset
    ):
        if not _has_dicom_magic(path):
            raise ImageReadError(
                path, "not-an-image", "not a DICOM file (no 'DICM' header and no pixel data)"
            )
        if "SOPClassUID" not in dataset:  # every real DICOM object, a report included, names its SOP class
            raise ImageReadError(path, "unreadable", "DICOM header is damaged (no SOP class and no pixel data)")
        raise ImageReadError(
            path, "not-an-image", "DICOM file holds no pixel data (a report or a structured file?)"
        )
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(path, "unreadable", "DICOM file lacks valid Rows/Columns") from None
    if rows * columns > MAX_PIXELS:
        raise ImageReadError(
            path,
            "too-large",
            f"header claims {columns}x{rows} pixels, more than the {MAX_PIXELS / 1e6:.0f} megapixel limit",
        )
    _check_min_side(path, (columns, rows))
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        # The first frame stands for the file, so only it is decoded: decoding a whole series first cost 1.3 GB
        # for an 18 MB file of 300 RLE frames, past the megapixel limit and the upload cap of `cxrfast serve`.
        dataset.pixel_array_options(index=0)

    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001
        text = str(error)
        lowered = text.lower()
        # pydicom says "less than expected (N vs M bytes)"; "truncat" covers a decoder plugin's other wordings
        if "less than expected" in lowered or "truncat" in lowered:
            raise ImageReadError(path, "truncated", f"DICOM pixel data is truncated ({text})") from None
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        plugin = ("; compressed DICOM needs a decoder: pip install 'cxr_fast[dicom]' (python-gdcm)"
                  if getattr(syntax, "is_compressed", False) and not has_dicom_decoder() else "")
        raise ImageReadError(
            path, "unreadable", f"cannot decode DICOM pixel data ({type(error).__name__}: {text}){plugin}"
        ) from None

    samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
    if _photometric(dataset) == "PALETTE COLOR":
        # The stored values are indices into the file's colour table, not grey levels: a table that runs from white
        # to black (as some converters write) read as grey would give a negative.
        from pydicom.pixels import apply_color_lut

        try:
            pixels, samples = apply_color_lut(pixels, dataset), 3
        except Exception as error:  # noqa: BLE001 - a missing or malformed table
            raise ImageReadError(path, "unreadable", f"cannot apply the DICOM palette colour table "
                                                     f"({type(error).__name__}: {error})") from None
    if samples > 1:
        # Colour DICOM (secondary capture): pydicom returns RGB; use its luma.
        rgb = np.ascontiguousarray(pixels[..., :3])
        if rgb.dtype != np.uint8:
            rgb = _stretch_to_uint8(rgb)
        return Image.fromarray(rgb).convert("L"), colour_share(rgb) if measure_colour else 0.0

    try:
        gray = dicom_to_uint8(pixels, dataset)
    except Exception as error:  # noqa: BLE001
        raise ImageReadError(
            path, "unreadable", f"cannot apply DICOM LUT/window ({type(error).__name__}: {error})"
        ) from None
    return Image.fromarray(gray), 0.0


def _name_the_transfer_syntax_it_was_read_with(dataset) -> None:
    """A dataset stored without its file meta group (older archives) names no transfer syntax, and pydicom will
    not decode pixels without one; the encoding it parsed the file with is that syntax, for uncompressed data."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(dataset, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = dataset.original_encoding
    if meta is None:
        dataset.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def has_dicom_decoder() -> bool:
    """Whether python-gdcm (the `dicom` extra), which decodes JPEG Lossless, JPEG-LS and JPEG 2000, is installed."""
    import importlib.util

    return importlib.util.find_spec("gdcm") is not None


def dicom_to_uint8(pixels: np.ndarray, dataset) -> np.ndarray:
    """Stored DICOM values → displayed 8-bit gray: Modality LUT, VOI window or LUT, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    for name in ("RescaleSlope", "RescaleIntercept"):
        if name in dataset and dataset[name].value in (None, ""):
            del dataset[name]  # present but empty (seen from some converters): no rescale, as viewers read it
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    padding = _padding_mask(pixels, dataset)
    if padding is not None:
        # Padding marks pixels outside the exposed field: it must not stretch the range the anatomy is shown in.
        values[padding] = values[~padding].min()
    center, width = _first_window(dataset)
    if "VOILUTSequence" in dataset:
        # A lookup table chosen by the modality: apply it, then use its full output range. Its entries are indexed
        # by whole values, so rounding first changes nothing and spares pydicom's warning about float input.
        gray = _stretch_to_uint8(apply_voi_lut(np.rint(values).astype(np.int64), dataset, index=0, prefer_lut=True))
    elif center is not None and width is not None and width > 0:
        function = str(getattr(dataset, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        gray = _window(values, center, width, function)
    else:
        gray = _stretch_to_uint8(values)
    if _photometric(dataset) == "MONOCHROME1" or (
            str(getattr(dataset, "PresentationLUTShape", "")).strip().upper() == "INVERSE"):
        # MONOCHROME1 shows low values white, and so does MONOCHROME2 under an INVERSE presentation LUT (with
        # MONOCHROME1, INVERSE only confirms it): the toolkit wants bone bright in every image.
        gray = 255 - gray
    if padding is not None:
        gray[padding] = 0  # outside the exposed field: black, as air is
    return gray


def _photometric(dataset) -> str:
    return str(getattr(dataset, "PhotometricInterpretation", "")).strip().upper()


def _padding_mask(pixels: np.ndarray, dataset) -> np.ndarray | None:
    """Pixels equal to Pixel Padding Value (or within its range limit), when some but not all are; else None."""
    value = dataset.get("PixelPaddingValue")
    if value is None or isinstance(value, (bytes, list)):
        return None
    limit = dataset.get("PixelPaddingRangeLimit")
    low, high = sorted((int(value), int(limit))) if isinstance(limit, int) else (int(value), int(value))
    mask = (pixels >= low) & (pixels <= high)
    return mask if mask.any() and not mask.all() else None


def _first_window(dataset) -> tuple[float | None, float | None]:
    def first(name):
        value = getattr(dataset, name, None)
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        return None if value is None else float(value)

    return first("WindowCenter"), first("WindowWidth")


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight onto 0..255."""
    if function == "SIGMOID":
        scaled = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        scaled = ((values - center) / width + 0.5) * 255.0
    else:  # LINEAR, the default
        if width < 1:
            width = 1.0
        scaled = ((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
