"""Shared fixtures.

`shared_data` points at ../shared/data (real chest X-rays). A user's machine may not have it: the tests that need
it skip there. CI sets CI=true and must run them, so a missing folder fails loudly instead of skipping.
"""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared data folder is missing: {SHARED_DATA}")
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
