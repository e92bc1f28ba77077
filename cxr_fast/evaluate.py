"""`cxrfast evaluate`: a run bundle on a manifest's split → predictions, metrics with CIs, calibration, figures.

Evaluating another source's manifest (external validation) uses all of its images except those the model learned
from (identical files or near copies, found with the fingerprints in the run bundle: `cxr_fast.seen`), and
compares them with the training data, warning when they look out of distribution: a model trained on one
hospital's X-rays can fall below chance on another's.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.preprocessing import StandardScaler

from cxr_fast.bundle import Run, device_name, load_run, predict_logits, read_training_manifest
from cxr_fast.calibration import (
    MIN_ERRORS_TO_FIT,
    expected_calibration_error,
    fit_temperature,
    flattens_everything,
    logits_nll,
    reliability_bins,
    softmax,
)
from cxr_fast.data.manifest import (
    image_column,
    label_indices,
    manifest_csv,
    manifest_digest,
    manifest_dir,
    manifest_key,
    read_manifest,
)
from cxr_fast.data.sources import MANIFEST_NAME
from cxr_fast.ensemble import ENSEMBLE_ARCH
from cxr_fast.errors import CxrFastError
from cxr_fast.metrics import bootstrap_ci, classification_metrics, pr_curves, roc_curves
from cxr_fast.outputs import check_folder_path, reading, replacing_folder, settle_replacement, writing
from cxr_fast.predict import image_warning
from cxr_fast.reprs import short_repr
from cxr_fast.seen import match_seen, seen_fingerprints
from cxr_fast.versions import library_versions

SHIFT_WARN_AUC = 0.8  # a domain classifier this good at telling new images from training images means a shift


@dataclass
class Evaluation:
    out_dir: Path
    metrics: dict
    predictions: pd.DataFrame
    shift: dict | None

    def __repr__(self) -> str:  # a notebook shows it: see cxr_fast.reprs
        return short_repr(self)


def select_items(run: Run, data: str | Path | None, split: str) -> tuple[pd.DataFrame, str, bool]:
    """The manifest rows to evaluate, a name for the output folder, and whether the data is external."""
    train_manifest = Path(run.config["data"])
    source = Path(data) if data is not None else train_manifest
    source_csv = manifest_csv(source)
    # another manifest file, even one in the training manifest's folder, is another collection
    external = manifest_key(source) != manifest_key(train_manifest)
    manifest = read_manifest(source) if external else read_training_manifest(run)
    if external:
        if split != "test":  # test is the default; any other value would be silently dropped
            raise CxrFastError(f"--split {split} applies to the training manifest; with --data every image of "
                               f"{source} is evaluated (leave --split out)")
        items, split_name = manifest, "all"  # another source: every image is a test image
    else:
        if split not in {"train", "valid", "test"}:
            raise CxrFastError(f"--split must be train, valid or test, got {split!r}")
        items, split_name = manifest[manifest["split"] == split], split
        if items.empty:
            raise CxrFastError(f"{source}: the manifest has no '{split}' images")
        if split != "test":
            warnings.warn(optimistic_note(split), stacklevel=2)
    unknown = sorted(set(items["label"]) - set(run.classes))
    if unknown:
        raise CxrFastError(f"{source}: labels {unknown} are not classes of this model {run.classes}")
    missing = [p for p in image_column(items) if not Path(p).exists()]
    if missing:
        raise CxrFastError(f"{source}: {len(missing)} listed images no longer exist, e.g. {missing[0]}")
    # Another CSV beside a folder's manifest.csv is another collection: its results get their own folder name.
    collection = source_csv.parent.name + ("" if source_csv.name == MANIFEST_NAME else f"-{source_csv.stem}")
    return items.reset_index(drop=True), f"{collection}-{split_name}", external


def optimistic_note(split: str) -> str:
    """Why scores on the train or valid split flatter the model: said on the console and in the report."""
    why = ("the model learned from these images" if split == "train" else
           "the kept epoch and the temperature were chosen on these images")
    return f"scores on the {split} split are optimistic: {why}; the test split is the fair one"


def manifest_folder(run: Run, data: str | Path | None) -> str:
    """The manifest being evaluated, resolved: what an output folder records it was made from. Its folder when
    the file is the usual manifest.csv, else the file itself: two manifests of one folder are two collections."""
    csv_path = manifest_csv(data if data is not None else run.config["data"]).resolve()
    return str(csv_path.parent if csv_path.name == MANIFEST_NAME else csv_path)


def data_folder(run: Run, data: str | Path | None) -> Path:
    """The folder of the manifest being evaluated (`manifest_folder`'s, or the one a manifest file lies in): marked
    as read (`outputs.reading`) while evaluate or interpret use it, so that no `prepare --force` replaces it then."""
    return manifest_dir(data if data is not None else run.config["data"])


def output_folder(parent: Path, name: str, manifest: str, record: str) -> Path:
    """`parent/name`, unless that folder holds results from another manifest whose folder has the same name
    (data/x and other/x): then `parent/name-<6 hex digits of this manifest's path>`, so that neither a refusal nor
    --force touches the other dataset's results. `record` is the JSON file that notes the manifest."""
    out = parent / name
    settle_replacement(out)  # a replacement killed halfway: its results, new or old, are there again to be read
    try:
        held = json.loads((out / record).read_text(encoding="utf-8")).get("manifest")
    except (OSError, ValueError, AttributeError):  # no results yet, or ones from before manifests were recorded
        held = None
    if held is not None and held != manifest:
        out = parent / f"{name}-{hashlib.sha1(manifest.encode()).hexdigest()[:6]}"
        settle_replacement(out)
    return out


def drop_seen(run: Run, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Leave out the images `run` trained or chose its epoch on, and copies of them.

    Returns the rows to evaluate, the rows left out (with a `match` column: identical or near copy) and a
    summary for metrics.json; `summary["checked"]` is False when the bundle has no fingerprints and its
    training manifest is gone, so nothing could be checked.
    """
    seen = seen_fingerprints(run.path, run.config["data"])
    if seen is None:
        reason = "the bundle predates stored fingerprints and its training manifest is not at hand"
        return items, items.iloc[:0].assign(match=""), {"checked": False, "listed": len(items), "reason": reason}
    match = match_seen(items, seen)
    left_out = items[match != ""].assign(match=match[match != ""])
    summary = {"checked": True, "listed": len(items), "identical": int((match == "identical").sum()),
               "near_copy": int((match == "near copy").sum()), "left_out": len(left_out)}
    return items[match == ""].reset_index(drop=True), left_out.reset_index(drop=True), summary


def image_warnings(items: pd.DataFrame) -> list[str]:
    """predict's `warning` for each image from the manifest's `colour` and `upright` columns (as read: strings), empty
    for an upright grey film; a missing column or a blank or unreadable value (a hand-edited manifest) makes no claim,
    as nothing is known of that image."""
    def measured(column: str) -> pd.Series:
        return pd.to_numeric(items[column], errors="coerce") if column in items else pd.Series(np.nan, index=items.index)

    return [image_warning(colour, upright) or "" for colour, upright in zip(measured("colour"), measured("upright"))]


def flagged_warning(metrics: dict) -> str | None:
    """One sentence for the console and the report when some evaluated images look like no upright grey film (predict's
    warnings, from prepare's measurements), else None: they are scored like the others, and only predictions.csv's
    rows said so."""
    flagged = metrics.get("flagged_images")
    if not flagged:
        return None
    return (f"{flagged} of {metrics['n']} images look like no upright grey chest film (in colour, or a negative film); "
            "they are scored like the others: predictions.csv's warning column names them and says why")


def select_unseen_items(run: Run, data: str | Path | None, split: str):
    """`select_items`, then, for another source's manifest, `drop_seen`: the images evaluate and interpret use.

    Returns (items, name, external, left_out, seen_summary); the last two are None for the training manifest.
    """
    items, name, external = select_items(run, data, split)
    if not external:
        return items, name, external, None, None
    items, left_out, summary = drop_seen(run, items)
    if items.empty:
        raise CxrFastError(f"{data}: all {summary['listed']} images are images {run.name} trained on, or copies of "
                           "them; nothing is left to evaluate")
    return items, name, external, left_out, summary


def metrics_table(m: dict):
    """The console's table of an evaluation's metrics (`cxrfast evaluate` and the demo print it), titled as its
    figures are (`evaluation_subject`)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table("metric", "value", title=escape(evaluation_subject(m)))
    lo, hi = m["balanced_accuracy_ci"]
    table.add_row("balanced accuracy", f"{m['balanced_accuracy']:.3f}  (95 % CI {lo:.3f}–{hi:.3f})")
    table.add_row("accuracy", f"{m['accuracy']:.3f}")
    table.add_row("macro F1", f"{m['macro_f1']:.3f}")
    if m["macro_roc_auc"] is not None:
        table.add_row("macro ROC AUC", f"{m['macro_roc_auc']:.3f}")
    if m["temperature"] == 1.0:  # nothing rescaled (an ensemble, or too few valid mistakes to fit): one figure
        table.add_row("ECE", f"{m['ece']:.3f}")
    else:
        # judged by log-loss, which ECE (15 bins) can contradict: name the figure that rose
        raw, calibrated = _distinct(m["nll"], m["nll_calibrated"])
        worse = f"  (log-loss rose {raw} → {calibrated}: see the report)" if calibration_worse(m) else ""
        table.add_row("ECE raw → calibrated", f"{m['ece']:.3f} → {m['ece_calibrated']:.3f}{worse}")
        if flattens_everything(m["temperature"]):
            table.add_row("[bold yellow]temperature[/]", f"{m['temperature']:.0f}, the fit's upper bound: the logits "
                          "told valid nothing, so every calibrated probability is near 1/K (a low ECE here means nothing)")
    if "by_marker" in m:  # synthetic data: the images without the planted shortcut tell more
        marked, unmarked = m["by_marker"]["with_marker"], m["by_marker"]["without_marker"]
        table.add_row("accuracy with / without a text marker",
                      f"{marked['correct']}/{marked['n']} / {unmarked['correct']}/{unmarked['n']}")
    for site, v in m.get("by_site", {}).items():
        table.add_row(f"balanced accuracy at {escape(site)}", escape(site_summary(v)))
    for name, v in m["per_class"].items():
        # two lines, so that a 100-column terminal holds them beside the widest label: what does not depend on how
        # common the class is (sensitivity, specificity), then what does (the predictive values) and F1
        # .get: a metrics.json written before specificity, NPV and the intervals
        text = {key: _figure_text(v.get(key), v.get(f"{key}_ci")) for key in ("recall", "specificity", "precision", "npv")}
        table.add_row(f"  {escape(name)}", f"R {text['recall']}  Spec {text['specificity']}  n {v['support']}\n"
                                           f"P {text['precision']}  NPV {text['npv']}  F1 {v['f1']:.2f}")
    return table


def _figure_text(value: float | None, ci: list | None) -> str:
    """A proportion to two decimals with its 95 % Wilson interval, "0.95 (0.75–0.99)", for the console and the site
    table; "—" where it is undefined (a recall without images of the class, say), and the figure alone where it has
    no interval (a never-predicted class's precision, 0 by convention) or the metrics.json predates the intervals."""
    if value is None:
        return "—"
    return f"{value:.2f}" if ci is None else f"{value:.2f} ({ci[0]:.2f}–{ci[1]:.2f})"


def seen_warning(summary: dict) -> str | None:
    """One sentence for the console and the report, or None when there is nothing to say."""
    if not summary["checked"]:
        return f"Not checked for images the model trained on: {summary['reason']}."
    if summary["left_out"] == 0:
        return None
    return (f"{summary['left_out']} of {summary['listed']} images are images this model trained on, or copies of them "
            f"({summary['identical']} identical files, {summary['near_copy']} near copies): they are left out of "
            "these figures and listed in seen_images.csv.")


def write_seen_images(folder: Path, left_out: pd.DataFrame | None) -> None:
    """seen_images.csv, the images left out as ones the model learned from; no file when none were."""
    if left_out is not None and len(left_out):
        left_out[["path", "label", "match"]].to_csv(folder / "seen_images.csv", index=False)


@torch.no_grad()
def penultimate_features(run: Run, files: list[str], bs: int = 32) -> np.ndarray:
    from cxr_fast.bundle import iter_batches

    return torch.cat([run.model.features(b.to(run.device)).cpu() for b in iter_batches(run, files, bs)]).numpy()


def domain_auc(a: np.ndarray, b: np.ndarray) -> float:
    """Cross-validated AUC of a logistic regression telling rows of `a` from rows of `b` (0.5 = alike); unshuffled
    folds and a deterministic solver, so the same rows always give the same figure."""
    x = StandardScaler().fit_transform(np.concatenate([a, b]))
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    folds = int(min(5, len(a), len(b)))
    if folds < 2:
        return float("nan")
    scores = cross_val_predict(LogisticRegression(max_iter=2000, C=0.1), x, y, cv=folds, method="predict_proba")
    return float(roc_auc_score(y, scores[:, 1]))


def image_statistics(run: Run, files: list[str]) -> np.ndarray:
    """Per-image intensity mean, std and percentiles of the preprocessed input (before normalisation)."""
    rows = []
    for f in files:
        x = run.load_input(f)[0].numpy() * run.config["std"][0] + run.config["mean"][0]
        rows.append([x.mean(), x.std(), *np.percentile(x, [5, 50, 95])])
    return np.array(rows)


def shift_check(run: Run, items: pd.DataFrame, sample: int = 200, seed: int = 0) -> dict:
    """How distinguishable the evaluated images are from the training images, by image statistics and by the
    model's penultimate features."""
    train = read_manifest(run.config["data"])
    train = train[train["split"] == "train"]
    rng = np.random.default_rng(seed)
    train_files = image_column(train).to_numpy()[rng.permutation(len(train))[:sample]].tolist()
    new_files = image_column(items).to_numpy()[rng.permutation(len(items))[:sample]].tolist()
    stats_auc = domain_auc(image_statistics(run, train_files), image_statistics(run, new_files))
    feature_auc = domain_auc(penultimate_features(run, train_files), penultimate_features(run, new_files))
    score = float(np.nanmax([stats_auc, feature_auc]))
    return {"image_stats_auc": stats_auc, "feature_auc": feature_auc, "score": score,
            "out_of_distribution": bool(score >= SHIFT_WARN_AUC), "threshold": SHIFT_WARN_AUC}


def shift_warning(shift: dict) -> str:
    return (f"Distribution shift: these images are unlike the training data (shift score {shift['score']:.2f}; "
            f"a classifier tells them apart with AUC {shift['feature_auc']:.2f} on the model's features, "
            f"{shift['image_stats_auc']:.2f} on image statistics; ≥ {shift['threshold']:.2f} warns). "
            "Expect the model's accuracy here to differ from its test results.")


def accuracy_by_marker(items: pd.DataFrame, y: np.ndarray, logits: np.ndarray) -> dict | None:
    """Accuracy on the images that carry a known text marker (synthetic data) and on those that do not; None when
    no image is known to carry one. A model reading the marker scores better where it is, so the overall figure
    overstates what it learned from the lungs."""
    if "marker_box" not in items:
        return None
    marked = items["marker_box"].fillna("").astype(str).str.len().to_numpy() > 0
    if not marked.any():
        return None
    correct = logits.argmax(1) == y
    return {key: {"n": int(rows.sum()), "correct": int(correct[rows].sum()),
                  "accuracy": float(correct[rows].mean()) if rows.any() else None}
            for key, rows in (("with_marker", marked), ("without_marker", ~marked))}


SITE_TEXT = ("The same metrics at each site. A model that learned a hospital's look (scanner, text markers, borders) "
             "instead of the disease does well where that look goes with the class and badly elsewhere; the pooled "
             "figure hides the difference. With few images at a site its figures are rough, and at a site with one "
             "class only the balanced accuracy is that class's recall.")


def metrics_by_site(items: pd.DataFrame, y: np.ndarray, logits: np.ndarray, classes: list[str],
                    n_boot: int = 1000, seed: int = 0) -> dict | None:
    """n, accuracy, balanced accuracy (with its bootstrap 95 % interval) and per-class recall (with its 95 % Wilson
    interval) at each site (`prepare --sites`); None for one site.

    A model that learned a hospital's look instead of the disease scores well where that look goes with the
    class and badly elsewhere, which the pooled figure hides. The interval says how far a small site's figure can
    be trusted: two sites whose intervals overlap widely may not differ at all. (Not where a site has one or two images
    of a class: resampled within the class, they barely vary its recall, and the interval is too narrow.)"""
    if "site" not in items:
        return None
    sites = items["site"].fillna("").astype(str).to_numpy()
    if len(set(sites) - {""}) < 2:
        return None
    by_site = {}
    for site in sorted(set(sites)):
        rows = sites == site
        probs = softmax(logits[rows])
        m = classification_metrics(y[rows], probs, classes)
        by_site[site or "(none)"] = {
            "n": m["n"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "balanced_accuracy_ci": list(bootstrap_ci(y[rows], probs, "balanced_accuracy", n_boot=n_boot, seed=seed)),
            "recall": {name: v["recall"] for name, v in m["per_class"].items()},
            # a site's recall of a class rests on few images: its Wilson interval says how few (null: none there)
            "recall_ci": {name: v["recall_ci"] for name, v in m["per_class"].items()}}
    return by_site


def site_summary(v: dict) -> str:
    """A site's balanced accuracy, size and recalls on one line. A site with images of one class only is named
    as such: its "balanced accuracy" is that class's recall, not comparable with the other sites'."""
    present = [name for name, r in v["recall"].items() if r is not None]
    recalls = " / ".join("—" if r is None else f"{r:.2f}" for r in v["recall"].values())
    only = f"; {present[0]} only: that class's recall" if len(present) == 1 else ""
    return f"{v['balanced_accuracy']:.3f} {_interval(v)} (n {v['n']}; recall {recalls}{only})"


def _interval(v: dict) -> str:
    """"(low–high)" of a site's balanced accuracy; empty for figures written before intervals were given."""
    low, high = v.get("balanced_accuracy_ci") or (None, None)
    return "" if low is None else f"({low:.3f}–{high:.3f})"


def site_table(by_site: dict) -> pd.DataFrame:
    """One row per site: what the report shows (a recall is "—" where the site has no image of the class)."""
    return pd.DataFrame([
        {"site": site, "images": v["n"], "balanced accuracy": f"{v['balanced_accuracy']:.3f}"
         + (" (one class only)" if sum(r is not None for r in v["recall"].values()) == 1 else ""),
         "95 % interval": _interval(v) or "—",
         "accuracy": f"{v['accuracy']:.3f}",
         **{f"recall {name}": _figure_text(r, v.get("recall_ci", {}).get(name)) for name, r in v["recall"].items()}}
        for site, v in by_site.items()])


def marker_text(by_marker: dict) -> str:
    def part(group: dict) -> str:
        return "no image" if not group["n"] else f"{group['accuracy']:.2f} ({group['correct']} of {group['n']})"

    return (f"Accuracy on the images carrying a text marker: {part(by_marker['with_marker'])}; on those without: "
            f"{part(by_marker['without_marker'])}. A model that reads the marker does better where it is, so the "
            f"images without it say more about what it learned from the lungs.")


def _distinct(a: float, b: float) -> tuple[str, str]:
    """Two figures printed with as many decimals (3 to 6) as it takes to show that they differ."""
    for digits in range(3, 7):
        if f"{a:.{digits}f}" != f"{b:.{digits}f}":
            break
    return f"{a:.{digits}f}", f"{b:.{digits}f}"


def calibration_worse(metrics: dict) -> str | None:
    """A caution when temperature scaling raised the log-loss on these images, else None: T was fitted on the valid
    split, and a small one, or one unlike these images, can mislead it."""
    if metrics["temperature"] == 1.0 or metrics["nll_calibrated"] <= metrics["nll"]:
        return None
    sharper = "sharpens (T < 1)" if metrics["temperature"] < 1 else "softens (T > 1)"
    # a T refitted on TTA predictions is this evaluation's alone: predict and serve apply training's
    refitted = metrics.get("temperature_used") == "tta"
    fitted, used = ("the valid split's TTA predictions", "predictions.csv") if refitted else \
        ("the valid split", "predictions.csv, predict, serve")
    return (f"Temperature scaling made the probabilities worse on these images: it {sharper} them, fitted on "
            f"{fitted}, and here the log-loss rises from {metrics['nll']:.3f} to {metrics['nll_calibrated']:.3f} "
            f"(ECE {metrics['ece']:.3f} to {metrics['ece_calibrated']:.3f}). The calibrated probabilities "
            f"({used}) are less trustworthy than the raw ones here.")


def tta_temperature(run: Run, progress: bool = True) -> dict:
    """The temperature for an evaluation with TTA, as the metrics.json keys that record it: `temperature` (the one
    applied), `temperature_single_view` (the run's, fitted by training on single views), `temperature_tta` (fitted
    here, or None), `temperature_used` ("tta" or "single_view") and, where the single-view one is kept,
    `temperature_note` saying why.

    The mean of four views' logits is spread differently from one view's (usually less extreme), so the single-view T
    misjudges it: refitted on the valid split's TTA logits (the images the training manifest marks valid, those
    training calibrated on, with `fit_temperature` as training uses it), the test NLL fell on each of six cxr-dev runs
    (docs/benchmarks.md).
    Fitted afresh on every call and kept nowhere: a stored one would outlive the weights or manifest it came from.
    Kept at the single-view T where that split cannot be had (an external evaluation of a bundle whose training
    manifest is gone or changed) and for an ensemble, whose members apply their own temperatures inside it."""
    single = run.temperature
    record = {"temperature_single_view": single, "temperature_tta": None}

    def keep(why: str) -> dict:
        return {"temperature": single, **record, "temperature_used": "single_view", "temperature_note": why}

    if run.config["model"]["arch"] == ENSEMBLE_ARCH:
        return keep("an ensemble, whose members apply their own single-view temperatures inside it")
    try:
        manifest = read_training_manifest(run)
    except CxrFastError:  # gone or prepared again: evaluating another collection (--data) still goes ahead
        return keep("the valid split it was fitted on is not at hand (the training manifest was moved or changed)")
    valid = manifest[manifest["split"] == "valid"].reset_index(drop=True)
    if valid.empty:
        return keep("the training manifest has no valid images")
    if missing := sum(not Path(p).exists() for p in image_column(valid)):
        return keep(f"{missing} of the training manifest's {len(valid)} valid images no longer exist")
    with reading(manifest_dir(run.config["data"])):  # another collection's evaluation marks only its own folder
        logits = predict_logits(run, valid, progress=progress, tta=True,
                                description=f"calibrating TTA on {len(valid)} valid images")
    fitted = float(fit_temperature(logits, label_indices(valid["label"], run.classes)))
    return {"temperature": fitted, **record, "temperature_tta": fitted, "temperature_used": "tta",
            "temperature_valid_images": len(valid)}


def tta_temperature_line(metrics: dict) -> str | None:
    """The console's one line on the temperature of a TTA evaluation (None without TTA)."""
    if not metrics.get("tta") or "temperature_used" not in metrics:
        return None
    single = metrics["temperature_single_view"]
    if metrics["temperature_used"] == "tta":
        return (f"TTA: temperature refitted on the {metrics['temperature_valid_images']} valid images' TTA predictions, "
                f"T = {metrics['temperature']:.3f} (single-view T = {single:.3f}, not used)")
    return f"TTA: temperature not refitted, single-view T = {single:.3f} kept: {metrics['temperature_note']}"


def calibration_text(run: Run, metrics: dict) -> str:
    temperature = metrics.get("temperature", run.temperature)  # the one applied: with TTA, maybe not the run's
    refitted = metrics.get("temperature_used") == "tta"
    if run.config["model"]["arch"] == ENSEMBLE_ARCH:
        return (f"Each member's probabilities are calibrated by its own temperature (fitted on the valid split"
                f"{', on single views' if metrics.get('tta') else ''}) before they are averaged; the average is not "
                f"rescaled. Its expected calibration error is {metrics['ece']:.3f}; probabilities in predictions.csv "
                "are the average.")
    if temperature == 1.0:  # what fit_temperature returns when it has too little to fit
        return (f"No temperature was applied: the valid split gave fewer than {MIN_ERRORS_TO_FIT} wrong predictions"
                f"{' with TTA' if refitted else ''} to fit one, so probabilities are the model's own. Its expected "
                f"calibration error is {metrics['ece']:.3f}.")
    if refitted:
        fitted = (f"fitted on the valid split's TTA predictions, as evaluated here; training's single-view T is "
                  f"{metrics['temperature_single_view']:.2f}")
    elif metrics.get("tta"):
        fitted = (f"fitted by training on single views of the valid split, not on TTA predictions: "
                  f"{metrics['temperature_note']}")
    else:
        fitted = "fitted on the valid split"
    return (f"Temperature scaling (T = {temperature:.2f}, {fitted}) changes the expected "
            f"calibration error from {metrics['ece']:.3f} to {metrics['ece_calibrated']:.3f}. Predicted classes "
            "do not change; probabilities in predictions.csv are calibrated.")


def compute_metrics(y: np.ndarray, logits: np.ndarray, classes: list[str], temperature: float,
                    n_boot: int = 1000, seed: int = 0) -> dict:
    """Every figure of an evaluation from labels `y` [N] and raw `logits` [N, K]: accuracy, balanced accuracy,
    per-class precision/recall/specificity/NPV (each with its 95 % Wilson interval) and F1, ROC and PR AUCs, `n_boot`
    bootstrap 95 % intervals of the summary figures, and ECE and NLL before and after dividing the logits by
    `temperature`."""
    probs = softmax(logits)
    calibrated = softmax(logits, temperature)
    metrics = classification_metrics(y, probs, classes)
    metrics["balanced_accuracy_ci"] = list(bootstrap_ci(y, probs, "balanced_accuracy", n_boot=n_boot, seed=seed))
    if metrics["macro_roc_auc"] is not None:
        try:
            metrics["macro_roc_auc_ci"] = list(bootstrap_ci(y, probs, "macro_roc_auc", n_boot=n_boot, seed=seed))
        except CxrFastError:
            metrics["macro_roc_auc_ci"] = None
    metrics["ci_level"] = 0.95
    metrics["bootstrap"] = {"replicates": n_boot, "seed": seed}  # what the intervals were drawn with
    metrics["temperature"] = temperature
    metrics["ece"] = expected_calibration_error(probs, y)
    metrics["ece_calibrated"] = expected_calibration_error(calibrated, y)
    # from the logits: the probabilities clip a confidently wrong prediction's loss, which can reverse the comparison
    metrics["nll"] = logits_nll(logits, y)
    metrics["nll_calibrated"] = logits_nll(logits, y, temperature)
    return metrics


def evaluation_subject(metrics: dict) -> str:
    """What an evaluation shows: 'run on data-split (n images)', the title of its console table and of its figures."""
    return f"{metrics['run']} on {metrics['data']} ({metrics['n']} images{', with TTA' if metrics.get('tta') else ''})"


def evaluation_figures(y, logits, classes, temperature, metrics, subject: str = "") -> dict:
    """The evaluation's figures by name; `subject` (`evaluation_subject`) goes into every title, so that a PNG
    copied out of the report still says which model, data and how many images it shows."""
    from cxr_fast.plots import plot_confusion_matrix, plot_pr_curves, plot_reliability, plot_roc_curves

    probs, calibrated = softmax(logits), softmax(logits, temperature)
    of = f"\n{subject}" if subject else ""
    raw_bins = reliability_bins(probs, y)
    return {
        "confusion_matrix": plot_confusion_matrix(metrics["confusion_matrix"], classes, title=f"Confusion matrix{of}"),
        "roc_curves": plot_roc_curves(roc_curves(y, probs, classes), title=f"ROC curves (one-vs-rest){of}"),
        "pr_curves": plot_pr_curves(pr_curves(y, probs, classes), title=f"Precision-recall curves (one-vs-rest){of}"),
        # T = 1 (an ensemble, calibrated member by member, or too few valid mistakes to fit): no before and after
        "reliability": (plot_reliability(raw_bins, title="Reliability", suptitle=subject) if temperature == 1.0 else
                        plot_reliability(raw_bins, reliability_bins(calibrated, y), temperature, suptitle=subject)),
    }


def evaluate(run_dir: str | Path, data: str | Path | None = None, split: str = "test", *, tta: bool = False,
             n_boot: int = 1000, device: str = "cpu", force: bool = False, progress: bool = True) -> Evaluation:
    """`cxrfast evaluate`: score the run in `run_dir` on its manifest's `split`, or on every image of another
    prepared collection `data` less those the model learned from, and write report.html, metrics.json and
    predictions.csv into RUN/eval/<data>-<split>/ (replaced only with `force`). `tta` averages each prediction over
    the image and three small crops, and calibrates it with a temperature refitted on the valid split's TTA
    predictions (`tta_temperature`). `device`: where the model runs (`cxr_fast.bundle.inference_device`)."""
    import matplotlib.pyplot as plt

    from cxr_fast.report import Section, write_metrics_json, write_report

    run = load_run(run_dir, device=device)
    with reading(data_folder(run, data)):  # a prepare --force of this data refuses until the evaluation is done
        items, name, external, left_out, seen_summary = select_unseen_items(run, data, split)
        # TTA figures go beside the plain ones, not over them: both are worth keeping, and serve shows the plain one.
        manifest = manifest_folder(run, data)
        out_dir = output_folder(run.path / "eval", f"{name}-tta" if tta else name, manifest, "metrics.json")
        with writing(out_dir):  # a second evaluate into this folder refuses now, not after its predictions
            if out_dir.exists() and not force:  # checked before the slow part; replacing_folder checks again
                raise CxrFastError(f"{out_dir}: an evaluation is already there; add --force to redo it")
            check_folder_path(out_dir.parent, None)

            logits = predict_logits(run, items, progress=progress, tta=tta)
            y = label_indices(items["label"], run.classes)
            calibration = tta_temperature(run, progress=progress) if tta else {"temperature": run.temperature}
            temperature = calibration["temperature"]
            metrics = compute_metrics(y, logits, run.classes, temperature, n_boot=n_boot)
            metrics.update(calibration)
            metrics.update({"run": run.name, "data": name, "manifest": manifest, "manifest_sha256": manifest_digest(manifest),
                            "external": external, "tta": tta, "device": device_name(run.device),
                            "versions": library_versions()})
            if (by_marker := accuracy_by_marker(items, y, logits)) is not None:
                metrics["by_marker"] = by_marker
            if (by_site := metrics_by_site(items, y, logits, run.classes, n_boot=n_boot)) is not None:
                metrics["by_site"] = by_site
            if seen_summary is not None:
                metrics["seen_images"] = seen_summary
            shift = None
            if external:
                try:
                    shift = metrics["shift"] = shift_check(run, items)
                except CxrFastError:  # e.g. a bundle shared without its training images
                    metrics["shift"] = {"skipped": f"the training images are not at hand to compare with "
                                                   f"(their manifest was {run.config.get('data')})"}

            with replacing_folder(out_dir, force=force, what="an evaluation") as work:
                probs = softmax(logits, temperature)
                predictions = pd.DataFrame({"path": items["path"], "label": items["label"],
                                            "predicted": [run.classes[i] for i in probs.argmax(1)]})
                if "site" in items:
                    predictions.insert(1, "site", items["site"])
                for k, c in enumerate(run.classes):
                    predictions[f"p_{c}"] = probs[:, k]
                if "colour" in items or "upright" in items:  # prepare measured them; a manifest without makes no
                    predictions["warning"] = image_warnings(items)  # claim either way
                    if flagged := int((predictions["warning"] != "").sum()):
                        metrics["flagged_images"] = flagged
                predictions.to_csv(work / "predictions.csv", index=False)
                write_seen_images(work, left_out)
                write_metrics_json(work / "metrics.json", metrics)

                figures = evaluation_figures(y, logits, run.classes, temperature, metrics, evaluation_subject(metrics))
                cautions = [shift_warning(shift)] if shift and shift["out_of_distribution"] else []  # the report's banners
                if seen_summary is not None and (seen := seen_warning(seen_summary)):
                    cautions.insert(0, seen)
                if external and shift is None:
                    cautions.append(f"Distribution-shift check skipped: {metrics['shift']['skipped']}")
                if not external and split != "test":
                    cautions.insert(0, optimistic_note(split).capitalize() + ".")
                if (worse := calibration_worse(metrics)) is not None:
                    cautions.append(worse)
                if (flagged_note := flagged_warning(metrics)) is not None:
                    cautions.append(flagged_note)
                sections = [
                    Section("Curves", text="One-vs-rest ROC and precision-recall curves per class.",
                            figures=["roc_curves", "pr_curves"]),
                    Section("Calibration", text=calibration_text(run, metrics), figures=["reliability"]),
                    Section("Confusion matrices", figures=["confusion_matrix"]),
                ]
                if "by_marker" in metrics:
                    sections.insert(0, Section("Images with and without a text marker", text=marker_text(metrics["by_marker"])))
                if "by_site" in metrics:
                    sections.insert(0, Section("By site", text=SITE_TEXT, table=site_table(metrics["by_site"])))
                write_report(work, f"Evaluation of {run.name} on {name}", sections, figures, metrics, warnings=cautions,
                             meta={"model": run.config["model"]["arch"], "run": str(run.path), "images": len(items),
                                   "test-time augmentation": "yes" if tta else "no"})
            plt.close("all")
            return Evaluation(out_dir=out_dir, metrics=metrics, predictions=predictions, shift=shift)
