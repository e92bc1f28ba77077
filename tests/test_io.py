"""read_image: every pixel format becomes 8-bit grayscale; every kind of bad file has a reason."""

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from cxr_fast.data import io
from cxr_fast.data.io import ImageReadError, image_size, is_dicom, read_image, read_image_with_size
from cxr_fast.errors import CxrFastError
from tests.conftest import bare_dataset_bytes, write_dicom


def smooth_image(seed: int, width: int = 96, height: int = 80) -> np.ndarray:
    """A smooth random uint8 image: upsampled coarse noise, so different seeds look different to a pHash."""
    coarse = np.random.default_rng(seed).random((6, 6)) * 255
    return np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    )


def assert_gray8(image: Image.Image):
    assert image.mode == "L"
    assert np.asarray(image).dtype == np.uint8


# --- PNG / JPEG formats ---------------------------------------------------------------------------------


def test_8bit_png_is_returned_unchanged(tmp_path):
    pixels = smooth_image(0)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert_gray8(image)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_16bit_png_is_stretched_over_its_range_not_clipped(tmp_path):
    # 12-bit detector data in a 16-bit PNG: PIL's convert("L") would clip almost everything to 255.
    pixels = (1000 + smooth_image(1).astype(np.uint16) * 12).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    image = read_image(tmp_path / "a16.png")
    assert_gray8(image)
    out = np.asarray(image).astype(float)
    assert out.min() == 0 and out.max() == 255
    assert (out == 255).mean() < 0.05
    assert np.corrcoef(out.ravel(), pixels.ravel())[0, 1] > 0.999


def test_rgba_and_la_drop_alpha(tmp_path):
    gray = smooth_image(2)
    alpha = np.full_like(gray, 128)
    Image.fromarray(np.dstack([gray, gray, gray, alpha]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(tmp_path / "la.png")
    for name in ("rgba.png", "la.png"):
        image = read_image(tmp_path / name)
        assert_gray8(image)
        np.testing.assert_allclose(np.asarray(image), gray, atol=1)


def test_rgb_uses_luma(tmp_path):
    red = np.zeros((80, 96, 3), np.uint8)
    red[..., 0] = np.linspace(60, 250, 96).astype(np.uint8)  # a ramp: a single colour is no radiograph
    Image.fromarray(red, "RGB").save(tmp_path / "red.png")
    assert np.abs(np.asarray(read_image(tmp_path / "red.png")).astype(int) - np.round(red[..., 0] * 0.299)).max() <= 1


def test_palette_png(tmp_path):
    gray = smooth_image(3)
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    image = read_image(tmp_path / "p.png")
    assert_gray8(image)
    assert np.abs(np.asarray(image).astype(int) - gray).mean() < 3


def test_cmyk_jpeg(tmp_path):
    gray = smooth_image(4)
    Image.fromarray(gray).convert("RGB").convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    image = read_image(tmp_path / "c.jpg")
    assert_gray8(image)
    assert np.abs(np.asarray(image).astype(int) - gray).mean() < 6


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.tile(np.linspace(0, 120, 120).astype(np.uint8), (80, 1))  # landscape, a ramp, and a bright
    pixels[:20, :30] = 255  # block in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "r.jpg")
    assert image.size == (80, 120)  # portrait after rotation
    expected = np.rot90(pixels, k=-1)
    assert np.abs(np.asarray(image).astype(int) - expected).mean() < 5
    # reduced-scale decoding still reports the original, oriented size
    small, size = read_image_with_size(tmp_path / "r.jpg", max_side=64)
    assert size == (80, 120) and max(small.size) == 64 and small.size[1] > small.size[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_s_orientation_tag_turns_it_as_exif_turns_a_png(tmp_path, orientation):
    # Pillow 13 turned a TIFF mapped from disk into scrambled pixels (5-8), and the size was swapped twice
    pixels = (np.arange(120 * 200).reshape(120, 200) % 251).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "film.tif", tiffinfo={0x0112: orientation})
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "film.png", exif=exif)
    tiff, tiff_size = read_image_with_size(tmp_path / "film.tif")
    png, png_size = read_image_with_size(tmp_path / "film.png")
    np.testing.assert_array_equal(np.asarray(tiff), np.asarray(png))
    assert tiff_size == png_size == ((120, 200) if orientation >= 5 else (200, 120)) == tiff.size


def test_max_side_shrinks_and_keeps_original_size(tmp_path):
    Image.fromarray(smooth_image(5, 1000, 800)).save(tmp_path / "big.jpg")
    small, size = read_image_with_size(tmp_path / "big.jpg", max_side=256)
    assert size == (1000, 800)
    assert small.size == (256, 205)
    assert read_image(tmp_path / "big.jpg", max_side=2000).size == (1000, 800)  # never enlarged
    assert image_size(tmp_path / "big.jpg") == (1000, 800)


# --- DICOM ----------------------------------------------------------------------------------------------


def dicom_phantom() -> np.ndarray:
    stored = np.full((80, 96), 600, np.uint16)
    stored[:, 32:64] = 1000
    stored[:, 64:] = 1250
    return stored


WINDOWED = dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=1001)


