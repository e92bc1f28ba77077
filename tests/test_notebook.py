"""The Python API used from a Jupyter notebook, checked without Jupyter: a kernel's stdout is no terminal, warnings
are shown in the output cell, and the last expression of a cell is displayed through its repr."""

import subprocess
import sys


def test_importing_the_api_shows_no_notices_about_its_dependencies():
    # fastai's torch.jit.script call at import, and tqdm.auto's request (huggingface_hub imports it) for ipywidgets
    # in a kernel without them, were printed under the first cell that trained a model
    code = ("import warnings; import cxr_fast.train, cxr_fast.interpret, cxr_fast.evaluate; "
            "from tqdm import TqdmWarning; from tqdm.notebook import WARN_NOIPYW; warnings.warn(WARN_NOIPYW, TqdmWarning); "
            "warnings.warn('a warning of our own', UserWarning)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "jit.script" not in done.stderr and "IProgress" not in done.stderr
    assert "a warning of our own" in done.stderr  # the filters are narrow: other warnings still show
