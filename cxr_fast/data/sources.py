"""Find the image files of a class-folder dataset, whatever its depth.

Accepted layouts (the class is the first folder below ROOT that is not a split folder; with sites, the second):

    ROOT/<class>/<file>                       e.g. Mendeley: COVID-19/COVID-19 (1).jpg
    ROOT/<split>/<class>/<file>               e.g. Kaggle: train/PNEUMONIA/person1_bacteria_1.jpeg
    ROOT/<class>/<any>/<sub>/<folders>/<file> nested folders under a class belong to that class
    ROOT/<site>/<class>/<file>                with ``sites=True`` only: one folder per hospital or collection

Split folders are ignored, at any level, because `prepare` makes its own, leakage-free split. Folders whose name
starts with "_" or "." are never data (``_masks``, ``.git``), nor are files whose name starts with "." (``.DS_Store``,
macOS's ``._film.png``) and files starting with "_" that are not named as images (``_meta.csv``): cameras and
scanners name films ``_DSC0001.JPG``. Every other file is returned, image-looking or not, so that nothing is dropped silently: files that turn out not to be images
are reported by the reader, and files outside any class folder come back with ``source_label=None``.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cxr_fast.data.cache import CACHE_DIRNAME
from cxr_fast.data.io import IMAGE_SUFFIXES
from cxr_fast.errors import CxrFastError

# `cxrfast data prepare` writes this file into every output folder. A folder holding one is an earlier prepare's
# output (manifest and cached copies), never a class of X-rays, even when it sits inside the source folder.
PREPARED_MARKER = "prepare_report.json"
MANIFEST_NAME = "manifest.csv"  # with the marker and the cache folder, what prepare writes into its --out

# Folders file systems make for themselves, never X-rays, and often not listable by a user (ext4's lost+found).
SYSTEM_FOLDERS = frozenset({"lost+found", "System Volume Information", "$RECYCLE.BIN"})

# Subfolders that datasets keep inside every class folder and that are never classes (the COVID-19 Radiography
# Database has COVID/images and COVID/masks): their being alike in every class does not suggest site folders.
NOT_CLASS_NAMES = frozenset({"images", "image", "imgs", "img", "masks", "mask", "labels", "annotations"})

SPLIT_FOLDER_NAMES = frozenset({"train", "training", "valid", "val", "validation", "test", "testing"})


@dataclass(frozen=True)
class Item:
    """One file found under ROOT; ``source_label`` is its class folder's name, None when it has none.

    ``site``: its site folder's name when the walk was asked for sites, else None.
    """

    path: Path
    source_label: str | None
    site: str | None = None

    @property
    def has_class(self) -> bool:
        return self.source_label is not None


def is_hidden(name: str) -> bool:
    """A folder (or an output's entry) that is never data: its name starts with "_" or "."."""
    return name.startswith(("_", "."))


def is_hidden_file(name: str) -> bool:
    """A file that is never data: the system's ("." files) and the toolkit's own notes ("_" files not named as
    images, such as ``_meta.csv``). A "_" name with an image suffix is a film: cameras write ``_DSC0001.JPG``."""
    return name.startswith(".") or (name.startswith("_") and Path(name).suffix.lower() not in IMAGE_SUFFIXES)


def is_split_folder(name: str) -> bool:
    return name.casefold() in SPLIT_FOLDER_NAMES


def find_images(root: str | os.PathLike, skip: Iterable[str | os.PathLike] = (), sites: bool = False) -> list[Item]:
    """Every non-hidden file under ``root`` with its class folder name, sorted by path.

    ``skip``: files or folders to leave out (e.g. the output folder when it lies inside ``root``).
    ``sites``: the first folder level names sites and the classes are the level below it.
    Raises `CxrFastError` when ``root`` is missing or not a folder.
    """
    root = Path(root)
    items = [
        Item(path=folder / name, source_label=label, site=site)
        for folder, site, label, files in _walk(root, skip, sites)
        for name in files
    ]
    items.sort(key=lambda item: item.path.relative_to(root).as_posix())
    return items


def class_folders(root: str | os.PathLike, skip: Iterable[str | os.PathLike] = (),
                  sites: bool = False) -> set[tuple[str | None, str]]:
    """The (site, class) folder names under ``root``, empty ones included (`find_images` only sees files); the
    site is None without ``sites``."""
    return {(site, label) for _, site, label, _ in _walk(Path(root), skip, sites) if label is not None}


def shared_subfolders(root: str | os.PathLike, items: Iterable[Item]) -> list[str]:
    """Subfolder names that every class folder holds its files in, when the class folders look like sites.

    Non-empty for ROOT/<site>/<class>/<file> read as ROOT/<class>/…: "hospA" and "hospB" become the classes
    and a model trained on them tells hospitals apart. The sites' class folders may be spelt differently
    ("COVID" at one, "COVID-19" at another), so two or more names in common (ignoring case) are enough, when they
    hold most of each folder's files. Empty when the class folders' subfolders differ (patients, dates: a
    class's own nesting), when they are images/ and masks/ folders, or when a class folder holds most of its
    files itself (a README or Thumbs.db beside the site's class folders does not count).
    """
    root = Path(root)
    files_in: dict[str, Counter] = defaultdict(Counter)  # class folder -> its subfolder ("" for itself) -> files
    spelling: dict[str, str] = {}
    for item in items:
        if not item.has_class:
            continue
        parts = [part for part in item.path.relative_to(root).parts[:-1] if not is_split_folder(part)]
        child = parts[1].casefold() if len(parts) > 1 else ""
        files_in[parts[0]][child] += 1
        spelling.setdefault(child, parts[1] if len(parts) > 1 else "")
    if len(files_in) < 2:
        return []
    shared = set.intersection(*(set(counts) - {""} for counts in files_in.values()))
    if len(shared) < 2 or shared & NOT_CLASS_NAMES:  # e.g. COVID/images + COVID/masks: no sites
        return []
    if any(sum(counts[name] for name in shared) * 2 <= sum(counts.values()) for counts in files_in.values()):
        return []
    return sorted(spelling[name] for name in shared)


def _walk(root: Path, skip: Iterable[str | os.PathLike],
          sites: bool = False) -> Iterator[tuple[Path, str | None, str | None, list[str]]]:
    """(folder, its site or None, its class or None, its non-hidden, non-skipped file names) for every folder."""
    if not root.exists():
        raise CxrFastError(f"{root}: folder not found")
    if not root.is_dir():
        raise CxrFastError(f"{root}: not a folder (expected ROOT/<class>/<image> folders)")
    skipped = {Path(p).resolve() for p in skip}
    # followlinks: a class folder may be a link to images kept elsewhere. A link to a folder already walked or
    # chosen for walking (one above it, a sibling linking back) is not followed, so links cannot loop.
    visited = {root.resolve()}
    for folder, subfolders, files in os.walk(root, onerror=_unreadable_folder, followlinks=True):
        folder_path = Path(folder)
        if (folder_path / PREPARED_MARKER).is_file():  # ROOT itself was an earlier prepare's --out
            subfolders[:] = [name for name in subfolders if name != CACHE_DIRNAME]
            files = [name for name in files if name not in (PREPARED_MARKER, MANIFEST_NAME)]
        # Pruning in place stops os.walk from descending; sorting makes the walk order deterministic.
        candidates = [name for name in sorted(subfolders)
                      if not (is_hidden(name) or name in SYSTEM_FOLDERS or (folder_path / name).resolve() in skipped
                              or (folder_path / name / PREPARED_MARKER).is_file())]
        # The real folders first, so that a link to a sibling is known for one whatever the names' order.
        visited.update((folder_path / name).resolve() for name in candidates if not (folder_path / name).is_symlink())
        kept_folders = []
        for name in candidates:
            path = folder_path / name
            if path.is_symlink():
                if path.resolve() in visited:
                    continue
                visited.add(path.resolve())
            kept_folders.append(name)
        subfolders[:] = kept_folders
        named = [part for part in folder_path.relative_to(root).parts if not is_split_folder(part)] + [None, None]
        site, label = (named[0], named[1]) if sites else (None, named[0])
        kept = [
            name for name in files
            if not is_hidden_file(name) and not (skipped and (folder_path / name).resolve() in skipped)
        ]
        yield folder_path, site, label, kept


def _unreadable_folder(error: OSError) -> None:
    # os.walk would otherwise leave out a folder it may not list, and every image in it, without a word.
    raise CxrFastError(f"{error.filename}: cannot list this folder ({error.strerror or error}); make it readable, "
                       "or move it out of the source folder")
