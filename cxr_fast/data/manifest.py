"""`prepare`: turn a folder of labelled X-rays into a checked, de-duplicated, split manifest.

    find files → map folder names to labels → decode every file → fingerprint + cache →
    group duplicates → drop label conflicts → (join each patient's images) → stratified group split →
    manifest.csv + prepare_report.json

Nothing is dropped silently: every file found either becomes a manifest row or an exclusion with a reason
(`EXCLUSION_REASONS`) that is printed and written to the report.

Manifest columns (``OUT/manifest.csv``):

    path          the original image; relative to OUT when inside it, else absolute
    label         the study label (folder name passed through the label map)
    source_label  the class folder's own name
    split         train / valid / test
    group         split group id ("g" + 12 hex digits): duplicates, and with a patient pattern all images of
                  one patient; members of one group share a split
    sha256        of the original file's bytes
    width,height  of the original image in pixels, after EXIF orientation
    patient       (with a patient pattern) the patient id from the file name or DICOM header; "" when none
    cache_path    (when cache_size > 0) the working-resolution PNG copy; relative to OUT when inside it
    mask          (synthetic data) lung/lesion mask from SRC/_meta.csv, absolute
    marker_box    (synthetic data) "x0,y0,x1,y1" in pixels of the ORIGINAL image (scale by width/height
                  for the cached copy); empty when the image has no marker
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cxr_fast.data import cache as image_cache
from cxr_fast.data.dedup import DEFAULT_MIN_CORRELATION, DEFAULT_THRESHOLD, group_duplicates
from cxr_fast.data.inversion import inverted_warning
from cxr_fast.data.io import MAX_TWO_LEVEL_SHARE, MIN_SIDE, colour_warning
from cxr_fast.data.labels import loose_name, map_label, parse_label_map
from cxr_fast.data.patients import (
    DICOM_PRESET,
    compile_patient_pattern,
    merge_groups,
    nih_patients_spread,
    patient_ids,
    patient_summary,
    patient_warnings,
)
from cxr_fast.data.sources import (
    MANIFEST_NAME,
    PREPARED_MARKER,
    SPLIT_FOLDER_NAMES,
    class_folders,
    find_images,
    is_hidden,
    shared_subfolders,
)
from cxr_fast.data.split import (
    DEFAULT_FRACTIONS,
    SPLITS,
    check_folds,
    fold_items,
    parse_fractions,
    split_items,
)
from cxr_fast.data.synth import UNFINISHED
from cxr_fast.errors import CxrFastError
from cxr_fast.outputs import check_folder_path, printable, readers, write_texts, writing
from cxr_fast.progress import LogProgress, progress_bar
from cxr_fast.reprs import short_repr
from cxr_fast.versions import library_versions

REPORT_NAME = PREPARED_MARKER
META_NAME = "_meta.csv"
MANIFEST_COLUMNS = ("path", "label", "source_label", "split", "group", "sha256", "width", "height")
# `colour`: the share of coloured pixels (`cxr_fast.data.io.colour_share`), and `upright`: the correlation with an
# upright chest (`cxr_fast.data.inversion.upright_correlation`), so that evaluate flags a photo, chart or negative film as
# predict does; manifests written before them have none, and the split's digest (`manifest_digest`) leaves them out
OPTIONAL_COLUMNS = ("site", "patient", "cache_path", "mask", "marker_box", "colour", "upright")
PATH_COLUMNS = ("path", "cache_path", "mask")

EXCLUSION_REASONS = {
    "no-class-folder": "file not inside a class folder (directly in the source or a site folder)",
    "unmapped-label": "class folder not in the label map (ignore_unmapped)",
    "label-conflict": "duplicate of an image with another label",
    "empty": "zero-byte file",
    "not-an-image": "not an image file",
    "truncated": "image data cut short or damaged",
    "unreadable": "could not be decoded",
    "too-small": f"smaller than {MIN_SIDE} px on a side",
    "too-large": "more pixels than the decompression-bomb limit",
    "not-a-radiograph": f"one or two grey values fill {MAX_TWO_LEVEL_SHARE * 100:.0f} % of it: a mask, a blank sheet or a drawing",
}

# Below this many files a thread pool is not worth starting.
PARALLEL_MIN_FILES = 16


@dataclass
class Exclusion:
    path: str  # relative to the source folder
    reason: str  # a key of EXCLUSION_REASONS
    detail: str


@dataclass
class PrepareReport:
    """What `prepare` did; also written, as JSON, to ``OUT/prepare_report.json``."""

    src: str
    out: str
    manifest_path: str
    report_path: str
    cache_dir: str | None
    n_files: int  # every file found under src
    n_images: int  # rows in the manifest
    counts: dict[str, dict[str, int]]  # split -> label -> number of images
    excluded: list[Exclusion]
    duplicate_groups: list[dict]  # groups of more than one image kept in the manifest
    conflicts: list[dict]  # duplicate groups whose members carried different labels (all excluded)
    unused_map_keys: list[str]  # label-map entries that matched no folder (a typo?)
    arguments: dict
    seconds: float
    labels: list[str] = field(default_factory=list)
    patients: dict | None = None  # with a patient pattern: counts from `patient_summary`
    sites: dict[str, dict[str, int]] | None = None  # with sites: site -> label -> number of images
    warnings: list[str] = field(default_factory=list)  # things the user should probably act on
    versions: dict[str, str] = field(default_factory=library_versions)  # the split depends on cxr_fast's and numpy's

    def __repr__(self) -> str:  # a notebook shows it: see cxr_fast.reprs
        return short_repr(self)

    def exclusions_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(item.reason for item in self.excluded).items()))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["exclusions_by_reason"] = self.exclusions_by_reason()
        return data


# --- decoding every file, in parallel --------------------------------------------------------------------


def _examine_all(
    tasks: list[tuple[str, str | None, int]], workers: int, progress: Progress | LogProgress, task_id
) -> list[image_cache.Examined]:
    results: list[image_cache.Examined] = []
    if workers <= 1 or len(tasks) < PARALLEL_MIN_FILES:
        for task in tasks:
            results.append(image_cache.examine_file(task))
            progress.advance(task_id)
        return results
    # Threads, not processes: JPEG/PNG decoding, resizing, PNG encoding and SHA-256 run in C with the GIL
    # released (checked: a probe thread is never stalled more than ~10 ms during a 0.5-3 s call of each),
    # so threads use the cores without processes' costs: no start-up, no pickling, no fork after torch
    # has started its thread pools, no `if __name__ == "__main__"` guard needed in a user's script.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxrfast-prepare") as pool:
        for result in pool.map(image_cache.examine_file, tasks):
            results.append(result)
            progress.advance(task_id)
    return results


def default_workers() -> int:
    """Decoding threads: one per CPU core, at most 8 (disk and memory bandwidth cap the gain)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


