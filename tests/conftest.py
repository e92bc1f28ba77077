"""Shared fixtures.

`shared_data` points at ../shared/data (real chest X-rays). A user's machine may not have it: the tests that need
it skip there. CI sets CI=true and must run them, so a missing folder fails loudly instead of skipping.
"""

import os
import struct
import subprocess
import sys
from contextlib import contextmanager
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


def write_dicom(path, stored, photometric="MONOCHROME2", **attributes):
    """A 12-bit DICOM of the `stored` values (any extra attributes set on the dataset), as a scanner would store it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.set_pixel_data(stored.astype("uint16"), photometric_interpretation=photometric, bits_stored=12)
    for name, value in attributes.items():
        setattr(dataset, name, value)
    dataset.save_as(path, enforce_file_format=True)


def bare_dataset_bytes(dicom_file) -> bytes:
    """The dataset of a DICOM file without its preamble and file meta group, as older archives store it."""
    data = dicom_file.read_bytes()
    group_length = struct.unpack("<I", data[140:144])[0]  # (0002,0000) UL, right after the preamble and 'DICM'
    return data[144 + group_length:]


# Holds the lock of the folder in sys.argv[1] (cxr_fast.outputs.writing), as a cxrfast process writing it does.
HOLDING_LOCK = """import sys
from pathlib import Path
from cxr_fast.outputs import writing
with writing(Path(sys.argv[1])):
    print("ready", flush=True)
    sys.stdin.read()
"""


# Reads the dataset in sys.argv[1] (holds cxr_fast.outputs.reading), as a train, evaluate, interpret or ensemble of it does.
READING_DATA = """import sys
from pathlib import Path
from cxr_fast.outputs import reading
with reading(Path(sys.argv[1])):
    print("ready", flush=True)
    sys.stdin.read()
"""


@contextmanager
def another_process(code: str, *args):
    """Another Python process running `code` (`args` as its sys.argv[1:]), paused where it prints 'ready' until this
    block ends (its stdin is closed then, and it goes on): a second cxrfast caught at a chosen point of its work."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = proc.stdout.readline()
        assert ready == "ready\n", proc.stderr.read()
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
