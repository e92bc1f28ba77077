"""Does fine-tuning only the later stages of tf_efficientnet_lite0 beat fine-tuning all of it? Trains a recipe
whose unfrozen epochs keep the stem and the first blocks at their pretrained weights (batch-norm weights too;
running statistics still update), then writes an ordinary run bundle that `cxrfast evaluate` and
`cxrfast ensemble` take as they are.

    .venv/bin/python docs/bench/partial_finetune.py DATA --keep-frozen 3 --out RUN     # stem + blocks 0-2 frozen
    .venv/bin/python docs/bench/partial_finetune.py DATA --keep-frozen 3 --augment strong --epochs 6 --out RUN

Frozen early layers also skip their backward pass, so the run is faster than full fine-tuning. `--augment strong`
widens the shipped augmentation (session 16's measurement).
"""

import argparse
from pathlib import Path

from fastai.callback.core import Callback
from fastai.vision.augment import aug_transforms

from cxr_fast.config import resolve_config
from cxr_fast.data import block
from cxr_fast.memory import keep_freed_memory
from cxr_fast.train import train


class KeepEarlyBlocksFrozen(Callback):
    """At the start of each fit, if the body is trainable (the unfrozen phase), freeze its stem and first blocks.
    fastai's optimiser skips parameters without gradients, so they keep their pretrained values."""

    order = 1  # before the run's own callbacks record anything

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks

    def before_fit(self):
        body = self.learn.model.body
        if not body.conv_stem.weight.requires_grad:  # the frozen phase: fastai's freeze() already holds the body
            return
        early = [body.conv_stem, body.bn1, *body.blocks[: self.n_blocks]]
        for module in early:
            for p in module.parameters():
                p.requires_grad_(False)
        trainable = sum(p.numel() for p in self.learn.model.parameters() if p.requires_grad)
        print(f"unfrozen phase: stem and blocks 0-{self.n_blocks - 1} kept frozen; {trainable:,} parameters train",
              flush=True)


def strong_transforms() -> list:
    """The shipped augmentation (cxr_fast.data.block.train_transforms), widened: zoom out as well as in and
    further, larger rotations and warps, stronger lighting changes, applied to every image. Still no flip."""
    return aug_transforms(do_flip=False, max_rotate=12.0, min_zoom=0.9, max_zoom=1.25, max_lighting=0.4,
                          max_warp=0.15, p_affine=1.0, p_lighting=0.9)


def main() -> None:
    keep_freed_memory()  # as the cxrfast command does, so that times match it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--keep-frozen", type=int, required=True, help="how many of the 7 block stages stay frozen")
    parser.add_argument("--recipe", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, help="the recipe's unless given (small sizes for a smoke test)")
    parser.add_argument("--epochs", type=int, help="unfrozen epochs; the recipe's unless given")
    parser.add_argument("--augment", choices=["shipped", "strong"], default="shipped")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = resolve_config(args.recipe, seed=args.seed, size=args.size, epochs=args.epochs)
    if args.augment == "strong":
        block.train_transforms = strong_transforms  # build_dataloaders looks the function up when it runs
    run = train(args.data, cfg, out=args.out, extra_cbs=[KeepEarlyBlocksFrozen(args.keep_frozen)], quiet=True)
    print(f"wrote {run}")


if __name__ == "__main__":
    main()
