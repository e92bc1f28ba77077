"""Synthetic phantoms: layout, masks, determinism, shortcut markers, and that the classes carry real signal."""

import errno
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import cross_val_score

from cxr_fast import CLASSES
from cxr_fast.data.synth import MARKERS, make_phantom, synthesize
from cxr_fast.errors import CxrFastError


def _read(path):
    return np.asarray(Image.open(path))


def test_the_phantoms_carry_the_toolkit_classes():
    assert CLASSES == ("COVID-19", "Normal", "Pneumonia") and set(MARKERS) == set(CLASSES)


def test_folder_layout_and_meta(tmp_path):
    meta = synthesize(tmp_path, n_per_class=3, size=64, progress=True)
    for label in CLASSES:
        names = sorted(p.name for p in (tmp_path / label).iterdir())
        assert names == [f"{label}_{i:04d}.png" for i in range(3)]
        image = Image.open(tmp_path / label / names[0])
        assert image.mode == "L" and image.size == (64, 64)
        mask = Image.open(tmp_path / "_masks" / label / names[0])
        assert mask.mode == "L" and mask.size == (64, 64)
    assert (tmp_path / "_README.txt").read_text().startswith("Synthetic chest X-ray phantoms")
    on_disk = pd.read_csv(tmp_path / "_meta.csv", keep_default_na=False)
    assert list(on_disk.columns) == ["relpath", "label", "mask", "marker", "marker_box"]
    assert len(on_disk) == 9 and on_disk["label"].value_counts().to_dict() == {c: 3 for c in CLASSES}
    assert on_disk.iloc[4]["relpath"] == "Normal/Normal_0001.png"
    assert on_disk.iloc[4]["mask"] == "_masks/Normal/Normal_0001.png"
    pd.testing.assert_frame_equal(on_disk, meta)
    assert all((tmp_path / p).is_file() for p in [*meta["relpath"], *meta["mask"]])