def test_dicom_monochrome2_applies_rescale_then_window(tmp_path):
    # stored 600 -> 200 HU-like units (below the window: 0); 1000 -> 1000 (window centre: ~128);
    # 1250 -> 1500 (above: 255). Without the rescale, 600 and 1250 would land inside the window.
    write_dicom(tmp_path / "m2.dcm", dicom_phantom(), **WINDOWED)
    image = read_image(tmp_path / "m2.dcm")
    assert_gray8(image)
    out = np.asarray(image)
    assert out[0, 0] == 0
    assert abs(int(out[0, 40]) - 128) <= 1
    assert out[0, 80] == 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    write_dicom(tmp_path / "m2.dcm", dicom_phantom(), **WINDOWED)
    write_dicom(tmp_path / "m1.dcm", dicom_phantom(), photometric="MONOCHROME1", **WINDOWED)
    mono2 = np.asarray(read_image(tmp_path / "m2.dcm")).astype(int)
    mono1 = np.asarray(read_image(tmp_path / "m1.dcm")).astype(int)
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert mono1[0, 0] == 255  # low values are white in MONOCHROME1 files; the toolkit wants them dark


def test_an_inverse_presentation_lut_turns_monochrome2_as_monochrome1_is_turned(tmp_path):
    # a viewer shows MONOCHROME2 under Presentation LUT Shape INVERSE as a negative: read as stored, bone was dark
    write_dicom(tmp_path / "m2.dcm", dicom_phantom(), **WINDOWED)
    write_dicom(tmp_path / "inv.dcm", dicom_phantom(), PresentationLUTShape="INVERSE", **WINDOWED)
    write_dicom(tmp_path / "m1.dcm", dicom_phantom(), photometric="MONOCHROME1", PresentationLUTShape="INVERSE",
                **WINDOWED)  # the usual pairing, in which INVERSE only confirms MONOCHROME1: turned once, not twice
    mono2 = np.asarray(read_image(tmp_path / "m2.dcm")).astype(int)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "inv.dcm")), 255 - mono2)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "m1.dcm")), 255 - mono2)


def test_a_palette_colour_dicom_is_read_through_its_colour_table(tmp_path):
    # its stored values index a table; this one runs from white to black, so the indices read as grey are a negative
    from pydicom.uid import ExplicitVRLittleEndian

    write_dicom(tmp_path / "m2.dcm", dicom_phantom(), **WINDOWED)
    shown = np.asarray(read_image(tmp_path / "m2.dcm"))
    pydicom = pytest.importorskip("pydicom")
    dataset = pydicom.dcmread(tmp_path / "m2.dcm")
    for name in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(dataset, name)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PhotometricInterpretation = "PALETTE COLOR"
    dataset.PixelData = (255 - shown).astype(np.uint8).tobytes()
    table = ((255 - np.arange(256)) * 257).astype("<u2").tobytes()
    for offset in range(3):  # red, green and blue: descriptor (0028,110x) and data (0028,120x)
        dataset.add_new((0x0028, 0x1101 + offset), "US", [256, 0, 16])
        dataset.add_new((0x0028, 0x1201 + offset), "OW", table)
    dataset.save_as(tmp_path / "palette.dcm")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "palette.dcm")), shown)


def test_an_empty_rescale_is_no_rescale(tmp_path):
    write_dicom(tmp_path / "plain.dcm", dicom_phantom())
    write_dicom(tmp_path / "empty.dcm", dicom_phantom(), RescaleSlope=None, RescaleIntercept=None)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "empty.dcm")),
                                  np.asarray(read_image(tmp_path / "plain.dcm")))


