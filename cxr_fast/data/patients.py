"""Patient ids from file names or DICOM headers, so that `prepare` can keep each patient's images in one split.

Many public collections hold several films of one patient (follow-ups), and their file names say whose
they are: NIH ChestX-ray8 names a film ``PPPPPPPP_FFF.png`` (patient, follow-up). Films of one patient share
anatomy, devices and scanner, so one in training and another in test lets a model score by recognising the
patient; the test figure then overstates how it does on new patients. With a patient pattern, `prepare`
joins every patient's images (and their duplicates) into one split group. DICOM files name their patient in
the header: the ``dicom`` preset reads PatientID there.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cxr_fast.data.io import dicom_patient_id
from cxr_fast.errors import CxrFastError

# Presets for collections whose naming is known; any other pattern is a regular expression.
PATIENT_PATTERNS = {
    "nih": r"^(\d{8})_\d{3}\.",  # NIH ChestX-ray8 / ChestX-ray14: 00000061_012.png
}
DICOM_PRESET = "dicom"  # PatientID from each DICOM file's header
# Below this share of NIH-style names the folder is probably not NIH data, and no hint is given.
NIH_HINT_MIN_SHARE = 0.5


def patient_ids(paths: Sequence[str | os.PathLike], pattern: str) -> list[str]:
    """The patient id of every file ("" where unknown), by ``pattern``: ``dicom``, ``nih`` or a regex."""
    if pattern == DICOM_PRESET:
        return [dicom_patient_id(path) for path in paths]
    regex = compile_patient_pattern(pattern)
    return [patient_of(Path(path).name, regex) for path in paths]


def compile_patient_pattern(pattern: str) -> re.Pattern:
    """A preset name (``nih``) or a regular expression whose first group (else whole match) is the patient."""
    text = PATIENT_PATTERNS.get(pattern, pattern)
    try:
        return re.compile(text)
    except re.error as error:
        presets = ", ".join([*PATIENT_PATTERNS, DICOM_PRESET])
        raise CxrFastError(
            f"patient pattern '{pattern}' is neither a preset ({presets}) nor a valid regular expression ({error})"
        ) from None


def patient_of(name: str, pattern: re.Pattern) -> str:
    """The patient id in a file name, or "" when the name does not match."""
    match = pattern.search(name)
    if match is None:
        return ""
    return match.group(1) if pattern.groups else match.group(0)


def merge_groups(groups: Sequence[str], patients: Sequence[str]) -> list[str]:
    """Split groups that also join images of one patient.

    ``groups``: duplicate group id per image; ``patients``: patient id per image ("" = unknown: the image
    joins no one). Groups linked through a shared patient (or a duplicate across patients) merge; a merged
    group takes its smallest member id, so ids stay derived from content and do not depend on file order.
    """
    parent = {group: group for group in groups}

    def root(group: str) -> str:
        while parent[group] != group:
            parent[group] = parent[parent[group]]
            group = parent[group]
        return group

    first_group_of_patient: dict[str, str] = {}
    for group, patient in zip(groups, patients, strict=True):
        if not patient:
            continue
        other = first_group_of_patient.setdefault(patient, group)
        a, b = root(group), root(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(group) for group in groups]


def patient_summary(patients: Sequence[str], labels: Sequence[str], splits: Sequence[str]) -> dict:
    """How many patients, with several images, with several labels, and images without a patient id."""
    images = Counter(p for p in patients if p)
    return dict(
        n_patients=len(images),
        n_matched=sum(images.values()),
        n_unmatched=sum(1 for p in patients if not p),
        several_images=sum(1 for n in images.values() if n > 1),
        several_labels=_patients_with_several(patients, labels),
        several_splits=_patients_with_several(patients, splits),  # 0 when grouped
    )


def _patients_with_several(patients: Sequence[str], values: Sequence[str]) -> int:
    """How many (known) patients have more than one distinct value: labels, splits."""
    values_of: dict[str, set] = {}
    for patient, value in zip(patients, values, strict=True):
        if patient:
            values_of.setdefault(patient, set()).add(value)
    return sum(1 for found in values_of.values() if len(found) > 1)


def patient_warnings(patients: Sequence[str], pattern: str, smallest_split: float) -> list[str]:
    """What looks wrong with the patient ids found: none at all, or one "patient" larger than a split."""
    named = Counter(patient for patient in patients if patient)
    if not named:
        where = "DICOM header" if pattern == DICOM_PRESET else "file name"
        return [f"patient pattern '{pattern}' matched no {where}; every image is its own patient"]
    largest, count = named.most_common(1)[0]
    if count > smallest_split * len(patients):
        # One "patient" larger than a whole split is usually an anonymisation placeholder, not a person.
        return [
            f"patient id {largest!r} names {count} of {len(patients)} images, more than a split holds; "
            "is it a placeholder? the split cannot keep to its fractions"
        ]
    return []


def nih_patients_spread(names: Sequence[str], splits: Sequence[str]) -> str | None:
    """A warning when NIH-style names show one patient in several splits (no patient pattern was given)."""
    patients = patient_ids(names, "nih")
    if sum(1 for p in patients if p) < NIH_HINT_MIN_SHARE * len(names):
        return None
    spread = _patients_with_several(patients, splits)
    if not spread:
        return None
    return (
        f"{spread} patients have images in more than one split (the file names look like NIH ChestX-ray ids, "
        "PATIENT_FOLLOWUP.png); pass --patient-pattern nih to keep each patient in one split"
    )