def test_masks_hold_lungs_and_class_specific_lesions():
    size = 96
    for i in range(4):
        image, mask, _ = make_phantom("Normal", i, size)
        assert set(np.unique(mask)) == {0, 1}
        assert 0.1 < (mask == 1).mean() < 0.5  # two lung fields, not the whole image
        # Both lungs: one on each side of the image.
        assert (mask[:, : size // 2] == 1).any() and (mask[:, size // 2 :] == 1).any()

        image, mask, _ = make_phantom("Pneumonia", i, size)
        lesion = mask == 2
        assert lesion.sum() > 20
        left = lesion[:, : size // 2].sum()
        assert max(left, lesion.sum() - left) / lesion.sum() > 0.95  # one lung only
        assert image[lesion].mean() > image[mask == 1].mean() + 15  # dense: clearly brighter than lung

        image, mask, _ = make_phantom("COVID-19", i, size)
        lesion = mask == 2
        left = lesion[:, : size // 2].sum()
        assert 0.15 < left / lesion.sum() < 0.85  # bilateral
        rows, lung_rows = np.nonzero(lesion)[0], np.nonzero(mask > 0)[0]
        assert rows.mean() > lung_rows.mean()  # lower zones
        assert image[lesion].mean() > image[mask == 1].mean()


def test_lesion_contrast_zero_removes_the_lesion_from_image_and_mask():
    with_lesion, mask, _ = make_phantom("Pneumonia", 1, 64)
    without, plain_mask, _ = make_phantom("Pneumonia", 1, 64, lesion_contrast=0.0)
    lesion = mask == 2
    assert without[lesion].mean() < with_lesion[lesion].mean() - 15
    assert (without[~lesion] != with_lesion[~lesion]).mean() < 0.02  # only the lesion's soft rim differs
    assert set(np.unique(plain_mask)) == {0, 1}


def test_same_arguments_same_bytes_and_independent_of_n(tmp_path):
    synthesize(tmp_path / "a", n_per_class=3, size=64, seed=5, progress=False)
    synthesize(tmp_path / "b", n_per_class=3, size=64, seed=5, progress=False)
    synthesize(tmp_path / "c", n_per_class=5, size=64, seed=5, progress=False)
    synthesize(tmp_path / "d", n_per_class=3, size=64, seed=6, progress=False)
    for label in CLASSES:
        for i in range(3):
            rel = f"{label}/{label}_{i:04d}.png"
            first = (tmp_path / "a" / rel).read_bytes()
            assert first == (tmp_path / "b" / rel).read_bytes() == (tmp_path / "c" / rel).read_bytes()
            assert first != (tmp_path / "d" / rel).read_bytes()  # the seed matters
            mask_rel = f"_masks/{rel}"
            assert (tmp_path / "a" / mask_rel).read_bytes() == (tmp_path / "c" / mask_rel).read_bytes()


def test_shortcut_markers_on_every_image_at_rate_one(tmp_path):
    size = 128
    meta = synthesize(tmp_path, n_per_class=2, size=size, shortcut_rate=1.0, progress=False)
    assert meta["marker"].tolist() == [1] * 6
    for row in meta.itertuples():
        x0, y0, x1, y1 = map(int, row.marker_box.split(","))
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert 0.08 <= (x1 - x0) / size <= 0.14 and 0.04 <= (y1 - y0) / size <= 0.14
        corner = MARKERS[row.label][1]
        assert (x0 < size / 2) == corner.endswith("left") and (y0 < size / 2) == corner.startswith("top")

        marked = _read(tmp_path / row.relpath)
        index = int(row.relpath[-8:-4])
        plain, plain_mask, box = make_phantom(row.label, index, size, shortcut_rate=0.0)
        assert box is None
        changed = marked != plain
        changed[y0:y1, x0:x1] = False
        assert not changed.any()  # the marker only touches its box
        assert np.array_equal(_read(tmp_path / row.mask), plain_mask)  # and never the mask
        inside = marked[y0:y1, x0:x1].astype(float)
        ring = plain[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4].astype(float)
        assert inside.max() >= 250 and np.percentile(inside, 90) > ring.mean() + 100


def test_no_markers_at_rate_zero(tmp_path):
    meta = synthesize(tmp_path, n_per_class=4, size=64, shortcut_rate=0.0, progress=False)
    assert meta["marker"].sum() == 0 and (meta["marker_box"] == "").all()


def test_refuses_non_empty_folder_unless_forced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CxrFastError, match="not empty"):
        synthesize(tmp_path, n_per_class=1, size=64, progress=False)
    synthesize(tmp_path, n_per_class=3, size=64, progress=False, force=True)
    synthesize(tmp_path, n_per_class=2, size=64, progress=False, force=True)
    assert len(list((tmp_path / "Normal").glob("*.png"))) == 2  # stale phantoms of the first run are gone
    assert len(list((tmp_path / "_masks" / "Normal").glob("*.png"))) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad, flag", [(dict(n_per_class=0), "--n-per-class"), (dict(size=8), "--size"),
                                       (dict(size=48), "--size must be at least 64"),  # prepare refuses < 64 px
                                       (dict(shortcut_rate=1.5), "--shortcut-rate"), (dict(seed=-1), "--seed"),
                                       (dict(lesion_contrast=-1), "--lesion-contrast")])
def test_bad_arguments_are_user_errors_naming_the_option(tmp_path, bad, flag):
    with pytest.raises(CxrFastError, match=flag):
        synthesize(tmp_path / "out", progress=False, **bad)
    assert not (tmp_path / "out").exists()


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(CxrFastError, match="afile: exists and is not a folder"):
        synthesize(tmp_path / "afile" / "sub", n_per_class=1, size=64, progress=False)


def test_classes_separable_by_lung_patterns_not_by_brightness():
    n, size = 40, 64
    images = np.array(
        [make_phantom(label, i, size)[0] for label in CLASSES for i in range(n)], dtype=np.float32
    )
    labels = np.repeat(np.arange(3), n)
    brightness = images.mean(axis=(1, 2))[:, None]
    brightness = (brightness - brightness.mean()) / brightness.std()
    # 16x16 thumbnails, each standardised so exposure differences are removed and only patterns remain.
    thumbs = (
        images.reshape(len(images), 16, size // 16, 16, size // 16).mean(axis=(2, 4)).reshape(len(images), -1)
    )
    thumbs = (thumbs - thumbs.mean(1, keepdims=True)) / thumbs.std(1, keepdims=True)
    by_brightness = cross_val_score(LogisticRegression(max_iter=2000), brightness, labels, cv=5).mean()
    by_pattern = cross_val_score(RidgeClassifier(alpha=10.0), thumbs, labels, cv=5).mean()  # fast, linear
    assert by_pattern > 0.6  # chance is 1/3
    assert by_brightness < 0.55


def test_a_stopped_synth_leaves_nothing_to_mistake_for_a_phantom_set(tmp_path, monkeypatch):
    import cxr_fast.data.synth as synth

    real, made = synth.make_phantom, []

    def stopped_halfway(*args, **kwargs):
        made.append(1)
        if len(made) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "make_phantom", stopped_halfway)
    with pytest.raises(KeyboardInterrupt, match="new: synth interrupted; no phantoms were written"):
        synthesize(tmp_path / "new", n_per_class=3, size=64, progress=False)
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # a new set: whole or nothing
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".partial").mkdir()  # the work folder a kill left in an existing empty folder
    monkeypatch.undo()
    synthesize(tmp_path / "empty", n_per_class=1, size=64, progress=False)  # still empty to a rerun, and cleaned
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [*sorted(CLASSES), "_README.txt", "_masks",
                                                                       "_meta.csv"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_replacement_stopped_halfway_leaves_the_old_set_whole(tmp_path, monkeypatch, error):
    from cxr_fast.data.manifest import prepare

    out = tmp_path / "old"
    synthesize(out, n_per_class=3, size=64, shortcut_rate=1.0, progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "_masks" / "Normal" / "notes.txt").write_text("mine too")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_save, saved = Image.Image.save, []

    def stopped_halfway(self, *args, **kwargs):  # Ctrl-C, or a full disk met inside PIL (no file named)
        saved.append(1)
        if len(saved) == 5:
            raise error
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", stopped_halfway)
    with pytest.raises(type(error)) as e:
        synthesize(out, n_per_class=3, size=64, seed=1, force=True, progress=False)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no work folder left
    if isinstance(error, OSError):
        assert e.value.filename == str(out)  # the one-line error says where the disk filled up
    else:
        assert "old: synth interrupted; the phantoms there are as they were" in str(e.value)
    assert prepare(out, tmp_path / "data", progress=False).n_images == 9
    synthesize(out, n_per_class=2, size=64, seed=1, force=True, progress=False)
    assert len(list((out / "Normal").glob("*.png"))) == 2  # the larger old set's extra phantoms are gone
    assert (out / "notes.txt").read_text() == "mine" and (out / "_masks" / "Normal" / "notes.txt").is_file()
    assert not (out / "_unfinished.txt").exists() and not (out / ".partial").exists()


def test_a_set_stopped_while_moved_into_its_folder_is_refused_by_prepare(tmp_path, monkeypatch):
    from cxr_fast.data.manifest import prepare

    out = tmp_path / "empty"
    out.mkdir()  # an existing folder is filled, not replaced: the new set is moved in, class by class
    real_rename = Path.rename

    def killed_while_moving(self, target):
        if self.name.startswith("Pneumonia"):
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_while_moving)
    with pytest.raises(KeyboardInterrupt, match="empty: cxrfast data synth was stopped while writing here"):
        synthesize(out, n_per_class=3, size=64, progress=False)
    monkeypatch.undo()
    assert (out / "Normal").is_dir()  # two classes in: a manifest of them would look whole
    with pytest.raises(CxrFastError, match="empty: cxrfast data synth was stopped while writing here"):
        prepare(out, tmp_path / "data", progress=False)
    synthesize(out, n_per_class=3, size=64, progress=False)  # the same command finishes it, --force or not
    assert prepare(out, tmp_path / "data", progress=False).n_files == 9
    assert not (out / "_unfinished.txt").exists() and not (out / ".partial").exists()