# --- prepare -------------------------------------------------------------------------------------------


def _removed_on_failure(prepare_fn):
    """A failed prepare removes the --out folder it created, cached copies and all, instead of leaving a folder
    that looks like a dataset; in an --out that existed before, the old manifest, report and the cached copies they
    point to are left as they were (the first two are only ever replaced together, at the end; new copies go beside
    the old ones, and stay for a rerun to reuse until a prepare that completes removes what it does not use)."""

    @functools.wraps(prepare_fn)
    def wrapper(src, out, *args, **kwargs):
        out_dir = Path(out)
        # One prepare at a time per folder: a second one shared the first one's .manifest.csv.partial, deleted the
        # copies it cached at another --size, and on failure removed the folder with the first one's dataset in it.
        with writing(out_dir):
            created = not out_dir.exists()
            try:
                return prepare_fn(src, out, *args, **kwargs)
            except BaseException:
                if created:
                    shutil.rmtree(out_dir, ignore_errors=True)
                raise

    return wrapper


@_removed_on_failure
def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    label_map: str | os.PathLike | Mapping[str, str] | None = None,
    ignore_unmapped: bool = False,
    seed: int = 0,
    splits: Sequence[float] | str | None = None,
    cache_size: int = 512,
    force: bool = False,
    progress: bool = True,
    workers: int | None = None,
    dedup_threshold: int = DEFAULT_THRESHOLD,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
    patient_pattern: str | None = None,
    folds: int | None = None,
    fold: int = 0,
    sites: bool = False,
    console: Console | None = None,
) -> PrepareReport:
    """Build ``OUT/manifest.csv`` and ``OUT/prepare_report.json`` from the class folders under ``src``.

    ``label_map``: folder → label, as a file path, inline "Folder=Label,...", preset name or dict; None
    uses folder names as labels. Folders the map does not cover are an error unless ``ignore_unmapped``.
    ``splits``: train/valid/test fractions (or "0.6,0.2,0.2"; None: 0.6, 0.2, 0.2). ``cache_size``: longest side of the cached
    working copies (0: no cache). ``workers``: decoding threads (default: one per core, at most 8).
    ``patient_pattern``: ``dicom`` (PatientID in DICOM headers), ``nih`` or a regular expression that finds the
    patient id in each file name (its first group, else the whole match); each patient's images then share a
    split.
    ``folds``: cross-validation instead of ``splits``: the images cut into ``folds`` equal parts, part ``fold``
    the test split, the next part valid, the rest train (`cxr_fast.data.split.fold_items`).
    ``sites``: SRC holds one folder per site (hospital, collection) with the class folders inside; the site is kept
    in a ``site`` column, and each site's classes are split in the same proportions.
    Raises `CxrFastError` for user mistakes (missing folder, existing manifest without ``force``, bad map).
    """
    started = time.perf_counter()
    src_dir = Path(os.path.abspath(src))
    out_dir = Path(os.path.abspath(out))
    if folds is not None:
        check_folds(folds, fold)
        if splits is not None:  # even the default's values: the folds would silently override them
            raise CxrFastError("give split fractions or folds, not both: folds decide the split's sizes")
        fractions = (1 - 2 / folds, 1 / folds, 1 / folds)
    else:
        fractions = parse_fractions(DEFAULT_FRACTIONS if splits is None else splits)
    mapping = parse_label_map(label_map)
    if patient_pattern and patient_pattern != DICOM_PRESET:
        compile_patient_pattern(patient_pattern)  # a bad regex fails now, not after decoding every file
    _check_arguments(src_dir, out_dir, seed, cache_size, force)
    workers = default_workers() if workers is None else max(1, int(workers))
    console = console or Console(stderr=True)

    # 1. Find files. The output folder may sit inside the source folder: never read our own files back.
    own_files = [out_dir / MANIFEST_NAME, out_dir / REPORT_NAME, out_dir / image_cache.CACHE_DIRNAME]
    skip = own_files if out_dir == src_dir else [out_dir] if out_dir.is_relative_to(src_dir) else []
    items = find_images(src_dir, skip=skip, sites=sites)
    layout = f"{src_dir}/<site>/<class>/<image>" if sites else f"{src_dir}/<class>/<image>"
    if not items:
        raise CxrFastError(f"{src_dir}: no files found (expected {layout})")
    loose_in_sites = Counter(item.site for item in items if item.site is not None and not item.has_class)
    if not any(item.has_class for item in items):
        if loose_in_sites:  # ROOT/<class>/<file> prepared with --sites: the classes were read as sites
            raise CxrFastError(f"{src_dir}: with --sites the folders below it are sites holding class folders, but "
                               f"{_listed(loose_in_sites)} hold their files directly; leave out --sites if those "
                               "are the classes")
        raise CxrFastError(f"{src_dir}: no class folders, only loose files (expected {layout})")
    site_hint = ""
    if not sites and (inner := shared_subfolders(src_dir, items)):
        source_labels = sorted({item.source_label for item in items if item.has_class})
        site_hint = (f"the class folders {', '.join(map(repr, source_labels))} each hold folders named alike "
                     f"({', '.join(map(repr, inner))}): if those are the classes and these are sites, pass --sites")

    # 2. Labels.
    candidates, excluded, unused_keys = _labelled_files(src_dir, items, mapping, ignore_unmapped, site_hint)

    _check_distinct_labels(src_dir, [label for _, _, label in candidates])

    # 3. Decode, fingerprint and cache every candidate.
    cache_dir = out_dir / image_cache.CACHE_DIRNAME if cache_size > 0 else None
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(str(item.path), str(cache_dir) if cache_dir else None, cache_size) for item, _, _ in candidates]
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with progress_bar(progress, transient=False, console=console, columns=columns) as bar:
        task_id = bar.add_task("Checking images", total=len(tasks))
        examined = _examine_all(tasks, workers, bar, task_id)

    rows = []
    fingerprints = []
    # colour images and negative films are kept, but named in a warning, as predict flags them: an evaluation's data
    # may hold them
    coloured_rows, inverted_rows = set(), set()
    for (item, relpath, label), result in zip(candidates, examined, strict=True):
        if result.fingerprint is None:
            excluded.append(Exclusion(relpath, result.reason, result.detail))
            continue
        fingerprints.append(result.fingerprint)
        if colour_warning(result.colour) is not None:
            coloured_rows.add(len(rows))
        if inverted_warning(result.upright) is not None:
            inverted_rows.add(len(rows))
        rows.append(
            dict(
                path=str(item.path),
                relpath=relpath,
                label=label,
                source_label=item.source_label,
                **({"site": item.site} if sites else {}),
                sha256=result.fingerprint.sha256,
                width=result.width,
                height=result.height,
                cache_path=result.cache_path,
                colour=result.colour,
                upright=result.upright,
            )
        )
    if not rows:
        raise CxrFastError(
            f"{src_dir}: none of the {len(items)} files is a usable image ({_reason_summary(excluded)})"
        )

    # 4. Duplicates and label conflicts.
    roots = group_duplicates(fingerprints, threshold=dedup_threshold, min_correlation=min_correlation)
    group_ids, duplicate_groups, conflicts = _resolve_duplicates(rows, roots)
    conflicted = {i for conflict in conflicts for i in conflict.pop("members")}
    for conflict in conflicts:
        excluded.extend(conflict.pop("exclusions"))
    kept = [i for i in range(len(rows)) if i not in conflicted]
    if not kept:
        raise CxrFastError(f"{src_dir}: every image is part of a label conflict; nothing left to split")

    # 5. Split, each patient's images together when a pattern names them.
    manifest = pd.DataFrame([rows[i] for i in kept])
    manifest["group"] = [group_ids[i] for i in kept]
    if patient_pattern:
        manifest["patient"] = patient_ids(list(manifest["path"]), patient_pattern)
        manifest["group"] = merge_groups(list(manifest["group"]), list(manifest["patient"]))
    # Strata: the labels, or each site's labels, so that no split is one hospital's COVID-19 and another's Normal.
    strata = list(manifest["label"] + " @ " + manifest["site"]) if sites else list(manifest["label"])
    if folds is None:
        manifest["split"] = split_items(strata, list(manifest["group"]), fractions, seed, spread_ties=sites)
    else:
        manifest["split"] = fold_items(strata, list(manifest["group"]), folds, fold, seed, spread_ties=sites)
    patients = None if not patient_pattern else patient_summary(
        list(manifest["patient"]), list(manifest["label"]), list(manifest["split"]))
    site_counts = None if not sites else {
        site: {label: int(n) for label, n in of_site["label"].value_counts().sort_index().items()}
        for site, of_site in manifest.groupby("site")}
    labels = manifest_classes(manifest)
    warnings = _prepare_warnings(src_dir, skip, mapping, items, manifest, fractions, patient_pattern, site_counts,
                                 site_hint, loose_in_sites)
    for flagged_rows, what in ((coloured_rows, "in colour (photos, charts or figures rather than grey films?)"),
                               (inverted_rows, "inverted (negative films, bright where a chest film is dark?)")):
        flagged = [rows[i]["relpath"] for i in kept if i in flagged_rows]  # not those a label conflict left out
        if flagged:
            warnings.append(f"{len(flagged)} image{'s are' if len(flagged) > 1 else ' is'} {what}, kept: "
                            f"{', '.join(map(printable, flagged[:5]))}"
                            + (f" and {len(flagged) - 5} more" if len(flagged) > 5 else ""))

    # 6. Synthetic data carries masks and marker boxes in SRC/_meta.csv (with sites, in SRC/<site>/_meta.csv).
    manifest = _merge_meta(manifest, src_dir, sites)

    # 7. Write.
    for column in PATH_COLUMNS:
        if column in manifest:
            manifest[column] = [_stored_path(value, out_dir) for value in manifest[column]]
    columns = list(MANIFEST_COLUMNS) + [
        name
        for name in OPTIONAL_COLUMNS
        if name in manifest and (name != "cache_path" or cache_dir is not None)
    ]
    manifest = manifest[columns]
    manifest_path = out_dir / MANIFEST_NAME
    report_path = out_dir / REPORT_NAME

    counts = {
        split: {
            label: int(((manifest["split"] == split) & (manifest["label"] == label)).sum())
            for label in labels
        }
        for split in SPLITS
    }
    excluded.sort(key=lambda item: item.path)
    report = PrepareReport(
        src=str(src_dir),
        out=str(out_dir),
        manifest_path=str(manifest_path),
        report_path=str(report_path),
        cache_dir=str(cache_dir) if cache_dir else None,
        n_files=len(items),
        n_images=len(manifest),
        counts=counts,
        excluded=excluded,
        duplicate_groups=duplicate_groups,
        conflicts=conflicts,
        unused_map_keys=unused_keys,
        arguments=dict(
            src=str(src_dir),
            out=str(out_dir),
            label_map=mapping,
            ignore_unmapped=ignore_unmapped,
            seed=seed,
            splits=list(fractions),
            cache_size=cache_size,
            dedup_threshold=dedup_threshold,
            min_correlation=min_correlation,
            patient_pattern=patient_pattern,
            folds=folds,
            fold=fold if folds is not None else None,
            sites=sites,
        ),
        seconds=round(time.perf_counter() - started, 3),
        labels=labels,
        patients=patients,
        sites=site_counts,
        warnings=warnings,
    )
    report_data = report.to_dict()
    report_data.pop("seconds")  # keeps the report identical between identical runs
    # Both written whole before either is renamed, so a full disk or Ctrl-C never pairs a new manifest with the old
    # report; the manifest last, as its rename is the moment the new dataset replaces the old.
    write_texts({
        report_path: json.dumps(report_data, indent=2) + "\n",
        manifest_path: manifest.to_csv(index=False, lineterminator="\n"),
    })
    # Only now may the old manifest's copies go: until the rename above it still pointed to them.
    used = {os.path.normpath(os.path.join(out_dir, value)) for value in manifest.get("cache_path", []) if value}
    image_cache.remove_unused(out_dir / image_cache.CACHE_DIRNAME, used)
    return report


