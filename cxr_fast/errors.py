"""The one exception type that library code raises for a user's mistake, and JSON, YAML and tensor readers.

The CLI turns it into a single line on stderr and exit code 1; anything else is a bug and keeps its traceback.
"""

import errno
import json
from pathlib import Path
from typing import Any

import yaml


class CxrFastError(Exception):
    """A problem with the user's input (a file, a flag, a manifest) that they can fix."""


def read_json(path: Path) -> Any:
    """A JSON file from a run or export folder; a damaged one is the user's to fix, not a traceback."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CxrFastError(f"{path}: not valid JSON ({e})") from None


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"found alias *{event.anchor}: cxr_fast reads no YAML aliases",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """YAML as plain data, as `yaml.safe_load` reads it (no Python objects), but refusing aliases (*name): ten lines
    of nested aliases ("billion laughs") stand for billions of values, which printing, copying or JSON-encoding the
    result then builds, until memory runs out. A recipe, a run's recipe.yaml or a label map never needs one. Raises
    yaml.YAMLError, as safe_load does."""
    return yaml.load(text, Loader=_NoAliasLoader)


def read_tensors(path: Path, what: str = "safetensors file") -> dict:
    """A safetensors file from a run, checkpoint or cache folder; a missing or damaged one is the user's to fix
    (restore it, or start again), not a traceback."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CxrFastError(f"{path}: {what} missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError for a truncated or garbled file
        raise CxrFastError(f"{path}: not a readable {what} ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line, for a one-line error."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# A full disk, a read-only or forbidden folder, a file where a folder should be (or the reverse), a name too long: a
# reason the user can act on, unlike an OSError from a damaged image.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                  errno.ENOENT,  # a folder that cannot be made where it was asked (under /proc, say)
                  errno.ENAMETOOLONG}  # a name over 255 bytes, or a path over the system's limit
# EINVAL is a storage error only when it names a file: Windows refuses a name so (a device name such as CON or NUL,
# a character such as ":" or "?"), and FAT or exFAT on a USB stick does on any system. Without a file it is
# anything, a bug included.
NAMED_STORAGE_ERRORS = {errno.EINVAL: "not a name this system or disk accepts"}


def storage_problem(e: BaseException) -> str | None:
    """'FILE: reason' for a storage error (the file when it is known), None for any other exception."""
    if not isinstance(e, OSError) or not (e.errno in STORAGE_ERRORS or (e.errno in NAMED_STORAGE_ERRORS and e.filename)):
        return None
    reason = e.strerror or str(e)
    if e.errno in NAMED_STORAGE_ERRORS:
        reason = f"{reason} ({NAMED_STORAGE_ERRORS[e.errno]})"
    return f"{e.filename}: {reason}" if e.filename else reason
