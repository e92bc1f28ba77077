"""Copy the real figures of a demo run into docs/img/, so the documentation shows pictures the code made.

    python docs/make_figures.py [DEMO_DIR] [--out docs/img]

DEMO_DIR is the folder written by `cxrfast demo --out DEMO_DIR` (default: ./demo). The script finds the run bundle
under DEMO_DIR/models/, copies its training curves, the evaluation figures of its test split and three images of the
interpretation gallery (the worst top loss; correct predictions with and without the planted marker), and redraws the deletion check from audit.json (the
gallery embeds that figure in its HTML only). Every picture the pages reference is written on every run; a missing
source is an error, never a silently stale picture.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

DOCS_IMG = Path(__file__).resolve().parent / "img"

# docs/img name <- file name inside the run bundle's folders
RUN_FIGURES = {"training-curves.png": "curves.png"}
EVAL_FIGURES = {
    "confusion-matrix.png": "confusion_matrix.png",
    "roc-curves.png": "roc_curves.png",
    "pr-curves.png": "pr_curves.png",
    "reliability.png": "reliability.png",
}


class FigureError(Exception):
    pass


def find_run(demo: Path) -> Path:
    runs = sorted(p.parent for p in (demo / "models").glob("*/config.json"))
    if not runs:
        raise FigureError(f"{demo}/models: no run bundle (run `cxrfast demo --out {demo}` first)")
    named_demo = [r for r in runs if r.name == "demo"]
    return (named_demo or runs)[0]


def find_output(run: Path, kind: str) -> Path:
    """RUN/<kind>/<data>-test (the demo's), else the only folder there."""
    folders = sorted(p for p in (run / kind).glob("*") if p.is_dir())
    test = [p for p in folders if p.name.endswith("-test")]
    if not (test or folders):
        raise FigureError(f"{run / kind}: nothing there (the demo's `{kind}` step did not finish?)")
    return (test or folders)[0]


def copy(source: Path, target: Path) -> None:
    if not source.is_file():
        raise FigureError(f"{source}: not found")
    shutil.copyfile(source, target)
    print(f"{target.name:28s} <- {source}")


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("true", "1")


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")


def gallery_images(interpret_dir: Path) -> dict[str, Path]:
    """The gallery PNGs the pages show, by docs/img name.

    `interpret` names them NNN_<image stem>.png, in gallery order (top losses first, worst first);
    audit_images.csv says which image was a top loss and whether it carries a text marker. Chosen: the worst top
    loss; the correct prediction that takes the largest share of its evidence from a marker (the planted
    shortcut at work); and the first correct prediction on an image without a marker.
    """
    with open(interpret_dir / "audit_images.csv", newline="", encoding="utf-8") as f:
        rows = {Path(r["path"]).stem: r for r in csv.DictReader(f)}
    shown = []
    for png in sorted((interpret_dir / "images").glob("*.png")):
        stem = png.stem.split("_", 1)[1] if "_" in png.stem else png.stem
        if stem in rows:
            shown.append((png, rows[stem]))
    top_losses = [png for png, r in shown if _truthy(r["top_loss"])]
    correct = [(png, r) for png, r in shown if not _truthy(r["top_loss"]) and _truthy(r["correct"])]
    with_marker = sorted((p for p in correct if _truthy(p[1]["has_marker"])),
                         key=lambda p: -_number(p[1]["share_marker"]))
    without_marker = [p for p in correct if not _truthy(p[1]["has_marker"])]
    if not top_losses or not with_marker or not without_marker:
        raise FigureError(
            f"{interpret_dir}/images: need a top loss and correct predictions with and without a text marker "
            f"(found {len(top_losses)} top losses, {len(with_marker)} with a marker, {len(without_marker)} without)"
        )
    return {
        "gallery-top-loss-1.png": top_losses[0],
        "gallery-marker.png": with_marker[0][0],
        "gallery-no-marker.png": without_marker[0][0],
    }


def draw_deletion(interpret_dir: Path, target: Path) -> None:
    from cxr_fast.gallery import deletion_figure
    from cxr_fast.report import png_bytes

    report = json.loads((interpret_dir / "audit.json").read_text(encoding="utf-8"))
    curves = {k: np.asarray(v) if isinstance(v, list) else v for k, v in report["deletion"].items()}
    target.write_bytes(png_bytes(deletion_figure(curves)))
    print(f"{target.name:28s} <- {interpret_dir / 'audit.json'} (redrawn)")


def make_figures(demo: Path, out: Path = DOCS_IMG) -> list[Path]:
    demo = Path(demo)
    out.mkdir(parents=True, exist_ok=True)
    run = find_run(demo)
    for name, source in RUN_FIGURES.items():
        copy(run / source, out / name)
    eval_dir = find_output(run, "eval")
    for name, source in EVAL_FIGURES.items():
        copy(eval_dir / source, out / name)
    interpret_dir = find_output(run, "interpret")
    for name, png in gallery_images(interpret_dir).items():
        copy(png, out / name)
    draw_deletion(interpret_dir, out / "deletion.png")
    return sorted(out.glob("*.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", nargs="?", default="demo", type=Path, help="folder made by `cxrfast demo --out`")
    parser.add_argument("--out", type=Path, default=DOCS_IMG, help="where the pictures go (default docs/img)")
    args = parser.parse_args(argv)
    try:
        make_figures(args.demo, args.out)
    except FigureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