def _prepare_warnings(src_dir: Path, skip, mapping, items, manifest: pd.DataFrame, fractions, patient_pattern,
                      site_counts: dict | None, site_hint: str, loose_in_sites: Counter) -> list[str]:
    """What the report and console warn about a finished split: patients, a single class, sites, classes."""
    if patient_pattern:
        warnings = patient_warnings(list(manifest["patient"]), patient_pattern, min(f for f in fractions if f > 0))
    else:
        names = [Path(relpath).name for relpath in manifest["relpath"]]
        spread = nih_patients_spread(names, list(manifest["split"]))
        warnings = [spread] if spread else []
    labels = manifest_classes(manifest)
    if len(labels) < 2:  # an external set of Normal films alone is a common test of a model; training refuses it
        warnings.append(f"only the class {labels[0]!r} has usable images: this manifest can test a model "
                        "(cxrfast evaluate RUN --data OUT), but training needs two or more classes")
    if site_hint:  # without a label map nothing failed: the "classes" are hospitals, and a model would learn them
        warnings.append(site_hint)
    if loose_in_sites:  # e.g. a class folder beside the site folders: its images are left out
        warnings.append(f"site folder(s) {_listed(loose_in_sites)} hold files directly, not in class folders: they "
                        "are left out (no-class-folder)")
    if site_counts is not None:
        warnings += site_warnings(site_counts)
    return warnings + _class_warnings(src_dir, skip, mapping, items, manifest, fractions, site_counts is not None)


