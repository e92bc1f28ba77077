"""Patient-aware splitting: patient ids from file names, groups joined through them, and the NIH hint."""

import re

import numpy as np
import pytest

from cxr_fast.data.manifest import prepare, read_manifest
from cxr_fast.data.patients import (
    compile_patient_pattern,
    merge_groups,
    nih_patients_spread,
    patient_of,
    patient_summary,
    patient_warnings,
)
from cxr_fast.errors import CxrFastError
from tests.conftest import write_dicom
from tests.test_manifest import CLASSES, textured_image


def film_warnings(report) -> list[str]:
    """The report's warnings without the one naming negative-looking images: these tests' random textures are no
    chest films, and about half of them correlate negatively with an upright chest (`cxr_fast.data.inversion`)."""
    return [w for w in report.warnings if "inverted (negative films" not in w]


def test_patient_of_uses_the_first_group_else_the_whole_match():
    nih = compile_patient_pattern("nih")
    assert patient_of("00000061_012.png", nih) == "00000061"
    assert patient_of("1-s2.0-S0140673620303706-fx1_lrg.jpg", nih) == ""
    assert patient_of("x00000061_012.png", nih) == ""  # anchored: not any 8 digits anywhere
    assert patient_of("case17-view2.png", compile_patient_pattern(r"case\d+")) == "case17"
    assert patient_of("p9_s3.dcm", compile_patient_pattern(r"^p(\d+)_")) == "9"


def test_a_bad_pattern_is_a_one_line_error():
    with pytest.raises(CxrFastError, match=r"'\(' is neither a preset \(nih, dicom\) nor a valid regular expression"):
        compile_patient_pattern("(")


def test_groups_merge_through_patients_and_duplicates():
    groups = ["g3", "g1", "g2", "g4", "g5", "g6"]
    patients = ["A", "A", "B", "", "", "B"]
    # g3 and g1 share patient A; g2 and g6 share B; unknown patients (g4, g5) join no one
    assert merge_groups(groups, patients) == ["g1", "g1", "g2", "g4", "g5", "g2"]
    # one duplicate group holding films of A and B joins both patients' other films
    assert merge_groups(["g9", "g7", "g7", "g8"], ["A", "A", "B", "B"]) == ["g7"] * 4


def nih_dataset(root, patients_per_class=8, films=3):
    """NIH-style names, PATIENT_FOLLOWUP.png, several films per patient, plus COVID-19 images without ids."""
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for p in range(patients_per_class):
            for f in range(films):
                name = f"{c * 1000 + p:08d}_{f:03d}.png" if label != "COVID-19" else f"covid-{p}-{f}.png"
                textured_image(10_000 * c + 100 * p + f).save(root / label / name)
    return root


def test_prepare_keeps_each_patient_in_one_split_and_reports_it(tmp_path):
    src = nih_dataset(tmp_path / "src")
    report = prepare(src, tmp_path / "out", patient_pattern="nih", cache_size=0, progress=False, workers=1)
    table = read_manifest(tmp_path / "out")
    named = table[table["patient"] != ""]
    assert len(named) == 48 and set(named["label"]) == {"Normal", "Pneumonia"}
    assert named.groupby("patient")["split"].nunique().max() == 1
    assert named.groupby("patient")["group"].nunique().max() == 1
    assert table.loc[table["patient"] == "", "group"].nunique() == 24  # no id: each image its own group
    assert report.patients == dict(n_patients=16, n_matched=48, n_unmatched=24, several_images=16,
                                   several_labels=0, several_splits=0)
    assert report.arguments["patient_pattern"] == "nih" and not film_warnings(report)


def test_without_a_pattern_nih_names_spread_over_splits_draw_a_warning(tmp_path):
    src = nih_dataset(tmp_path / "src")
    report = prepare(src, tmp_path / "out", cache_size=0, progress=False, workers=1)
    table = read_manifest(tmp_path / "out")
    assert "patient" not in table.columns and report.patients is None
    patients = table["path"].str.extract(r"/(\d{8})_\d{3}\.png$")[0]
    spread = table.assign(patient=patients).dropna().groupby("patient")["split"].nunique().gt(1).sum()
    assert spread > 0  # three films a patient, split image by image: some patients straddle splits
    assert len(film_warnings(report)) == 1
    assert re.match(rf"{spread} patients have images in more than one split", film_warnings(report)[0])
    assert "--patient-pattern nih" in film_warnings(report)[0]


def test_a_pattern_matching_nothing_is_warned_about(tmp_path):
    src = nih_dataset(tmp_path / "src", patients_per_class=2, films=2)
    report = prepare(src, tmp_path / "out", patient_pattern=r"^patient(\d+)", cache_size=0, progress=False,
                     workers=1)
    assert report.patients["n_matched"] == 0
    assert film_warnings(report) == ["patient pattern '^patient(\\d+)' matched no file name; every image is its own "
                               "patient"]


