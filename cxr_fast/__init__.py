"""cxr_fast: train, compare and audit chest X-ray classifiers on a CPU."""

from cxr_fast.errors import CxrFastError

__version__ = "0.1.0"

# The three classes of the study; data from other sources is mapped onto these by a label map.
CLASSES = ("COVID-19", "Normal", "Pneumonia")

__all__ = ["CLASSES", "CxrFastError", "__version__"]
