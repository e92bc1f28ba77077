"""The Python API used from a Jupyter notebook, checked without Jupyter: a kernel's stdout is no terminal, warnings
are shown in the output cell, and the last expression of a cell is displayed through its repr."""

import subprocess
import sys
from pathlib import Path


def test_importing_the_api_shows_no_notices_about_its_dependencies():
    # fastai's torch.jit.script call at import, and tqdm.auto's request (huggingface_hub imports it) for ipywidgets
    # in a kernel without them, were printed under the first cell that trained a model
    code = ("import warnings; import cxr_fast.train, cxr_fast.interpret, cxr_fast.evaluate; "
            "from tqdm import TqdmWarning; from tqdm.notebook import WARN_NOIPYW; warnings.warn(WARN_NOIPYW, TqdmWarning); "
            "warnings.warn('a warning of our own', UserWarning)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "jit.script" not in done.stderr and "IProgress" not in done.stderr
    assert "a warning of our own" in done.stderr  # the filters are narrow: other warnings still show


def _big_results():
    """Each result class the API returns, holding what a real dataset gives: 1,000 predictions, long curves."""
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from cxr_fast.compare import Comparison
    from cxr_fast.data.manifest import Exclusion, PrepareReport
    from cxr_fast.evaluate import Evaluation
    from cxr_fast.interpret import Interpretation

    table = pd.DataFrame({"path": [f"images/{i}.png" for i in range(1000)], "p_Normal": np.linspace(0, 1, 1000)})
    curves = {"fractions": list(np.linspace(0, 1, 21)), "attributed_curve": list(np.linspace(1, 0, 21))}
    metrics = {"n": 1000, "accuracy": 0.9, "per_class": {c: {"f1": 0.9, "support": 333} for c in "ABC"},
               "versions": {"torch": "2.14.1"}, "bootstrap": {"n": 1000, "seed": 0}}
    return [
        (Evaluation(Path("models/r1/eval/data-test"), metrics, table, None), "1000 rows × 2 columns"),
        (Interpretation(Path("models/r1/interpret/data-test"), {"deletion": curves, "summary": metrics},
                        table, ["A verdict in one long sentence about where the evidence lies. " * 3] * 4),
         "<list: 4 items>"),
        (Comparison(Path("models/cmp"), table, table, table), "split='test'"),
        (PrepareReport(src="raw", out="data", manifest_path="data/manifest.csv", report_path="data/prepare_report.json",
                       cache_dir="data/cache", n_files=1500, n_images=1000, counts={"train": {"A": 600}},
                       excluded=[Exclusion(f"A/{i}.png", "unreadable", "truncated") for i in range(500)],
                       duplicate_groups=[], conflicts=[], unused_map_keys=[], arguments={"seed": 0}, seconds=1.0),
         "excluded=<list: 500 items>"),
    ]


def test_results_show_a_short_repr_in_a_notebook():
    # the dataclasses' own reprs put every prediction, metric and curve point into the output cell
    for result, shows in _big_results():
        text = repr(result)
        assert len(text) < 600, text
        assert text.startswith(type(result).__name__ + "(") and shows in text
    evaluation = _big_results()[0][0]
    # the path as repr() gives it: PosixPath('…'), or Path('…') once fastcore (imported with fastai) has patched it
    assert f"out_dir={Path('models/r1/eval/data-test')!r}" in repr(evaluation)
    assert "accuracy" in repr(evaluation)  # a long dict names its first keys


def test_a_run_shows_its_architecture_and_classes_not_every_layer(tiny_runs):
    from cxr_fast.bundle import load_run

    run = load_run(tiny_runs[0])
    text = repr(run)
    assert len(text) < 400, text  # the network's layers took 5,000 characters for the tiny cxresnet
    n_parameters = sum(p.numel() for p in run.model.parameters())
    assert f"<CXRModel: {n_parameters:,} parameters>" in text
    assert "arch='cxresnet_tiny'" in text and f"classes={run.classes!r}" in text and "temperature=1.0" in text
