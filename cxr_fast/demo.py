"""`cxrfast demo`: the whole product on the synthetic phantoms, ending with a report on disk.

synth → prepare → train (recipes/demo.yaml) → evaluate → interpret → DIR/report.html.

The phantoms carry a planted shortcut on some images (a corner text marker that gives the class away) so a
newcomer sees the shortcut audit at work: it should report evidence taken from outside the lungs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from pathlib import Path, PurePath
from urllib.parse import quote

from rich.console import Console
from rich.markup import escape

from cxr_fast import CLASSES
from cxr_fast.data.split import DEFAULT_FRACTIONS
from cxr_fast.errors import CxrFastError
from cxr_fast.outputs import check_folder_path, clear_run_folder, write_text, writing

DEMO_SHORTCUT_RATE = 0.5
DEMO_ENTRIES = {"phantoms", "data", "models", "report.html"}  # all a demo writes in its folder
# a file browser's, or the work files and locks of a demo killed outright (phantoms, data, report): not the user's
DEMO_LITTER = {".DS_Store", "Thumbs.db", ".phantoms.partial", ".phantoms.lock", ".data.lock", ".report.html.partial"}


def run_demo(out: str | Path, *, n_per_class: int = 80, shortcut_rate: float = DEMO_SHORTCUT_RATE,
             epochs: int | None = None, force: bool = False, console: Console | None = None) -> Path:
    from cxr_fast.config import resolve_config

    console = console or Console()
    cfg = resolve_config("demo", epochs=epochs)
    # The train split (prepare's default share of each class) must fill one batch: fastai drops an incomplete last
    # batch, so fewer images would leave an epoch with no step. Checked before anything is written.
    train_share = DEFAULT_FRACTIONS[0]
    least = math.ceil(math.ceil(cfg.bs / len(CLASSES)) / train_share)
    if n_per_class < least:
        raise CxrFastError(f"--n-per-class must be at least {least} (got {n_per_class}): the demo trains in batches "
                           f"of {cfg.bs} on {train_share:.0%} of the phantoms")
    out = Path(out).absolute()
    with writing(out):  # a second demo here refuses: it used to take this one for a killed demo's and clear it
        check_folder_path(out, "--out")
        earlier = out.with_name(f".{out.name}.old")  # an earlier demo, kept until the new one is complete
        if earlier.exists():  # a replacement killed outright: report.html, written last and whole, says how far it got
            if (out / "report.html").is_file():
                shutil.rmtree(earlier)
            else:
                shutil.rmtree(out, ignore_errors=True)
                earlier.rename(out)
        if unfinished_demo(out):  # a first demo killed outright (no cleanup ran): nothing in it was finished
            console.print(f"[yellow]{escape(str(out))}: an unfinished demo (no report.html); starting it again[/]")
            clear_run_folder(out, keep=True)
        # a demo stopped in its first step holds only the phantoms' hidden work folder: no demo yet, nothing to replace
        if out.exists() and any(p.name not in DEMO_LITTER for p in out.iterdir()):
            if not force:
                raise CxrFastError(f"{out}: already exists; choose another --out or add --force to replace it")
            # --force replaces the folder: only one that an earlier demo wrote, never a mistyped home or data folder
            foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES | DEMO_LITTER)
            if foreign or not (out / "phantoms").is_dir():
                held = f"it holds {', '.join(foreign[:3])}" if foreign else "it has no phantoms/ folder"
                raise CxrFastError(f"{out}: not a demo folder ({held}); --force replaces only an earlier demo's folder")
            if out == Path.cwd():
                raise CxrFastError(f"{out}: the current folder; --force cannot set it aside, give --out a folder below it")
            shutil.rmtree(earlier, ignore_errors=True)
            out.rename(earlier)
        existed = out.exists()  # empty but for litter, or the current folder: emptied on failure, not removed
        try:
            path = _run_steps(out, cfg, n_per_class, shortcut_rate, console)
        except BaseException as e:  # Ctrl-C or a failure: the half-made demo goes, and the earlier one comes back whole
            if earlier.exists():
                shutil.rmtree(out, ignore_errors=True)
                earlier.rename(out)
                kept = f"the earlier demo in {out} is as it was"
            else:  # left, it would block the same command, and its checkpoint would invite a `train --resume`
                clear_run_folder(out, keep=existed)
                kept = f"what it had made in {out} was removed, so the same command starts it again"
            if isinstance(e, KeyboardInterrupt):  # training's own message would name a run folder that is gone now
                raise KeyboardInterrupt(f"demo interrupted; {kept}") from None
            raise
        shutil.rmtree(earlier, ignore_errors=True)
        return path


def unfinished_demo(out: Path) -> bool:
    """Whether `out` is what a first demo killed before its report leaves: the synthetic phantoms (synth's own
    _meta.csv or _unfinished.txt marks them), at most the demo's other folders, and no report.html."""
    from cxr_fast.data.synth import UNFINISHED

    if not (out / "phantoms").is_dir() or (out / "report.html").exists():
        return False
    if any(p.name not in DEMO_ENTRIES | DEMO_LITTER for p in out.iterdir()):
        return False
    return any((out / "phantoms" / name).is_file() for name in ("_meta.csv", UNFINISHED))