def test_dicom_without_window_uses_full_range(tmp_path):
    stored = (smooth_image(6).astype(np.uint16) * 16).astype(np.uint16)  # 12-bit values
    write_dicom(tmp_path / "nowin.dcm", stored)
    out = np.asarray(read_image(tmp_path / "nowin.dcm")).astype(float)
    assert out.min() == 0 and out.max() == 255
    assert np.corrcoef(out.ravel(), stored.ravel())[0, 1] > 0.999


def test_dicom_without_suffix_is_found_by_its_preamble(tmp_path):
    write_dicom(tmp_path / "m2.dcm", dicom_phantom(), **WINDOWED)
    (tmp_path / "IM0001").write_bytes((tmp_path / "m2.dcm").read_bytes())
    assert is_dicom(tmp_path / "IM0001")
    assert not is_dicom(tmp_path / "nothing.png")
    np.testing.assert_array_equal(
        np.asarray(read_image(tmp_path / "IM0001")), np.asarray(read_image(tmp_path / "m2.dcm"))
    )
    assert image_size(tmp_path / "IM0001") == (96, 80)


# --- bad files ------------------------------------------------------------------------------------------


def reason_for(path) -> str:
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert isinstance(caught.value, CxrFastError)
    return caught.value.reason


def test_a_dicom_cut_short_in_its_pixel_data_is_truncated(tmp_path):
    write_dicom(tmp_path / "m2.dcm", dicom_phantom(), **WINDOWED)
    data = (tmp_path / "m2.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 2000])  # the header is whole, the pixels are not
    assert reason_for(tmp_path / "cut.dcm") == "truncated"


def test_a_compressed_dicom_cut_short_is_truncated_not_a_damaged_header(tmp_path):
    # pydicom warns and returns an empty dataset when encapsulated pixel data ends before its delimiter
    from pydicom.uid import RLELossless

    pydicom = pytest.importorskip("pydicom")
    write_dicom(tmp_path / "m2.dcm", dicom_phantom())
    dataset = pydicom.dcmread(tmp_path / "m2.dcm")
    dataset.compress(RLELossless)
    dataset.save_as(tmp_path / "rle.dcm")
    data = (tmp_path / "rle.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom's own warning is turned into the reason, not shown besides
        assert reason_for(tmp_path / "cut.dcm") == "truncated"


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert reason_for(tmp_path / "empty.png") == "empty"


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all\n")
    (tmp_path / "notes.dcm").write_text("not a dicom either\n")
    assert reason_for(tmp_path / "notes.png") == "not-an-image"
    assert reason_for(tmp_path / "notes.dcm") == "not-an-image"


def test_truncated_jpeg_and_png(tmp_path, monkeypatch):
    Image.fromarray(smooth_image(7, 300, 300)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    noisy = np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert reason_for(tmp_path / "cut.jpg") == "truncated"
    assert reason_for(tmp_path / "cut.png") == "truncated"
    # also at reduced-scale decoding, and even if some library switched PIL to padding truncated files
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError) as caught:
        read_image(tmp_path / "cut.jpg", max_side=64)
    assert caught.value.reason == "truncated"


def test_too_small(tmp_path):
    Image.fromarray(smooth_image(8, 32, 32)).save(tmp_path / "tiny.png")
    Image.fromarray(smooth_image(8, 200, 40)).save(tmp_path / "strip.png")
    assert reason_for(tmp_path / "tiny.png") == "too-small"
    assert reason_for(tmp_path / "strip.png") == "too-small"


def test_a_mask_a_blank_sheet_or_a_dicom_mask_is_no_radiograph(tmp_path):
    mask = np.zeros((800, 600), np.uint8)
    mask[200:600, 100:280] = mask[200:600, 320:500] = 255  # two "lungs", as a hand-drawn mask stores them
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.new("L", (300, 300), 255).save(tmp_path / "blank.png")
    write_dicom(tmp_path / "mask.dcm", mask.astype(np.uint16))
    for name in ("mask.png", "blank.png", "mask.dcm"):
        assert reason_for(tmp_path / name) == "not-a-radiograph"
    with pytest.raises(ImageReadError, match=r"mask.png: 100% of its pixels take two grey values: a mask, a blank"):
        read_image(tmp_path / "mask.png", max_side=64)  # judged before shrinking gives the edges other values
    with pytest.raises(ImageReadError, match="take one grey value"):
        read_image(tmp_path / "blank.png")


def test_a_film_with_wide_black_borders_is_still_a_radiograph(tmp_path):
    # real films hold at most 63 % of their pixels at their two commonest values (burnt-out borders, labels)
    film = np.zeros((400, 400), np.uint8)
    film[60:340, 60:340] = smooth_image(9, 280, 280)  # 49 % of the film, the rest black
    film[:20, :100] = 255  # a burnt-out label
    Image.fromarray(film).save(tmp_path / "bordered.png")
    assert np.asarray(read_image(tmp_path / "bordered.png")).shape == (400, 400)


@pytest.mark.shared_data
def test_every_real_film_is_read_and_every_hand_drawn_mask_refused(shared_data):
    images = sorted((shared_data / "lung-masks" / "images").glob("*.png"))
    masks = sorted((shared_data / "lung-masks" / "masks").glob("*.png"))
    assert len(images) == len(masks) == 300
    for film in images:
        read_image(film, max_side=96)
    assert {reason_for(mask) for mask in masks} == {"not-a-radiograph"}


def test_too_large_is_refused_from_the_header(tmp_path, monkeypatch):
    # Both PIL's own bomb limit (above ~179 MP) and the toolkit's stricter one are reported as too-large,
    # without decoding (decoding 30,000 x 30,000 would need 900 MB).
    (tmp_path / "bomb.png").write_bytes(huge_png_header(30_000, 30_000))
    (tmp_path / "big.png").write_bytes(huge_png_header(9_000, 9_000))
    assert reason_for(tmp_path / "bomb.png") == "too-large"
    assert reason_for(tmp_path / "big.png") == "too-large"
    # and worded alike, whichever limit caught them
    for name, claimed in (("bomb.png", "900 megapixels"), ("big.png", "9000x9000 pixels")):
        with pytest.raises(ImageReadError, match=f"{name}: header claims {claimed}, more than the 64 megapixel limit"):
            read_image(tmp_path / name)
    Image.fromarray(smooth_image(9, 100, 100)).save(tmp_path / "ok.png")
    monkeypatch.setattr(io, "MAX_PIXELS", 5_000)
    assert reason_for(tmp_path / "ok.png") == "too-large"


def test_missing_file(tmp_path):
    assert reason_for(tmp_path / "missing.png") == "unreadable"


def write_png_16bit(path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG of any colour type (Pillow writes 16 bits only for grayscale)."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_a_16bit_colour_png_of_low_bit_data_is_refused_not_read_as_a_black_sheet(tmp_path):
    # Pillow reads 16-bit RGB and gray+alpha PNGs as 8 bits, keeping the high byte: 12-bit values become 16 levels.
    twelve_bit = smooth_image(3).astype(np.uint16) * 16
    write_png_16bit(tmp_path / "rgb.png", np.dstack([twelve_bit] * 3), color_type=2)
    write_png_16bit(tmp_path / "la.png", np.dstack([twelve_bit, np.full_like(twelve_bit, 65535)]), color_type=4)
    for name in ("rgb.png", "la.png"):
        with pytest.raises(ImageReadError, match="16-bit colour PNG whose values fill only the low bits") as e:
            read_image(tmp_path / name)
        assert e.value.reason == "unreadable"
    write_png_16bit(tmp_path / "full.png", np.dstack([twelve_bit * 16] * 3), color_type=2)  # all 16 bits used
    image = read_image(tmp_path / "full.png")
    assert np.corrcoef(np.asarray(image, float).ravel(), twelve_bit.ravel())[0, 1] > 0.999


def test_the_suffix_dcm_does_not_hide_a_png_and_still_finds_a_dicom_without_preamble(tmp_path):
    Image.fromarray(smooth_image(5)).save(tmp_path / "named.dcm", format="PNG")  # exported under the wrong name
    assert not is_dicom(tmp_path / "named.dcm")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "named.dcm")), smooth_image(5))
    write_dicom(tmp_path / "m2.dcm", dicom_phantom(), **WINDOWED)
    (tmp_path / "old.dcm").write_bytes((tmp_path / "m2.dcm").read_bytes()[132:])  # no preamble, no 'DICM'
    assert is_dicom(tmp_path / "old.dcm")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "old.dcm")), np.asarray(read_image(tmp_path / "m2.dcm")))


