"""`cxrfast`: thin Typer commands over the Python API.

Every command calls one library function. A `CxrFastError` (a problem with the user's input) or a storage error (a
full disk, a read-only folder) becomes one line on stderr and exit code 1, Ctrl-C one line and exit code 130;
Typer itself answers a malformed command line (a missing option, a value of the wrong type) with exit code 2;
anything else is a bug and keeps its traceback. CXRFAST_TRACEBACK=1 keeps the traceback of the one-line errors too
(a storage error may be a bug reading a file that should be there).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from cxr_fast.cli_predict import DEVICE_HELP
from cxr_fast.config import TrainConfig
from cxr_fast.errors import CxrFastError, storage_problem
from cxr_fast.memory import keep_freed_memory
from cxr_fast.progress import loading_libraries

# A warning is for the user at a terminal: one line, not the source line that raised it.
warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
# Each command is one process doing one job: reusing freed memory makes training ~1.4x faster on a CPU (memory.py).
keep_freed_memory()
# Output redirected to a file or a pipe on Windows is in the locale's code page (cp1252, cp932), which cannot hold every
# character of a class or file name (肺炎), nor the arrows of a few lines: those are written as \u escapes rather
# than ending the command with a UnicodeEncodeError after its work was done.
for _stream in (sys.stdout, sys.stderr):
    if getattr(_stream, "errors", None) == "strict" and hasattr(_stream, "reconfigure"):
        _stream.reconfigure(errors="backslashreplace")

DEFAULTS = TrainConfig()  # shown in train's --help: an option left out takes the recipe's value, else this

app = typer.Typer(
    name="cxrfast",
    help="Train, compare and audit chest X-ray classifiers (COVID-19 / Normal / Pneumonia) on a CPU.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare X-ray folders into checked split manifests; make synthetic phantoms.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    console.soft_wrap = not console.is_terminal  # a log file gets whole lines, which grep can find; a terminal wraps
    return console


console = _console()
err_console = _console(stderr=True)




def user_errors(fn):
    """Turn a CxrFastError into `error: <message>` and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if os.environ.get("CXRFAST_TRACEBACK") == "1":  # for a developer: every error as Python raised it
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except CxrFastError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as e:
            if storage_problem(e) is None:
                raise
            # a full disk, a read-only or forbidden folder: the file and the cause, not a traceback
            err_console.print(f"[bold red]error:[/] {escape(storage_problem(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:  # say so, rather than exit silently; training says what it kept, and how on
            err_console.print(f"[bold yellow]{escape(str(e) or 'interrupted')}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None  # the shell's code for Ctrl-C

    return wrapper


# ---------------------------------------------------------------------------------------------- data


@data_app.command("prepare")
@user_errors
def data_prepare(
    src: Annotated[Path, typer.Argument(help="Folder of X-rays in class folders (ROOT/<class>/… or ROOT/<split>/<class>/…).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for manifest.csv, prepare_report.json and the image cache.")],
    label_map: Annotated[str | None, typer.Option(help="YAML/JSON file, inline 'A=B,C=D', or preset 'mendeley'.")] = None,
    ignore_unmapped: Annotated[bool, typer.Option(help="Exclude folders the label map does not name instead of failing.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the stratified split.")] = 0,
    splits: Annotated[str | None, typer.Option(help="Train,valid,test fractions: 0.6,0.2,0.2 unless given (percentages work too: 60,20,20).")] = None,
    size: Annotated[int, typer.Option("--size", help="Longest side of the cached working copies: 0 (no cache) or at least 64. About 2× the training size.")] = 512,
    patient_pattern: Annotated[str | None, typer.Option(help="Keep each patient's images in one split: 'dicom' (PatientID in DICOM headers), 'nih' (file names like 00000061_012.png) or a regular expression whose first group is the patient id in the file name.")] = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validation: cut the images into this many equal parts (instead of --splits); --fold's part is the test split, the next part valid, the rest train.")] = None,
    fold: Annotated[int | None, typer.Option(help="With --folds: which part is the test split (0 to folds - 1). Prepare each fold into its own --out.")] = None,
    sites: Annotated[bool, typer.Option(help="SRC holds one folder per site (hospital, collection) with the class folders inside: ROOT/<site>/<class>/…; the site is kept in the manifest.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing manifest; the old one and its cached copies stay until the new one is complete.")] = False,
):
    """Read, check, de-duplicate and split a folder of X-rays into a manifest."""
    from cxr_fast.data.labels import parse_label_map
    from cxr_fast.data.manifest import prepare, print_summary

    if (folds is None) != (fold is None):
        raise CxrFastError("--folds and --fold go together: e.g. --folds 5 --fold 0 (then --fold 1, … --fold 4)")
    report = prepare(src, out, label_map=parse_label_map(label_map), ignore_unmapped=ignore_unmapped, seed=seed,
                     splits=splits, cache_size=size, patient_pattern=patient_pattern, folds=folds,
                     fold=fold or 0, sites=sites, force=force)
    print_summary(report, console)
    console.print(f"manifest: [bold]{escape(str(Path(out) / 'manifest.csv'))}[/]")


@data_app.command("synth")
@user_errors
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the phantoms into (class folders + masks).")],
    n_per_class: Annotated[int, typer.Option(help="Images per class.")] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    shortcut_rate: Annotated[float, typer.Option(help="Share of images carrying a corner marker that gives away the class.")] = 0.0,
    lesion_contrast: Annotated[float, typer.Option(help="Strength of the class signal in the lungs (1 = default).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same images.")] = 0,
    force: Annotated[bool, typer.Option(help="Write into a non-empty folder: earlier phantoms and masks are replaced, other files kept.")] = False,
):
    """Write synthetic chest X-ray phantoms with ground-truth lung and lesion masks (the default dataset)."""
    from cxr_fast.data.synth import synthesize

    meta = synthesize(out, n_per_class=n_per_class, size=size, shortcut_rate=shortcut_rate, seed=seed,
                      lesion_contrast=lesion_contrast, force=force)
    console.print(f"wrote {len(meta)} phantoms to [bold]{escape(str(out))}[/] ({int(meta['marker'].sum())} with a shortcut marker)")


# ---------------------------------------------------------------------------------------------- models


@app.command("models")
@user_errors
def models(
    pattern: Annotated[str | None, typer.Argument(help="fnmatch pattern, e.g. 'efficientnet*'.")] = None,
):
    """List architectures: cxr_fast's own first, then installed plugins', then timm's."""
    from cxr_fast.archs import list_models

    found = list_models(pattern)
    table = Table("name", "source")
    for name, source in found:
        table.add_row(name, source)
    console.print(table)
    console.print(f"{len(found)} architectures; `cxrfast train` takes those whose features are a map (cxr_fast's own and "
                  "timm's convolutional networks) and refuses token-sequence models such as vision transformers")


@app.command("train")
@user_errors
def train(
    data: Annotated[Path, typer.Option(help="Folder with manifest.csv (from `cxrfast data prepare`).")],
    arch: Annotated[str | None, typer.Option(help=f"Architecture: convnet, cxresnet, frozen_lite (frozen ImageNet features + a fitted regression), or any convolutional timm name (default {DEFAULTS.arch}, or the recipe's).")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe; flags given here override it.")] = None,
    epochs: Annotated[int | None, typer.Option(help=f"Epochs, after the frozen epochs when fine-tuning (default {DEFAULTS.epochs}, or the recipe's).")] = None,
    size: Annotated[int | None, typer.Option(help=f"Training image side in pixels (default {DEFAULTS.size}, or the recipe's).")] = None,
    bs: Annotated[int | None, typer.Option(help=f"Batch size (default {DEFAULTS.bs}, or the recipe's).")] = None,
    lr: Annotated[str | None, typer.Option(help=f"Peak learning rate, or 'auto' (lr_find) (default {DEFAULTS.lr:g}, or the recipe's).")] = None,
    weights: Annotated[str | None, typer.Option(help=f"none | hub | PATH | efficientnet-lite0/1/2 (default {DEFAULTS.weights}, or the recipe's).")] = None,
    n_in: Annotated[int | None, typer.Option(help=f"Input channels, 1 or 3 (default {DEFAULTS.n_in}, or the recipe's).")] = None,
    class_weights: Annotated[bool | None, typer.Option(help="Weight the loss by inverse class frequency (default off, or the recipe's).")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Random seed (default {DEFAULTS.seed}, or the recipe's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default models/<arch>-<date>-<time>).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other recipe option as KEY=VALUE, e.g. --set wd=1e-4 --set freeze_epochs=2 (repeat it).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    distributed: Annotated[bool, typer.Option(help="Data-parallel over --nproc processes on this machine (under torchrun: over its processes).")] = False,
    nproc: Annotated[int | None, typer.Option(help="With --distributed: processes to start (default: one per GPU, else 2).")] = None,
):
    """Train a classifier with a one-cycle schedule and write a run bundle (safetensors + JSON)."""
    with loading_libraries(err_console):
        from cxr_fast import distributed as ddp
        from cxr_fast.config import parse_settings, resolve_config
        from cxr_fast.train import run_summary
        from cxr_fast.train import train as train_run

    cfg = None
    options = dict(arch=arch, epochs=epochs, size=size, bs=bs, lr=lr, weights=weights, n_in=n_in,
                   class_weights=class_weights, seed=seed)
    settings = parse_settings(set_)
    both = sorted(key for key in settings if options.get(key) is not None)
    if both:
        raise CxrFastError(f"{', '.join(both)} given both as a flag and with --set; give each once")
    if not resume:
        cfg = resolve_config(recipe, **{**settings, **{k: v for k, v in options.items() if v is not None}})
    else:  # the checkpoint holds the run's settings; say so rather than silently drop what was typed
        ignored = [f"--{k.replace('_', '-')}" for k, v in {**options, "recipe": recipe, "set": set_}.items()
                   if v not in (None, [])]
        if ignored:
            err_console.print(f"[yellow]--resume continues with the run's own settings; ignored: {', '.join(ignored)}[/]",
                              highlight=False, soft_wrap=True)
    processes = _processes(distributed, nproc)
    if processes and not ddp.is_distributed():
        run_dir = ddp.launch_training(processes, data, cfg, out=out, resume=resume)
    else:  # one process, or one of torchrun's (train() reads its environment)
        run_dir = train_run(data, cfg, out=out, resume=resume)  # Ctrl-C: user_errors prints how to resume
    if ddp.is_main():
        console.print(run_summary(run_dir))


def _processes(distributed: bool, nproc: int | None) -> int | None:
    """The number of training processes to launch, or None for one: --nproc only counts with --distributed, and 0
    must not quietly mean the default."""
    from cxr_fast import distributed as ddp

    if nproc is not None and not distributed:
        raise CxrFastError("--nproc applies with --distributed; add it, or leave --nproc out")
    if nproc is not None and nproc < 1:
        raise CxrFastError(f"--nproc must be at least 1, got {nproc}")
    return (nproc or ddp.default_nproc()) if distributed else None


@app.command("ensemble")
@user_errors
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders trained on the same manifest.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the new bundle (default models/ensemble-<date>-<time>).")] = None,
):
    """Average run bundles' calibrated probabilities into one bundle that every other command takes as a model."""
    with loading_libraries(err_console):
        from cxr_fast.ensemble import build_ensemble, ensemble_summary

    summary, note = ensemble_summary(build_ensemble(runs, out))
    console.print(summary)
    if note:
        err_console.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


@app.command("evaluate")
@user_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder (models/<run>).")],
    data: Annotated[Path | None, typer.Option(help="Another manifest folder (or a manifest CSV): external validation on all its images except those the model learned from (and copies of them).")] = None,
    split: Annotated[str, typer.Option(help="Split of the training manifest to evaluate.")] = "test",
    tta: Annotated[bool, typer.Option(help="Average predictions over small zooms and shifts, calibrated by a temperature refitted on the valid split's TTA predictions.")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    force: Annotated[bool, typer.Option(help="Redo an existing evaluation.")] = False,
):
    """Metrics with 95 % CIs, calibration, ROC/PR curves, confusion matrix and an HTML report."""
    with loading_libraries(err_console):
        from cxr_fast.evaluate import evaluate as run_evaluation
        from cxr_fast.evaluate import (
            flagged_warning,
            metrics_table,
            seen_warning,
            shift_warning,
            tta_temperature_line,
        )

    result = run_evaluation(run, data, split, tta=tta, device=device, force=force)
    m = result.metrics
    table = metrics_table(m)
    console.print(table)
    if line := tta_temperature_line(m):
        err_console.print(f"[bold yellow]note:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if "seen_images" in m and (seen := seen_warning(m["seen_images"])):
        err_console.print(f"[bold yellow]warning:[/] {escape(seen)}")
    if result.shift and result.shift["out_of_distribution"]:
        err_console.print(f"[bold yellow]warning:[/] {escape(shift_warning(result.shift))}")
    if flagged := flagged_warning(m):
        err_console.print(f"[bold yellow]warning:[/] {escape(flagged)}", highlight=False, soft_wrap=True)
    if "skipped" in m.get("shift", {}):
        err_console.print(f"[bold yellow]warning:[/] distribution-shift check skipped: {escape(m['shift']['skipped'])}")
    console.print(f"report: [bold]{escape(str(result.out_dir / 'report.html'))}[/]")


@app.command("compare")
@user_errors
def compare(
    runs: Annotated[list[Path] | None, typer.Argument(help="Existing runs on the same manifest.")] = None,
    data: Annotated[Path | None, typer.Option(help="Manifest folder: train --archs on it first.")] = None,
    archs: Annotated[str | None, typer.Option(help="Comma-separated architectures to train and compare.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe shared by all architectures.")] = None,
    recipes: Annotated[str | None, typer.Option(help="Comma-separated recipes (names in recipes/ or files), each trained as it says.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds, e.g. 0,1,2 (default 0).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epoch budget for every architecture.")] = None,
    size: Annotated[int | None, typer.Option(help="Image size for every architecture.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default models/compare-<date>-<time>).")] = None,
    distributed: Annotated[bool, typer.Option(help="Train each run data-parallel over --nproc processes, one run after another.")] = False,
    nproc: Annotated[int | None, typer.Option(help="With --distributed: processes per run (default: one per GPU, else 2).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted comparison in --out: keep its finished runs, resume the interrupted one.")] = False,
):
    """Compare architectures on one test split: balanced accuracy with CI, F1, AUC, ECE, size, speed, McNemar."""
    with loading_libraries(err_console):
        from cxr_fast.compare import compare_archs, compare_runs

    if (distributed or nproc is not None) and not (archs or recipes):
        raise CxrFastError("--distributed/--nproc apply to training: give --archs or --recipes with --data")

    if archs or recipes:
        if data is None:
            raise CxrFastError("--archs/--recipes need --data (the manifest to train on)")
        if runs:
            raise CxrFastError("give existing runs, or --archs/--recipes to train new ones, not both")
        try:
            seed_list = [int(s) for s in (seeds or "0").split(",")]
        except ValueError:
            raise CxrFastError(f"--seeds must be integers like 0,1,2, got {seeds!r}") from None
        result = compare_archs(data, _names(archs), recipe=recipe, recipes=_names(recipes), seeds=seed_list,
                               out=out, epochs=epochs, size=size,
                               nproc=_processes(distributed, nproc), resume=resume)
    else:
        # these steer training: with existing runs they would be dropped, and the table would not be what was asked
        training_only = [flag for flag, value in (("--data", data), ("--recipe", recipe), ("--epochs", epochs),
                                                  ("--size", size), ("--seeds", seeds), ("--resume", resume or None))
                         if value is not None]
        if training_only:
            raise CxrFastError(f"{', '.join(training_only)} apply to --archs/--recipes, which train new runs; existing "
                               "runs are compared on their own test split (for another dataset, evaluate each run with "
                               "`cxrfast evaluate RUN --data D`)")
        result = compare_runs(runs or [], out=out)
    # One column per architecture and a row per figure: fits an 80-column terminal for a handful of models.
    rows = list(result.summary.itertuples())
    table = Table("", *(Column(escape(r.arch), overflow="fold") for r in rows), title=f"{result.split} split")
    several = any(r.runs > 1 for r in rows)  # then each figure is a mean over an architecture's runs, as the report says
    for label, cell in [
        ("runs", lambda r: str(r.runs)),
        ("balanced acc.", lambda r: f"{r.balanced_accuracy:.3f}" + (f" ± {r.balanced_accuracy_sd:.3f}" if r.runs > 1 else "")),
        ("  mean 95 % CI" if several else "  95 % CI", lambda r: f"{r.ci_low:.3f}–{r.ci_high:.3f}"),
        ("macro F1", lambda r: f"{r.macro_f1:.3f}"),
        ("macro AUC", lambda r: f"{r.macro_roc_auc:.3f}"),
        ("ECE (calibrated)", lambda r: f"{r.ece:.3f}"),
        ("parameters", lambda r: f"{r.params / 1e6:.2f} M"),
        ("training s", lambda r: f"{r.train_seconds:.0f}"),
        ("inference img/s", lambda r: f"{r.images_per_s:.0f}"),
    ]:
        table.add_row(label, *(cell(r) for r in rows))
    console.print(table)
    for t in result.mcnemar.itertuples():
        console.print(f"McNemar {escape(t.model_a)} vs {escape(t.model_b)}: p = {t.p_value:.3g}")
    console.print(f"report: [bold]{escape(str(result.out_dir / 'report.html'))}[/]")


@app.command("interpret")
@user_errors
def interpret(
    run: Annotated[Path, typer.Argument(help="Run folder (models/<run>).")],
    data: Annotated[Path | None, typer.Option(help="Another manifest folder or CSV (all its images except those the model learned from).")] = None,
    split: Annotated[str, typer.Option(help="Split of the training manifest.")] = "test",
    n: Annotated[int, typer.Option(help="Top losses (and correct examples) to show.")] = 16,
    audit_n: Annotated[int, typer.Option(help="Correct predictions, stratified by class, added to the audit.")] = 48,
    methods: Annotated[str, typer.Option(help="occlusion[,integrated_gradients,gradcam]")] = "occlusion",
    window: Annotated[int | None, typer.Option(help="Occlusion window in pixels (default: image side / 8).")] = None,
    stride: Annotated[int | None, typer.Option(help="Occlusion stride in pixels (default: window / 2).")] = None,
    baseline: Annotated[str, typer.Option(help="Occluding value: black (X-ray background) or mean (dataset gray).")] = "black",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    force: Annotated[bool, typer.Option(help="Redo an existing interpretation.")] = False,
):
    """Top losses, occlusion heatmap gallery and a shortcut audit: is the model looking at the lungs?"""
    with loading_libraries(err_console):
        from cxr_fast.evaluate import seen_warning
        from cxr_fast.interpret import interpret as run_interpretation

    result = run_interpretation(run, data, split, n=n, audit_n=audit_n,
                                methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                                window=window, stride=stride, baseline=baseline, device=device, force=force)
    for line in result.verdicts:
        console.print(f"[bold]audit:[/] {escape(line)}")
    if "seen_images" in result.audit and (seen := seen_warning(result.audit["seen_images"])):
        err_console.print(f"[bold yellow]warning:[/] {escape(seen)}")
    console.print(f"gallery: [bold]{escape(str(result.out_dir / 'gallery.html'))}[/]")


@app.command("demo")
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path("demo"),
    n_per_class: Annotated[int, typer.Option(help="Phantoms per class.")] = 80,
    epochs: Annotated[int | None, typer.Option(help="Override the demo recipe's epochs.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an earlier demo's folder (only one holding nothing but phantoms/, data/, models/ and report.html).")] = False,
):
    """The whole pipeline on synthetic phantoms: synth → prepare → train → evaluate → interpret → report."""
    from cxr_fast.demo import run_demo

    run_demo(out, n_per_class=n_per_class, epochs=epochs, force=force, console=console)


from cxr_fast.cli_predict import register as _register_predict  # noqa: E402

_register_predict(app, user_errors, console, err_console)


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
