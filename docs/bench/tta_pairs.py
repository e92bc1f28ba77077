"""Does test-time augmentation help a run under cross-validation? Each fold's run predicts its valid and test
images once per view (the image and `cxr_fast.bundle.tta_views`' three crops); the plain prediction is the first
view, the TTA one the mean of the four, exactly as `cxrfast evaluate` and `cxrfast evaluate --tta` give them. The
folds' images are pooled and the gain paired image by image, so one pass answers both.

    .venv/bin/python docs/bench/tta_pairs.py --fold D/fold0 RUN_0 --fold D/fold1 RUN_1 ... [--save VIEWS.npz]
"""

import argparse

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score

from cxr_fast.bundle import iter_batches, load_run, tta_views
from cxr_fast.data.manifest import image_column, read_manifest
from cxr_fast.memory import keep_freed_memory

SPLITS = ("valid", "test")


def view_logits(run, files: list[str]) -> np.ndarray:
    """[N, 4, K]: the logits of every image under each of the four views."""
    out = []
    with torch.no_grad():
        for batch in iter_batches(run, files, 32):
            out.append(torch.stack([run.model(view).float() for view in tta_views(batch)], 1))
    return torch.cat(out).numpy()


def paired_gain(y: np.ndarray, plain: np.ndarray, tta: np.ndarray, n_boot: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    gains = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        gains.append(balanced_accuracy_score(y[idx], tta[idx]) - balanced_accuracy_score(y[idx], plain[idx]))
    lo, hi = np.percentile(gains, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", nargs=2, action="append", required=True, metavar=("DATA", "RUN"))
    parser.add_argument("--save", help="keep every view's logits and the labels in this .npz file")
    args = parser.parse_args()
    keep_freed_memory()
    logits = {split: [] for split in SPLITS}
    labels = {split: [] for split in SPLITS}
    for data, run_dir in args.fold:
        run, items = load_run(run_dir), read_manifest(data)
        for split in SPLITS:
            rows = items[items["split"] == split].reset_index(drop=True)
            logits[split].append(view_logits(run, image_column(rows).tolist()))
            labels[split].append(rows["label"].map({c: i for i, c in enumerate(run.classes)}).to_numpy())
            print(f"{run_dir}: {split} ({len(rows)} images) done", flush=True)
    if args.save:
        np.savez(args.save, **{f"{split}_{f}_{what}": values[split][f] for split in SPLITS
                               for f in range(len(args.fold)) for what, values in (("logits", logits), ("y", labels))})
    for split in SPLITS:
        views, y = np.concatenate(logits[split]), np.concatenate(labels[split])
        plain, tta = views[:, 0].argmax(1), views.mean(1).argmax(1)
        lo, hi = paired_gain(y, plain, tta)
        per_fold, start = [], 0
        for fold_y in labels[split]:
            rows = slice(start, start + len(fold_y))
            start += len(fold_y)
            per_fold.append(f"{balanced_accuracy_score(y[rows], plain[rows]):.3f} → "
                            f"{balanced_accuracy_score(y[rows], tta[rows]):.3f}")
        print(f"{split} ({len(y)} images): plain {balanced_accuracy_score(y, plain):.3f} "
              f"(recall {np.round(recall_score(y, plain, average=None), 2)}), "
              f"TTA {balanced_accuracy_score(y, tta):.3f} (recall {np.round(recall_score(y, tta, average=None), 2)}); "
              f"paired gain 95 % {lo:+.3f} to {hi:+.3f}; per fold {' / '.join(per_fold)}")


if __name__ == "__main__":
    main()