def test_the_decoder_plugin_hint_is_given_only_for_compressed_dicom_without_a_decoder(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "has_dicom_decoder", lambda: False)
    write_dicom(tmp_path / "plain.dcm", dicom_phantom())
    import pydicom

    dataset = pydicom.dcmread(tmp_path / "plain.dcm")
    del dataset.PhotometricInterpretation  # damaged, not compressed: a plugin would not help
    dataset.save_as(tmp_path / "damaged.dcm")
    with pytest.raises(ImageReadError, match="cannot decode DICOM pixel data") as e:
        read_image(tmp_path / "damaged.dcm")
    assert "pip install" not in str(e.value)
    dataset = pydicom.dcmread(tmp_path / "plain.dcm")
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless  # claims a codec no plugin here decodes
    dataset.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    dataset.save_as(tmp_path / "jpegls.dcm")
    with pytest.raises(ImageReadError, match=r"needs a decoder: pip install 'cxr_fast\[dicom\]'"):
        read_image(tmp_path / "jpegls.dcm")
    monkeypatch.setattr(io, "has_dicom_decoder", lambda: True)  # installed, so the data itself is damaged
    with pytest.raises(ImageReadError, match="cannot decode DICOM pixel data") as e:
        read_image(tmp_path / "jpegls.dcm")
    assert "pip install" not in str(e.value)


