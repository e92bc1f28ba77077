"""Which temperature should calibrate `cxrfast evaluate --tta`? For each run, its test split three ways: one view with
the run's temperature (plain `evaluate`), the mean of the four TTA views' logits with that same single-view T, and the
TTA logits with a T refitted on the valid split's TTA logits (`fit_temperature`, as training fits the single-view one,
on the same valid images). Logits come from `predict_logits`, exactly as evaluate computes them; the valid TTA pass is
timed, since a refit costs that much on every `evaluate --tta`.

    .venv/bin/python docs/bench/tta_temperature.py RUN [RUN ...]

Prints, per run and test split: NLL (from the logits), ECE (15 bins) and balanced accuracy for the three, the two
temperatures, the seconds of the valid TTA pass, and a paired bootstrap 95 % interval (2,000 resamples of the test
images) of NLL(TTA, single-view T) - NLL(TTA, refitted T): above 0, the refit is better.
"""

import argparse
import time

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from cxr_fast.bundle import load_run, predict_logits, read_training_manifest
from cxr_fast.calibration import expected_calibration_error, fit_temperature, softmax
from cxr_fast.data.manifest import label_indices
from cxr_fast.memory import keep_freed_memory


def losses(logits: np.ndarray, y: np.ndarray, temperature: float) -> np.ndarray:
    """Each image's negative log-likelihood of its true class under softmax(logits / T), from the logits."""
    from scipy.special import logsumexp

    scaled = logits / temperature
    return logsumexp(scaled, axis=1) - scaled[np.arange(len(y)), y]


def paired_interval(a: np.ndarray, b: np.ndarray, n_boot: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), (n_boot, len(a)))
    diffs = (a[idx] - b[idx]).mean(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    keep_freed_memory()
    print("| run | T single | T TTA | valid TTA pass | test: NLL single / TTA·T single / TTA·T TTA | "
          "ECE single / TTA·T single / TTA·T TTA | bal. acc. single / TTA | NLL gain of the refit (95 %) |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in args.runs:
        run = load_run(run_dir)
        manifest = read_training_manifest(run)
        valid, test = (manifest[manifest["split"] == s].reset_index(drop=True) for s in ("valid", "test"))
        y_valid, y_test = (label_indices(rows["label"], run.classes) for rows in (valid, test))
        start = time.perf_counter()
        valid_tta = predict_logits(run, valid, tta=True, progress=False)
        seconds = time.perf_counter() - start
        t_single, t_tta = run.temperature, fit_temperature(valid_tta, y_valid)
        plain = predict_logits(run, test, progress=False)
        tta = predict_logits(run, test, tta=True, progress=False)
        cases = {"single": (plain, t_single), "tta_single_t": (tta, t_single), "tta_refit_t": (tta, t_tta)}
        nll = {k: losses(lg, y_test, t) for k, (lg, t) in cases.items()}
        ece = {k: expected_calibration_error(softmax(lg, t), y_test) for k, (lg, t) in cases.items()}
        lo, hi = paired_interval(nll["tta_single_t"], nll["tta_refit_t"])
        print(f"| {run.name} | {t_single:.3f} | {t_tta:.3f} | {seconds:.1f} s ({len(valid)} images) | "
              + " / ".join(f"{nll[k].mean():.3f}" for k in cases) + " | "
              + " / ".join(f"{ece[k]:.3f}" for k in cases) + " | "
              f"{balanced_accuracy_score(y_test, plain.argmax(1)):.3f} / {balanced_accuracy_score(y_test, tta.argmax(1)):.3f} | "
              f"{nll['tta_single_t'].mean() - nll['tta_refit_t'].mean():+.3f} ({lo:+.3f} to {hi:+.3f}) |", flush=True)


if __name__ == "__main__":
    main()
