"""`cxrfast compare`: several runs (or architectures trained under one budget) on the same test split.

Every run is scored on the same test images, so the bootstrap uses one seed for all (the same resamples) and
McNemar's test compares each pair of models on the cases where exactly one of them is right.
"""

from __future__ import annotations

import itertools
import json
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cxr_fast.bundle import (
    Run,
    check_training_manifest,
    load_run,
    predict_logits,
    read_training_manifest,
    run_labels,
)
from cxr_fast.calibration import softmax
from cxr_fast.config import find_recipe
from cxr_fast.data.manifest import label_indices, manifest_key
from cxr_fast.errors import CxrFastError, parse_yaml
from cxr_fast.evaluate import compute_metrics
from cxr_fast.metrics import mcnemar
from cxr_fast.outputs import PARTIAL_INSIDE, check_folder_path, new_folder, settle_move, writing
from cxr_fast.progress import progress_bar
from cxr_fast.reprs import short_repr

WARM_UP_IMAGES = 8  # untimed before the inference speed is measured


@dataclass
class Comparison:
    out_dir: Path
    table: pd.DataFrame  # one row per run
    summary: pd.DataFrame  # one row per architecture: mean ± sd across seeds
    mcnemar: pd.DataFrame
    split: str = "test"  # the manifest split the runs were scored on

    def __repr__(self) -> str:  # a notebook shows it: see cxr_fast.reprs
        return short_repr(self)


def score_run(run: Run, split: str = "test", n_boot: int = 1000) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics row, predictions and labels of one run on its own manifest's split."""
    manifest = read_training_manifest(run)
    items = manifest[manifest["split"] == split].reset_index(drop=True)
    if items.empty:
        raise CxrFastError(f"{run.config['data']}: no '{split}' images to compare on")
    # An untimed first batch: the first pass pays one-off costs (kernel choice, memory, the files' first read) that
    # made whichever heavy run came first look slowest, so img/s changed with the order the runs were given in.
    predict_logits(run, items.head(WARM_UP_IMAGES), progress=False)
    started = time.perf_counter()
    logits = predict_logits(run, items, progress=False)
    images_per_s = len(items) / (time.perf_counter() - started)
    y = label_indices(items["label"], run.classes)
    m = compute_metrics(y, logits, run.classes, run.temperature, n_boot=n_boot)
    row = {
        "run": run.name,
        "arch": run.config["model"]["arch"],
        "setting": training_setting(run),
        "seed": run.config.get("seed"),
        "balanced_accuracy": m["balanced_accuracy"],
        "ci_low": m["balanced_accuracy_ci"][0],
        "ci_high": m["balanced_accuracy_ci"][1],
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "macro_roc_auc": m["macro_roc_auc"],
        "ece": m["ece_calibrated"],
        "params": int(sum(p.numel() for p in run.model.parameters())),
        "train_seconds": run.metrics.get("train_seconds"),
        "images_per_s": images_per_s,
        "data": str(Path(run.config["data"]).resolve()),
    }
    return row, softmax(logits).argmax(1), y


def training_setting(run) -> str:
    """Everything a run was trained with except its seed, as text: runs that share it are seeds of one setting."""
    recipe_path = run.path / "recipe.yaml"
    recipe = trained_recipe(recipe_path) if recipe_path.is_file() else None
    if isinstance(recipe, dict):
        recipe.pop("seed", None)
    return json.dumps({"model": run.config["model"], "size": run.config.get("size"), "recipe": recipe},
                      sort_keys=True, default=str)


def trained_recipe(path: Path):
    """A run's recipe.yaml; one from someone else is refused in one line if it is no plain YAML (see `parse_yaml`)."""
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CxrFastError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def setting_labels(table: pd.DataFrame) -> pd.Series:
    """A column name per training setting: the architecture, or, where one architecture was trained in several
    settings (other epochs, rates, sizes…), the architecture and the first run of each setting."""
    settings_per_arch = table.groupby("arch")["setting"].nunique()
    first_run = table.groupby("setting")["run"].first()
    return pd.Series([arch if settings_per_arch[arch] == 1 else f"{arch} ({first_run[setting]})"
                      for arch, setting in zip(table["arch"], table["setting"], strict=True)], index=table.index)


