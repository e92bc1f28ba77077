"""How often the per-class 95 % intervals contain the true proportion: the Wilson score interval that `evaluate`
reports for each class's recall, specificity, precision and NPV, beside the percentile bootstrap (a per-class
figure resampled within its class, as `bootstrap_ci` resamples, is a binomial draw of the same n).

    python docs/bench/wilson_coverage.py                 # 4,000 simulated test sets a cell, a few seconds
    python docs/bench/wilson_coverage.py --draws 20000

Each cell draws `--draws` counts k ~ Binomial(n, p) (n images of the class, true sensitivity p, say), builds the
interval from k of n and counts how often it holds p. The exact coverage, the binomial probabilities of the k whose
interval holds p summed, is printed beside the simulated one as a check; the two differ by simulation noise only.
Also printed: the mean width of the Wilson interval, and then, for each n, the lowest exact coverage of the Wilson
interval over a fine grid of true proportions from 0.5 to 0.999 (coverage jumps as p crosses an interval's end, so
three proportions can miss a dip).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

from cxr_fast.metrics import wilson_interval

SIZES = (1, 2, 5, 19, 79)
PROPORTIONS = (0.5, 0.8, 0.95)


def bootstrap_interval(k: int, n: int, rng: np.random.Generator, replicates: int = 1000) -> tuple[float, float]:
    """The percentile bootstrap of k/n: resampling n cases of which k are hits is a Binomial(n, k/n) draw."""
    values = rng.binomial(n, k / n, size=replicates) / n
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4000, help="simulated test sets per cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    print(f"{'n':>3} {'p':>5} | {'Wilson sim':>10} {'exact':>6} {'width':>6} | {'bootstrap sim':>13} {'exact':>6}")
    for n in SIZES:
        ks = np.arange(n + 1)
        wilson = [wilson_interval(int(k), n) for k in ks]
        boot = [bootstrap_interval(int(k), n, rng) for k in ks]
        for p in PROPORTIONS:
            pmf = stats.binom.pmf(ks, n, p)
            draws = rng.binomial(n, p, size=args.draws)

            def coverage(intervals, pmf=pmf, draws=draws, p=p):
                holds = np.array([low <= p <= high for low, high in intervals])
                return holds[draws].mean(), float(pmf[holds].sum())

            w_sim, w_exact = coverage(wilson)
            b_sim, b_exact = coverage(boot)
            width = float(sum(pmf[k] * (wilson[k][1] - wilson[k][0]) for k in ks))
            print(f"{n:>3} {p:>5} | {w_sim:>10.3f} {w_exact:>6.3f} {width:>6.2f} | {b_sim:>13.3f} {b_exact:>6.3f}")

    print("\nlowest exact Wilson coverage for p in [0.5, 0.999] (by symmetry the same over [0.001, 0.5])")
    grid = np.round(np.arange(0.5, 0.9995, 0.001), 3)
    for n in SIZES:
        ks = np.arange(n + 1)
        low, high = np.array([wilson_interval(int(k), n) for k in ks]).T
        exact = [stats.binom.pmf(ks, n, p)[(low <= p) & (p <= high)].sum() for p in grid]
        worst = int(np.argmin(exact))
        print(f"n {n:>3}: {exact[worst]:.3f} at p = {grid[worst]}; mean over the grid {np.mean(exact):.3f}")


if __name__ == "__main__":
    main()
