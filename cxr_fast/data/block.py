"""Manifest → fastai DataBlock → DataLoaders.

The data layer knows nothing of models: the caller passes the number of input channels and, for pretrained
networks, their normalisation statistics; otherwise statistics are computed from the training split.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import ColReader, IndexSplitter
from fastai.vision.augment import Normalize, aug_transforms
from fastai.vision.core import PILImage, PILImageBW
from fastai.vision.data import ImageBlock
from fasttransform import Transform

from cxr_fast.data.io import read_image
from cxr_fast.data.manifest import image_column, manifest_classes
from cxr_fast.errors import CxrFastError
from cxr_fast.preprocess import resize_square, to_tensor


class CXRImageBW(PILImageBW):
    """A grayscale X-ray opened by cxr_fast's reader (PNG/JPEG/DICOM), not PIL alone."""

    @classmethod
    def create(cls, fn, **kwargs):
        return cls(read_image(fn))


class CXRImageRGB(PILImage):
    @classmethod
    def create(cls, fn, **kwargs):
        return cls(read_image(fn).convert("RGB"))


class SquishResize(Transform):
    """Item transform calling `cxr_fast.preprocess.resize_square`, the same code evaluate/predict use."""

    order = 1

    def __init__(self, size: int):
        self.size = size

    def encodes(self, img: PILImage):  # PILImageBW is a PILImage subclass
        return type(img)(resize_square(img, self.size))


def train_transforms() -> list:
    """Augmentations that keep a chest X-ray plausible.

    No horizontal flip: the heart sits on the patient's left, and flipping also moves side markers, so a flip
    makes anatomically impossible images. Small rotations, zoom and warp mimic patient positioning; lighting
    changes mimic exposure differences between machines.
    """
    return aug_transforms(
        do_flip=False, max_rotate=7.0, max_zoom=1.1, max_lighting=0.3, max_warp=0.1, p_affine=0.75, p_lighting=0.75
    )