def compare_runs(run_dirs: list[str | Path], *, out: str | Path | None = None, split: str = "test",
                 n_boot: int = 1000, progress: bool = True) -> Comparison:
    """Score runs trained on one manifest on its `split` (default test), with McNemar tests between every pair, and
    write runs.csv, comparison.csv, mcnemar.csv and report.html into `out` (default models/compare-<date>-<time>).
    `progress` counts the runs scored (each one's prediction pass is timed, so it draws no bar of its own)."""
    if isinstance(run_dirs, str | Path):  # a string would be taken letter by letter
        raise CxrFastError(f"compare takes a list of run folders, got the single path {str(run_dirs)!r}")
    if len(run_dirs) < 2:
        raise CxrFastError("compare needs at least two runs")
    resolved = [Path(r).resolve() for r in run_dirs]
    repeated = sorted({str(r) for r, seen in zip(run_dirs, resolved) if resolved.count(seen) > 1})
    if repeated:
        raise CxrFastError(f"{', '.join(repeated)}: the same run is given twice; compare needs distinct runs")
    # Everything that can be refused is checked before the runs are scored, which takes minutes.
    out_dir = Path(out) if out else Path("models") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    with writing(out_dir):  # a second compare into this --out refuses now, not after scoring every run
        check_new_folder(out_dir)
        runs = [load_run(r) for r in run_dirs]
        manifests = sorted({manifest_key(run.config["data"]) for run in runs})
        if len(manifests) != 1:
            raise CxrFastError("runs were trained on different manifests; compare needs one shared test split: "
                               + ", ".join(manifests))
        for run in runs:
            check_training_manifest(run)
        # A bar per run, not per image: the images/s column times the prediction pass, which draws nothing. Without
        # it, a comparison of a few real models printed nothing for minutes.
        with progress_bar(progress) as bar:
            task = bar.add_task(f"scoring {len(runs)} runs on the {split} split", total=len(runs))
            scored = []
            for run in runs:
                scored.append(score_run(run, split, n_boot))
                bar.advance(task)
        table = pd.DataFrame([s[0] for s in scored])
        table["run"] = run_labels(runs)  # two runs of one folder name (a/cxr, b/cxr) keep apart in every table
        table["seed"] = table["seed"].astype("Int64")  # an ensemble has none: a whole number or blank, not 0.0 / NaN
        for (_, seed), twins in table.dropna(subset=["seed"]).groupby(["setting", "seed"])["run"]:
            if len(twins) > 1:  # e.g. a run and a resumed copy of it: their spread is no seed-to-seed spread
                warnings.warn(f"{' and '.join(twins)} were trained alike with the same seed {seed}; the spread shown "
                              "for their setting is not a spread across seeds", stacklevel=2)
        y = scored[0][2]
        tests = []
        for (i, a), (j, b) in itertools.combinations(enumerate(scored), 2):
            result = mcnemar(y, a[1], b[1])
            tests.append({"model_a": table["run"][i], "model_b": table["run"][j], **result})
        summary = summarise(table)
        comparison = Comparison(out_dir, table, summary, pd.DataFrame(tests), split)
        with new_folder(out_dir) as work:  # a compare stopped part-way leaves no half-written --out to block a rerun
            write_comparison(comparison, work)
        return comparison


def check_new_folder(out_dir: Path) -> None:
    """Refuse, before minutes of work, an --out that is a file, lies under one, or already holds something."""
    check_folder_path(out_dir, "--out")
    settle_move(out_dir)
    drop_empty_comparison(out_dir)
    if out_dir.exists() and any(p.name != PARTIAL_INSIDE for p in out_dir.iterdir()):
        if (out_dir / "runs").is_dir() and not (out_dir / "report").exists():
            raise CxrFastError(f"{out_dir}: an unfinished comparison is here; add --resume to continue it, or "
                               "choose another --out")
        raise CxrFastError(f"{out_dir}: already exists; choose another --out")


def drop_empty_comparison(out_dir: Path) -> None:
    """A comparison stopped before its first run saved an epoch keeps nothing, but left `OUT/runs/` (and the run's
    folder, if it was made): empty folders, removed so the same command starts it again. rmdir removes nothing else."""
    runs = out_dir / "runs"
    if not runs.is_dir() or {p.name for p in out_dir.iterdir()} - {"runs", PARTIAL_INSIDE}:
        return
    try:
        for run in runs.iterdir():
            run.rmdir()
        runs.rmdir()
    except OSError:  # something in there: an unfinished comparison, for --resume
        return


