"""`cxrfast predict`: a trained run on new X-ray files → calibrated class probabilities, optionally heatmaps.

Inputs are files or folders (walked recursively for image files). A file that cannot be read as an X-ray is
listed with the reason and skipped; the others are still predicted. Probabilities are calibrated with the run's
temperature, as in `cxrfast evaluate`'s predictions.csv: exactly so for images no larger than the manifest's cache
(`data prepare --size`), whose shrunk copies training and evaluation read; for larger ones predict reads the file
itself, and the model's input differs by a few grey levels.

A colour image (a photo, a chart, a colour-map figure) is read as grey and predicted like a film, with a warning in
its row (`cxr_fast.data.io.colour_warning`): the probabilities of such an image say nothing about a radiograph. So is
an inverted (negative) film (`cxr_fast.data.inversion.inverted_warning`); `image_warning` joins the two, for predict
and serve alike.

Two runtimes give the same probabilities: "torch" runs the bundle's PyTorch model; "onnx" runs the export made by
`cxrfast export` with ONNX Runtime and, without heatmaps, never imports torch (a much faster start).

Heatmaps: one occlusion map per image for its predicted class, with the black baseline `cxrfast interpret`
uses, drawn like interpret's gallery. They go into `<out stem>_heatmaps/` next to the results file, or into
`./heatmaps` without one, and never replace an existing file: a name already taken gets a numeric suffix
(`x_heatmap.png`, `x_heatmap-2.png`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr_fast.calibration import softmax
from cxr_fast.data.inversion import inverted_warning, upright_correlation
from cxr_fast.data.io import ImageReadError, colour_warning, image_stem, read_image_and_colour
from cxr_fast.errors import CxrFastError
from cxr_fast.outputs import check_folder_path, csv_text, printable, short_stem, write_text, writing

RUNTIMES = ("torch", "onnx")
OUT_SUFFIXES = (".csv", ".json")
# Files in a folder named as these are notes, not films: passed over without a word (every other file is read).
DOCUMENT_SUFFIXES = frozenset({".txt", ".csv", ".tsv", ".json", ".xml", ".yaml", ".yml", ".md", ".html", ".htm",
                               ".pdf", ".doc", ".docx", ".rtf", ".odt", ".xls", ".xlsx", ".ods", ".log", ".ini"})


# ---------------------------------------------------------------------------------------------- runners


class TorchRunner:
    """A run bundle's PyTorch model behind the interface `cxr_fast.export.OnnxRunner` also has."""

    runtime = "torch"

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        from cxr_fast.bundle import load_run

        self.run = load_run(run_dir, device=device)
        self.path = self.run.path

    name = property(lambda self: self.run.name)
    arch = property(lambda self: self.run.config["model"]["arch"])
    classes = property(lambda self: self.run.classes)
    size = property(lambda self: self.run.size)
    n_in = property(lambda self: self.run.n_in)
    mean = property(lambda self: list(self.run.config["mean"]))
    std = property(lambda self: list(self.run.config["std"]))
    temperature = property(lambda self: self.run.temperature)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.run.device)
            return self.run.model(x).float().cpu().numpy()

    def torch_module(self):
        return self.run.model


def load_runner(run_dir: str | Path, runtime: str = "torch", device: str = "cpu"):
    """The model of `run_dir` for `runtime`; `device` (`cxr_fast.bundle.inference_device`) for the torch one."""
    if runtime not in RUNTIMES:
        raise CxrFastError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "onnx":
        # spelt as inference_device takes it (" CPU "); ONNX Runtime's GPU build and its providers: not tried
        if str(device).strip().lower() not in ("cpu", "auto"):
            raise CxrFastError(f"--device {device} applies to --runtime torch; the ONNX runtime runs on the CPU")
        from cxr_fast.export import OnnxRunner

        return OnnxRunner(run_dir)
    return TorchRunner(run_dir, device)


# ---------------------------------------------------------------------------------------------- one image


def image_warning(colour: float, upright: float) -> str | None:
    """Why an image looks like no upright grey chest film, from its share of coloured pixels (`colour_share`) and its
    `upright_correlation`: colour, inverted, or both joined by " | "; None for neither. predict, serve and evaluate
    (from prepare's manifest columns) say the same."""
    found = [w for w in (colour_warning(colour), inverted_warning(upright)) if w is not None]
    return " | ".join(found) if found else None


