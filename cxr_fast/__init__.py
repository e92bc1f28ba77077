"""cxr_fast: train, compare and audit chest X-ray classifiers on a CPU."""

import warnings

from cxr_fast.errors import CxrFastError

# Notices about our dependencies that mean nothing to a user of cxr_fast, at the command line or in a notebook:
# fastai still calls torch.jit.script at import, which torch says is deprecated; in a Jupyter kernel without
# ipywidgets, huggingface_hub's import of tqdm.auto asks to "update jupyter and ipywidgets" (its bars work without).
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"

# The three classes of the study; data from other sources is mapped onto these by a label map.
CLASSES = ("COVID-19", "Normal", "Pneumonia")

__all__ = ["CLASSES", "CxrFastError", "__version__"]