def _checkpoint_settings(state_file: Path) -> dict:
    """The settings an interrupted run started with, from its checkpoint (a damaged one: none, and `train --resume`
    then names the damage)."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state["config"] if isinstance(state, dict) and isinstance(state.get("config"), dict) else {}


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd across seeds per training setting (an architecture, unless it was trained in several settings)."""
    g = table.assign(arch=setting_labels(table)).groupby("arch", sort=False)
    summary = g.agg(runs=("run", "count"), balanced_accuracy=("balanced_accuracy", "mean"),
                    balanced_accuracy_sd=("balanced_accuracy", "std"), ci_low=("ci_low", "mean"),
                    ci_high=("ci_high", "mean"), macro_f1=("macro_f1", "mean"), macro_roc_auc=("macro_roc_auc", "mean"),
                    ece=("ece", "mean"), params=("params", "first"), train_seconds=("train_seconds", "mean"),
                    images_per_s=("images_per_s", "mean")).reset_index()
    # a single run has no spread: its sd stays NaN (an empty cell in comparison.csv), which 0.0 would misstate
    return summary.sort_values("balanced_accuracy", ascending=False).reset_index(drop=True)


def write_comparison(c: Comparison, folder: Path) -> None:
    import matplotlib.pyplot as plt

    from cxr_fast.plots import plot_comparison
    from cxr_fast.report import Section, write_report

    c.table.to_csv(folder / "runs.csv", index=False)
    c.summary.to_csv(folder / "comparison.csv", index=False)
    c.mcnemar.to_csv(folder / "mcnemar.csv", index=False)
    # an architecture's bar is the mean over its runs, and so are its interval's ends: the label says so
    several = bool((c.summary["runs"] > 1).any())
    figure = plot_comparison(c.summary.rename(columns={"arch": "name"}), title=f"Architecture comparison on the "
                             f"{c.split} split", ci_label="mean of its runs' 95 % bootstrap CIs" if several else
                             "95 % bootstrap CI")
    shown = c.summary[["arch", "runs", "balanced_accuracy", "balanced_accuracy_sd", "ci_low", "ci_high", "macro_f1",
                       "macro_roc_auc", "ece", "params", "train_seconds", "images_per_s"]].copy()
    tests = c.mcnemar.copy()
    # p rounded to 0.000 reads as impossible; the exact test's "statistic" is only min(b, c)
    tests["p_value"] = ["< 0.001" if p < 0.001 else f"{p:.3f}" for p in tests["p_value"]]
    tests.loc[tests["method"] == "exact", "statistic"] = None
    write_report(folder, "Architecture comparison", [
        Section("Summary", text=f"Balanced accuracy on the shared {c.split} split: mean ± sd across seeds, with the mean "
                "95 % bootstrap interval. ECE after temperature scaling. Training time on this machine's CPU.",
                table=shown, figures=["comparison"]),
        Section("Runs", table=c.table.drop(columns=["data", "setting"])),  # setting: the recipe as JSON, for runs.csv
        Section("McNemar tests", text=f"Pairwise on the same {c.split} images: b counts the images the first model gets "
                "right and the second wrong, c the reverse (exact binomial test below 25 such images, else chi-square). "
                "A small p-value says so uneven a split would be rare if the two models had the same error rate. Every "
                "pair is tested, without correction for multiple comparisons: among many pairs, some small p-values are "
                "expected by chance alone.", table=tests),
    ], {"comparison": figure})
    plt.close("all")


def recipe_run_name(recipe: str | Path, recipes: list[str | Path]) -> str:
    """The recipe's file name without its suffix; where other recipe files of that name are compared too, as many
    of its folders before it as tell them apart (a/lite, b/lite → a-lite, b-lite), or its whole name (lite.yaml
    beside lite.yml)."""
    path = find_recipe(recipe).resolve()
    others = {p for p in (find_recipe(r).resolve() for r in recipes) if p.stem == path.stem} - {path}
    parts = path.with_suffix("").parts
    for n in range(1, len(parts) + 1):
        name = "-".join(parts[-n:]).lstrip("/-")
        if all("-".join(other.with_suffix("").parts[-n:]).lstrip("/-") != name for other in others):
            return name
    return path.name