@pytest.mark.shared_data
def test_cxr_dev_patients_stay_in_one_split_with_the_nih_preset(shared_data, tmp_path):
    labels = "Covid-19=COVID-19,No_findings=Normal,Pneumonia=Pneumonia"
    plain = prepare(shared_data / "cxr-dev", tmp_path / "plain", label_map=labels, cache_size=0, progress=False)
    assert plain.warnings and "--patient-pattern nih" in plain.warnings[0]  # 89 patients straddle splits
    grouped = prepare(shared_data / "cxr-dev", tmp_path / "grouped", label_map=labels, cache_size=0,
                      progress=False, patient_pattern="nih")
    table = read_manifest(tmp_path / "grouped")
    assert grouped.patients["n_patients"] > 500 and grouped.patients["several_images"] > 100
    assert grouped.patients["n_unmatched"] == (table["label"] == "COVID-19").sum()  # COVID-19 files have no ids
    assert table[table["patient"] != ""].groupby("patient")["split"].nunique().max() == 1
    # no patient warning now; the one warning left names the cxr-dev film the negative-film check flags (an upright
    # film with a washed-out, bright surround: docs/benchmarks.md)
    assert grouped.warnings == ["1 image is inverted (negative films, bright where a chest film is dark?), kept: "
                                "Covid-19/F63AB6CE-1968-4154-A70F-913AF154F53D.jpg"]


def dicom_dataset(root, patient_of_film):
    """ROOT/<class>/film-N.dcm with PatientID set from ``patient_of_film(class_index, film)`` (None: no tag)."""
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for f in range(6):
            stored = np.asarray(textured_image(20_000 + 100 * c + f), dtype=np.uint16) * 16  # 12-bit values
            patient = patient_of_film(c, f)
            tags = {} if patient is None else {"PatientID": patient}
            write_dicom(root / label / f"film-{f}.dcm", stored, **tags)
    return root


def test_the_dicom_preset_reads_patient_ids_from_headers(tmp_path):
    # two patients per class with three films each, except that the first class's films carry no PatientID
    src = dicom_dataset(tmp_path / "src", lambda c, f: None if c == 0 else f"P{c}-{f // 3}")
    report = prepare(src, tmp_path / "out", patient_pattern="dicom", cache_size=0, progress=False, workers=1)
    table = read_manifest(tmp_path / "out")
    assert sorted(set(table["patient"]) - {""}) == ["P1-0", "P1-1", "P2-0", "P2-1"]
    assert table[table["patient"] != ""].groupby("patient")["split"].nunique().max() == 1
    assert report.patients["n_unmatched"] == 6 and report.patients["several_images"] == 4
    # two patients per grouped class cannot fill three splits; that, and nothing else, is warned about
    assert sorted(w.split("'")[1] for w in film_warnings(report)) == ["Normal", "Pneumonia"]
    assert all(" has no " in w for w in film_warnings(report))


def test_one_patient_id_on_too_many_images_is_flagged_as_a_placeholder(tmp_path):
    src = dicom_dataset(tmp_path / "src", lambda c, f: "ANONYMOUS")
    report = prepare(src, tmp_path / "out", patient_pattern="dicom", cache_size=0, progress=False, workers=1)
    assert film_warnings(report)[0].startswith("patient id 'ANONYMOUS' names 18 of 18 images, more than a split holds")
    # every image then lands in one split: one more line per class says which splits it misses
    assert len(film_warnings(report)) == 1 + len(CLASSES)
    assert all(" has no " in w and " or " in w for w in film_warnings(report)[1:])


def test_a_pattern_may_find_the_patient_anywhere_in_the_name():
    assert patient_of("scan-000123-2.png", compile_patient_pattern(r"-(\d+)-")) == "000123"
    assert patient_of("chest_patient42.jpg", compile_patient_pattern(r"patient\d+")) == "patient42"


def test_patient_summary_by_hand():
    patients = ["A", "A", "B", "", "C", "C", "C", ""]
    labels = ["N", "N", "P", "N", "N", "P", "N", "P"]
    splits = ["train", "train", "test", "valid", "train", "valid", "train", "test"]
    # A: 2 images, one label, one split; B: 1 image; C: 3 images, two labels, two splits; 2 images without id
    assert patient_summary(patients, labels, splits) == dict(
        n_patients=3, n_matched=6, n_unmatched=2, several_images=2, several_labels=1, several_splits=1
    )


def test_a_patient_larger_than_the_smallest_split_is_flagged():
    # 10 images, smallest split 0.2: a split holds 2, so a patient with 3 images cannot fit one
    assert patient_warnings(["P"] * 2 + [str(i) for i in range(8)], "nih", 0.2) == []
    warned = patient_warnings(["P"] * 3 + [str(i) for i in range(7)], "nih", 0.2)
    assert len(warned) == 1 and warned[0].startswith("patient id 'P' names 3 of 10 images")


def test_the_nih_hint_needs_half_the_names_to_look_like_nih_ids():
    spread = ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    splits = ["train", "test", "train"]
    # 3 NIH-style names of 6: one patient in two splits is reported
    hint = nih_patients_spread(spread + ["a.png", "b.png", "c.png"], splits + ["train"] * 3)
    assert hint is not None and hint.startswith("1 patients have images in more than one split")
    # 3 of 7: probably not NIH data, no hint
    assert nih_patients_spread(spread + ["a.png", "b.png", "c.png", "d.png"], splits + ["train"] * 4) is None
    # NIH data whose patients each stay in one split: nothing to say
    assert nih_patients_spread(spread, ["train", "train", "test"]) is None
