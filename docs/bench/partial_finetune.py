"""Does fine-tuning only the later stages of tf_efficientnet_lite0 beat fine-tuning all of it? Trains a recipe
whose unfrozen epochs keep the stem and the first blocks at their pretrained weights (batch-norm weights too;
running statistics still update), then writes an ordinary run bundle that `cxrfast evaluate` and
`cxrfast ensemble` take as they are.

    .venv/bin/python docs/bench/partial_finetune.py DATA --keep-frozen 3 --out RUN     # stem + blocks 0-2 frozen

Frozen early layers also skip their backward pass, so the run is faster than full fine-tuning.
"""

import argparse
from pathlib import Path

from fastai.callback.core import Callback

from cxr_fast.config import resolve_config
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


def main() -> None:
    keep_freed_memory()  # as the cxrfast command does, so that times match it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--keep-frozen", type=int, required=True, help="how many of the 7 block stages stay frozen")
    parser.add_argument("--recipe", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, help="the recipe's unless given (small sizes for a smoke test)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = resolve_config(args.recipe, seed=args.seed, size=args.size)
    run = train(args.data, cfg, out=args.out, extra_cbs=[KeepEarlyBlocksFrozen(args.keep_frozen)], quiet=True)
    print(f"wrote {run}")


if __name__ == "__main__":
    main()
