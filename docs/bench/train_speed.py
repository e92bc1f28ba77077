"""Training throughput: cxr_fast's fastai Learner versus a plain PyTorch loop on the same model, batch size and
preprocessed tensors; plus the full pipeline (manifest → DataBlock with augmentation → Learner).

    .venv/bin/python docs/bench/train_speed.py DATA_DIR [--arch cxresnet] [--size 128] [--bs 32] [--n 256]
"""

import argparse
import time

import fastai.callback.schedule  # noqa: F401
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from torch.utils.data import DataLoader, TensorDataset

from cxr_fast.archs import create_model
from cxr_fast.config import resolve_config
from cxr_fast.data.block import image_column
from cxr_fast.data.manifest import read_manifest
from cxr_fast.preprocess import load_input
from cxr_fast.train import build_learner


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--arch", default="cxresnet")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    manifest = read_manifest(a.data)
    train = manifest[manifest["split"] == "train"].iloc[: a.n]
    classes = sorted(manifest["label"].unique())
    x = torch.stack([load_input(f, a.size, 1, [0.5], [0.25]) for f in image_column(train)])
    y = torch.tensor(train["label"].map({c: i for i, c in enumerate(classes)}).to_numpy())
    images = a.epochs * len(x)

    set_seed(0)
    model = create_model(a.arch, n_in=1, n_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=a.bs, shuffle=True, drop_last=True)
    model.train()
    start = time.perf_counter()
    for _ in range(a.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    plain = images / (time.perf_counter() - start)

    set_seed(0)
    model = create_model(a.arch, n_in=1, n_classes=3)
    ds = TensorDataset(x, y)
    dls = DataLoaders.from_dsets(ds, ds, bs=a.bs, shuffle=True, drop_last=True)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam)
    with learn.no_bar(), learn.no_logging():
        start = time.perf_counter()
        learn.fit_one_cycle(a.epochs, 1e-3)
        elapsed = time.perf_counter() - start
    # fastai also ran a validation pass over the same tensors each epoch: count only training time by
    # subtracting a timed validation pass.
    with learn.no_bar(), learn.no_logging():
        start = time.perf_counter()
        learn.validate()
        valid_s = time.perf_counter() - start
    fastai_tensors = images / (elapsed - a.epochs * valid_s)

    cfg = resolve_config(arch=a.arch, size=a.size, bs=a.bs, epochs=a.epochs)
    learn, _ = build_learner(manifest[manifest["split"].isin(["train", "valid"])].pipe(
        lambda m: m[(m["split"] == "valid") | m.index.isin(train.index)]), cfg)
    with learn.no_bar(), learn.no_logging():
        start = time.perf_counter()
        learn.fit_one_cycle(a.epochs, 1e-3)
        elapsed = time.perf_counter() - start
        start = time.perf_counter()
        learn.validate()
        valid_s = time.perf_counter() - start
    full = images / (elapsed - a.epochs * valid_s)
    print(f"arch={a.arch} size={a.size} bs={a.bs} images/epoch={len(x)} threads={torch.get_num_threads()}")
    print(f"plain PyTorch loop, tensors:           {plain:6.1f} images/s")
    print(f"cxr_fast/fastai Learner, same tensors: {fastai_tensors:6.1f} images/s ({fastai_tensors / plain:.2f}x)")
    print(f"full pipeline (files, augmentation):   {full:6.1f} images/s ({full / plain:.2f}x)")


if __name__ == "__main__":
    main()