def _labelled_files(src_dir: Path, items: list, mapping, ignore_unmapped: bool, site_hint: str):
    """Each file in a class folder with its label: (candidates as (item, relpath, label), exclusions, the map's
    keys that match no folder). A folder the map leaves out is refused unless `ignore_unmapped`."""
    excluded: list[Exclusion] = []
    source_labels = sorted({item.source_label for item in items if item.has_class})
    unmapped = [name for name in source_labels if map_label(name, mapping) is None]
    unused_keys = sorted(
        key for key in (mapping or {}) if not any(map_label(name, {key: "x"}) for name in source_labels)
    )
    if unmapped and not ignore_unmapped:
        counts = Counter(item.source_label for item in items)
        listed = _listed(Counter({name: counts[name] for name in unmapped}))
        typo = (f" (the map's {', '.join(map(repr, unused_keys))} {'matches' if len(unused_keys) == 1 else 'match'} "
                "no folder: a typo?)"
                if unused_keys and not site_hint else "")
        advice = "add them to the map or pass --ignore-unmapped to leave them out" + (f"; {site_hint}" if site_hint else "")
        raise CxrFastError(f"{src_dir}: the label map does not cover folder(s) {listed}{typo}; {advice}")
    candidates = []
    for item in items:
        relpath = item.path.relative_to(src_dir).as_posix()
        if not _is_utf8(relpath):  # e.g. a Latin-1 name from an old zip: no CSV or JSON could hold it
            excluded.append(Exclusion(printable(relpath), "unreadable", "file or folder name is not valid UTF-8; "
                                                                         "rename it"))
            continue
        if not item.has_class:
            excluded.append(Exclusion(relpath, "no-class-folder", EXCLUSION_REASONS["no-class-folder"]))
            continue
        label = map_label(item.source_label, mapping)
        if label is None:
            excluded.append(
                Exclusion(relpath, "unmapped-label", f"folder {item.source_label!r} is not in the label map")
            )
            continue
        candidates.append((item, relpath, label))
    return candidates, excluded, unused_keys


