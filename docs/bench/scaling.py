"""Time and memory of the steps that see every image, at the sizes of real collections (10,000-100,000 films).

    .venv/bin/python docs/bench/scaling.py prepare SRC OUT        # data prepare, with the time of each phase
    .venv/bin/python docs/bench/scaling.py dedup N                # near_pairs on N distinct films' fingerprints
    .venv/bin/python docs/bench/scaling.py seen RUN DATA          # evaluate's check for images RUN learned from
    .venv/bin/python docs/bench/scaling.py metrics N              # evaluate's metrics, figures and report, N rows
    .venv/bin/python docs/bench/scaling.py frozen-read DATA N     # frozen_lite's N training images held in memory

Each prints one line: seconds, and the process's peak resident memory (ru_maxrss) or how much it grew. Distinct
films are stood in for by random hashes and thumbnails: no pair of them passes the hash test, as no pair of
cxr-dev's 886 films does. Used for docs/benchmarks.md#scaling-to-larger-collections; it also runs on older commits
(PYTHONPATH=a checkout), which is how the "before" figures there were taken.
"""

import argparse
import inspect
import resource
import shutil
import tempfile
import time

import numpy as np


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def prepare(src: str, out: str) -> str:
    from cxr_fast.data import manifest

    phases = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = time.perf_counter() - started
        return wrapper

    manifest._examine_all = timed("decoding", manifest._examine_all)
    manifest.group_duplicates = timed("duplicates", manifest.group_duplicates)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    report = manifest.prepare(src, out, progress=False)
    total = time.perf_counter() - started
    shown = " ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
    return f"{report.n_images} images: {total:.1f} s ({shown}, rest {total - sum(phases.values()):.1f} s)"


def dedup(n: int) -> str:
    from cxr_fast.data import dedup

    rng = np.random.default_rng(0)
    prints = [dedup.Fingerprint(f"{i:064x}", rng.bytes(32).hex(), rng.bytes(1024)) for i in range(n)]
    started = time.perf_counter()
    pairs = dedup.near_pairs(prints)
    return f"{n} fingerprints: {time.perf_counter() - started:.1f} s, {len(pairs)} pairs"


def seen(run_dir: str, data: str) -> str:
    from cxr_fast.bundle import load_run
    from cxr_fast.evaluate import drop_seen, select_items

    run = load_run(run_dir)
    items, _, _ = select_items(run, data, "test")
    started = time.perf_counter()
    _, left_out, summary = drop_seen(run, items)
    return (f"{len(items)} images against the bundle's seen list: {time.perf_counter() - started:.1f} s, "
            f"{summary['identical']} identical, {summary['near_copy']} near copies")


def metrics(n: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from cxr_fast.evaluate import compute_metrics, evaluation_figures
    from cxr_fast.report import Section, write_report

    classes = ["COVID-19", "Normal", "Pneumonia"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)).astype(np.float32)
    logits[np.arange(n), y] += 1.5
    started = time.perf_counter()
    m = compute_metrics(y, logits, classes, 1.3)
    computed = time.perf_counter()
    figures = evaluation_figures(y, logits, classes, 1.3, m)
    with tempfile.TemporaryDirectory() as folder:
        write_report(folder, "scaling", [Section("Curves", figures=["roc_curves", "pr_curves"])], figures, m)
    return (f"{n} rows: metrics with 1,000 bootstrap resamples {computed - started:.1f} s, figures and report "
            f"{time.perf_counter() - computed:.1f} s")


def frozen_read(data: str, n: int) -> str:
    from cxr_fast import probe
    from cxr_fast.archs.weights import Stats
    from cxr_fast.config import resolve_config
    from cxr_fast.data.manifest import image_column, read_manifest
    from cxr_fast.progress import progress_bar

    cfg = resolve_config("frozen_lite")
    files = image_column(read_manifest(data)).tolist()[:n]
    stats = Stats(mean=[0.5] * cfg.n_in, std=[0.25] * cfg.n_in)
    before = peak_mib()
    started = time.perf_counter()
    with progress_bar(False) as bar:
        task = bar.add_task("reading", total=len(files))
        old = "stats" in inspect.signature(probe._read_images).parameters  # float32 inputs, before 3f19634
        images = (probe._read_images(files, cfg, stats, bar, task) if old else
                  probe._read_images(files, cfg.size, bar, task))
    held = images.numel() * images.element_size() / 2**20
    return (f"{len(files)} images at {cfg.size} px: {time.perf_counter() - started:.1f} s, {held:.0f} MiB held, "
            f"peak memory grew {peak_mib() - before:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("prepare").add_argument("paths", nargs=2)
    sub.add_parser("dedup").add_argument("n", type=int)
    sub.add_parser("seen").add_argument("paths", nargs=2)
    sub.add_parser("metrics").add_argument("n", type=int)
    frozen = sub.add_parser("frozen-read")
    frozen.add_argument("data")
    frozen.add_argument("n", type=int)
    args = parser.parse_args()
    line = {"prepare": lambda: prepare(*args.paths), "dedup": lambda: dedup(args.n), "seen": lambda: seen(*args.paths),
            "metrics": lambda: metrics(args.n), "frozen-read": lambda: frozen_read(args.data, args.n)}[args.what]()
    print(f"{line}; peak memory {peak_mib():.0f} MiB; load average {load()}")
