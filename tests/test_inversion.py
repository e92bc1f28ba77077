"""The inverted-film check (`cxr_fast.data.inversion`): real films pass, their negatives and only those are flagged,
phantoms pass. Rates on all 1186 real films: docs/bench/orientation_check.py."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from cxr_fast import CLASSES
from cxr_fast.data.inversion import inverted_warning, upright_correlation
from cxr_fast.data.io import read_image
from cxr_fast.data.synth import make_phantom
from cxr_fast.predict import image_warning


@pytest.mark.shared_data
def test_a_real_film_passes_and_its_negative_is_flagged(shared_data):
    for folder in sorted((shared_data / "cxr-dev").iterdir()):  # one film of each class, as the reader reads it
        film = read_image(sorted(folder.iterdir())[0])
        assert upright_correlation(film) > 0.1, folder.name
        assert inverted_warning(upright_correlation(film)) is None
        assert inverted_warning(upright_correlation(ImageOps.invert(film))).startswith("looks like an inverted (negative) film")


@pytest.mark.parametrize("label", CLASSES)
def test_a_phantom_passes_and_its_negative_is_flagged(label):
    phantom = Image.fromarray(make_phantom(label, 3, size=64, seed=7, shortcut_rate=1.0)[0])  # with its text marker
    assert inverted_warning(upright_correlation(phantom)) is None
    assert inverted_warning(upright_correlation(ImageOps.invert(phantom))) is not None


def test_the_check_sees_large_masses_not_grain():
    """Noise alone, or a flat sheet, is no negative film: the rule fires only on a reversed chest layout."""
    rng = np.random.default_rng(0)
    assert inverted_warning(upright_correlation(Image.new("L", (80, 80), 128))) is None
    phantom = make_phantom("Normal", 0, size=96, seed=5)[0].astype(np.int16)
    grainy = np.clip(phantom + rng.integers(-60, 61, phantom.shape), 0, 255).astype(np.uint8)
    assert inverted_warning(upright_correlation(Image.fromarray(grainy))) is None
    assert inverted_warning(upright_correlation(Image.fromarray(255 - grainy))) is not None
    assert inverted_warning(float("nan")) is None  # not measured (a manifest cell left blank): no claim


def test_a_colour_negative_gets_both_warnings():
    negative = ImageOps.invert(Image.fromarray(make_phantom("Pneumonia", 0, size=64, seed=2)[0]))
    both = image_warning(1.0, upright_correlation(negative)).split(" | ")  # each message has its own "; "
    assert [w.split(" ")[:3] for w in both] == [["a", "colour", "image"], ["looks", "like", "an"]]
    assert image_warning(0.0, upright_correlation(negative)).startswith("looks like an inverted")
    assert image_warning(0.0, upright_correlation(ImageOps.invert(negative))) is None