def _resolve_duplicates(rows: list[dict], roots: list[int]) -> tuple[list[str], list[dict], list[dict]]:
    """Group id per row, the duplicate groups kept, and the label conflicts (with members and exclusions).

    A group's id comes from its members' content ("g" + 12 hex digits of the smallest SHA-256), so it
    does not change when unrelated files are added to or removed from the dataset.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for index, root in enumerate(roots):
        members[root].append(index)
    id_of_root = {
        root: "g" + min(rows[i]["sha256"] for i in indices)[:12] for root, indices in members.items()
    }
    duplicate_groups, conflicts = [], []
    for root, indices in sorted(members.items()):
        if len(indices) < 2:
            continue
        labels = sorted({rows[i]["label"] for i in indices})
        entry = dict(
            group=id_of_root[root],
            labels=labels,
            files=[rows[i]["relpath"] for i in indices],
            exact=len({rows[i]["sha256"] for i in indices}) == 1,
        )
        if len(labels) == 1:
            duplicate_groups.append(entry)
            continue
        # Which label is right cannot be known here; keeping either would train or test on a wrong one.
        exclusions = []
        for i in indices:
            others = ", ".join(f"{rows[j]['relpath']} ({rows[j]['label']})" for j in indices if j != i)
            exclusions.append(Exclusion(rows[i]["relpath"], "label-conflict", f"duplicate of {others}"))
        conflicts.append(dict(entry, members=indices, exclusions=exclusions))
    return [id_of_root[root] for root in roots], duplicate_groups, conflicts


def _check_arguments(src: Path, out: Path, seed: int, cache_size: int, force: bool) -> None:
    if not src.exists():
        raise CxrFastError(f"{src}: source folder not found")
    if not src.is_dir():
        raise CxrFastError(f"{src}: source is not a folder (expected {src}/<class>/<image>)")
    if (src / UNFINISHED).is_file():
        raise CxrFastError(f"{src}: {(src / UNFINISHED).read_text(encoding='utf-8').strip()}")
    check_folder_path(out, "--out")
    if (out / MANIFEST_NAME).exists() and not force:
        raise CxrFastError(f"{out / MANIFEST_NAME} already exists; use --force to replace it")
    if (reader := readers(out)) is not None:  # a training run there would lose its data halfway (prepare holds
        raise CxrFastError(reader)           # out's lock by now, so a reader starting later refuses in its turn)
    _check_out_inside_src(src, out)
    if not isinstance(seed, int) or seed < 0:
        raise CxrFastError(f"seed must be a whole number >= 0, got {seed!r}")
    if not isinstance(cache_size, int) or (cache_size != 0 and cache_size < 64):
        raise CxrFastError(f"cache size must be 0 (no cache) or at least 64 pixels, got {cache_size!r}")


def _check_out_inside_src(src: Path, out: Path) -> None:
    """An --out folder inside SRC is left out of the data, so it must not hold any: `--out SRC/Pneumonia` would
    otherwise drop that class, in this run and (through the report it leaves there) every later one."""
    src, out = src.resolve(), out.resolve()  # a linked SRC given by its real path is the same folder
    if out == src or not out.is_relative_to(src) or not out.is_dir():
        return
    ours = {MANIFEST_NAME, PREPARED_MARKER, image_cache.CACHE_DIRNAME}
    # an earlier prepare's output inside it (another fold) is never data either way
    others = sorted(entry.name for entry in out.iterdir() if entry.name not in ours and not is_hidden(entry.name)
                    and not (entry / PREPARED_MARKER).is_file())
    if others:
        raise CxrFastError(f"{out}: --out lies inside {src} and already holds {others[0]!r}"
                           f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}, which would be left out "
                           "of the data; give a new or empty folder")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_distinct_labels(src: Path, labels: list[str]) -> None:
    """Folders named "Normal" and "normal", "Pneumonia " with a space, or one name in two Unicode forms would be
    two classes that print alike, and the model would learn to tell them apart."""
    by_key = defaultdict(set)
    for label in labels:
        by_key[loose_name(label)].add(label)
    alike = [sorted(names) for names in by_key.values() if len(names) > 1]
    if alike:
        shown = " and ".join(repr(name) for name in alike[0])
        raise CxrFastError(f"{src}: class folders {shown} differ only in case, spaces or Unicode form and would be "
                           "two classes; rename them alike, or give a --label-map mapping each to one label")


def _stored_path(value: str, out_dir: Path) -> str:
    """Relative to OUT when inside it (the folder can move), else absolute."""
    if not value:
        return ""
    path = Path(os.path.abspath(value))
    return path.relative_to(out_dir).as_posix() if path.is_relative_to(out_dir) else str(path)


def _reason_summary(excluded: list[Exclusion]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(Counter(e.reason for e in excluded).items()))


def _merge_meta(manifest: pd.DataFrame, src: Path, sites: bool = False) -> pd.DataFrame:
    """Masks and marker boxes from SRC/_meta.csv (and, with sites, each SRC/<site>/_meta.csv: phantoms
    synthesised one site at a time), matched to the manifest by path."""
    folders = [src] + (sorted({src / site for site in manifest["site"]}) if sites else [])
    tables = [_read_meta(folder, folder.relative_to(src)) for folder in folders if (folder / META_NAME).is_file()]
    if not tables:
        return manifest
    meta = pd.concat(tables).drop_duplicates("relpath").set_index("relpath")
    relpaths = manifest["relpath"]
    if "mask" in meta.columns:
        manifest["mask"] = relpaths.map(meta["mask"]).fillna("")
    if "marker_box" in meta.columns:
        manifest["marker_box"] = relpaths.map(meta["marker_box"]).fillna("")
    return manifest


def _read_meta(folder: Path, prefix: Path) -> pd.DataFrame:
    """One _meta.csv, its relpaths made relative to SRC (``prefix`` is the folder's place in it), masks absolute."""
    meta_path = folder / META_NAME
    try:
        meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CxrFastError(f"{meta_path}: cannot read ({error})") from None
    if "relpath" not in meta.columns:
        raise CxrFastError(f"{meta_path}: missing column 'relpath'")
    meta["relpath"] = [(prefix / relpath).as_posix() for relpath in meta["relpath"]]
    if "mask" in meta.columns:
        meta["mask"] = [str(folder / mask) if mask else "" for mask in meta["mask"]]
    return meta


# --- reading and printing ------------------------------------------------------------------------------


def absolute_anywhere(value: str) -> bool:
    """Whether a stored path is absolute on Linux, macOS or Windows. A manifest or config.json written on Windows
    (C:\\data\\x.png) and read on Linux, or the reverse, holds paths absolute elsewhere: kept as they are, they name
    the file that is missing; joined to a folder here, they named one that never existed. Relative paths are written
    with "/", which both take."""
    return PurePosixPath(value).is_absolute() or bool(PureWindowsPath(value).anchor)


def manifest_csv(dir_or_csv: str | os.PathLike) -> Path:
    """The manifest file of a prepared folder, or the CSV itself."""
    location = Path(dir_or_csv)
    return location / MANIFEST_NAME if location.is_dir() else location


def manifest_dir(dir_or_csv: str | os.PathLike) -> Path:
    """The folder a manifest lies in, as given (made absolute; `outputs` resolves links when it names the marks): what
    train, evaluate, interpret and ensemble mark as read (`outputs.reading`) while they use its data."""
    return manifest_csv(dir_or_csv).absolute().parent


def manifest_key(dir_or_csv: str | os.PathLike) -> str:
    """One name for one manifest however it is given: `--data D` and `--data D/manifest.csv` are the same data."""
    return str(manifest_csv(dir_or_csv).resolve())


def manifest_digest(dir_or_csv: str | os.PathLike) -> str:
    """SHA-256 of what defines the split: each image's path, label and split, sorted. A resumed run checks that it
    still trains on the same rows, and evaluate that the test split is still the one held out. Other columns (an
    image cache added by preparing again), row order and line endings do not count."""
    csv_path = manifest_csv(dir_or_csv)
    if not csv_path.is_file():
        raise CxrFastError(f"{csv_path}: manifest not found")
    try:
        rows = pd.read_csv(csv_path, dtype=str, keep_default_na=False, usecols=["path", "label", "split"])
    except (ValueError, pd.errors.ParserError) as e:
        raise CxrFastError(f"{csv_path}: not a readable manifest ({str(e).splitlines()[0]})") from None
    text = rows.sort_values(["path", "label", "split"]).to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_matches(dir_or_csv: str | os.PathLike, recorded: str) -> bool:
    """Whether `recorded`, a run's or checkpoint's ``manifest_sha256``, is this manifest's digest. Runs and
    checkpoints written before 2026-11-27 22:35 (commit fcfd3ab) recorded the SHA-256 of manifest.csv's bytes
    instead of `manifest_digest`; the same bytes are the same manifest, so that digest is accepted too."""
    if recorded == manifest_digest(dir_or_csv):
        return True
    return recorded == hashlib.sha256(manifest_csv(dir_or_csv).read_bytes()).hexdigest()


def read_manifest(dir_or_csv: str | os.PathLike) -> pd.DataFrame:
    """Load a manifest (its folder or the CSV itself) with absolute paths, validated.

    Returns a DataFrame with the columns as written (strings; ``width``/``height`` as int; empty optional
    values as ""). Raises `CxrFastError` for a missing file, missing columns or unknown split names.
    """
    csv_path = manifest_csv(dir_or_csv)
    if not csv_path.is_file():
        raise CxrFastError(f"{csv_path}: manifest not found (make one with `cxrfast data prepare`)")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CxrFastError(
            f"{csv_path}: not a readable CSV manifest ({str(error).splitlines()[0]})"
        ) from None
    missing = [column for column in MANIFEST_COLUMNS if column not in frame.columns]
    if missing:
        raise CxrFastError(f"{csv_path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise CxrFastError(f"{csv_path}: manifest has no rows")
    bad_splits = sorted(set(frame["split"]) - set(SPLITS))
    if bad_splits:
        raise CxrFastError(
            f"{csv_path}: unknown split value(s) {', '.join(map(repr, bad_splits))}; "
            f"expected {', '.join(SPLITS)}"
        )
    if (frame["label"].str.strip() == "").any() or (frame["path"].str.strip() == "").any():
        raise CxrFastError(f"{csv_path}: some rows have an empty path or label")
    for column in ("width", "height"):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if numbers.isna().any() or (numbers % 1 != 0).any():
            raise CxrFastError(f"{csv_path}: column {column!r} must hold whole numbers")
        frame[column] = numbers.astype(int)
    base = csv_path.parent.absolute()
    for column in PATH_COLUMNS:
        if column in frame.columns:
            frame[column] = [
                str(base / value) if value and not absolute_anywhere(value) else value for value in frame[column]
            ]
    return frame


def print_summary(report: PrepareReport, console: Console | None = None) -> None:
    """Print counts per split x label, exclusions by reason, duplicates and conflicts as rich tables."""
    console = console or Console()
    folds = report.arguments.get("folds")
    if folds:
        # A line of its own: inside the table title, a long manifest path made rich wrap it mid-phrase.
        test = report.arguments["fold"]
        console.print(f"cross-validation: fold {test} of 0–{folds - 1} is test, fold {(test + 1) % folds} is valid")
    # file names, labels and messages are the user's text: escaped, or rich reads "[left]" in a name as markup
    table = Table(title=f"{report.n_images} images in {escape(str(report.manifest_path))}")
    table.add_column("label")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for label in report.labels:
        per_split = [report.counts[split].get(label, 0) for split in SPLITS]
        table.add_row(escape(label), *map(str, per_split), str(sum(per_split)))
    totals = [sum(report.counts[split].values()) for split in SPLITS]
    shares = [f"{n} ({n / max(1, sum(totals)):.0%})" for n in totals]
    table.add_row("[bold]total", *shares, f"[bold]{sum(totals)}")
    console.print(table)

    by_reason = report.exclusions_by_reason()
    if by_reason:
        excluded = Table(
            title=f"{len(report.excluded)} of {report.n_files} files excluded "
            f"(details in {escape(str(report.report_path))})"
        )
        excluded.add_column("reason")
        excluded.add_column("files", justify="right")
        excluded.add_column("meaning")
        excluded.add_column("example")
        for reason, count in by_reason.items():
            example = next(item for item in report.excluded if item.reason == reason)
            meaning = EXCLUSION_REASONS.get(reason, "")
            detail = "" if example.detail == meaning else f": {example.detail}"
            excluded.add_row(reason, str(count), meaning, escape(f"{example.path}{detail}"))
        console.print(excluded)
    else:
        console.print(f"All {report.n_files} files were usable.")

    if report.duplicate_groups:
        n_files = sum(len(group["files"]) for group in report.duplicate_groups)
        console.print(
            f"{len(report.duplicate_groups)} duplicate groups ({n_files} images) kept, each within one split."
        )
    for conflict in report.conflicts[:10]:
        console.print(
            f"[yellow]label conflict[/] {escape(', '.join(conflict['labels']))}: {escape(', '.join(conflict['files']))}"
        )
    if len(report.conflicts) > 10:
        console.print(f"... and {len(report.conflicts) - 10} more label conflicts (see {escape(str(report.report_path))})")
    if report.patients:
        found = report.patients
        console.print(
            f"{found['n_patients']} patients named by the pattern ({found['several_images']} with several images, "
            f"{found['several_labels']} with several labels), each within one split; "
            f"{found['n_unmatched']} images had no patient id."
        )
    if report.sites:
        by_site = Table(title="images per site")
        by_site.add_column("site")
        for label in report.labels:
            by_site.add_column(escape(label), justify="right")
        for site, counts in report.sites.items():
            by_site.add_row(escape(site), *(str(counts.get(label, 0)) for label in report.labels))
        console.print(by_site)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if report.unused_map_keys:
        console.print(f"[yellow]label map entries matching no folder:[/] {escape(', '.join(report.unused_map_keys))}")
    if report.cache_dir:
        console.print(f"Image cache: {escape(str(report.cache_dir))}")
    console.print(f"Took {report.seconds:.1f} s.")


def _listed(files_per_folder: Counter) -> str:
    """'Normal' (10 files), 'Pneumonia' (3 files), … at most five folders, for a one-line message."""
    named = [f"{printable(name)!r} ({n} file{'s' if n != 1 else ''})" for name, n in sorted(files_per_folder.items())]
    return ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")


def site_warnings(site_counts: dict[str, dict[str, int]]) -> list[str]:
    """Classes that come from one site only, when there are several: the site can stand in for the class."""
    if len(site_counts) < 2:
        return []
    warnings = []
    for label in sorted({label for counts in site_counts.values() for label in counts}):
        found_at = [site for site, counts in site_counts.items() if counts.get(label)]
        if len(found_at) == 1:
            warnings.append(f"every '{label}' image comes from site '{found_at[0]}': a model can learn to recognise "
                            "that site instead of the disease; check `cxrfast interpret`'s shortcut audit")
    return warnings


def _class_warnings(src_dir: Path, skip, mapping, items, manifest: pd.DataFrame, fractions, sites) -> list[str]:
    """Classes that vanished (a mapped folder with no usable image) or that miss a split they should be in."""
    warnings = []
    used = set(manifest["source_label"])
    # With sites a class folder is a site's: hospC/Pneumonia may be empty while hospA/Pneumonia is not.
    used_at = set(zip(manifest["site"], manifest["source_label"])) if sites else {(None, name) for name in used}
    files_per_folder = Counter((item.site, item.source_label) for item in items)
    for site, folder in sorted(class_folders(src_dir, skip, sites), key=lambda pair: (pair[0] or "", pair[1])):
        if (site, folder) in used_at or map_label(folder, mapping) is None:
            continue
        found = files_per_folder[site, folder]
        why = "it is empty" if not found else f"none of its {found} files is usable (see {REPORT_NAME})"
        name = f"{site}/{folder}" if sites else folder
        warnings.append(f"class folder '{printable(name)}' is left out: {why}")
    split_like = sorted(folder for folder in used if SPLIT_FOLDER_NAMES & set(re.split(r"[^a-z]+", folder.casefold())))
    if split_like:  # e.g. train_set/COVID/…: the classes would be train_set against test_set
        warnings.append(f"class folder(s) {', '.join(map(repr, split_like))} look like split folders; if the classes "
                        "are the folders inside, rename these train, valid or test (their images are then pooled)")
    for label in manifest_classes(manifest):
        of_label = manifest.loc[manifest["label"] == label, "split"]
        # One line per class, not per split: a patient id shared by every image can empty two splits of each class.
        missing = [split for split, fraction in zip(SPLITS, fractions, strict=True)
                   if fraction > 0 and not (of_label == split).any()]
        if missing:
            where = " or ".join(missing)
            warnings.append(f"'{label}' has no {where} images ({len(of_label)} in all): "
                            f"its recall there cannot be measured; add images")
    return warnings


def manifest_classes(manifest: pd.DataFrame) -> list[str]:
    """A manifest's classes in the order of a model's outputs (sorted, as fastai's CategoryBlock orders its vocab)."""
    return sorted(manifest["label"].unique().tolist())


def label_indices(labels: pd.Series, classes: Sequence[str]) -> np.ndarray:
    """Each label's position in `classes`, the model's outputs. A label that is not one of them is refused: mapped
    alone it would become NaN and then a float, and every metric after it wrong or an obscure crash."""
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise CxrFastError(f"labels {unknown} are not classes of this model {list(classes)}")
    return labels.map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)


def image_column(df: pd.DataFrame) -> pd.Series:
    """The file to read for each row: the cached working-resolution copy when there is one."""
    if "cache_path" in df.columns:
        cached = df["cache_path"].fillna("").astype(str)
        return cached.where(cached != "", df["path"].astype(str))
    return df["path"].astype(str)
