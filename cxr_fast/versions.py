"""The library versions a result records (a run's config.json, an evaluation's metrics.json, an interpretation's
audit.json, a prepared manifest's report), so that it can be reproduced, or its difference from another explained.

fastai, timm, Captum (and torch, where nothing imported it yet) are named from their installed metadata, not
imported: prepare needs none of them, evaluate and interpret no fastai, and importing one only to read its version
would slow the command down. An imported torch gives its whole version, with the build (`2.14.1+cu130`).
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import numpy as np

import cxr_fast


def _installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    torch = getattr(sys.modules.get("torch"), "__version__", None) or _installed("torch")
    return {"cxr_fast": cxr_fast.__version__, "torch": torch, "fastai": _installed("fastai"),
            "timm": _installed("timm"), "captum": _installed("captum"), "numpy": np.__version__,
            "python": platform.python_version()}