def compare_archs(data: str | Path, archs: list[str] = (), *, recipe: str | Path | None = None,
                  recipes: list[str | Path] = (), seeds=(0,), out: str | Path | None = None, quiet: bool = False,
                  nproc: int | None = None, resume: bool = False, **overrides) -> Comparison:
    """Train every architecture (one shared recipe) or every recipe (each its own architecture and weights)
    under the same split and seeds — and the same size and epochs when given — then compare the runs.

    With `nproc`, each run trains data-parallel over `nproc` processes on this machine (one run after another,
    as `cxrfast train --distributed` does); the comparison itself runs in this one process. `resume` continues an
    interrupted comparison in `out`: its finished runs are kept, an interrupted one resumes, the rest train."""
    from cxr_fast import distributed
    from cxr_fast.config import resolve_config
    from cxr_fast.train import CHECKPOINT_DIR, train

    def train_one(cfg, run_out, count: str):
        interrupted = resume and (run_out / CHECKPOINT_DIR / "state.json").is_file()
        finished = resume and not interrupted and (run_out / "config.json").is_file()
        if not quiet:  # a log holds one epoch table after another: say whose each is
            doing = "keeping the finished run" if finished else "resuming" if interrupted else "training"
            print(f"compare: {doing} {run_out.name} ({count})", file=sys.stderr, flush=True)
        if finished:
            check_same_settings(run_out, cfg)
            return run_out
        # An interrupted run goes on with its own settings: they must be the ones asked for now, too.
        if interrupted and (started := _checkpoint_settings(run_out / CHECKPOINT_DIR / "state.json")):
            check_same_settings(run_out, cfg, trained=started)
        if resume and not interrupted and run_out.exists():
            shutil.rmtree(run_out)  # killed before its first epoch ended: nothing of it to keep
        cfg = None if interrupted else cfg  # a resumed run takes its settings from its checkpoint
        if nproc is None:
            return train(data, cfg, out=run_out, quiet=quiet, resume=interrupted)
        return distributed.launch_training(nproc, data, cfg, out=run_out, quiet=quiet, resume=interrupted)

    out_dir = Path(out) if out else Path("models") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    with writing(out_dir):  # a second compare (or --resume) into this --out refuses, never clearing this one's runs
        if not resume:
            check_new_folder(out_dir)
        elif out is None or not (out_dir / "runs").is_dir():
            raise CxrFastError(f"{out_dir}: no interrupted comparison to resume (expected {out_dir / 'runs'})")
        elif (out_dir / "report").exists():  # written whole or not at all (new_folder): every run is finished
            raise CxrFastError(f"{out_dir}: this comparison is finished (its report: {out_dir / 'report'}); nothing to "
                               "resume")
        if not archs and not recipes:
            raise CxrFastError("compare needs --archs or --recipes to train")
        # Every run's folder, and every recipe error, is known before the first run trains. Runs of a recipe are named
        # by the recipe, since two recipes may train one architecture.
        configs = [resolve_config(recipe, arch=a, seed=s, **overrides) for a in archs for s in seeds]
        jobs = [(f"{cfg.arch}-seed{cfg.seed}", cfg) for cfg in configs]
        jobs += [(f"{recipe_run_name(r, recipes)}-seed{s}", resolve_config(r, seed=s, **overrides))
                 for r in recipes for s in seeds]
        names = [name for name, _ in jobs]
        if len(jobs) < 2:  # refused now, not after the one run has trained
            raise CxrFastError(f"compare needs at least two runs, and this would train one ({names[0]}); give more "
                               "--archs, --recipes or --seeds")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise CxrFastError(f"given twice: {', '.join(repeated)} (two runs would share one folder); each "
                               "architecture, recipe and seed trains once")
        if nproc is not None:  # a batch size the processes cannot share fails now, not after the first runs
            for _, cfg in jobs:
                distributed.per_process_config(cfg, nproc)
        runs, doing = [], "scoring"
        resume_hint = f"continue it with the same command and --resume --out {shlex.quote(str(out_dir))}"
        try:
            for i, (name, cfg) in enumerate(jobs, 1):
                doing = f"training {name}"
                runs.append(train_one(cfg, out_dir / "runs" / name, f"{i} of {len(jobs)}"))
            doing = "scoring"
            return compare_runs(runs, out=out_dir / "report")
        except KeyboardInterrupt:  # say how to finish the comparison, not only the one run
            raise KeyboardInterrupt(f"compare interrupted while {doing} ({len(runs)} of {len(jobs)} runs finished); "
                                    f"{resume_hint}") from None


def check_same_settings(run_dir: Path, cfg, trained: dict | None = None) -> None:
    """A run kept or resumed by `compare --resume` must have been trained as this comparison asks: one report
    must not set a 30-epoch run beside a 3-epoch one. `trained`: the settings it ran with (default: the finished
    run's recipe.yaml)."""
    if trained is None:
        trained = trained_recipe(run_dir / "recipe.yaml") or {}
    asked = cfg.to_dict()
    differ = sorted(k for k in asked if k != "weights" and trained.get(k) != asked[k])  # weights: resolved paths
    if differ:
        shown = ", ".join(f"{k} {trained.get(k)!r}, not {asked[k]!r}" for k in differ[:3])
        raise CxrFastError(f"{run_dir}: trained with other settings ({shown}); resume with the command that started "
                           "this comparison, or give a new --out")