def _run_steps(out: Path, cfg, n_per_class: int, shortcut_rate: float, console: Console) -> Path:
    from cxr_fast.data.manifest import prepare, print_summary
    from cxr_fast.data.synth import synthesize
    from cxr_fast.evaluate import evaluate, metrics_table
    from cxr_fast.interpret import interpret
    from cxr_fast.train import run_summary, train

    console.rule("1/5 synthetic phantoms")
    synthesize(out / "phantoms", n_per_class=n_per_class, size=256, shortcut_rate=shortcut_rate, seed=0)
    console.rule("2/5 prepare: checks, duplicates, split manifest")
    report = prepare(out / "phantoms", out / "data", cache_size=0)
    print_summary(report, console)
    console.rule("3/5 train (recipes/demo.yaml)")
    run_dir = train(out / "data", cfg, out=out / "models" / "demo")
    console.print(run_summary(run_dir))
    console.rule("4/5 evaluate on the test split")
    # on the GPU when there is one, as training was: the 48 occlusion maps took minutes on a GPU machine's CPU
    evaluation = evaluate(run_dir, device="auto")
    console.print(metrics_table(evaluation.metrics))
    console.rule("5/5 interpret: top losses, occlusion maps, shortcut audit")
    interpretation = interpret(run_dir, n=12, audit_n=45, device="auto")
    for line in interpretation.verdicts:
        console.print(f"[bold]audit:[/] {escape(line)}")
    path = write_demo_report(out, run_dir, evaluation, interpretation, shortcut_rate)
    console.print(f"report: [bold]{escape(str(path))}[/]")
    return path


def relative_link(root: PurePath, path: PurePath) -> str:
    """`path` as a link from a page in `root`: forward slashes on every OS (a browser reads a backslash as part of
    the name), and URL-quoted (a space or `#` in a folder name would break the link)."""
    return quote(path.relative_to(root).as_posix())


def write_demo_report(out: Path, run_dir: Path, evaluation, interpretation, shortcut_rate: float) -> Path:
    from cxr_fast.evaluate import calibration_worse, marker_text
    from cxr_fast.report import DISCLAIMER

    m = evaluation.metrics
    train_metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    rel = lambda p: html.escape(relative_link(out, p))  # noqa: E731
    verdicts = "".join(f"<li>{html.escape(v)}</li>" for v in interpretation.verdicts)
    lo, hi = m["balanced_accuracy_ci"]
    curves = base64.b64encode((run_dir / "curves.png").read_bytes()).decode()  # embedded: the page travels alone
    marker_line = f"<li>{html.escape(marker_text(m['by_marker']))}</li>" if "by_marker" in m else ""
    calibration_line = html.escape(
        f"expected calibration error {m['ece']:.3f} (the valid split gave too few mistakes to fit a temperature, so "
        "none was applied)" if m["temperature"] == 1.0 else
        f"expected calibration error {m['ece']:.3f} raw, {m['ece_calibrated']:.3f} after temperature scaling"
        + (" (worse: see the full report)" if calibration_worse(m) else ""))
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>cxr_fast demo</title>
<style>body{{font-family:system-ui,sans-serif;max-width:860px;margin:auto;padding:12px}}img{{width:100%}}</style></head>
<body><h1>cxr_fast demo</h1><p><em>{html.escape(DISCLAIMER)}</em></p>
<p>Synthetic phantoms (not real X-rays), {shortcut_rate:.0%} of them carrying a planted corner text marker that
gives the class away, were checked and split, then <code>{html.escape(run_dir.name)}</code> was trained
({train_metrics['epochs']} epochs, {train_metrics['train_seconds']:.0f} s on this CPU).</p>
<h2>Test results ({m['n']} images)</h2><ul>
<li>balanced accuracy {m['balanced_accuracy']:.3f} (95 % CI {lo:.3f}–{hi:.3f}), accuracy {m['accuracy']:.3f},
macro F1 {m['macro_f1']:.3f}</li>
{marker_line}<li>{calibration_line}</li></ul>
<p><a href="{rel(evaluation.out_dir / 'report.html')}">Full evaluation report</a></p>
<h2>Shortcut audit</h2><ul>{verdicts}</ul>
<p><a href="{rel(interpretation.out_dir / 'gallery.html')}">Occlusion gallery and audit</a></p>
<h2>Training curves</h2><img src="data:image/png;base64,{curves}"
alt="Training curves of {html.escape(run_dir.name)}: loss and accuracy by epoch, the best epoch marked">
</body></html>"""
    path = out / "report.html"
    write_text(path, page)  # whole or not at all: its presence is what marks a demo complete
    return path
