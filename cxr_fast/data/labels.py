"""Label maps: how a dataset's folder names become the study's labels.

Real datasets name their classes their own way ("No_findings", "Pneumonia-Viral", "COVID"), so a label map
translates folder names into labels. It can be given three ways, whichever is handiest on a command line:

- inline: ``"No_findings=Normal,Covid-19=COVID-19"``
- a YAML or JSON file holding a mapping ``{folder: label}``
- a preset name, for datasets users commonly bring: ``mendeley``
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from pathlib import Path

import yaml

from cxr_fast.errors import CxrFastError, parse_yaml

PRESETS: dict[str, dict[str, str]] = {
    # Mendeley "Curated Dataset for COVID-19 Posterior-Anterior Chest Radiography Images",
    # doi 10.17632/9xkhgts2s6.
    "mendeley": {
        "COVID-19": "COVID-19",
        "Normal": "Normal",
        "Pneumonia-Bacterial": "Pneumonia",
        "Pneumonia-Viral": "Pneumonia",
    },
}

MAP_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def parse_label_map(spec: str | Path | Mapping[str, str] | None) -> dict[str, str] | None:
    """Turn a label-map spec (file path, inline text, preset name or dict) into ``{folder: label}``.

    None or an empty string means "no map": folder names are used as labels unchanged.
    Raises `CxrFastError` naming the problem for anything malformed.
    """
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return _validated(dict(spec), "label map")
    if isinstance(spec, Path):
        return _read_map_file(spec)
    text = str(spec).strip()
    if not text:
        return None
    if text.lower() in PRESETS:
        return dict(PRESETS[text.lower()])
    path = Path(text).expanduser()
    if path.is_file():
        return _read_map_file(path)
    if "=" in text:
        return _parse_inline(text)
    if path.suffix.lower() in MAP_FILE_SUFFIXES:
        raise CxrFastError(f"{text}: label map file not found")
    raise CxrFastError(
        f"label map {text!r} is neither a file, a preset ({', '.join(sorted(PRESETS))}) nor inline "
        "'folder=label,folder=label'"
    )


def map_label(source_label: str, label_map: Mapping[str, str] | None) -> str | None:
    """The label for a folder name, or None when the map does not cover it.

    An exact match wins; otherwise one ignoring case, surrounding spaces and Unicode form is accepted when it is
    unambiguous, because folder case is easily lost between filesystems ("covid" vs "COVID").
    """
    if label_map is None:
        return source_label
    if source_label in label_map:
        return label_map[source_label]
    folded = [label for key, label in label_map.items() if loose_name(key) == loose_name(source_label)]
    return folded[0] if len(set(folded)) == 1 else None


def loose_name(name: str) -> str:
    # Unicode form too: macOS writes "Neumonía" decomposed (NFD), a map typed elsewhere holds it composed (NFC).
    return unicodedata.normalize("NFC", name).strip().casefold()


def _parse_inline(text: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue  # tolerate a trailing comma
        if part.count("=") != 1:
            raise CxrFastError(f"label map {text!r}: {part.strip()!r} should be 'folder=label'")
        folder, label = (side.strip() for side in part.split("="))
        if not folder or not label:
            raise CxrFastError(f"label map {text!r}: {part.strip()!r} has an empty folder or label")
        if folder in mapping and mapping[folder] != label:
            raise CxrFastError(
                f"label map {text!r}: folder {folder!r} is mapped twice ({mapping[folder]!r} and {label!r})"
            )
        mapping[folder] = label
    if not mapping:
        raise CxrFastError(f"label map {text!r} maps nothing")
    return _consistent(mapping, f"label map {text!r}")


def _consistent(mapping: dict[str, str], where: str) -> dict[str, str]:
    """Refuse a map whose folders or labels differ only in case, spaces or Unicode form where that matters.

    Folder names are matched loosely (`map_label`), so 'Normal=Other,normal=Normal' would silently give the folder
    Normal one of two labels; and labels 'Pneumonia' and 'pneumonia' would be two classes that print alike."""
    folders: dict[str, tuple[str, str]] = {}
    labels: dict[str, str] = {}
    for folder, label in mapping.items():
        seen = folders.setdefault(loose_name(folder), (folder, label))
        if seen[1] != label:
            raise CxrFastError(f"{where}: folders {seen[0]!r} and {folder!r} differ only in case, spaces or Unicode "
                               f"form but map to different labels ({seen[1]!r} and {label!r}); folder case is easily "
                               "lost between file systems, so give each folder once")
        other = labels.setdefault(loose_name(label), label)
        if other != label:
            raise CxrFastError(f"{where}: labels {other!r} and {label!r} differ only in case, spaces or Unicode form "
                               "and would be two classes; spell them alike")
    return mapping


def _read_map_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CxrFastError(f"{path}: label map file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CxrFastError(f"{path}: cannot read label map ({error})") from None
    try:
        # JSON is (almost) a subset of YAML, but its own parser gives clearer errors for .json files.
        data = json.loads(text) if path.suffix.lower() == ".json" else parse_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        detail = str(error).splitlines()[0]
        raise CxrFastError(
            f"{path}: label map is not valid {path.suffix.lstrip('.').upper() or 'YAML'} ({detail})"
        ) from None
    if not isinstance(data, dict):
        raise CxrFastError(f"{path}: label map must be a mapping 'folder: label', got {type(data).__name__}")
    return _validated(data, str(path))


def _validated(data: dict, where: str) -> dict[str, str]:
    if not data:
        raise CxrFastError(f"{where}: label map is empty")
    mapping: dict[str, str] = {}
    for folder, label in data.items():
        if not isinstance(label, str) or not label.strip():
            raise CxrFastError(
                f"{where}: folder {folder!r} must map to a non-empty label name, got {label!r}"
            )
        if not isinstance(folder, str) or not folder.strip():
            # YAML turns unquoted 1 or yes into numbers/booleans: a folder name must stay text.
            raise CxrFastError(f"{where}: folder name {folder!r} must be text (quote it in YAML)")
        mapping[folder.strip()] = label.strip()
    return _consistent(mapping, where)
