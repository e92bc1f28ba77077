"""prepare / read_manifest / print_summary: the whole path from a folder of files to a checked manifest."""

import errno
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

import cxr_fast
from cxr_fast.data import io, manifest
from cxr_fast.data.manifest import MANIFEST_COLUMNS, prepare, print_summary, read_manifest
from cxr_fast.errors import CxrFastError

CLASSES = ("COVID-19", "Normal", "Pneumonia")


def textured_image(seed: int, width: int = 96, height: int = 96) -> Image.Image:
    """Random detail at several scales, so that every image has its own perceptual hash."""
    rng = np.random.default_rng(seed)
    total = np.zeros((height, width))
    for cells, weight in [(4, 1.0), (8, 0.5), (16, 0.25)]:
        noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        total += weight * np.asarray(noise.resize((width, height), Image.Resampling.BICUBIC), dtype=float)
    total = (total - total.min()) / (total.max() - total.min()) * 255
    return Image.fromarray(total.astype(np.uint8))


def make_dataset(root: Path, per_class: int = 6, size: int = 96) -> Path:
    """ROOT/<class>/<class>_NN.png with distinct images; returns root."""
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            textured_image(100 * c + i, size, size).save(root / label / f"{label}_{i:02d}.png")
    return root


def quiet(src, out, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 1)
    return prepare(src, out, **kwargs)


def test_prepare_writes_manifest_report_and_cache(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=10, size=200)
    out = tmp_path / "out"
    report = quiet(src, out, cache_size=128)

    frame = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(frame.columns) == [*MANIFEST_COLUMNS, "cache_path", "colour", "upright"]
    assert len(frame) == report.n_images == 30
    assert set(frame["label"]) == set(CLASSES)
    assert (frame["label"] == frame["source_label"]).all()  # no label map: folder names are the labels
    assert all(Path(p).is_absolute() for p in frame["path"])  # outside OUT: absolute
    assert all(
        not Path(p).is_absolute() and p.startswith("cache/") for p in frame["cache_path"]
    )  # inside: relative
    assert (frame["width"] == "200").all() and (frame["height"] == "200").all()
    assert Counter(frame["split"]) == {"train": 18, "valid": 6, "test": 6}
    assert report.counts == {
        split: dict.fromkeys(CLASSES, n) for split, n in [("train", 6), ("valid", 2), ("test", 2)]
    }

    for row in frame.itertuples():
        cached = out / row.cache_path
        assert cached.name == f"{row.sha256}.png" and cached.parent.name == row.sha256[:2]
        assert cached.parent.parent == out / "cache" / "128px"
        with Image.open(cached) as image:
            assert image.mode == "L" and image.size == (128, 128)

    data = json.loads((out / "prepare_report.json").read_text())
    assert data["counts"] == report.counts
    assert data["excluded"] == [] and data["conflicts"] == []
    assert data["arguments"]["seed"] == 0 and data["arguments"]["cache_size"] == 128
    # the split is drawn with numpy by cxr_fast's algorithm: the report says which versions drew it
    assert data["versions"]["numpy"] == np.__version__ and data["versions"]["cxr_fast"] == cxr_fast.__version__

    table = read_manifest(out)
    assert all(Path(p).is_file() for p in table["cache_path"])  # made absolute again
    assert table["width"].dtype.kind == "i"


def test_small_images_are_cached_without_enlarging(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=2, size=96)
    quiet(src, tmp_path / "out", cache_size=512)
    for path in read_manifest(tmp_path / "out")["cache_path"]:
        assert Image.open(path).size == (96, 96)


def test_no_cache(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=2)
    quiet(src, tmp_path / "out", cache_size=0)
    assert "cache_path" not in read_manifest(tmp_path / "out").columns
    assert not (tmp_path / "out" / "cache").exists()


