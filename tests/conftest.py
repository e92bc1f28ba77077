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


# Tiny synthetic data and trained runs shared by the tests of evaluate, compare and interpret: training is the
# slow part, so it happens once per session.
TINY = dict(arch="cxresnet_tiny", size=48, bs=16, lr=3e-3)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from cxr_fast.data.manifest import prepare
    from cxr_fast.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "src", n_per_class=10, size=64, seed=1, progress=False)
    prepare(root / "src", root / "data", cache_size=0, progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory) -> list[Path]:
    """Two 2-epoch runs (seeds 0 and 1) on `tiny_data`."""
    from cxr_fast.config import resolve_config
    from cxr_fast.train import train

    root = tmp_path_factory.mktemp("runs")
    return [train(tiny_data, resolve_config(epochs=2, seed=s, **TINY), out=root / f"seed{s}", quiet=True)
            for s in (0, 1)]
