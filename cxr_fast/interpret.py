"""`cxrfast interpret`: what does the model look at, and is it cheating?

1. Top losses, ranked as fastai's `ClassificationInterpretation` ranks them, and the most-confused pairs, from the
   one pass of the model over the images.
2. Occlusion heatmaps (all classes from one sweep, equal to Captum's `Occlusion`) for the top losses and a
   class-stratified sample of correct predictions; integrated gradients and Grad-CAM on request.
3. A shortcut audit: the share of positive evidence inside the lung fields, per image, per class and overall,
   with a plain verdict. Lung fields come from the ground-truth masks of synthetic data, else from
   `cxr_fast.lungs.estimate_lung_field`.
4. A deletion check of faithfulness.

Computation lives here and in `attribution`/`audit`; `gallery` draws.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxr_fast import attribution, audit
from cxr_fast.bundle import Run, device_name, load_run, predict_logits
from cxr_fast.calibration import softmax
from cxr_fast.data.io import image_stem, read_image, read_mask
from cxr_fast.data.manifest import image_column, label_indices, manifest_digest
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluate import (
    data_folder,
    manifest_folder,
    output_folder,
    select_unseen_items,
    write_seen_images,
)
from cxr_fast.lungs import estimate_lung_field
from cxr_fast.outputs import check_folder_path, reading, replacing_folder, short_stem, writing
from cxr_fast.preprocess import resize_square
from cxr_fast.reprs import short_repr
from cxr_fast.versions import library_versions

METHODS = ("occlusion", "integrated_gradients", "gradcam")


@dataclass
class Interpretation:
    out_dir: Path
    audit: dict
    top_losses: pd.DataFrame
    verdicts: list[str]

    def __repr__(self) -> str:  # a notebook shows it: see cxr_fast.reprs
        return short_repr(self)


def top_losses(run: Run, items: pd.DataFrame, k: int, logits: np.ndarray) -> tuple[pd.DataFrame, list]:
    """The k wrong predictions with the highest loss, ranked as fastai's `ClassificationInterpretation.top_losses`
    ranks them (the cross-entropy of the network's own, uncalibrated logits, as `CrossEntropyLossFlat` gives it,
    largest first by `topk`), and the confused pairs (`most_confused`). Correct predictions are left out even when
    their loss is high (on a small split fastai's top k would include them), as the gallery shows them as "what the
    model got most wrong".

    Everything comes from `logits` (rows in `items` order), the one pass over the images that `interpret` makes:
    fastai's `from_learner` ran the model over every image again for the same losses (`tests/test_interpret.py`
    checks that the rows are fastai's). `p_true` and `p_predicted` are calibrated, as every other table shows them.
    """
    y = label_indices(items["label"], run.classes)
    probs = softmax(logits, run.temperature)
    # copies: pandas hands out `y` read-only, which torch.from_numpy warns about
    losses = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float32),
                                               torch.tensor(y, dtype=torch.int64), reduction="none")
    losses, idx = losses.topk(len(items))
    confused = most_confused(y, probs.argmax(1), run.classes)
    rows = []
    for loss, i in zip(losses.tolist(), idx.tolist()):
        true, pred = int(y[i]), int(probs[i].argmax())
        if pred == true:
            continue
        if len(rows) == k:
            break
        rows.append({"index": i, "path": items["path"].iloc[i], "label": run.classes[true],
                     "predicted": run.classes[pred], "p_true": float(probs[i, true]),
                     "p_predicted": float(probs[i, pred]), "loss": float(loss)})
    return pd.DataFrame(rows, columns=["index", "path", "label", "predicted", "p_true", "p_predicted", "loss"]), confused


def most_confused(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> list[tuple[str, str, int]]:
    """(true class, predicted class, count) of every pair confused at least once, most often first, as fastai's
    `ClassificationInterpretation.most_confused(min_val=1)` lists them. Counted from the predictions at hand: fastai's
    runs the model over every image again."""
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(counts, (y, pred), 1)
    np.fill_diagonal(counts, 0)
    pairs = [(classes[i], classes[j], int(counts[i, j])) for i, j in zip(*np.nonzero(counts))]
    return sorted(pairs, key=lambda pair: pair[2], reverse=True)


def audit_sample(probs: np.ndarray, y: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """Up to n correct predictions, spread evenly over the true classes and interleaved (class A, B, C, A, …)
    so that any prefix of the list, such as the gallery's first few, shows every class; a class with too few
    correct predictions leaves its share to the others."""
    rng = np.random.default_rng(seed)
    pred = probs.argmax(1)
    per_class = [rng.permutation(np.flatnonzero((y == c) & (pred == c))).tolist() for c in np.unique(y)]
    interleaved = [i for round_ in itertools.zip_longest(*per_class) for i in round_ if i is not None]
    return interleaved[:n]


def lung_mask_for(row: pd.Series, image: np.ndarray, size: int) -> tuple[np.ndarray, str]:
    """Ground-truth lungs (synthetic masks: 1 lung, 2 lesion) at the model's size, else the automatic estimate."""
    mask_path = row.get("mask")
    if isinstance(mask_path, str) and mask_path and Path(mask_path).is_file():
        mask = read_mask(mask_path)  # a manifest from someone else may name a decompression bomb
        return np.asarray(mask.resize((size, size), Image.Resampling.NEAREST)) > 0, "ground truth"
    lungs = estimate_lung_field(image)
    # The audit leaves an image without a usable lung field out of its lung figures; the column says why. An estimate
    # far outside what lungs cover (a bright collimation frame taken whole, two specks above the diaphragm) would
    # otherwise credit evidence anywhere on the film to "the lungs", or none.
    if not lungs.any():
        return lungs, "not found"
    if not PLAUSIBLE_LUNG_AREA[0] <= lungs.mean() <= PLAUSIBLE_LUNG_AREA[1]:
        return np.zeros_like(lungs), "implausible"
    return lungs, "estimated"


# Every one of the 300 hand-drawn lung masks of ../shared/data/lung-masks covers 8.4-40 % of its film (at 96 px); on
# cxr-dev (96 px) the estimate fell outside 8-55 % for 27 of 886 films: 21 below, 6 above (docs/interpretation.md).
PLAUSIBLE_LUNG_AREA = (0.08, 0.55)


def marker_box_for(row: pd.Series, size: int, margin: int = 0):
    """The marker's box at the model's size, grown by `margin` pixels on each side.

    Occlusion credits every pixel of a window that covers the marker, so its evidence for a marker spreads about
    half a window beyond the marker itself: the audit counts the marker at the map's resolution."""
    box = row.get("marker_box")
    if not isinstance(box, str) or not box:
        return None
    x0, y0, x1, y1 = (float(v) for v in box.split(","))
    sx, sy = size / float(row["width"]), size / float(row["height"])
    return (max(0, int(np.floor(x0 * sx)) - margin), max(0, int(np.floor(y0 * sy)) - margin),
            min(size, int(np.ceil(x1 * sx)) + margin), min(size, int(np.ceil(y1 * sy)) + margin))


def lung_caption(shares: dict) -> str:
    if math.isnan(shares["share_inside"]):
        return "no positive evidence"
    if not 0 < shares["area_inside"] < 1:
        return "no lung field found"
    return f"{shares['share_inside']:.0%} of evidence inside the lungs"


BASELINES = ("black", "mean")


def baseline_value(run: Run, baseline: str) -> torch.Tensor:
    """The occluding value in the model's normalised units, per channel ([n_in, 1, 1]).

    "black" (default) blacks a patch out: an X-ray's background is black, so occluding empty air changes
    nothing, and a bright text marker or lesion vanishes. "mean" paints the dataset's mean gray, Captum's usual
    zero baseline, which also credits empty dark corners (a gray patch there is itself something new)."""
    if baseline not in BASELINES:
        raise CxrFastError(f"--baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline == "mean":
        return torch.zeros(run.n_in, 1, 1)
    from cxr_fast.predict import black_baseline  # one definition for the gallery, predict and serve

    return torch.from_numpy(black_baseline(run.config["mean"], run.config["std"]))


def attribute(run: Run, x: torch.Tensor, pred: int, true: int, methods, window, stride,
              baseline: float | torch.Tensor = 0.0) -> dict[str, np.ndarray]:
    """Maps by name for the predicted and (when different) the true class."""
    maps = {}
    all_classes = attribution.occlusion_maps(run.model, x, window=window, stride=stride, baseline=baseline)
    maps[f"occlusion → {run.classes[pred]}"] = all_classes[pred].numpy()
    if true != pred:
        maps[f"occlusion → {run.classes[true]} (true)"] = all_classes[true].numpy()
    if "integrated_gradients" in methods:
        maps[f"integrated gradients → {run.classes[pred]}"] = _np(attribution.integrated_gradients(run.model, x, pred))
    if "gradcam" in methods:
        maps[f"Grad-CAM → {run.classes[pred]}"] = _np(attribution.gradcam(run.model, x, pred))
    return maps


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def interpret(run_dir: str | Path, data: str | Path | None = None, split: str = "test", *, n: int = 16,
              audit_n: int = 48, methods=("occlusion",), window: int | None = None, stride: int | None = None,
              baseline: str = "black", device: str = "cpu", force: bool = False, progress: bool = True) -> Interpretation:
    """`cxrfast interpret`: fastai's top losses (the `n` wrong predictions with the highest loss) and `audit_n`
    correct ones of every class, each with an occlusion map (`window`/`stride` in pixels, default 1/8 of the size
    and half that), a shortcut audit of where the evidence lies (lungs, borders, text markers), a deletion check of
    the maps' faithfulness, and gallery.html, audit.json and top_losses.csv in RUN/interpret/<data>-<split>/
    (<data>-<split>-mean with ``baseline="mean"``). `device`: where the model runs (`cxr_fast.bundle.inference_device`):
    on a GPU the maps take a fraction of their CPU time."""
    from cxr_fast.progress import progress_bar

    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "occlusion" not in methods:
        raise CxrFastError(f"--methods takes occlusion plus any of {METHODS[1:]}, got {list(methods)}")
    bad = [f"--{name} must be a whole number ≥ {least} (got {value})"  # before the slow prediction step
           for name, value, least in (("n", n, 1), ("audit-n", audit_n, 0), ("window", window, 1), ("stride", stride, 1))
           if value is not None and value < least]
    if bad:
        raise CxrFastError("; ".join(bad))
    run = load_run(run_dir, device=device)
    with reading(data_folder(run, data)):  # a prepare --force of this data refuses until the interpretation is done
        if "gradcam" in methods and not attribution.has_feature_map(run.model):
            raise CxrFastError(f"{run.path}: Grad-CAM needs one spatial feature map, and this model has none (an "
                               "ensemble, or frozen features pooled to one vector); use occlusion or integrated_gradients")
        fill = baseline_value(run, baseline)
        # The window and stride used, as occlusion_maps picks them when not given, so that audit.json records them.
        window = window or attribution.default_window(run.size, run.size)[0]
        stride = stride or max(1, window // 2)
        attribution.check_window(run.size, window, stride)  # before the slow prediction step, not on the first map
        if window > run.size // 4:
            warnings.warn(f"--window {window} is over a quarter of the {run.size}-pixel input: occlusion spreads each "
                          "region's evidence about half a window around it, so the audit's lung figures are blurred",
                          stacklevel=2)
        # another source's images less those the model learned from, as evaluate uses them
        items, name, _, left_out, seen_summary = select_unseen_items(run, data, split)
        lost = [mask for mask in items.get("mask", []) if mask and not Path(mask).is_file()]
        if lost:  # named by their absolute path in SRC: a moved source folder left the audit on estimates without a word
            warnings.warn(f"{len(lost)} of the lung masks the manifest names are missing (e.g. {lost[0]}; was the source "
                          "folder moved?): the lung fields of those images are estimated instead", stacklevel=2)
        manifest = manifest_folder(run, data)
        # A mean-gray baseline's maps sit beside the black ones, so the two can be compared (as evaluate's -tta does)
        out_dir = output_folder(run.path / "interpret", name if baseline == "black" else f"{name}-{baseline}", manifest,
                                "audit.json")
        with writing(out_dir):  # a second interpret into this folder refuses now, not after its maps
            if out_dir.exists() and not force:  # checked before the slow part; replacing_folder checks again
                raise CxrFastError(f"{out_dir}: an interpretation is already there; add --force to redo it")
            check_folder_path(out_dir.parent, None)

            logits = predict_logits(run, items, progress=progress)
            probs = softmax(logits, run.temperature)
            y = label_indices(items["label"], run.classes)
            losses, confused = top_losses(run, items, n, logits)

            # The audit sample: the top losses plus correct predictions of every class; each image attributed once.
            correct_sample = audit_sample(probs, y, audit_n)
            order = list(dict.fromkeys(losses["index"].tolist() + correct_sample))
            if not order:
                raise CxrFastError(f"nothing to interpret: the model gets all {len(items)} images right and --audit-n 0 "
                                   "asks for no correct ones")
            files = image_column(items).tolist()
            loss_set = set(losses["index"])
            rows, shown, predicted_maps = [], [], {}
            with progress_bar(progress, transient=False) as bar:
                task = bar.add_task("occlusion maps", total=len(order))
                for i in order:
                    row, file = items.iloc[i], files[i]
                    image = np.asarray(resize_square(read_image(file), run.size))
                    x = run.load_input(file)
                    pred, true = int(probs[i].argmax()), int(y[i])
                    maps = attribute(run, x, pred, true, methods, window, stride, fill)
                    predicted_maps[i] = maps[f"occlusion → {run.classes[pred]}"]
                    lungs, lung_source = lung_mask_for(row, image, run.size)
                    # the audit counts the marker's evidence at the map's resolution; the figure shows the marker itself
                    box = marker_box_for(row, run.size, margin=window // 2)
                    shares = audit.attribution_shares(predicted_maps[i], lungs, marker_box=box)
                    rows.append({"path": row["path"], "label": run.classes[true], "predicted": run.classes[pred],
                                 "p_predicted": float(probs[i, pred]), "correct": pred == true, "lungs": lung_source,
                                 "top_loss": i in loss_set, **({"site": row["site"]} if "site" in row else {}), **shares})
                    caption = (f"{Path(row['path']).name}: true {run.classes[true]}, predicted {run.classes[pred]} "
                               f"(p={probs[i, pred]:.2f}; p(true)={probs[i, true]:.2f}); {lung_caption(shares)}")
                    if i in loss_set or sum(not top_loss for *_, top_loss in shown) < n:  # the gallery's, drawn below
                        shown.append((row, image, maps, caption, lungs, i in loss_set))
                    bar.advance(task)
                # drawing the figures and the deletion curves took ~10 s for 24 maps, after the maps' bar had ended
                task = bar.add_task("gallery figures", total=len(shown))
                figures_loss, figures_correct, image_files = draw_figures(run, shown, lambda: bar.advance(task))

                per_image = pd.DataFrame(rows)
                summary = audit.audit_summary(per_image.to_dict("records"), labels=per_image["label"].tolist(),
                                              preds=per_image["predicted"].tolist(), class_names=run.classes,
                                              sites=per_image["site"].tolist() if "site" in per_image else None)
                verdicts = audit.verdict(summary).splitlines()

                # Faithfulness: deletion curves for a few correctly predicted images (of every class), averaged.
                checked = (correct_sample or order)[:8]
                task = bar.add_task("deletion curves", total=len(checked))
                deletion = deletion_check(run, items, probs, checked, fill, predicted_maps, lambda: bar.advance(task))

            with replacing_folder(out_dir, force=force, what="an interpretation") as work:
                write_interpretation(work, run, name, per_image, losses, summary, verdicts, confused, deletion,
                                     image_files, figures_loss, figures_correct,
                                     {"methods": list(methods), "window": window, "stride": stride,
                                      "baseline": baseline, "device": device_name(run.device), "manifest": manifest,
                                      "manifest_sha256": manifest_digest(manifest),
                                      **({"seen_images": seen_summary} if seen_summary else {})})
                write_seen_images(work, left_out)
            report = json.loads((out_dir / "audit.json").read_text(encoding="utf-8"))
            return Interpretation(out_dir=out_dir, audit=report, top_losses=losses, verdicts=verdicts)


def draw_figures(run: Run, shown: list, drawn: Callable[[], None] = lambda: None) -> tuple[list, list, list]:
    """The gallery's figures of the top losses and of the correct predictions, as (caption, PNG, link) each, and
    the PNGs by file name for images/: one per (row, image, maps, caption, lungs, top_loss) in `shown`; `drawn` is
    called after each figure."""
    from cxr_fast import gallery
    from cxr_fast.report import png_bytes

    figures_loss, figures_correct, image_files = [], [], []
    for row, image, maps, caption, lungs, top_loss in shown:
        fig = gallery.attribution_figure(image, maps, caption, lungs, marker_box_for(row, run.size))
        png = png_bytes(fig)
        filename = f"{len(image_files) + 1:03d}_{short_stem(image_stem(row['path']))}.png"
        # the gallery links its full-size copy
        (figures_loss if top_loss else figures_correct).append((caption, png, f"images/{filename}"))
        image_files.append((filename, png))
        drawn()
    return figures_loss, figures_correct, image_files


def write_interpretation(work: Path, run: Run, name: str, per_image, losses, summary, verdicts, confused, deletion,
                         image_files, figures_loss, figures_correct, settings: dict) -> None:
    from cxr_fast import gallery
    from cxr_fast.report import png_bytes, to_jsonable

    (work / "images").mkdir()
    for filename, png in image_files:
        (work / "images" / filename).write_bytes(png)
    per_image.to_csv(work / "audit_images.csv", index=False)
    losses.to_csv(work / "top_losses.csv", index=False)
    report = {"run": run.name, "data": name, "images_audited": len(per_image), "summary": summary,
              "verdicts": verdicts, "most_confused": [[str(a), str(b), int(count)] for a, b, count in confused],
              "deletion": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in deletion.items()},
              **settings, "versions": library_versions()}
    # null, not NaN, for a share with nothing to measure (no text marker, say): NaN is not JSON to strict readers
    (work / "audit.json").write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False))
    gallery.write_gallery(
        work / "gallery.html", f"Interpretation of {run.name} on {name}",
        [(v, audit.flags_shortcut(v)) for v in verdicts],
        [("Top losses", "The images the model got most wrong, with occlusion maps for the predicted and the true "
          "class. Red: evidence for the class; blue: against. Green: lung fields; yellow: a text marker.", figures_loss),
         ("Correct predictions", "A class-stratified sample of correct predictions.", figures_correct),
         ("Faithfulness", "Removing the most-attributed pixels first should lower the probability faster than "
          "removing random pixels.", [("deletion curves", png_bytes(gallery.deletion_figure(deletion)))])],
        tables=[("Shortcut audit per class", summary_rows(summary)),
                # the losses are of the network's own (uncalibrated) probabilities; p_true beside it is calibrated
                ("Top losses", losses.drop(columns=["index"]).rename(columns={"loss": "loss (uncalibrated)"})
                 .to_dict("records")),
                ("Most confused", [{"true": a, "predicted": b, "count": c} for a, b, c in confused])],
    )


SUMMARY_COLUMNS = ("n", "mean_share_inside", "mean_share_outside", "mean_area_inside", "lung_preference",
                   "mean_share_border", "mean_share_marker", "n_with_marker")


def summary_rows(summary: dict) -> list[dict]:
    """The audit summary as table rows: one per predicted class, then all images."""
    groups = [*summary["by_class"].items(), ("all images", summary["overall"])]
    return [{"predicted": name, **{k: stats.get(k) for k in SUMMARY_COLUMNS}} for name, stats in groups]


def deletion_check(run: Run, items, probs, indices, fill: torch.Tensor, maps: dict[int, np.ndarray],
                   done: Callable[[], None] = lambda: None) -> dict:
    """Deletion curves of the images `indices`, averaged, with the predicted-class occlusion maps the audit already
    made (`maps`, by index: 8 maps made again would cost up to minutes on a CPU); `done` is called after each curve."""
    curves = []
    for i in indices:
        x = run.load_input(image_column(items.iloc[[i]]).iloc[0])
        attr = torch.from_numpy(maps[i])
        curves.append(audit.deletion_curve(run.model, x, attr, int(probs[i].argmax()), baseline=fill))
        done()
    if not curves:
        raise CxrFastError("no images to run the deletion check on")
    keys = ("attributed_curve", "random_curve")
    mean = {k: np.mean([np.asarray(c[k]) for c in curves], axis=0) for k in keys}
    return {"fractions": np.asarray(curves[0]["fractions"]), **mean,
            "attributed_auc": float(np.mean([c["attributed_auc"] for c in curves])),
            "random_auc": float(np.mean([c["random_auc"] for c in curves])), "images": len(curves)}
