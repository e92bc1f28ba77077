"""Would averaging a run's last epochs help? Trains one recipe, keeps every epoch's weights, and scores on valid
and test: each epoch alone, the epoch the run keeps (best valid balanced accuracy), the mean of the last k epochs'
predictions (a snapshot ensemble) and the mean of their weights (stochastic weight averaging, batch-norm
statistics recomputed on the training images). Writes every variant's test probabilities to
RUN-epochs/test_probabilities.csv, for pooling cross-validation folds (docs/bench/pool_folds.py).

    .venv/bin/python docs/bench/weight_averaging.py DATA --recipe efficientnet_lite0 --seed 0 --out RUN

Choose on valid; the test columns are there to check the choice, not to make it.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from safetensors.torch import load_file, save_file
from sklearn.metrics import balanced_accuracy_score
from torch.optim.swa_utils import update_bn

from cxr_fast.bundle import iter_batches, load_run, predict_logits
from cxr_fast.calibration import softmax
from cxr_fast.config import resolve_config
from cxr_fast.data.manifest import image_column, read_manifest
from cxr_fast.memory import keep_freed_memory
from cxr_fast.train import _cpu_state, train


class SaveEveryEpoch(Callback):
    order = 52  # after the run's own recorder

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0

    def after_epoch(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(_cpu_state(self.learn.model), str(self.folder / f"epoch{self.count}.safetensors"))
        self.count += 1


def mean_state(states: list[dict]) -> dict:
    return {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}


def main() -> None:
    keep_freed_memory()  # as the cxrfast command does, so that times match it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--recipe", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    snapshots = args.out.with_name(args.out.name + "-epochs")
    if not (args.out / "model.safetensors").exists():
        cfg = resolve_config(args.recipe, seed=args.seed)
        train(args.data, cfg, out=args.out, extra_cbs=[SaveEveryEpoch(snapshots)], quiet=True)
    run = load_run(args.out)
    manifest = read_manifest(args.data)
    splits = {s: manifest[manifest["split"] == s].reset_index(drop=True) for s in ("valid", "test")}
    targets = {s: items["label"].map({c: i for i, c in enumerate(run.classes)}).to_numpy() for s, items in splits.items()}
    train_files = image_column(manifest[manifest["split"] == "train"]).tolist()

    states = [load_file(str(p)) for p in sorted(snapshots.glob("epoch*.safetensors"), key=lambda p: int(p.stem[5:]))]
    probs = {}

    def score(name: str, state: dict, recompute_bn: bool = False) -> None:
        run.model.load_state_dict(state)
        if recompute_bn:
            with torch.no_grad():
                update_bn(iter_batches(run, train_files, 32), run.model)
        run.model.eval()
        probs[name] = {s: softmax(predict_logits(run, items, progress=False)) for s, items in splits.items()}
        show(name)

    def show(name: str) -> None:
        ba = {s: balanced_accuracy_score(targets[s], probs[name][s].argmax(1)) for s in splits}
        print(f"{name:28s} valid {ba['valid']:.3f}  test {ba['test']:.3f}", flush=True)

    for i, state in enumerate(states):
        score(f"epoch {i}", state)
    last = len(states)
    for k in (2, 3, 4):
        if k < last:
            chosen = list(range(last - k, last))
            name = f"predictions of epochs {chosen[0]}-{chosen[-1]}"
            probs[name] = {s: np.mean([probs[f"epoch {i}"][s] for i in chosen], axis=0) for s in splits}
            show(name)
            score(f"weights of epochs {chosen[0]}-{chosen[-1]}", mean_state([states[i] for i in chosen]), True)

    kept = run.metrics["best_epoch"]
    probs["kept epoch"] = probs[f"epoch {kept}"]
    table = splits["test"][["path", "label"]].copy()
    for name, p in probs.items():
        for c, cls in enumerate(run.classes):
            table[f"{name}|{cls}"] = p["test"][:, c]
    table.to_csv(snapshots / "test_probabilities.csv", index=False)
    print(f"the run keeps epoch {kept}; training took {run.metrics['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()