def test_compressed_dicom_is_decoded_with_the_dicom_extra(tmp_path):
    # JPEG Lossless is what most CR/DX systems send; python-gdcm (the `dicom` extra, installed in CI) decodes it
    gdcm = pytest.importorskip("gdcm")
    stored = (np.random.default_rng(0).random((80, 96)) * 4000).astype(np.uint16)
    write_dicom(tmp_path / "plain.dcm", stored)
    for name, syntax in [("jpeg-lossless", gdcm.TransferSyntax.JPEGLosslessProcess14_1),
                         ("jpeg-ls", gdcm.TransferSyntax.JPEGLSLossless),
                         ("jpeg-2000", gdcm.TransferSyntax.JPEG2000Lossless)]:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(tmp_path / "plain.dcm"))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
        change.SetInput(reader.GetImage())
        assert change.Change(), name
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(tmp_path / f"{name}.dcm"))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write(), name
        assert (tmp_path / f"{name}.dcm").read_bytes() != (tmp_path / "plain.dcm").read_bytes()
        np.testing.assert_array_equal(np.asarray(read_image(tmp_path / f"{name}.dcm")),
                                      np.asarray(read_image(tmp_path / "plain.dcm")), err_msg=name)


def test_a_multi_frame_dicom_is_read_from_its_first_frame_alone(tmp_path, monkeypatch):
    # every frame was decoded before the first was kept: 300 frames cost 1.3 GB, past the megapixel limit
    from pydicom.dataset import Dataset

    from tests.conftest import write_dicom

    frames = np.stack([np.full((64, 80), 400 * (k + 1), dtype=np.uint16) for k in range(3)])
    frames[0, :, :40] = 4000  # the first frame alone has two halves
    frames += np.arange(64, dtype=np.uint16)[:, None]  # and a ramp: two flat values are no radiograph
    write_dicom(tmp_path / "series.dcm", frames, NumberOfFrames=3)
    decoded = []
    real = Dataset.pixel_array.fget

    def counted(dataset):
        pixels = real(dataset)
        decoded.append(pixels.shape)
        return pixels

    monkeypatch.setattr(Dataset, "pixel_array", property(counted))
    image = np.asarray(read_image(tmp_path / "series.dcm"))
    assert image.shape == (64, 80) and image[:, :40].mean() > image[:, 40:].mean()
    assert decoded == [(64, 80)]


def test_a_dicom_with_neither_preamble_nor_suffix_is_found_by_its_first_element(tmp_path):
    # PACS exports name files by UID or IM000001; some also drop the preamble, which left no clue but the content
    write_dicom(tmp_path / "m2.dcm", dicom_phantom(), **WINDOWED)
    for name, data in [("IM000001", bare_dataset_bytes(tmp_path / "m2.dcm")),
                       ("IM000002", (tmp_path / "m2.dcm").read_bytes()[132:])]:  # file meta kept, no 'DICM'
        (tmp_path / name).write_bytes(data)
        assert is_dicom(tmp_path / name), name
        np.testing.assert_array_equal(np.asarray(read_image(tmp_path / name)), np.asarray(read_image(tmp_path / "m2.dcm")))
    (tmp_path / "notes").write_bytes(b"\x08\x00 plain text that happens to start with a backspace")
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(512))
    assert not is_dicom(tmp_path / "notes") and not is_dicom(tmp_path / "random.bin")