def test_every_bad_file_is_excluded_with_its_reason(tmp_path, monkeypatch):
    src = make_dataset(tmp_path / "src", per_class=4)
    (src / "Normal" / "zero.png").write_bytes(b"")
    (src / "Normal" / "text.png").write_text("this is not an image")
    textured_image(1, 100, 100).save(src / "Normal" / "full.jpg")
    data = (src / "Normal" / "full.jpg").read_bytes()
    (src / "Normal" / "full.jpg").unlink()
    (src / "Normal" / "cut.jpg").write_bytes(data[: len(data) // 2])
    textured_image(2, 32, 32).save(src / "COVID-19" / "tiny.png")
    textured_image(3, 120, 110).save(src / "COVID-19" / "huge.png")
    (src / "loose.png").write_bytes((src / "Normal" / "Normal_00.png").read_bytes())
    monkeypatch.setattr(io, "MAX_PIXELS", 120 * 100)  # only huge.png (120x110) is over the limit

    report = quiet(src, tmp_path / "out")
    reasons = {item.path: item.reason for item in report.excluded}
    assert reasons == {
        "Normal/zero.png": "empty",
        "Normal/text.png": "not-an-image",
        "Normal/cut.jpg": "truncated",
        "COVID-19/tiny.png": "too-small",
        "COVID-19/huge.png": "too-large",
        "loose.png": "no-class-folder",
    }
    assert report.n_files == 12 + 6 and report.n_images == 12
    assert report.exclusions_by_reason()["empty"] == 1
    data = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert {item["path"]: item["reason"] for item in data["excluded"]} == reasons
    assert all(item["detail"] for item in data["excluded"])


def test_label_map_unmapped_and_ignore_unmapped(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=4)
    label_map = "COVID-19=COVID-19,Normal=Normal"
    with pytest.raises(CxrFastError, match=r"does not cover folder\(s\) 'Pneumonia' \(4 files\)"):
        quiet(src, tmp_path / "out", label_map=label_map)
    assert not (tmp_path / "out" / "manifest.csv").exists()

    with pytest.raises(CxrFastError, match=r"'Pneumonai' matches no folder: a typo\?"):
        quiet(src, tmp_path / "out", label_map=label_map + ",Pneumonai=Pneumonia")

    report = quiet(src, tmp_path / "out", label_map=label_map + ",Typo=Normal", ignore_unmapped=True)
    assert report.exclusions_by_reason() == {"unmapped-label": 4}
    assert report.labels == ["COVID-19", "Normal"]
    assert report.unused_map_keys == ["Typo"]


def test_a_class_that_vanishes_or_misses_a_split_is_warned_about(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=6)
    (src / "Viral").mkdir()  # an empty class folder: easy to miss, since it adds no files
    for extra in sorted((src / "Pneumonia").iterdir())[2:]:
        extra.unlink()  # two images cannot fill three splits
    report = quiet(src, tmp_path / "out")
    assert report.labels == list(CLASSES)
    assert "class folder 'Viral' is left out: it is empty" in report.warnings
    missing = [w for w in report.warnings if w.startswith("'Pneumonia' has no")]
    assert len(missing) == 1 and "(2 in all)" in missing[0]
    assert not any(w.startswith(("'COVID-19'", "'Normal'")) for w in report.warnings)


def test_a_single_class_is_prepared_for_testing_a_model_with_a_warning(tmp_path):
    # a set of Normal films alone is a common external test; it was refused, though evaluate --data takes it
    src = make_dataset(tmp_path / "src", per_class=3)
    for label in ("Normal", "Pneumonia"):
        for file in (src / label).iterdir():
            file.write_text("not an image")
    report = quiet(src, tmp_path / "out")
    assert any(w.startswith("only the class 'COVID-19' has usable images: this manifest can test a model")
               for w in report.warnings)
    assert set(read_manifest(tmp_path / "out")["label"]) == {"COVID-19"}


def test_label_map_renames_folders(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=3)
    (src / "Normal").rename(src / "No_findings")
    quiet(src, tmp_path / "out", label_map="No_findings=Normal,COVID-19=COVID-19,Pneumonia=Pneumonia")
    table = read_manifest(tmp_path / "out")
    assert set(table.loc[table["source_label"] == "No_findings", "label"]) == {"Normal"}


def test_duplicates_share_a_group_and_a_split(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=10)
    original = Image.open(src / "Normal" / "Normal_03.png")
    original.resize((80, 80)).save(src / "Normal" / "copy_small.jpg", quality=80)
    (src / "Normal" / "exact_copy.png").write_bytes((src / "Normal" / "Normal_03.png").read_bytes())

    report = quiet(src, tmp_path / "out")
    table = read_manifest(tmp_path / "out").set_index("path")
    names = [str(src / "Normal" / name) for name in ("Normal_03.png", "copy_small.jpg", "exact_copy.png")]
    assert table.loc[names, "group"].nunique() == 1
    assert table.loc[names, "split"].nunique() == 1
    assert table["group"].nunique() == 30
    assert len(report.duplicate_groups) == 1 and len(report.duplicate_groups[0]["files"]) == 3
    assert not report.duplicate_groups[0]["exact"]


def test_label_conflict_excludes_the_whole_group(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=6)
    Image.open(src / "Normal" / "Normal_01.png").resize((90, 90)).save(src / "Pneumonia" / "same_patient.jpg")

    report = quiet(src, tmp_path / "out")
    assert len(report.conflicts) == 1
    assert report.conflicts[0]["labels"] == ["Normal", "Pneumonia"]
    conflicted = {item.path for item in report.excluded if item.reason == "label-conflict"}
    assert conflicted == {"Normal/Normal_01.png", "Pneumonia/same_patient.jpg"}
    table = read_manifest(tmp_path / "out")
    assert len(table) == 17
    assert not table["path"].str.contains("same_patient|Normal_01").any()


def test_same_seed_same_manifest_other_seed_other_split(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=10)
    quiet(src, tmp_path / "a", seed=1)
    quiet(src, tmp_path / "b", seed=1)
    quiet(src, tmp_path / "c", seed=2)
    first = (tmp_path / "a" / "manifest.csv").read_text()
    assert (tmp_path / "b" / "manifest.csv").read_text() == first
    assert (tmp_path / "b" / "prepare_report.json").read_text().replace(str(tmp_path / "b"), "") == (
        tmp_path / "a" / "prepare_report.json"
    ).read_text().replace(str(tmp_path / "a"), "")
    a, c = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "c")
    assert list(a["path"]) == list(c["path"])
    assert list(a["split"]) != list(c["split"])
    assert Counter(zip(a["label"], a["split"], strict=True)) == Counter(
        zip(c["label"], c["split"], strict=True)
    )


def test_cross_validation_folds_test_each_image_once(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=9)
    tables = []
    for fold in range(3):
        report = quiet(src, tmp_path / f"fold{fold}", folds=3, fold=fold, cache_size=0)
        assert report.arguments["folds"] == 3 and report.arguments["fold"] == fold
        tables.append(read_manifest(tmp_path / f"fold{fold}"))
    tested = [path for table in tables for path in table.loc[table["split"] == "test", "path"]]
    assert sorted(tested) == sorted(tables[0]["path"])
    assert all(Counter(table["split"]) == {"train": 9, "valid": 9, "test": 9} for table in tables)
    for splits in ((0.8, 0.1, 0.1), "60,20,20"):  # the default's values too: the folds would override them
        with pytest.raises(CxrFastError, match="not both"):
            quiet(src, tmp_path / "bad", folds=5, fold=0, splits=splits)
    with pytest.raises(CxrFastError, match="between 0 and 2"):
        quiet(src, tmp_path / "bad", folds=3, fold=3)


def test_refuses_to_overwrite_unless_forced(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=3)
    quiet(src, tmp_path / "out", seed=0)
    with pytest.raises(CxrFastError, match="already exists; use --force"):
        quiet(src, tmp_path / "out", seed=5)
    report = quiet(src, tmp_path / "out", seed=5, force=True)
    assert json.loads(Path(report.report_path).read_text())["arguments"]["seed"] == 5


def test_output_inside_source_is_not_read_back(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=3)
    quiet(src, src, cache_size=64)
    report = quiet(src, src, cache_size=64, force=True)  # cache/, manifest.csv, report are not data
    assert report.n_files == 9 and report.excluded == []


def test_earlier_outputs_inside_source_are_not_read_as_classes(tmp_path):
    # cross-validation folds prepared into the source folder: fold1 must not read fold0's cached copies as a class
    src = make_dataset(tmp_path / "src", per_class=4)
    quiet(src, src / "fold0", cache_size=64, folds=3, fold=0)
    report = quiet(src, src / "fold1", cache_size=64, folds=3, fold=1)
    assert report.n_files == 12 and report.excluded == [] and report.conflicts == []
    assert sorted(report.labels) == ["COVID-19", "Normal", "Pneumonia"]


def test_bad_sources_and_arguments(tmp_path):
    with pytest.raises(CxrFastError, match="source folder not found"):
        quiet(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrFastError, match="no files found"):
        quiet(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "flat").mkdir()
    textured_image(0).save(tmp_path / "flat" / "a.png")
    with pytest.raises(CxrFastError, match="no class folders"):
        quiet(tmp_path / "flat", tmp_path / "out")
    (tmp_path / "junk" / "Normal").mkdir(parents=True)
    (tmp_path / "junk" / "Normal" / "a.png").write_text("text")
    with pytest.raises(CxrFastError, match="none of the 1 files is a usable image"):
        quiet(tmp_path / "junk", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed prepare leaves no half-made dataset folder behind
    src = make_dataset(tmp_path / "src", per_class=1)
    with pytest.raises(CxrFastError, match="cache size"):
        quiet(src, tmp_path / "out", cache_size=10)
    with pytest.raises(CxrFastError, match="add up to 1"):
        quiet(src, tmp_path / "out", splits=(0.5, 0.2, 0.2))
    with pytest.raises(CxrFastError, match="neither a file"):
        quiet(src, tmp_path / "out", label_map="nonsense")
    (tmp_path / "afile").write_text("")
    with pytest.raises(CxrFastError, match="afile: exists and is not a folder"):
        quiet(src, tmp_path / "afile" / "sub")


def test_synthetic_meta_adds_masks_and_marker_boxes(tmp_path):
    from cxr_fast.data.synth import synthesize

    src = tmp_path / "synth"
    synthesize(src, n_per_class=4, size=96, shortcut_rate=0.5, seed=0, progress=False)
    report = quiet(src, tmp_path / "out", cache_size=64)
    assert report.n_images == 12
    assert report.exclusions_by_reason() == {}  # synthesize's _README.txt is never read as an image
    table = read_manifest(tmp_path / "out")
    meta = pd.read_csv(src / "_meta.csv", dtype=str, keep_default_na=False)
    expected = {str(src / row.relpath): (str(src / row.mask), row.marker_box) for row in meta.itertuples()}
    for row in table.itertuples():
        assert (row.mask, row.marker_box) == expected[row.path]
        assert Path(row.mask).is_file()
    assert (table["marker_box"] != "").any() and (table["marker_box"] == "").any()


def test_parallel_workers_give_the_same_manifest(tmp_path, monkeypatch):
    src = make_dataset(tmp_path / "src", per_class=4)
    (src / "Normal" / "bad.png").write_text("not an image")
    quiet(src, tmp_path / "serial")
    monkeypatch.setattr(manifest, "PARALLEL_MIN_FILES", 2)
    report = quiet(src, tmp_path / "parallel", workers=2)
    assert (tmp_path / "parallel" / "manifest.csv").read_text() == (
        tmp_path / "serial" / "manifest.csv"
    ).read_text()
    assert report.exclusions_by_reason() == {"not-an-image": 1}


def test_read_manifest_errors(tmp_path):
    with pytest.raises(CxrFastError, match="manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label\na.png,Normal\n")
    with pytest.raises(CxrFastError, match="missing column.*split"):
        read_manifest(tmp_path)
    header = ",".join(MANIFEST_COLUMNS)
    (tmp_path / "manifest.csv").write_text(f"{header}\na.png,Normal,Normal,training,g1,abc,10,10\n")
    with pytest.raises(CxrFastError, match="unknown split value.*'training'"):
        read_manifest(tmp_path / "manifest.csv")
    (tmp_path / "manifest.csv").write_text(f"{header}\na.png,Normal,Normal,train,g1,abc,ten,10\n")
    with pytest.raises(CxrFastError, match="whole numbers"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text(f"{header}\n")
    with pytest.raises(CxrFastError, match="no rows"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text(f"{header}\nimages/a.png,Normal,Normal,train,g1,abc,10,10\n")
    assert read_manifest(tmp_path)["path"][0] == str(tmp_path.absolute() / "images" / "a.png")


def test_print_summary(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=4)
    (src / "Normal" / "zero.png").write_bytes(b"")
    report = quiet(src, tmp_path / "out")
    console = Console(record=True, width=200)
    print_summary(report, console)
    text = console.export_text()
    for word in (*CLASSES, "train", "valid", "test", "empty", "Normal/zero.png", "12 images"):
        assert word in text


def test_masks_and_blank_sheets_among_the_films_are_excluded_with_the_reason(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=4)
    mask = np.zeros((128, 128), np.uint8)
    mask[20:100, 30:100] = 255
    Image.fromarray(mask).save(src / "Normal" / "lung_mask.png")
    Image.new("L", (128, 128), 0).save(src / "COVID-19" / "blank.png")
    report = quiet(src, tmp_path / "out")
    assert {(e.path, e.reason) for e in report.excluded} == {("Normal/lung_mask.png", "not-a-radiograph"),
                                                          ("COVID-19/blank.png", "not-a-radiograph")}
    assert len(read_manifest(tmp_path / "out")) == 12
    console = Console(record=True, width=200)
    print_summary(report, console)
    assert "a mask, a blank sheet or a drawing" in console.export_text()


@pytest.mark.shared_data
def test_prepare_real_cxr_dev(shared_data, tmp_path):
    src = shared_data / "cxr-dev"
    report = prepare(
        src,
        tmp_path / "out",
        label_map="Covid-19=COVID-19,No_findings=Normal,Pneumonia=Pneumonia",
        cache_size=128,
        progress=False,
    )
    table = read_manifest(tmp_path / "out")
    assert report.n_files == 886
    assert set(table["label"]) == set(CLASSES)
    # near-identical copies were removed from cxr-dev: whatever is excluded must say why, and be rare
    assert len(table) + len(report.excluded) == 886 and len(table) >= 880
    assert all(item.reason in manifest.EXCLUSION_REASONS for item in report.excluded)
    for label, count in Counter(table["label"]).items():
        mine = table[table["label"] == label]
        for split, fraction in (("train", 0.6), ("valid", 0.2), ("test", 0.2)):
            assert abs((mine["split"] == split).sum() / count - fraction) <= 0.02
    assert table.groupby("group")["split"].nunique().max() == 1
    assert all(max(Image.open(p).size) <= 128 for p in table["cache_path"].sample(50, random_state=0))


def test_cache_is_reused_and_refreshed_for_another_size(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=2, size=200)
    cache = tmp_path / "out" / "cache"
    quiet(src, tmp_path / "out", cache_size=128)
    cached = sorted(cache.rglob("*.png"))
    assert len(cached) == 6
    stamps = {path: path.stat().st_mtime_ns for path in cached}
    quiet(src, tmp_path / "out", cache_size=128, force=True)
    assert {path: path.stat().st_mtime_ns for path in cached} == stamps  # same content key: not rewritten
    quiet(src, tmp_path / "out", cache_size=64, force=True)
    smaller = sorted(cache.rglob("*.png"))
    # the same images in a folder of their own; the 128 px copies, no longer used, are gone
    assert [path.relative_to(cache / "64px") for path in smaller] == [path.relative_to(cache / "128px") for path in cached]
    assert all(Image.open(path).size == (64, 64) for path in smaller)
    assert not (cache / "128px").exists()
    assert not list(cache.rglob(".*"))  # no partial files left behind


def test_an_interrupted_prepare_leaves_the_old_cached_copies_alone(tmp_path, monkeypatch):
    # `--size 64 --force` stopped after the image check had rewritten, in place, the 128 px copies the old manifest
    # points to: the manifest was unchanged (a run's digest check passed) and a run evaluated on it read other pixels
    src = make_dataset(tmp_path / "src", per_class=2, size=200)
    out = tmp_path / "out"
    quiet(src, out, cache_size=128)
    old_manifest = (out / "manifest.csv").read_bytes()
    old_copies = {path: Path(path).read_bytes() for path in read_manifest(out)["cache_path"]}

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", ctrl_c)  # the outputs' write: every image has been checked by then
    with pytest.raises(KeyboardInterrupt):
        quiet(src, out, cache_size=64, force=True)
    monkeypatch.undo()
    assert (out / "manifest.csv").read_bytes() == old_manifest
    assert {path: Path(path).read_bytes() for path in read_manifest(out)["cache_path"]} == old_copies


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_manifest_and_report_together(tmp_path, monkeypatch, failure):
    # the manifest was renamed into place before the report was written: a full disk or Ctrl-C between the two left
    # a seed-7 manifest beside the seed-0 report
    src = make_dataset(tmp_path / "src", per_class=5)
    out = tmp_path / "out"
    quiet(src, out, cache_size=64)
    names = ("manifest.csv", "prepare_report.json")
    old = {name: (out / name).read_bytes() for name in names}
    write_text = Path.write_text

    def report_fails(path, *args, **kwargs):
        if "prepare_report" in path.name:
            raise failure
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", report_fails)
    with pytest.raises(type(failure)):
        quiet(src, out, cache_size=64, seed=7, force=True)
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in names} == old
    assert not list(out.glob(".*"))  # no partial files left behind
    quiet(src, out, cache_size=64, seed=7, force=True)
    assert (out / "manifest.csv").read_bytes() != old["manifest.csv"]  # seed 7 does split otherwise


def test_a_manifest_of_the_old_cache_layout_still_works_and_is_cleaned_up(tmp_path):
    # before the size folder, copies were cache/<sha[:2]>/<sha>.png: manifests pointing there must still read, and the
    # next prepare removes those copies (but nothing of the user's in the folder)
    src = make_dataset(tmp_path / "src", per_class=2, size=200)
    out = tmp_path / "out"
    quiet(src, out, cache_size=128)
    frame = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    for i, new in enumerate(frame["cache_path"]):
        old = Path("cache", *Path(new).parts[2:])
        (out / old).parent.mkdir(parents=True, exist_ok=True)
        (out / new).rename(out / old)
        frame.loc[i, "cache_path"] = old.as_posix()
    frame.to_csv(out / "manifest.csv", index=False)
    shutil.rmtree(out / "cache" / "128px")
    (out / "cache" / "notes.txt").write_text("mine")
    assert all(Path(path).is_file() for path in read_manifest(out)["cache_path"])

    quiet(src, out, cache_size=128, force=True)
    kept = sorted(path.relative_to(out).as_posix() for path in (out / "cache").rglob("*") if path.is_file())
    assert kept == sorted([*read_manifest(out)["cache_path"].map(lambda p: Path(p).relative_to(out).as_posix()),
                           "cache/notes.txt"])
    assert all(path.startswith("cache/128px/") for path in kept if path != "cache/notes.txt")


def test_a_prepare_without_cache_removes_the_old_one(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=2)
    quiet(src, tmp_path / "out", cache_size=64)
    quiet(src, tmp_path / "out", cache_size=0, force=True)
    assert not (tmp_path / "out" / "cache").exists()


def test_a_damaged_cached_copy_is_written_again(tmp_path):
    # a copy cut short (a disk error, an interrupted sync) passed the header check and failed only in training
    src = make_dataset(tmp_path / "src", per_class=2, size=200)
    quiet(src, tmp_path / "out", cache_size=128)
    copy = sorted((tmp_path / "out" / "cache").rglob("*.png"))[0]
    whole = copy.read_bytes()
    copy.write_bytes(whole[: len(whole) // 2])
    quiet(src, tmp_path / "out", cache_size=128, force=True)
    assert copy.read_bytes() == whole


def test_a_small_cache_keeps_the_short_side_readable(tmp_path):
    # --size 64 cached a 256x210 film as 64x52, below the reader's 64 px minimum: training could not read it
    from cxr_fast.data.cache import cached_size
    from cxr_fast.data.io import read_image

    assert cached_size((256, 210), 64) == (78, 64) and cached_size((200, 200), 64) == (64, 64)
    assert cached_size((100, 70), 64) == (91, 64) and cached_size((90, 64), 64) == (90, 64)  # never enlarged
    assert cached_size((1000, 789), 256) == (256, 202)  # 789 * 0.256 = 201.98: rounded, not cut
    src = tmp_path / "src"
    for c, label in enumerate(CLASSES):
        (src / label).mkdir(parents=True)
        for i in range(2):
            textured_image(100 * c + i, 256, 210).save(src / label / f"{i}.png")
    quiet(src, tmp_path / "out", cache_size=64)
    for path in read_manifest(tmp_path / "out")["cache_path"]:
        assert read_image(path).size == (78, 64)


def test_a_cached_copy_of_another_size_or_mode_is_written_again(tmp_path):
    # a whole PNG at the cache path is reused only as the 8-bit gray copy of the size the rule gives now
    from cxr_fast.data.cache import cache_path_for, store

    film = textured_image(1, 200, 160)
    sha = "ab" * 32
    path = cache_path_for(tmp_path, sha, 100)
    path.parent.mkdir(parents=True)
    for stale in (film.resize((100, 100)), film.resize((100, 80)).convert("RGB")):
        stale.save(path)
        assert store(film, tmp_path, sha, 100) == path
        with Image.open(path) as copy:
            assert (copy.mode, copy.size) == ("L", (100, 80))


def test_remove_unused_removes_only_unused_copies_and_leftover_partials(tmp_path):
    from cxr_fast.data.cache import remove_unused

    used, unused = "ab" * 32, "cd" * 32
    files = {f"64px/ab/{used}.png": True, f"64px/cd/{unused}.png": False,
             f"64px/cd/.{unused}.png.123.456.partial": False,  # a copy a kill -9 cut short
             # the user's files, one named like a copy but outside the folder store puts a copy in
             "64px/cd/cd-notes.txt": True, f"{unused}.png": True, f"64px/{unused}.png": True}
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    remove_unused(tmp_path, {str(tmp_path / f"64px/ab/{used}.png")})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        name for name, kept in files.items() if kept)


def test_a_wide_films_small_copy_is_shrunk_from_the_film_not_enlarged_from_a_thumbnail(tmp_path):
    # at --size 64 a 400x160 film was decoded at 64x26 and that enlarged to 160x64: 26 rows of detail, not 64
    from cxr_fast.data.io import read_image

    src = tmp_path / "src"
    for c, label in enumerate(CLASSES):
        (src / label).mkdir(parents=True)
        for i in range(2):
            film = np.asarray(textured_image(100 * c + i, 400, 160), dtype=float)
            film[(np.arange(160) // 8) % 2 == 1] *= 0.5  # bands 8 rows high: 3 rows in the copy, lost in a 26-row decode
            Image.fromarray(film.astype(np.uint8)).save(src / label / f"{i}.png")
    quiet(src, tmp_path / "out", cache_size=64)
    for row in read_manifest(tmp_path / "out").itertuples():
        copy = read_image(row.cache_path)
        assert copy.size == (160, 64)
        shrunk = np.asarray(read_image(row.path).resize((160, 64), Image.Resampling.LANCZOS), dtype=float)
        assert np.abs(np.asarray(copy, dtype=float) - shrunk).mean() < 1.0


def test_an_out_folder_inside_the_source_that_holds_data_is_refused(tmp_path):
    # --out SRC/Pneumonia would leave that class out of this run and, through its report, every later one
    src = make_dataset(tmp_path / "src", per_class=3)
    with pytest.raises(CxrFastError, match="Pneumonia: --out lies inside .* already holds 'Pneumonia_00.png' and 2 "
                                           "more, which would be left out of the data"):
        quiet(src, src / "Pneumonia")
    assert not (src / "Pneumonia" / "prepare_report.json").exists()
    quiet(src, src / "prepared")  # a new folder inside SRC is fine, and so is preparing it again
    assert quiet(src, src / "prepared", force=True).n_files == 9
    quiet(src, src / "cv" / "fold0", folds=3, fold=0)  # a folder holding only earlier prepares' outputs is fine too
    assert quiet(src, src / "cv", folds=3, fold=1).n_files == 9


def test_a_source_prepared_into_itself_can_be_prepared_elsewhere(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=3)
    quiet(src, src, cache_size=64)
    report = quiet(src, tmp_path / "out", cache_size=64)  # SRC/cache is not a class of near copies
    assert report.n_files == 9 and report.excluded == [] and sorted(report.labels) == list(CLASSES)


def test_a_file_name_that_is_not_utf8_is_excluded_not_a_crash(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=3)
    textured_image(99).save(bytes(src / "Normal") + b"/caf\xe9.png")  # a Latin-1 name from an old zip
    report = quiet(src, tmp_path / "out")
    assert [(e.path, e.reason) for e in report.excluded] == [("Normal/caf\\xe9.png", "unreadable")]
    assert "not valid UTF-8" in report.excluded[0].detail
    assert len(read_manifest(tmp_path / "out")) == 9
    (src / "Normal" / "caf\udce9.png").unlink()
    (src / "Viral\udced").mkdir()  # a whole class folder of such a name: its warning is printable too
    textured_image(98).save(bytes(src / "Viral") + b"\xed/a.png")
    report = quiet(src, tmp_path / "out2")
    assert "class folder 'Viral\\xed' is left out: none of its 1 files is usable" in report.warnings[0]
    with open(tmp_path / "log.txt", "w", encoding="utf-8") as log:
        print_summary(report, Console(file=log))


def test_class_folders_that_differ_only_in_case_space_or_unicode_form_are_refused(tmp_path):
    import unicodedata

    for pair in (("Normal", "normal"), ("Pneumonia", "Pneumonia "), ("Neumonía", unicodedata.normalize("NFD", "Neumonía"))):
        src = make_dataset(tmp_path / f"src{len(pair[1])}", per_class=3)
        (src / "train" / pair[0]).mkdir(parents=True)
        (src / "test" / pair[1]).mkdir(parents=True)
        textured_image(501).save(src / "train" / pair[0] / "a.png")
        textured_image(502).save(src / "test" / pair[1] / "b.png")
        with pytest.raises(CxrFastError, match="differ only in case, spaces or Unicode form"):
            quiet(src, tmp_path / "out")
    # a label map names the class once: both folders become it
    label_map = {name: name for name in CLASSES} | {"Neumonía": "Pneumonia"}
    report = quiet(src, tmp_path / "out", label_map=label_map)
    assert report.n_files == 11 and not report.excluded


def test_an_out_folder_that_cannot_be_written_fails_before_decoding(tmp_path, monkeypatch):
    src = make_dataset(tmp_path / "src", per_class=3)
    monkeypatch.setattr(manifest.os, "access", lambda path, mode: False)  # as on a read-only mount
    with pytest.raises(CxrFastError, match=r"cannot be written \(read-only or not yours; choose another --out\)"):
        quiet(src, tmp_path / "out")
    monkeypatch.undo()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manifest.image_cache, "store", full_disk)  # the disk fills up during the run
    with pytest.raises(CxrFastError, match="cannot write the image cache .No space left on device"):
        quiet(src, tmp_path / "out")


def test_class_folders_named_like_split_folders_are_warned_about(tmp_path):
    src = tmp_path / "src"
    for s, split in enumerate(("train_set", "Test-Images")):  # the classes are one level deeper, under near-miss names
        for c, label in enumerate(CLASSES):
            (src / split / label).mkdir(parents=True)
            for i in range(2):
                textured_image(1000 + 100 * s + 10 * c + i).save(src / split / label / f"{i}.png")
    report = quiet(src, tmp_path / "out")
    assert sorted(report.labels) == ["Test-Images", "train_set"]
    assert any(w.startswith("class folder(s) 'Test-Images', 'train_set' look like split folders") for w in report.warnings)
    assert not any("look like split" in w for w in quiet(make_dataset(tmp_path / "plain"), tmp_path / "o2").warnings)


def make_sites(root: Path, per_class: int = 6, sites=("hospA", "hospB"), classes_at=None) -> Path:
    """ROOT/<site>/<class>/<file>; ``classes_at``: site -> the classes it has (default: all)."""
    for s, site in enumerate(sites):
        for c, label in enumerate((classes_at or {}).get(site, CLASSES)):
            (root / site / label).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                textured_image(1000 * s + 100 * c + i).save(root / site / label / f"{i:02d}.png")
    return root


def test_site_folders_read_as_classes_are_named_and_sites_reads_the_classes_inside(tmp_path):
    # Read as ROOT/<class>/…, the "classes" are hospitals: a model would learn to tell them apart, without an error.
    src = make_sites(tmp_path / "src")
    report = quiet(src, tmp_path / "as_classes")
    assert report.labels == ["hospA", "hospB"]
    assert any("each hold folders named alike ('COVID-19', 'Normal', 'Pneumonia')" in w and "--sites" in w
               for w in report.warnings)
    with pytest.raises(CxrFastError, match=r"'hospA' \(18 files\).*--ignore-unmapped to leave them out; the class "
                                           r"folders .*: if those are the classes and these are sites, pass --sites$"):
        quiet(src, tmp_path / "mapped", label_map="COVID-19=COVID-19,Normal=Normal,Pneumonia=Pneumonia")

    report = quiet(src, tmp_path / "sites", sites=True, label_map="COVID-19=COVID,Normal=Normal,Pneumonia=Pneumonia")
    assert report.labels == ["COVID", "Normal", "Pneumonia"]
    assert report.sites == {site: {"COVID": 6, "Normal": 6, "Pneumonia": 6} for site in ("hospA", "hospB")}
    assert not any("--sites" in w or "comes from site" in w for w in report.warnings)
    frame = read_manifest(tmp_path / "sites")
    assert sorted(frame["site"].unique()) == ["hospA", "hospB"]
    # Each site's classes are split alike: every site has every class in every split.
    assert frame.groupby(["site", "label"])["split"].nunique().eq(3).all()
    console = Console(record=True, width=200)
    print_summary(report, console)
    assert "images per site" in console.export_text()


def test_each_sites_synthetic_meta_adds_its_masks_and_marker_boxes(tmp_path):
    # phantoms made one site at a time keep their _meta.csv in SRC/<site>/: it was not read, and the shortcut
    # audit lost the true lung masks and evaluate the with/without-marker figures
    from cxr_fast.data.synth import synthesize

    src = tmp_path / "src"
    synthesize(src / "north", n_per_class=3, size=96, seed=0, progress=False)
    synthesize(src / "south", n_per_class=3, size=96, shortcut_rate=1.0, seed=1, progress=False)
    quiet(src, tmp_path / "out", sites=True, cache_size=0)
    table = read_manifest(tmp_path / "out")
    assert len(table) == 18 and all(Path(mask).is_file() for mask in table["mask"])
    marked = table["marker_box"] != ""
    assert set(table.loc[marked, "site"]) == {"south"} and marked.sum() == 9
    for site in ("north", "south"):  # each row has the mask its own site drew for it
        meta = pd.read_csv(src / site / "_meta.csv", dtype=str, keep_default_na=False)
        expected = {str(src / site / row.relpath): str(src / site / row.mask) for row in meta.itertuples()}
        of_site = table[table["site"] == site]
        assert [expected[path] for path in of_site["path"]] == list(of_site["mask"])


def test_a_class_found_at_one_site_only_is_warned_about(tmp_path):
    src = make_sites(tmp_path / "src", classes_at={"hospB": ("Normal", "Pneumonia")})
    report = quiet(src, tmp_path / "out", sites=True)
    assert [w for w in report.warnings if "comes from site" in w] == [
        "every 'COVID-19' image comes from site 'hospA': a model can learn to recognise that site instead of the "
        "disease; check `cxrfast interpret`'s shortcut audit"]


def test_a_class_folders_own_subfolders_are_not_taken_for_sites(tmp_path):
    # Patients (or dates) nested under each class differ between classes: the ordinary layout, no hint.
    for c, label in enumerate(CLASSES):
        for p in range(2):
            folder = tmp_path / "src" / label / f"{label}_patient{p}"
            folder.mkdir(parents=True)
            for i in range(3):
                textured_image(100 * c + 10 * p + i).save(folder / f"{i}.png")
    report = quiet(tmp_path / "src", tmp_path / "out")
    assert report.labels == list(CLASSES)
    assert not any("--sites" in w for w in report.warnings)


def test_sites_are_named_despite_a_stray_file_or_classes_spelt_differently_at_each_site(tmp_path):
    # a README beside a site's class folders, or "COVID" at one site and "COVID-19" at another, hid the hint
    src = make_sites(tmp_path / "src")
    (src / "hospB" / "readme.txt").write_text("exported 2026-11-02")
    (src / "hospB" / "COVID-19").rename(src / "hospB" / "covid")
    (src / "hospB" / "Normal").rename(src / "hospB" / "normal")
    report = quiet(src, tmp_path / "out")
    hint = next(w for w in report.warnings if "--sites" in w)
    assert "'Normal', 'Pneumonia'" in hint


def test_images_and_masks_folders_inside_every_class_are_not_taken_for_sites(tmp_path):
    # the COVID-19 Radiography Database keeps COVID/images and COVID/masks: alike in every class, yet not sites
    for c, label in enumerate(CLASSES):
        for sub in ("images", "masks"):
            (tmp_path / "src" / label / sub).mkdir(parents=True)
        for i in range(4):
            textured_image(100 * c + i).save(tmp_path / "src" / label / "images" / f"{i}.png")
            mask = np.zeros((96, 96), np.uint8)
            mask[20:70, 10 + i:40] = 255
            Image.fromarray(mask).save(tmp_path / "src" / label / "masks" / f"{i}.png")
    report = quiet(tmp_path / "src", tmp_path / "out")
    assert report.labels == list(CLASSES) and report.exclusions_by_reason() == {"not-a-radiograph": 12}
    assert not any("--sites" in w for w in report.warnings)


def test_an_empty_class_folder_at_one_site_is_warned_about(tmp_path):
    # hospA/Pneumonia has images, so "Pneumonia" was counted as used and hospC's empty one went unmentioned
    src = make_sites(tmp_path / "src", sites=("hospA", "hospC"), classes_at={"hospC": ("COVID-19", "Normal")})
    (src / "hospC" / "Pneumonia").mkdir()
    report = quiet(src, tmp_path / "out", sites=True)
    assert "class folder 'hospC/Pneumonia' is left out: it is empty" in report.warnings


def test_sites_on_a_folder_of_class_folders_says_to_leave_it_out_and_loose_site_files_are_named(tmp_path):
    src = make_dataset(tmp_path / "src", per_class=2)
    with pytest.raises(CxrFastError, match=r"with --sites the folders below it are sites holding class folders, but "
                                           r"'COVID-19' \(2 files\), 'Normal' \(2 files\), 'Pneumonia' \(2 files\) hold "
                                           r"their files directly; leave out --sites if those are the classes$"):
        quiet(src, tmp_path / "out", sites=True)
    mixed = make_sites(tmp_path / "mixed", per_class=4)  # and a class folder beside the site folders
    (mixed / "Normal").mkdir()
    for i in range(3):
        textured_image(900 + i).save(mixed / "Normal" / f"{i}.png")
    report = quiet(mixed, tmp_path / "mixed-out", sites=True)
    assert report.exclusions_by_reason() == {"no-class-folder": 3}
    assert ("site folder(s) 'Normal' (3 files) hold files directly, not in class folders: they are left out "
            "(no-class-folder)") in report.warnings


def test_a_bug_in_fingerprinting_is_raised_not_reported_as_unreadable_files(tmp_path, monkeypatch):
    # a broad except around our own code turned a programming error into "unreadable" exclusions, and prepare
    # finished with the images quietly left out
    from cxr_fast.data import cache

    film = tmp_path / "film.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80), dtype=np.uint8)).save(film)
    assert cache.examine_file((str(film), None, 0)).reason == ""

    def broken(path, image):
        raise TypeError("a bug")

    monkeypatch.setattr(cache, "fingerprint", broken)
    with pytest.raises(TypeError, match="a bug"):
        cache.examine_file((str(film), None, 0))

    def vanished(path, image):  # deleted between its decoding and its hashing
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    monkeypatch.setattr(cache, "fingerprint", vanished)
    examined = cache.examine_file((str(film), None, 0))
    assert examined.reason == "unreadable" and "No such file" in examined.detail


def test_labels_map_to_the_model_outputs_and_an_unknown_label_is_refused():
    from cxr_fast.data.manifest import label_indices, manifest_classes

    manifest = pd.DataFrame({"label": ["Pneumonia", "COVID-19", "Normal", "Pneumonia"]})
    classes = manifest_classes(manifest)
    assert classes == ["COVID-19", "Normal", "Pneumonia"]  # sorted, as fastai orders its vocab
    indices = label_indices(manifest["label"], classes)
    assert indices.tolist() == [2, 0, 1, 2] and indices.dtype == np.int64
    with pytest.raises(CxrFastError, match=r"labels \['Viral'\] are not classes of this model"):
        label_indices(pd.Series(["Normal", "Viral"]), classes)  # mapped alone it became NaN, then 1.0, 0.0 …


def test_a_second_prepare_into_a_folder_another_process_is_preparing_refuses_and_leaves_its_cache(tmp_path):
    # Two prepares into one --out at once: they shared .manifest.csv.partial (one failed on it, and, having "created"
    # the folder, removed it with the other's finished dataset in it), and one at another --size deleted the copies
    # the other had cached, leaving its manifest pointing at missing files (seen with two real processes).
    from tests.conftest import HOLDING_LOCK, another_process

    src = make_dataset(tmp_path / "src")
    out = tmp_path / "data"
    cached = out / "cache" / "128px" / "ab" / ("ab" + "0" * 62 + ".png")  # one of the first one's copies
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"png")
    with another_process(HOLDING_LOCK, out) as first:
        with pytest.raises(CxrFastError, match=rf"{out}: is being written by another cxrfast process \(pid {first.pid}\)"):
            quiet(src, out, cache_size=64, force=True)
        assert cached.read_bytes() == b"png" and not (out / "manifest.csv").exists()


def test_prepare_force_refuses_while_another_process_reads_the_data_and_goes_ahead_once_it_is_gone(tmp_path):
    # A prepare --force under a running train replaced its manifest (and removed cached copies it did not use): the
    # train found out only at its end and wrote no bundle, minutes lost. Now the reader's mark makes prepare refuse.
    import socket
    import subprocess
    import sys

    from cxr_fast.outputs import reader_path, reading
    from tests.conftest import HOLDING_LOCK, READING_DATA, another_process

    src = make_dataset(tmp_path / "src")
    out = tmp_path / "data"
    quiet(src, out, cache_size=64)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with another_process(READING_DATA, out) as reader:
        with pytest.raises(CxrFastError, match=rf"^{out}: is being read by another cxrfast process \(pid {reader.pid}: "
                                               r"a train, evaluate, interpret or ensemble\); wait for it to finish \(if none is "
                                               rf"running, delete {tmp_path}/\.data\.reader-{reader.pid}-.*\.lock\)$"):
            quiet(src, out, cache_size=128, splits="0.5,0.25,0.25", force=True)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # not a file touched
        with another_process(READING_DATA, out):  # readers do not exclude one another
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # the mark went with its process

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = reader_path(out).with_name(f".data.reader-{dead.stdout.strip()}-{socket.gethostname()}.lock")
    stale.write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")  # a train killed with kill -9 left it
    with reading(out):  # this process's own mark never stops its own prepare (the demo prepares, then trains)
        quiet(src, out, cache_size=128, splits="0.5,0.25,0.25", force=True)
    assert (out / "manifest.csv").read_bytes() != before[out / "manifest.csv"] and (out / "cache" / "128px").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # the stale mark removed, and ours

    # the other way round: a reader starting while a prepare writes the folder refuses at once, and leaves no mark
    with another_process(HOLDING_LOCK, out) as writer:
        with pytest.raises(CxrFastError, match=rf"^{out}: is being written by another cxrfast process \(pid {writer.pid}\)"):
            with reading(out):
                pass
        assert not reader_path(out).exists()


def test_a_data_folder_reached_through_a_link_is_one_folder_to_readers_and_writers(tmp_path):
    # the marks were named after the path as given: a train reading `data -> prepared/v2` and a `prepare --force` of
    # prepared/v2 did not see each other, and the run lost its manifest halfway
    from cxr_fast.outputs import reading
    from tests.conftest import HOLDING_LOCK, READING_DATA, another_process

    src = make_dataset(tmp_path / "src")
    real = tmp_path / "prepared" / "v2"
    quiet(src, real, cache_size=64)
    link = tmp_path / "data"
    link.symlink_to(real, target_is_directory=True)
    before = (real / "manifest.csv").read_bytes()
    for read_as, replaced_as in ((link, real), (real, link)):
        with another_process(READING_DATA, read_as) as reader:
            with pytest.raises(CxrFastError, match=rf"^{replaced_as}: is being read by another cxrfast process "
                                                   rf"\(pid {reader.pid}: "):
                quiet(src, replaced_as, cache_size=64, splits="0.5,0.25,0.25", force=True)
        assert (real / "manifest.csv").read_bytes() == before
    with another_process(HOLDING_LOCK, link) as writer:
        with pytest.raises(CxrFastError, match=rf"^{real}: is being written by another cxrfast process \(pid {writer.pid}\)"):
            with reading(real):
                pass
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["v2"]  # every mark went with its process


def test_a_manifest_written_on_windows_reads_on_linux_and_the_reverse(tmp_path):
    # prepared on Windows (originals outside DIR by their C:\ path, copies inside it by a "/" path, CRLF line ends)
    # and read on Linux, or prepared on Linux and read on Windows: the copies are found in DIR, and a path absolute
    # on the other system is kept as it was, naming the missing file, not joined to DIR
    header = ",".join(MANIFEST_COLUMNS) + ",cache_path,mask"
    rows = [r"C:\Users\ana\src\Normal\a.png,Normal,Normal,train,g1,abc,10,10,cache/64px/ab/ab.png,C:\Users\ana\m.png",
            "/home/ana/src/Normal/b.png,Normal,Normal,test,g2,abd,10,10,cache/64px/ab/ac.png,",
            r"\\server\share\c.png,Normal,Normal,valid,g3,abe,10,10,cache/64px/ab/ad.png,"]
    (tmp_path / "manifest.csv").write_bytes(("\r\n".join([header, *rows]) + "\r\n").encode("utf-8"))
    frame = read_manifest(tmp_path)
    assert list(frame["path"]) == [r"C:\Users\ana\src\Normal\a.png", "/home/ana/src/Normal/b.png", r"\\server\share\c.png"]
    assert list(frame["cache_path"]) == [str(tmp_path / "cache/64px/ab" / name) for name in ("ab.png", "ac.png", "ad.png")]
    assert list(frame["mask"]) == [r"C:\Users\ana\m.png", "", ""]
    assert list(manifest.image_column(frame)) == list(frame["cache_path"])


def test_negative_films_are_kept_named_in_a_warning_and_measured_in_the_manifest(tmp_path):
    # predict flags a negative film; prepare kept one without a word, and evaluate scored it as a film
    from PIL import ImageOps

    from cxr_fast.data.synth import synthesize

    src = tmp_path / "src"
    synthesize(src, n_per_class=4, size=64, progress=False)
    assert not any("inverted" in w for w in quiet(src, tmp_path / "upright").warnings)  # phantoms pass
    ImageOps.invert(Image.open(next((src / "Normal").glob("*.png"))).convert("L")).save(src / "Normal" / "negative.png")
    report = quiet(src, tmp_path / "out")
    assert [w for w in report.warnings if "inverted" in w] == [
        "1 image is inverted (negative films, bright where a chest film is dark?), kept: Normal/negative.png"]
    frame = read_manifest(tmp_path / "out")
    upright = dict(zip([Path(p).name for p in frame["path"]], frame["upright"].astype(float)))
    assert upright.pop("negative.png") < 0 < min(upright.values())


def test_prepare_s_warning_and_the_manifest_s_upright_column_agree_on_a_barely_negative_film(tmp_path, monkeypatch):
    # the column was rounded to 4 places: a correlation of -0.00003 was named "inverted" by prepare, and read back as
    # -0.0, which is not below 0, so evaluate's predictions.csv gave that image no warning
    from cxr_fast.data import cache
    from cxr_fast.data.inversion import inverted_warning
    from cxr_fast.data.synth import synthesize

    synthesize(tmp_path / "src", n_per_class=2, size=64, progress=False)
    monkeypatch.setattr(cache, "upright_correlation", lambda image: -0.00003)
    report = quiet(tmp_path / "src", tmp_path / "out")
    assert any(w.startswith("6 images are inverted") for w in report.warnings), report.warnings
    frame = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert all(inverted_warning(u) is not None for u in frame["upright"])


def test_colour_images_are_kept_and_named_in_a_warning(tmp_path):
    # an external collection with a photo or chart in it was prepared without a word, and evaluate scored it
    src = make_dataset(tmp_path / "src", per_class=3)
    assert not any("in colour" in w for w in quiet(src, tmp_path / "grey").warnings)
    film = np.asarray(Image.open(src / "Normal" / "Normal_00.png"))
    Image.fromarray(np.dstack([film] * 3)).save(src / "Normal" / "grey-rgb.jpg", quality=60)  # grey: not named
    other = np.asarray(textured_image(999))  # not the film: a duplicate of it in another class would be left out
    Image.fromarray(np.dstack([other, other // 2, 255 - other])).save(src / "Pneumonia" / "photo.png")  # 63+ apart
    report = quiet(src, tmp_path / "out")
    assert [w for w in report.warnings if "in colour" in w] == [
        "1 image is in colour (photos, charts or figures rather than grey films?), kept: Pneumonia/photo.png"]
    frame = read_manifest(tmp_path / "out")
    assert "photo.png" in {Path(p).name for p in frame["path"]}
    # the share of coloured pixels goes into the manifest, so that evaluate can flag the image as predict does
    spread = np.asarray(Image.open(src / "Pneumonia" / "photo.png"), dtype=int)
    shares = dict(zip([Path(p).name for p in frame["path"]], frame["colour"].astype(float)))
    assert shares.pop("photo.png") == pytest.approx(((spread.max(2) - spread.min(2)) > 48).mean())
    assert "grey-rgb.jpg" in shares and max(shares.values()) < 0.01
