"""Training throughput: cxr_fast's Learner versus a plain PyTorch loop on the same model, batch size and
preprocessed tensors; plus the full pipeline (manifest → DataBlock with decoding and augmentation → Learner).

    .venv/bin/python docs/bench/train_speed.py DATA_DIR [--arch cxresnet] [--size 128] [--bs 32] [--n 256]
        [--channels-last]

Each measurement times only the training phase of each epoch (no validation), drops the first epoch (warm-up)
and is repeated `--rounds` times, the three methods taking turns so that a change in machine load hits all of
them; the median is reported.
"""

import argparse
import statistics
import time

import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from torch.utils.data import DataLoader, TensorDataset

from cxr_fast.archs import create_model
from cxr_fast.config import resolve_config
from cxr_fast.data.manifest import image_column, read_manifest
from cxr_fast.memory import keep_freed_memory
from cxr_fast.preprocess import load_input
from cxr_fast.train import build_learner


class TrainPhaseTimer(Callback):
    """Seconds spent in each epoch's training phase."""

    def before_fit(self):
        self.seconds = []

    def before_train(self):
        self.start = time.perf_counter()

    def after_train(self):
        self.seconds.append(time.perf_counter() - self.start)


def plain_loop(x, y, arch, bs, epochs, channels_last):
    model = create_model(arch, n_in=1, n_classes=3)
    if channels_last:  # as cxr_fast's ChannelsLast callback does: the model and every batch
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, drop_last=True)
    model.train()
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for xb, yb in loader:
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def learner_fit(learn, epochs):
    timer = TrainPhaseTimer()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 1e-3, cbs=timer)
    return timer.seconds


def main():
    keep_freed_memory()  # as the cxrfast command does, so that times match it
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--arch", default="cxresnet")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--channels-last", action="store_true", help="both the plain loop and cxr_fast")
    a = p.parse_args()
    manifest = read_manifest(a.data)
    train = manifest[manifest["split"] == "train"].iloc[: a.n]
    subset = manifest[(manifest["split"] == "valid") | manifest.index.isin(train.index)]
    classes = sorted(manifest["label"].unique())
    x = torch.stack([load_input(f, a.size, 1, [0.5], [0.25]) for f in image_column(train)])
    y = torch.tensor(train["label"].map({c: i for i, c in enumerate(classes)}).to_numpy())
    steps = len(x) // a.bs * a.bs  # images per epoch with drop_last
    cfg = resolve_config(arch=a.arch, size=a.size, bs=a.bs, epochs=a.epochs, channels_last=a.channels_last)

    def cxr_fast_on_tensors():
        # The Learner exactly as cxr_fast configures it (optimizer, loss, metrics), fed the same tensors.
        learn, _ = build_learner(subset, cfg)
        ds = TensorDataset(x, y)
        # num_workers as cxr_fast's own loaders use it: fastai's default here is one worker process per core,
        # which on 2 cores competes with training (it made this method look 0.66x the plain loop, session 13)
        learn.dls = DataLoaders.from_dsets(ds, ds, bs=a.bs, shuffle=True, drop_last=True, num_workers=cfg.num_workers)
        return learner_fit(learn, a.epochs)

    def full_pipeline():
        learn, _ = build_learner(subset, cfg)
        return learner_fit(learn, a.epochs)

    methods = {
        "plain PyTorch loop, tensors": lambda: plain_loop(x, y, a.arch, a.bs, a.epochs, a.channels_last),
        "cxr_fast Learner, same tensors": cxr_fast_on_tensors,
        "full pipeline (files, augmentation)": full_pipeline,
    }
    rates = {name: [] for name in methods}
    for _ in range(a.rounds):
        for name, run in methods.items():
            seconds = run()[1:]  # the first epoch is warm-up
            rates[name].append(steps * len(seconds) / sum(seconds))
    print(f"arch={a.arch} size={a.size} bs={a.bs} images/epoch={steps} threads={torch.get_num_threads()} "
          f"rounds={a.rounds} channels_last={a.channels_last}")
    plain = statistics.median(rates["plain PyTorch loop, tensors"])
    for name, values in rates.items():
        median = statistics.median(values)
        spread = ", ".join(f"{v:.1f}" for v in values)
        print(f"{name:38s} {median:6.1f} images/s ({median / plain:.2f}x)   [{spread}]")


if __name__ == "__main__":
    main()
