"""The preprocessing functions from a grayscale PIL image to a model's input tensor.

Training (through fastai transforms in `cxr_fast.data.block`) and every later step (evaluate, interpret, predict)
call these same functions, so a reloaded model sees exactly the pixels it was trained on. Two paths wrap them:
fastai's transforms in training, and `predict.model_image`/`model_input` (numpy, also the ONNX runtime's);
tests/test_train.py and tests/test_predict.py check that both give the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr_fast.data.io import read_image


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Squish to size×size. Chest X-rays are roughly square and cropping would cut off lung apices or
    costophrenic angles, so we squish (a small aspect change) rather than crop or pad."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR)


def to_tensor(img: Image.Image, n_in: int) -> torch.Tensor:
    """uint8 grayscale → float [n_in, H, W] in [0, 1]; 3-channel models get the gray image three times."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div_(255.0)
    return x.unsqueeze(0).expand(n_in, -1, -1).contiguous()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    shape = (-1, 1, 1) if x.ndim == 3 else (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(shape)
    std_t = torch.tensor(std, dtype=x.dtype).view(shape)
    return (x - mean_t) / std_t


def load_input(path: str | Path, size: int, n_in: int, mean, std) -> torch.Tensor:
    """A file (PNG/JPEG/DICOM) → normalised model input [n_in, size, size]."""
    return normalize(to_tensor(resize_square(read_image(path), size), n_in), mean, std)
