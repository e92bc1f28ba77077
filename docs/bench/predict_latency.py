"""Single-image prediction latency, PyTorch versus ONNX Runtime: cold (a new `cxrfast predict` process, from
start to probabilities) and warm (the model already loaded, file → probabilities), with and without heatmap.

    .venv/bin/python docs/bench/predict_latency.py RUN IMAGE [--repeat 20]

RUN must have been exported first (`cxrfast export RUN --format onnx`).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cxr_fast.predict import load_runner, predict


def cold_seconds(run, image, runtime, repeat=3):
    cxrfast = Path(sys.executable).with_name("cxrfast")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([str(cxrfast), "predict", str(run), str(image), "--runtime", runtime],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def warm_seconds(runner, image, repeat, heatmap=False):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.csv"
        predict(None, [image], runner=runner, progress=False, heatmap=heatmap, out=out, force=True)  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            predict(None, [image], runner=runner, progress=False, heatmap=heatmap, out=out, force=True)
            times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("image")
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    print(f"{'runtime':8s} {'cold s (3 runs)':22s} {'warm ms (median, min-max)':28s} heatmap s (median of 3)")
    for runtime in ("torch", "onnx"):
        cold = cold_seconds(a.run, a.image, runtime)
        runner = load_runner(a.run, runtime)
        warm = [1000 * t for t in warm_seconds(runner, a.image, a.repeat)]
        heat = warm_seconds(runner, a.image, 3, heatmap=True)
        print(f"{runtime:8s} {', '.join(f'{t:.1f}' for t in cold):22s} "
              f"{statistics.median(warm):6.1f} ({min(warm):.1f}-{max(warm):.1f}){'':12s} {statistics.median(heat):.1f}")


if __name__ == "__main__":
    main()
