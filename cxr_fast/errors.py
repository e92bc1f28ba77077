"""The one exception type that library code raises for a user's mistake, and a JSON reader that raises it.

The CLI turns it into a single line on stderr and exit code 1; anything else is a bug and keeps its traceback.
"""

import json
from pathlib import Path
from typing import Any


class CxrFastError(Exception):
    """A problem with the user's input (a file, a flag, a manifest) that they can fix."""


def read_json(path: Path) -> Any:
    """A JSON file from a run or export folder; a damaged one is the user's to fix, not a traceback."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CxrFastError(f"{path}: not valid JSON ({e})") from None