def test_a_marker_box_is_its_width_and_margin_from_its_corner():
    # at 96 px: MARKER_WIDTH 0.12 gives round(11.52) = 12 px, MARKER_MARGIN 0.03 gives round(2.88) = 3 px
    for label, (_, corner) in MARKERS.items():
        image, _, (x0, y0, x1, y1) = make_phantom(label, 0, 96, shortcut_rate=1.0)
        assert x1 - x0 == 12 and 0 < y1 - y0 < 12
        assert (x0 == 3) if corner.endswith("left") else (x1 == 93)
        assert (y0 == 3) if corner.startswith("top") else (y1 == 93)
        plain, _, _ = make_phantom(label, 0, 96)
        changed = np.argwhere(image != plain)
        assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
        assert changed[:, 0].min() >= y0 and changed[:, 0].max() < y1


def test_lesions_lie_inside_the_lung_field_the_mask_shows_without_them():
    for label in ("Pneumonia", "COVID-19"):
        for i in range(3):
            _, mask, _ = make_phantom(label, i, 96)
            _, lungs_only, _ = make_phantom(label, i, 96, lesion_contrast=0.0)
            assert (mask == 2).any()
            assert np.array_equal(mask > 0, lungs_only == 1)  # a lesion relabels lung, never adds to it