def model_image(image: Image.Image, size: int) -> np.ndarray:
    """The image as the model sees it: squished to size×size (bilinear), uint8 [size, size]."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def model_input(pixels: np.ndarray, n_in: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [H, W] → normalised float32 [n_in, H, W].

    The recipe of preprocessing.json in numpy, so the ONNX runtime needs no torch; tests pin it to
    `cxr_fast.preprocess.load_input`, the path used in training and evaluation."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return (np.broadcast_to(x, (n_in, *x.shape)) - m) / s


def black_baseline(mean, std) -> np.ndarray:
    """Black in the model's normalised units, per channel ([n_in, 1, 1]): an X-ray's background, so occluding
    empty air changes nothing (see `cxr_fast.interpret.baseline_value`, which uses it too)."""
    return np.array([-m / s for m, s in zip(mean, std, strict=True)], dtype=np.float32).reshape(-1, 1, 1)


def occlusion_map(runner, x: np.ndarray, target: int) -> np.ndarray:
    """Occlusion map [H, W] (logit units) for class `target` of one normalised input [n_in, H, W]."""
    import torch

    from cxr_fast.attribution import occlusion_maps

    maps = occlusion_maps(runner.torch_module(), torch.from_numpy(np.ascontiguousarray(x)),
                          baseline=torch.from_numpy(black_baseline(runner.mean, runner.std)), targets=[target])
    return maps[0].numpy()


def heatmap_png(pixels: np.ndarray, attr: np.ndarray, title: str, label: str) -> bytes:
    """The X-ray beside the map blended over it, with a signed colour bar (interpret's gallery figure)."""
    from cxr_fast import gallery
    from cxr_fast.report import png_bytes

    return png_bytes(gallery.attribution_figure(pixels, {label: attr}, title))


def overlay_png(pixels: np.ndarray, attr: np.ndarray) -> bytes:
    """Just the map blended over the image at the model's size (red: evidence for the class; blue: against)."""
    import io

    from cxr_fast.attribution import overlay_rgb

    buffer = io.BytesIO()
    Image.fromarray(overlay_rgb(pixels, attr)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- files


def find_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Named files as given, plus the files found in named folders; the reader decides by content what is an image.

    Folders are walked as `cxrfast data prepare` walks them (`cxr_fast.data.sources`: linked folders followed,
    "."-files and "_"-folders passed over, such as synthetic data's `_masks`), and every file found is read as
    prepare reads it, whatever its name: films come as `.jfif`, `.webp`, `IMG.006` or a UID, and one passed over
    by its name would vanish without a word. Only files named as documents (`DOCUMENT_SUFFIXES`: notes,
    spreadsheets, reports) are passed over, and so are the heatmap folders predict itself writes (`heatmaps`,
    `<name>_heatmaps`), whose figures are not X-rays; anything else that is no image is listed as skipped, with
    its reason. The same file named twice is predicted once. Returns (files, skipped) where skipped lists
    (path, reason)."""
    from cxr_fast.data.sources import find_images as walk_folder

    files, skipped = [], []
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            files.append(path)  # a missing file is reported by read_image, with the other unreadable ones
            continue
        found = [f.path for f in walk_folder(path)
                 if not any(is_heatmap_folder(part) for part in f.path.relative_to(path).parts[:-1])
                 and f.path.suffix.lower() not in DOCUMENT_SUFFIXES]
        if not found:
            skipped.append((path, "no image files in this folder"))
        files += found
    unique = list({f.resolve(): f for f in files}.values())
    return unique, skipped


def is_heatmap_folder(name: str) -> bool:
    return name == "heatmaps" or name.endswith("_heatmaps")


def unique_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """A free name in `folder`: stem.png, stem-2.png, stem-3.png, ..."""
    candidate, n = folder / f"{stem}{suffix}", 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}{suffix}"
    return candidate


def write_new_file(folder: Path, stem: str, data: bytes) -> Path:
    """Write `data` under a name nobody has taken; exclusive creation, so not even a race can overwrite."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = unique_path(folder, stem)
        try:
            f = open(path, "xb")
        except FileExistsError:
            continue
        try:
            with f:
                f.write(data)
        except BaseException as e:  # a full disk, Ctrl-C: no half-written figure left to pass for a whole one
            path.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(path)
            raise
        return path


def heatmap_folder(out: Path | None) -> Path:
    return out.parent / f"{out.stem}_heatmaps" if out is not None else Path("heatmaps")


def check_out(out: Path | None, force: bool, heatmap: bool = False) -> None:
    """Refuse an --out the results (or heatmaps) could not be written to, before any prediction is made."""
    if heatmap:
        check_folder_path(heatmap_folder(out), "--out (its heatmaps go beside it)")
    if out is None:
        return
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise CxrFastError(f"{out}: --out must end in .csv or .json")
    if out.is_dir():
        raise CxrFastError(f"{out}: is a folder; --out names the results file")
    if out.exists() and not force:
        raise CxrFastError(f"{out}: already exists; add --force to replace it")
    check_folder_path(out.parent, "--out")


def write_results(out: Path, results: pd.DataFrame, skipped: list[tuple[Path, str]], runner) -> None:
    """CSV: one row per input, skipped ones with an empty prediction and the reason in `error`.
    JSON: {"model", "predictions", "skipped"}; a grey image's `warning` is null there, as `cxrfast serve` answers it
    (the CSV's empty cell)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        predictions = [{**row, "warning": row["warning"] or None} for row in results.to_dict("records")]
        document = {"model": model_summary(runner), "predictions": predictions,
                    "skipped": [{"path": printable(p), "reason": r} for p, r in skipped]}
        write_text(out, json.dumps(document, indent=2))
    else:
        errors = pd.DataFrame({"path": [printable(p) for p, _ in skipped], "error": [r for _, r in skipped]})
        write_text(out, csv_text(pd.concat([results.assign(error=""), errors], ignore_index=True)))


def model_summary(runner) -> dict:
    return {"name": runner.name, "arch": runner.arch, "runtime": runner.runtime, "classes": runner.classes,
            "size": runner.size, "temperature": runner.temperature}


def predict(run_dir: str | Path, inputs: Sequence[str | Path], heatmap: bool = False, out: str | Path | None = None,
            runtime: str = "torch", *, device: str = "cpu", force: bool = False, bs: int = 32, progress: bool = True,
            runner=None) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Predict every readable image among `inputs` (files or folders).

    Returns (results, skipped): results has columns path, predicted, p_<class> (calibrated), warning (empty, or
    why the image looks like no radiograph) and, with `heatmap`, the heatmap file; skipped lists (path, reason)
    for inputs that could not be read. With `out` (.csv or .json) the results are also written there; an existing
    file is refused unless `force`. `device`: where the torch runtime's model runs (`cxr_fast.bundle.inference_device`).
    `runner` (a loaded TorchRunner/OnnxRunner) replaces `run_dir`/`runtime`/`device` for repeated calls.
    """
    from cxr_fast.progress import progress_bar

    if not inputs:
        raise CxrFastError("give at least one image file or folder to predict")
    out = Path(out) if out is not None else None
    with writing(out) if out is not None else nullcontext():  # one predict at a time writes a results file
        check_out(out, force, heatmap)
        runner = runner if runner is not None else load_runner(run_dir, runtime, device)
        files, skipped = find_images(inputs)
        classes, size = runner.classes, runner.size
        heatmaps_dir = heatmap_folder(out)

        rows, pending = [], []

        def flush():
            probs = softmax(runner.logits(np.stack([x for _, _, x, _ in pending])), runner.temperature)
            for (file, pixels, x, warning), p in zip(pending, probs):
                k = int(p.argmax())
                row = {"path": printable(file), "predicted": classes[k], **{f"p_{c}": float(v) for c, v in zip(classes, p)},
                       "warning": warning or ""}
                if heatmap:
                    attr = occlusion_map(runner, x, k)
                    title = f"{printable(file.name)}: predicted {classes[k]} (p={p[k]:.2f}) — research tool, not a diagnosis"
                    png = heatmap_png(pixels, attr, title, f"occlusion → {classes[k]}")
                    row["heatmap"] = printable(write_new_file(heatmaps_dir, f"{short_stem(image_stem(file))}_heatmap", png))
                rows.append(row)
                bar.advance(task)
            pending.clear()

        with progress_bar(progress) as bar:
            task = bar.add_task(f"predicting {len(files)} image{'s' if len(files) != 1 else ''}", total=len(files))
            try:
                for file in files:
                    try:
                        image, colour = read_image_and_colour(file)
                    except ImageReadError as e:
                        skipped.append((file, f"{e.reason}: {e.explanation}"))
                        bar.advance(task)
                        continue
                    pixels = model_image(image, size)
                    pending.append((file, pixels, model_input(pixels, runner.n_in, runner.mean, runner.std),
                                    image_warning(colour, upright_correlation(image))))
                    if len(pending) == bs:
                        flush()
                if pending:
                    flush()
            except KeyboardInterrupt:  # say what became of the work: an earlier --out is untouched, heatmaps stay
                kept = f"; the heatmaps made so far are in {heatmaps_dir}" if heatmap and rows else ""
                untouched = f"; {out} was not written" if out is not None else ""
                raise KeyboardInterrupt(f"interrupted after {len(rows)} of {len(files)} images{untouched}{kept}") from None

        columns = ["path", "predicted", *[f"p_{c}" for c in classes], "warning", *(["heatmap"] if heatmap else [])]
        results = pd.DataFrame(rows, columns=columns)
        if out is not None and not results.empty:  # a run that predicted nothing must not replace earlier results
            write_results(out, results, skipped, runner)
        return results, skipped
