"""`cxrfast predict`, `cxrfast export` and `cxrfast serve`: using a trained model.

Kept apart from `cli.py` so that module stays short; `register(app)` adds the commands to the main app. The
helpers of `cli.py` (`user_errors`, the consoles) are passed in, or imported lazily when not, which avoids a
circular import at load time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table

from cxr_fast.progress import loading_libraries

MAX_ROWS_SHOWN = 30  # a folder of thousands of files belongs in --out, not on the terminal
DEVICE_HELP = ("Where the model runs: cpu (the default: the same numbers on every machine), cuda, cuda:N, or auto "
               "(the GPU when torch sees one).")


def display_names(paths: list[str]) -> list[str]:
    """File names for the table, or paths below the files' common folder where two names are the same: PACS
    exports reuse names such as IMG0001 in every series folder."""
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    resolved = [Path(p).resolve() for p in paths]
    root = os.path.commonpath([p.parent for p in resolved])
    return [os.path.relpath(p, root) for p in resolved]


def register(app: typer.Typer, user_errors, console, err_console) -> None:
    """Add predict, serve and export to `app`, with the main CLI's error wrapper and consoles (passed in: this module
    cannot import cli, which imports it)."""

    @app.command("predict")
    @user_errors
    def predict(
        run: Annotated[Path, typer.Argument(help="Run folder (models/<run>).")],
        inputs: Annotated[list[Path], typer.Argument(help="X-ray files (PNG/JPEG/DICOM) or folders, searched recursively.")],
        heatmap: Annotated[bool, typer.Option(help="Also write an occlusion heatmap PNG per image (slow: 10-60 s per image at 224 px on a CPU).")] = False,
        out: Annotated[Path | None, typer.Option(help="Write the results to FILE.csv or FILE.json (heatmaps go to FILE_heatmaps/).")] = None,
        runtime: Annotated[str, typer.Option(help="torch, or onnx (needs `cxrfast export RUN` first; starts faster).")] = "torch",
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
        force: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    ):
        """Calibrated class probabilities for new X-rays; unreadable files skipped, colour images and negative films flagged."""
        from cxr_fast.errors import CxrFastError
        from cxr_fast.outputs import printable

        with loading_libraries(err_console, torch=runtime == "torch"):  # the onnx runtime needs no torch
            from cxr_fast.predict import predict as run_prediction

        results, skipped = run_prediction(run, inputs, heatmap=heatmap, out=out, runtime=runtime, device=device,
                                            force=force)
        if not results.empty:
            prob_columns = [c for c in results.columns if c.startswith("p_")]
            # a long name wraps rather than losing its end, which tells UID-named files apart
            table = Table(Column("file", overflow="fold"), "predicted", *[c[2:] for c in prob_columns], *(["heatmap"] if heatmap else []),
                          title=f"{len(results)} image{'s' if len(results) != 1 else ''} — research tool, not a diagnosis")
            shown = results.head(MAX_ROWS_SHOWN).to_dict("records")
            for row, name in zip(shown, display_names([row["path"] for row in shown])):
                table.add_row(escape(name), escape(row["predicted"]),
                              *[f"{row[c]:.3f}" for c in prob_columns], *([escape(row["heatmap"])] if heatmap else []))
            console.print(table)
            if len(results) > MAX_ROWS_SHOWN:
                console.print(f"… and {len(results) - MAX_ROWS_SHOWN} more" + ("" if out else "; use --out to keep them all"))
            for row in results[results["warning"] != ""].to_dict("records"):  # every one, beyond the table's rows too
                err_console.print(f"[bold yellow]warning:[/] {escape(row['path'] + ': ' + row['warning'])}",
                                  highlight=False, soft_wrap=True)
        # nothing predicted from one file: the error names it and why, as every other one-line error does, and
        # nothing else does (no 'skipped:' line too); earlier results in --out stay as they were
        if results.empty and len(skipped) == 1:
            path, reason = skipped[0]
            raise CxrFastError(f"{printable(path)}: {reason}")
        for path, reason in skipped:
            err_console.print(f"[bold yellow]skipped:[/] {escape(f'{printable(path)}: {reason}')}", highlight=False,
                              soft_wrap=True)
        if results.empty:  # nothing was written: earlier results in --out stay as they were
            raise CxrFastError(f"no image could be predicted ({len(skipped)} files skipped, listed above)"
                               if skipped else "no image could be predicted")
        if out is not None:
            console.print(f"results: [bold]{escape(str(out))}[/]")

    @app.command("export")
    @user_errors
    def export(
        run: Annotated[Path, typer.Argument(help="Run folder (models/<run>).")],
        fmt: Annotated[str, typer.Option("--format", help="Export format; onnx is the one supported.")] = "onnx",
        out: Annotated[Path | None, typer.Option(help="Folder for model.onnx and preprocessing.json (default: the run folder).")] = None,
        force: Annotated[bool, typer.Option(help="Replace an existing export.")] = False,
    ):
        """Export the model to ONNX (dynamic batch) with its preprocessing recipe, for ONNX Runtime."""
        import json

        from cxr_fast.errors import CxrFastError

        with loading_libraries(err_console):
            from cxr_fast.export import PREPROCESSING_FILE, export_onnx

        if fmt != "onnx":
            raise CxrFastError(f"--format {fmt!r} is not supported; the one export format is onnx")
        onnx_path = export_onnx(run, out, force=force)
        spec = json.loads((onnx_path.parent / PREPROCESSING_FILE).read_text(encoding="utf-8"))
        console.print(f"ONNX model: [bold]{escape(str(onnx_path))}[/] (opset {spec['opset']}, "
                      f"input {escape(str(spec['input']['shape']))}; "
                      f"max logit difference from PyTorch {spec['max_abs_logit_difference']:.1e})")
        console.print(f"preprocessing: [bold]{escape(str(onnx_path.parent / PREPROCESSING_FILE))}[/]")

    @app.command("serve")
    @user_errors
    def serve(
        run: Annotated[Path, typer.Argument(help="Run folder (models/<run>).")],
        host: Annotated[str, typer.Option(help="Address to listen on; the default lets only this computer in.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
        runtime: Annotated[str, typer.Option(help="torch, or onnx (needs `cxrfast export RUN` first).")] = "torch",
        device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    ):
        """A local web page: drop an X-ray, see class probabilities and the occlusion heatmap."""
        with loading_libraries(err_console, torch=runtime == "torch"):
            from cxr_fast.serve import serve as run_server

        def ready(url: str, loopback: bool):
            console.print(f"serving [bold]{escape(str(run))}[/] at [bold]{escape(url)}[/] (Ctrl+C to stop)")
            if not loopback:
                err_console.print(f"[bold yellow]warning:[/] listening on {escape(host)}: anyone who can reach this "
                                  "computer can upload images; there is no login.")

        run_server(run, host=host, port=port, runtime=runtime, on_ready=ready, device=device)