def test_padding_outside_the_exposed_field_does_not_stretch_the_grey_range(tmp_path):
    stored = (smooth_image(6).astype(np.uint16) * 4 + 1000).astype(np.uint16)  # anatomy: 1000-2020
    stored[:, :10] = 0  # the collimated border, marked as padding
    write_dicom(tmp_path / "m2.dcm", stored, PixelPaddingValue=0)
    gray = np.asarray(read_image(tmp_path / "m2.dcm")).astype(int)
    assert gray[:, :10].max() == 0
    assert gray[:, 10:].min() == 0 and gray[:, 10:].max() == 255  # the anatomy gets the whole range, not 127-255
    assert np.corrcoef(gray[:, 10:].ravel(), stored[:, 10:].ravel())[0, 1] > 0.999
    stored[:, :10] = 4095
    write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", PixelPaddingValue=4095)
    inverted = np.asarray(read_image(tmp_path / "m1.dcm")).astype(int)
    assert inverted[:, :10].max() == 0  # black, as air, whichever way the file shows its values
    assert inverted[:, 10:].min() == 0 and inverted[:, 10:].max() == 255
    assert np.corrcoef(inverted[:, 10:].ravel(), stored[:, 10:].ravel())[0, 1] < -0.999


def test_a_voi_lut_is_applied_exactly_and_quietly(tmp_path, recwarn):
    from pydicom.dataset import Dataset

    stored = np.tile(np.arange(0, 1024, 8, dtype=np.uint16), (80, 1))  # 128 columns of 0, 8, ..., 1016
    lut = Dataset()
    lut.LUTDescriptor = [1024, 0, 16]
    lut.add_new(0x00283006, "US", [int(v) for v in (np.arange(1024) ** 2 // 16)])  # LUTData: a curve, not a line
    write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[lut])
    gray = np.asarray(read_image(tmp_path / "lut.dcm")).astype(float)
    expected = (np.arange(0, 1024, 8) ** 2 // 16).astype(float)
    expected = np.rint(255 * (expected - expected.min()) / (expected.max() - expected.min()))
    assert np.abs(gray[0] - expected).max() <= 1
    assert not [w for w in recwarn if "VOI LUT" in str(w.message)]


def test_a_damaged_dicom_header_is_unreadable_not_a_report(tmp_path):
    damaged = tmp_path / "CORRUPT01"
    damaged.write_bytes(b"\x00" * 128 + b"DICM" + np.random.default_rng(1).bytes(2000))
    assert reason_for(damaged) == "unreadable"
    write_dicom(tmp_path / "m2.dcm", dicom_phantom())
    import pydicom

    report = pydicom.dcmread(tmp_path / "m2.dcm")
    del report.PixelData  # a structured report or other non-image object: it names its SOP class
    report.save_as(tmp_path / "report.dcm")
    assert reason_for(tmp_path / "report.dcm") == "not-an-image"


def test_an_image_stem_keeps_dots_that_are_not_image_suffixes():
    assert io.image_stem("a/b/chest.PNG") == "chest"
    assert io.image_stem("x/1.2.826.0.1.3680043.8.498.318") == "1.2.826.0.1.3680043.8.498.318"
    assert io.image_stem("IMG.001") == "IMG.001"
    assert io.image_stem("scan.v2.dcm") == "scan.v2"


# --- exact pixels: the conversions worked out by hand -------------------------------------------------------


def test_the_two_level_share_refuses_a_film_from_ninety_percent_on(tmp_path):
    # 10,000 pixels: 4,500 at 0 and 4,500 at 255 (90 % at two values), the rest a ramp of many values, each rare
    pixels = np.zeros(10_000, np.uint8)
    pixels[4_500:9_000] = 255
    pixels[9_000:] = np.arange(1_000) % 250 + 2
    Image.fromarray(pixels.reshape(100, 100)).save(tmp_path / "ninety.png")
    assert reason_for(tmp_path / "ninety.png") == "not-a-radiograph"
    pixels[4_450:4_500] = pixels[8_950:9_000] = np.arange(50) * 5 + 2  # 89 %: a film with wide borders
    Image.fromarray(pixels.reshape(100, 100)).save(tmp_path / "eighty-nine.png")
    assert read_image(tmp_path / "eighty-nine.png").size == (100, 100)


def test_sixty_four_pixels_a_side_is_enough_and_sixty_three_is_not_for_png_and_dicom(tmp_path):
    Image.fromarray(smooth_image(8, 200, 64)).save(tmp_path / "64.png")
    Image.fromarray(smooth_image(8, 200, 63)).save(tmp_path / "63.png")
    write_dicom(tmp_path / "64.dcm", smooth_image(8, 64, 200).astype(np.uint16) * 16)
    write_dicom(tmp_path / "63.dcm", smooth_image(8, 63, 200).astype(np.uint16) * 16)
    assert read_image(tmp_path / "64.png").size == (200, 64)
    assert read_image(tmp_path / "64.dcm").size == (64, 200)
    assert reason_for(tmp_path / "63.png") == "too-small"
    assert reason_for(tmp_path / "63.dcm") == "too-small"


def stretched(values: np.ndarray) -> np.ndarray:
    """min..max onto 0..255, rounded to the nearest grey level, as a hand calculation does it."""
    values = values.astype(float)
    return np.round((values - values.min()) / (values.max() - values.min()) * 255)


def test_a_16bit_png_is_stretched_to_the_nearest_grey_level(tmp_path):
    pixels = (1000 + np.arange(96 * 80).reshape(80, 96) % 3002).astype(np.uint16)  # 1000..4001: no value halfway
    Image.fromarray(pixels).save(tmp_path / "a16.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "a16.png")), stretched(pixels))


def test_float_and_32bit_tiffs_are_stretched_over_their_range_and_nan_is_black(tmp_path):
    ramp = np.arange(96 * 80, dtype=np.float64).reshape(80, 96)
    Image.fromarray((ramp * 37 + 100_000).astype(np.int32), mode="I").save(tmp_path / "int32.tif")
    assert Image.open(tmp_path / "int32.tif").mode == "I"
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "int32.tif")), stretched(ramp))
    floats = (ramp / 7 - 300).astype(np.float32)
    floats[:, :8] = np.nan  # a detector's dead columns
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    gray = np.asarray(read_image(tmp_path / "float.tif"))
    assert (gray[:, :8] == 0).all()  # as dark as the darkest real value, not as bright as the brightest
    np.testing.assert_array_equal(gray[:, 8:], stretched(floats[:, 8:]))


def standard_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 onto 0..255, piece by piece as the standard writes it, rounded to the nearest level."""
    x = x.astype(float)
    if function == "SIGMOID":
        y = 255 / (1 + np.exp(-4 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = np.where(x <= center - width / 2, 0.0,
                     np.where(x > center + width / 2, 255.0, ((x - center) / width + 0.5) * 255))
    else:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        y = np.where(x <= low, 0.0, np.where(x > high, 255.0, ((x - (center - 0.5)) / (width - 1) + 0.5) * 255))
    return np.round(y)


@pytest.mark.parametrize("function", [None, "LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_a_voi_window_maps_each_stored_value_as_the_standard_says(tmp_path, function):
    stored = np.tile(1900 + 3 * np.arange(96, dtype=np.uint16), (80, 1))  # 1900..2185, one value a column
    extra = {} if function is None else {"VOILUTFunction": function}
    write_dicom(tmp_path / "w.dcm", stored, WindowCenter=2048, WindowWidth=200, **extra)
    gray = np.asarray(read_image(tmp_path / "w.dcm"))
    np.testing.assert_array_equal(gray, standard_window(stored, 2048, 200, function or "LINEAR"))


def test_the_first_of_several_windows_is_used(tmp_path):
    stored = np.tile(1900 + 3 * np.arange(96, dtype=np.uint16), (80, 1))
    write_dicom(tmp_path / "two.dcm", stored, WindowCenter=[2048, 1000], WindowWidth=[200, 50])
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "two.dcm")),
                                  standard_window(stored, 2048, 200, "LINEAR"))


def test_a_voi_lut_wins_over_a_window_in_the_same_file(tmp_path):
    from pydicom.dataset import Dataset

    stored = np.tile(np.arange(0, 1024, 8, dtype=np.uint16), (80, 1))
    lut = Dataset()
    lut.LUTDescriptor = [1024, 0, 16]
    lut.add_new(0x00283006, "US", [int(v) for v in (np.arange(1024) ** 2 // 16)])
    write_dicom(tmp_path / "both.dcm", stored, VOILUTSequence=[lut], WindowCenter=100, WindowWidth=50)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "both.dcm"))[0],
                                  stretched(np.arange(0, 1024, 8) ** 2 // 16))


def test_padding_is_found_among_stored_values_within_its_range_limit(tmp_path):
    # Pixel Padding Value and Range Limit name stored values, before the rescale: here 0..9 in the border
    stored = (smooth_image(6).astype(np.uint16) * 4 + 1000).astype(np.uint16)
    stored[:, :10] = np.arange(10, dtype=np.uint16)
    write_dicom(tmp_path / "pad.dcm", stored, PixelPaddingValue=0, PixelPaddingRangeLimit=9,
                RescaleSlope=1, RescaleIntercept=-1000)
    gray = np.asarray(read_image(tmp_path / "pad.dcm"))
    assert (gray[:, :10] == 0).all()
    np.testing.assert_array_equal(gray[:, 10:], stretched(stored[:, 10:]))  # the anatomy alone sets the range


def test_a_colour_dicom_is_read_through_its_luma(tmp_path):
    import pydicom

    write_dicom(tmp_path / "m2.dcm", dicom_phantom())
    dataset = pydicom.dcmread(tmp_path / "m2.dcm")
    rgb = np.zeros((80, 96, 3), np.uint8)
    rgb[..., 0] = np.linspace(40, 250, 96).astype(np.uint8)  # red ramp
    rgb[..., 2] = 200  # constant blue
    dataset.set_pixel_data(rgb, photometric_interpretation="RGB", bits_stored=8)
    dataset.save_as(tmp_path / "rgb.dcm")
    expected = 0.299 * rgb[..., 0] + 0.114 * rgb[..., 2]  # ITU-R 601 luma, green being 0
    assert np.abs(np.asarray(read_image(tmp_path / "rgb.dcm")).astype(float) - expected).max() <= 1


def test_a_16bit_colour_png_needs_sixty_four_grey_levels_in_its_high_bytes(tmp_path):
    # MIN_GREY_LEVELS: fewer levels than 64 lost the data; 64 are enough
    ramp = np.tile(np.arange(96, dtype=np.uint16), (80, 1))
    for levels, readable in [(64, True), (63, False)]:
        high_bytes = ramp * (levels - 1) // 95  # 0..levels-1, every one of them used
        assert len(np.unique(high_bytes)) == levels
        write_png_16bit(tmp_path / f"{levels}.png", np.dstack([high_bytes * 256 + 128] * 3), color_type=2)
        if readable:
            np.testing.assert_array_equal(np.asarray(read_image(tmp_path / f"{levels}.png")), high_bytes)
        else:
            assert reason_for(tmp_path / f"{levels}.png") == "unreadable"


def test_colour_is_measured_before_the_grey_image_hides_it(tmp_path):
    gray = np.clip(smooth_image(7), 60, 250)  # room for a blue channel 49 below the red one
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([gray] * 3), "RGB").save(tmp_path / "gray-rgb.png")
    Image.fromarray(np.dstack([gray] * 3), "RGB").save(tmp_path / "gray-rgb.jpg", quality=50)  # 4:2:0 chroma
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 128)]), "RGBA").save(tmp_path / "gray-rgba.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "gray-p.png")
    for name in ("gray.png", "gray-rgb.png", "gray-rgb.jpg", "gray-rgba.png", "gray-p.png"):
        image, share = io.read_image_and_colour(tmp_path / name)
        assert share == 0.0 and io.colour_warning(share) is None, name
        np.testing.assert_array_equal(np.asarray(image), np.asarray(read_image(tmp_path / name)))

    # columns 0-9: channels 48 apart (not coloured); 10-19: 49 apart (coloured); the rest grey
    rgb = np.dstack([gray] * 3)
    rgb[:, :10, 2] = gray[:, :10] - 48
    rgb[:, 10:20, 2] = gray[:, 10:20] - 49
    Image.fromarray(rgb, "RGB").save(tmp_path / "band.png")
    _, share = io.read_image_and_colour(tmp_path / "band.png")
    assert share == pytest.approx(10 / gray.shape[1])
    assert "colour image (10% of its pixels" in io.colour_warning(share)
    assert io.colour_warning(0.0099) is None and io.colour_warning(0.01) is not None  # COLOUR_SHARE: 1 %


def test_a_colour_dicom_is_measured_and_a_grey_one_is_not(tmp_path):
    import pydicom

    write_dicom(tmp_path / "m2.dcm", dicom_phantom())
    assert io.read_image_and_colour(tmp_path / "m2.dcm")[1] == 0.0
    dataset = pydicom.dcmread(tmp_path / "m2.dcm")
    rgb = np.zeros((80, 96, 3), np.uint8)
    rgb[..., 0] = np.linspace(40, 250, 96).astype(np.uint8)
    rgb[..., 2] = 200  # blue 200, green 0: every pixel's channels spread over 200 levels or more
    dataset.set_pixel_data(rgb, photometric_interpretation="RGB", bits_stored=8)
    dataset.save_as(tmp_path / "rgb.dcm")
    assert io.read_image_and_colour(tmp_path / "rgb.dcm")[1] == 1.0