def compute_stats(paths: Sequence[str], size: int, n_in: int, sample: int = 256, seed: int = 0):
    """Mean and std of pixel values in [0, 1] over a sample of training images, at the training size."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(sample, len(paths)), replace=False)
    values = [to_tensor(resize_square(read_image(paths[i]), size), 1) for i in sorted(chosen)]
    stacked = np.stack([v.numpy() for v in values])
    mean, std = float(stacked.mean()), float(stacked.std())
    return [mean] * n_in, [max(std, 1e-3)] * n_in


@dataclass
class DataSpec:
    classes: list[str]
    mean: list[float]
    std: list[float]


MAX_LEFT_OUT_SHARE = 0.25  # more of the training split than this dropped from every epoch: say so
RARE_CLASS = 5  # fewer training images than this: more likely a mistyped label than a class to learn


def check_classes(manifest: pd.DataFrame, where: str | Path) -> None:
    """Refuse a manifest whose train split lacks a class (the model would have an output it can never learn);
    warn about a class with only a few training images (often a typo in a label) and one the valid split lacks
    (each epoch's balanced accuracy then averages over the other classes only)."""
    classes = manifest_classes(manifest)
    if len(classes) < 2:
        raise CxrFastError(f"{where}: manifest has only the class {classes[0]!r}; a classifier needs two or more")
    in_train = manifest.loc[manifest["split"] == "train", "label"].value_counts()
    lacking = [c for c in classes if in_train.get(c, 0) == 0]
    if lacking:
        raise CxrFastError(f"{where}: no {', '.join(lacking)} image in the train split; a model cannot learn a class "
                           "it never sees (fix the labels, or prepare the split again)")
    rare = [f"{c} ({in_train[c]})" for c in classes if in_train[c] < RARE_CLASS]
    if rare:
        warnings.warn(f"{where}: only a few training images for {', '.join(rare)}; a mistyped label?", stacklevel=2)
    in_valid = set(manifest.loc[manifest["split"] == "valid", "label"])
    absent = [c for c in classes if c not in in_valid]
    if absent and in_valid:
        warnings.warn(f"{where}: no {', '.join(absent)} image in the valid split; balanced accuracy each epoch "
                      "averages over the other classes only", stacklevel=2)


def build_dataloaders(
    manifest: pd.DataFrame,
    *,
    size: int,
    bs: int,
    n_in: int = 1,
    stats: tuple[list[float], list[float]] | None = None,
    augment: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    stats_sample: int = 256,
) -> tuple[DataLoaders, DataSpec]:
    """Train/valid DataLoaders from the manifest's `split` column (the test split is left for evaluation)."""
    df = manifest[manifest["split"].isin(["train", "valid"])].reset_index(drop=True).copy()
    for split in ("train", "valid"):
        if not (df["split"] == split).any():
            raise CxrFastError(f"manifest has no '{split}' images; re-run `cxrfast data prepare`")
    n_train = int((df["split"] == "train").sum())
    if n_train < bs:  # fastai drops the last incomplete training batch, so an epoch would have no steps at all
        raise CxrFastError(f"manifest has {n_train} training images, fewer than the batch size {bs}: "
                           f"pass --bs {n_train} or less, or add images")
    left_out = n_train % bs
    if left_out > n_train * MAX_LEFT_OUT_SHARE:  # a different remainder each shuffled epoch, but each epoch is short
        warnings.warn(f"batch size {bs} leaves {left_out} of {n_train} training images out of every epoch (the last, "
                      f"incomplete batch is dropped): pick a --bs that divides {n_train} more evenly", stacklevel=2)
    df["image"] = image_column(df)
    classes = manifest_classes(manifest)
    if len(classes) < 2:
        raise CxrFastError(f"manifest has only the class {classes[0]!r}; a classifier needs two or more")
    if stats is None:
        stats = compute_stats(df.loc[df["split"] == "train", "image"].tolist(), size, n_in, stats_sample, seed)
    mean, std = stats

    image_cls = CXRImageBW if n_in == 1 else CXRImageRGB
    batch_tfms = []  # ImageBlock already adds IntToFloatTensor (uint8 → [0, 1]) before these
    if augment:
        batch_tfms += train_transforms()
    batch_tfms.append(Normalize.from_stats(mean, std))
    block = DataBlock(
        blocks=(ImageBlock(cls=image_cls), CategoryBlock(vocab=classes)),
        get_x=ColReader("image"),
        get_y=ColReader("label"),
        splitter=IndexSplitter(df.index[df["split"] == "valid"].tolist()),
        item_tfms=[SquishResize(size)],  # DataBlock adds ToTensor after it
        batch_tfms=batch_tfms,
    )
    dls = block.dataloaders(df, bs=bs, num_workers=num_workers, seed=seed, shuffle=True)
    return dls, DataSpec(classes=classes, mean=list(mean), std=list(std))


def build_eval_dataloaders(items: pd.DataFrame, *, size: int, bs: int, n_in: int, classes: list[str],
                           mean: list[float], std: list[float], device=None) -> DataLoaders:
    """DataLoaders whose valid set is `items`, preprocessed as in training without augmentation, with batches on
    `device` (fastai's default device, a GPU when there is one, if None).

    fastai needs a training set to build DataLoaders; it gets the first item, which nothing ever reads.
    """
    df = pd.concat([items.iloc[:1], items], ignore_index=True).copy()
    df["image"] = image_column(df)
    block = DataBlock(
        blocks=(ImageBlock(cls=CXRImageBW if n_in == 1 else CXRImageRGB), CategoryBlock(vocab=classes)),
        get_x=ColReader("image"),
        get_y=ColReader("label"),
        splitter=IndexSplitter(list(range(1, len(df)))),
        item_tfms=[SquishResize(size)],
        batch_tfms=[Normalize.from_stats(mean, std)],
    )
    return block.dataloaders(df, bs=bs, num_workers=0, shuffle=False, device=device)
