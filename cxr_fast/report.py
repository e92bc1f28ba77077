"""Write a report as a self-contained HTML page and a Markdown file, with the figures as PNG files.

`write_report` is shared by `evaluate` and `compare` (interpret's gallery, `cxr_fast.gallery`, has its own layout
and uses this module's cell formatting and figure encoding): give it a metrics dict (from
`cxr_fast.metrics.classification_metrics`, optionally extended with calibration numbers and intervals) to
get summary cards and a per-class table, and any number of `Section`s for everything else.

The HTML embeds every figure as a base64 data URI so the single file can be mailed or opened on a phone;
the Markdown links the PNG files written next to it. Titles, headings, table cells, warnings, meta facts and
figure names are escaped in both (`md_escape` for the Markdown): run, site and class names come from user data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.errors import CxrFastError

DISCLAIMER = "Research tool, not a diagnosis: do not use these results to make clinical decisions."


@dataclass
class Section:
    """One part of a report.

    `text` is plain text: paragraphs separated by blank lines, lines starting with "- " form a list. It is
    escaped in the HTML and written as is to the Markdown: keep names from user data out of it (a table or a
    warning escapes them). `table` is a DataFrame or a list of dicts (columns in first-seen order). `figures` names
    figures passed to `write_report` to show here; figures no section names go to a final "Figures" section.
    """

    heading: str
    text: str = ""
    table: object = None
    figures: Sequence[str] = field(default_factory=tuple)


class _SummarySection(Section):
    """The headline numbers: cards in the HTML, a table in the Markdown."""


# ------------------------------------------------------------------------------------------ formatting


def _is_missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def format_value(value, digits: int = 3) -> str:
    """A table cell: floats to `digits` decimals, missing values as an em dash, everything else str()."""
    if _is_missing(value):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)


@dataclass(frozen=True)
class Estimate:
    """A figure and its interval as one table cell: "0.950 (0.751–0.991)" in Markdown and wherever it is text; in the
    HTML the interval goes on a second, smaller line, so that four such columns still fit the page."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{format_value(self.value)} ({format_value(self.low)}–{format_value(self.high)})"


def _table_records(table) -> tuple[list[str], list[dict]]:
    """(columns, rows) from a DataFrame or an iterable of mappings."""
    rows = table.to_dict("records") if hasattr(table, "to_dict") else [dict(r) for r in table]
    columns: list[str] = []
    for row in rows:
        columns.extend(str(k) for k in row if str(k) not in columns)
    return columns, [{str(k): v for k, v in row.items()} for row in rows]


def html_table(table) -> str:
    """A DataFrame or list of dicts as an HTML table (cells by `format_value`, escaped), with header cells both ways:
    a screen reader names a cell by its column and by its row's first cell (the class, run or site), e.g. "Normal,
    Pneumonia: 2" in the confusion matrix. The reports and interpret's gallery share it."""
    columns, rows = _table_records(table)
    head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in columns)
    def cell(row, c) -> str:
        value = row.get(c)
        if isinstance(value, Estimate):
            interval = f"({format_value(value.low)}–{format_value(value.high)})"
            return f'{html.escape(format_value(value.value))}<br><span class="ci">{html.escape(interval)}</span>'
        return html.escape(format_value(value))

    body = "".join(
        f'<tr><th scope="row">{cell(row, columns[0])}</th>' + "".join(f"<td>{cell(row, c)}</td>" for c in columns[1:])
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# What Markdown would read as formatting in the middle of a line: a backslash before punctuation (a Windows path's
# backslashes before letters stay as written), code, emphasis, links, HTML, table cells, strike-through, an entity.
# An underscore inside a word (balanced_accuracy) emphasises nothing and is left alone.
_MD_SPECIAL = re.compile(r"\\(?=[!-/:-@\[-`{-~])|[`*\[\]<>|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|&(?=#?\w+;)")


def md_escape(text) -> str:
    """`text` (a name, a path, a warning: anything that may come from user data) as Markdown that shows it
    literally, on one line: safe in a heading, a list item and a table cell."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(), re.sub(r"\s*[\r\n]+\s*", " ", str(text)))


def _md_table(table) -> str:
    columns, rows = _table_records(table)
    lines = ["| " + " | ".join(md_escape(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md_escape(format_value(row.get(c))) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _html_text(text: str) -> str:
    """Plain text to escaped HTML: blank-line separated paragraphs, "- " lines as a bullet list."""
    parts = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if all(line.startswith(("- ", "* ")) for line in lines):
            items = "".join(f"<li>{html.escape(line[2:])}</li>" for line in lines)
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append("<p>" + "<br>".join(html.escape(line) for line in lines) + "</p>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ metrics views


def _ci_text(metrics: Mapping, key: str) -> str:
    ci = metrics.get(f"{key}_ci")
    if ci is None or len(ci) != 2 or any(_is_missing(v) for v in ci):
        return ""
    level = metrics.get("ci_level", 0.95)
    return f"{100 * level:.0f}% CI {format_value(ci[0])}–{format_value(ci[1])}"


def summary_cards(metrics: Mapping) -> list[tuple[str, str, str]]:
    """(label, value, detail) for the headline numbers present in `metrics`.

    Reads accuracy, balanced_accuracy, macro_f1, macro_roc_auc and the calibration keys ece,
    ece_calibrated and temperature; `<key>_ci` = (low, high) adds an interval (level from `ci_level`).
    """
    cards = []
    if "accuracy" in metrics:
        detail = f"n = {metrics['n']}" if "n" in metrics else ""
        cards.append(("Accuracy", format_value(metrics["accuracy"]), _ci_text(metrics, "accuracy") or detail))
    for key, label in (
        ("balanced_accuracy", "Balanced accuracy"),
        ("macro_f1", "Macro F1"),
        ("macro_roc_auc", "Macro ROC AUC"),
    ):
        if key in metrics:
            cards.append((label, format_value(metrics[key]), _ci_text(metrics, key)))
    if "ece" in metrics and metrics.get("temperature") == 1.0:  # nothing rescaled (an ensemble): one figure
        cards.append(("ECE", format_value(metrics["ece"]), ""))
    elif "ece" in metrics:
        detail = ""
        if "ece_calibrated" in metrics:
            detail = f"calibrated {format_value(metrics['ece_calibrated'])}"
            if "temperature" in metrics:
                detail += f" (T = {format_value(metrics['temperature'], 2)})"
        cards.append(("ECE (raw)", format_value(metrics["ece"]), detail))
    return cards


def _with_interval(values: Mapping, key: str):
    """values[key] as an `Estimate` with its interval `<key>_ci`, or the bare value where there is none (the figure
    is undefined, or the metrics.json was written before per-class intervals were)."""
    value, ci = values.get(key), values.get(f"{key}_ci")
    if _is_missing(value) or ci is None or len(ci) != 2 or any(_is_missing(v) for v in ci):
        return value
    return Estimate(value, ci[0], ci[1])


PER_CLASS_NOTE = ("In brackets: the 95 % Wilson score interval of each class's precision, recall (sensitivity), "
                  "specificity and NPV, one figure at a time (not all at once); none where the figure is undefined "
                  "(—), nor for the precision of a class never predicted (0 by convention). With few images of a "
                  "class the interval is wide: read it, not the figure alone.")


def per_class_table(metrics: Mapping) -> list[dict]:
    """Rows of the per-class table from `metrics['per_class']`; precision, recall, specificity and NPV are
    `Estimate`s where the metrics hold their intervals (`recall_ci`, ...)."""
    rows = []
    for name, values in metrics.get("per_class", {}).items():
        rows.append(
            {
                "class": name,
                "support": values.get("support"),
                "precision": _with_interval(values, "precision"),
                "recall": _with_interval(values, "recall"),
                "specificity": _with_interval(values, "specificity"),
                "NPV": _with_interval(values, "npv"),
                "F1": values.get("f1"),
                "ROC AUC": values.get("roc_auc"),
                "AP": values.get("average_precision"),
            }
        )
    return rows


def confusion_table(metrics: Mapping) -> list[dict] | None:
    """The confusion matrix as table rows (true class per row), or None when absent."""
    cm = metrics.get("confusion_matrix")
    classes = list(metrics.get("per_class", {}))
    if cm is None or len(classes) != len(cm):
        return None
    return [
        {"true \\ predicted": name, **{c: int(v) for c, v in zip(classes, row, strict=True)}}
        for name, row in zip(classes, cm, strict=True)
    ]


# ------------------------------------------------------------------------------------------ writing


def figure_filename(name: str) -> str:
    """The PNG file name a figure is written to: its name with anything unusual replaced by '_'."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "figure"
    return f"{slug}.png"


def figure_text(figure) -> str:
    """A figure's title and its panels' titles on one line: its image's alt text, for a reader who cannot see it."""
    titles = [figure.get_suptitle(), *(ax.get_title() for ax in figure.axes)]
    lines = [": ".join(" ".join(line.split()) for line in t.splitlines() if line.strip()) for t in titles]
    return "; ".join(line for line in lines if line).replace(r"\$", "$")  # `plots.literal`'s $


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes, its titles (`figure_text`) in the PNG's Title field so that a copied file still
    describes itself; the figure is closed, as pyplot would otherwise keep every one in memory."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    text = figure_text(figure)
    figure.savefig(buffer, format="png", bbox_inches="tight", metadata={"Title": text} if text else None)
    plt.close(figure)
    return buffer.getvalue()


_CSS = """
:root { --fg:#1d2330; --muted:#5b6472; --line:#e3e6eb; --card:#f5f7fa; --accent:#0072B2; --warn:#fff4e5; }
* { box-sizing: border-box; }
body { margin:0; font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); }
main { max-width: 960px; margin: 0 auto; padding: 16px; }
h1 { font-size: 1.6rem; margin: .4em 0 .2em; }
h2 { font-size: 1.25rem; margin-top: 1.6em; border-bottom: 1px solid var(--line); padding-bottom: .2em; }
.meta { color: var(--muted); font-size: .9rem; margin: 0; }
.disclaimer { font-size: .9rem; color: var(--muted); border-left: 3px solid var(--accent); padding-left: 8px; }
.warnings { background: var(--warn); border: 1px solid #f0b429; border-radius: 8px; padding: 8px 16px; }
.warnings h2 { border: 0; margin-top: .4em; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; }
.card { background: var(--card); border-radius: 8px; padding: 10px 12px; }
.card .label { font-size: .85rem; color: var(--muted); }
.card .value { font-size: 1.5rem; font-weight: 600; }
.card .detail { font-size: .8rem; color: var(--muted); min-height: 1em; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .92rem; }
th, td { padding: 6px 8px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td .ci { color: var(--muted); font-size: .85em; }
figure { margin: 16px 0; }
figure img { width: 100%; max-width: 100%; height: auto; }
figcaption { font-size: .85rem; color: var(--muted); }
"""


def write_report(
    out_dir,
    title: str,
    sections: Iterable[Section | tuple[str, str]] = (),
    figures: Mapping[str, object] | None = None,
    metrics: Mapping | None = None,
    *,
    warnings: Sequence[str] = (),
    meta: Mapping[str, object] | None = None,
    disclaimer: str = DISCLAIMER,
) -> tuple[Path, Path]:
    """Write `report.html`, `report.md` and one PNG per figure into `out_dir`; return (html_path, md_path).

    sections: `Section`s or (heading, text) pairs, in order. figures: {name: matplotlib Figure}; an image's alt
    text is its figure's titles (`figure_text`), or its name for a figure without any.
    metrics: optional classification metrics (see `summary_cards`) shown as cards, a per-class table and
    the confusion matrix. warnings: strings shown prominently near the top (e.g. distribution shift).
    meta: key/value facts shown under the title (model, data, date).
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CxrFastError(f"{out_dir}: cannot create the report folder ({error.strerror})") from error
    sections = [s if isinstance(s, Section) else Section(*s) for s in sections]
    figures = dict(figures or {})
    metrics = metrics or {}

    # Write figures first; the file names must stay distinct after slugging.
    files: dict[str, str] = {}
    pngs: dict[str, bytes] = {}
    alts: dict[str, str] = {}
    for name, figure in figures.items():
        filename = figure_filename(name)
        if filename in files.values():
            raise CxrFastError(f"{out_dir}: two figures would both be written to {filename}; rename one")
        alts[name] = figure_text(figure) or name
        pngs[name] = png_bytes(figure)
        (out_dir / filename).write_bytes(pngs[name])
        files[name] = filename

    claimed = {name for s in sections for name in s.figures}
    unknown = claimed - set(figures)
    if unknown:
        raise CxrFastError(f"{out_dir}: sections name figure(s) not given: {', '.join(sorted(unknown))}")
    leftover = [name for name in figures if name not in claimed]

    blocks: list[Section] = []
    if metrics:
        cards = summary_cards(metrics)
        if cards:
            blocks.append(
                _SummarySection(
                    "Summary", table=[{"metric": c[0], "value": c[1], "detail": c[2]} for c in cards]
                )
            )
        if metrics.get("per_class"):
            rows = per_class_table(metrics)
            with_intervals = any(isinstance(v, Estimate) for row in rows for v in row.values())
            blocks.append(Section("Per-class metrics", text=PER_CLASS_NOTE if with_intervals else "", table=rows))
        confusion = confusion_table(metrics)
        if confusion:
            blocks.append(
                Section(
                    "Confusion matrix", text="Rows: true class. Columns: predicted class.", table=confusion
                )
            )
    blocks += sections
    if leftover:
        blocks.append(Section("Figures", figures=leftover))

    md_path = out_dir / "report.md"
    html_path = out_dir / "report.html"
    md_path.write_text(_markdown(title, blocks, files, alts, warnings, meta, disclaimer), encoding="utf-8")
    html_path.write_text(_html(title, blocks, pngs, alts, metrics, warnings, meta, disclaimer), encoding="utf-8")
    return html_path, md_path


def _markdown(title, blocks, files, alts, warnings, meta, disclaimer) -> str:
    lines = [f"# {md_escape(title)}", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- **{md_escape(key)}**: {md_escape(format_value(value))}")
    if meta:
        lines.append("")
    lines += [f"> {md_escape(disclaimer)}", ""]
    if warnings:
        lines += ["## Warnings", ""] + [f"- ⚠ {md_escape(w)}" for w in warnings] + [""]
    for block in blocks:
        lines += [f"## {md_escape(block.heading)}", ""]
        if block.text:
            lines += [block.text.strip(), ""]
        if block.table is not None:
            lines += [_md_table(block.table), ""]
        for name in block.figures:
            lines += [f"![{md_escape(alts[name])}]({files[name]})", ""]
    return "\n".join(lines)


def _html(title, blocks, pngs, alts, metrics, warnings, meta, disclaimer) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    if meta:
        facts = " · ".join(f"<strong>{esc(str(k))}</strong>: {esc(format_value(v))}" for k, v in meta.items())
        body.append(f'<p class="meta">{facts}</p>')
    body.append(f'<p class="disclaimer">{esc(disclaimer)}</p>')
    if warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
        body.append(f'<section class="warnings"><h2>⚠ Warnings</h2><ul>{items}</ul></section>')
    for block in blocks:
        body.append(f"<section><h2>{esc(block.heading)}</h2>")
        if isinstance(block, _SummarySection):
            cards = "".join(
                f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div>'
                f'<div class="detail">{esc(detail)}</div></div>'
                for label, value, detail in summary_cards(metrics)
            )
            body.append(f'<div class="cards">{cards}</div>')
        else:
            if block.text:
                body.append(_html_text(block.text))
            if block.table is not None:
                body.append(f'<div class="table-wrap">{html_table(block.table)}</div>')
        for name in block.figures:
            data = base64.b64encode(pngs[name]).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alts[name], quote=True)}">'
                f"<figcaption>{esc(name)}</figcaption></figure>"
            )
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


# ------------------------------------------------------------------------------------------ JSON


def to_jsonable(value):
    """`value` with numpy scalars/arrays, tuples and Paths turned into JSON types; NaN (nothing to measure) becomes
    None, and an infinity, which JSON cannot hold, the string "inf" or "-inf": a lung preference with all the evidence
    inside the lungs is the best case, not a missing one."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return None if math.isnan(value) else float(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics_json(path, metrics: Mapping) -> Path:
    """Write `metrics` as indented JSON (numpy types converted) and return the path."""
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(metrics), indent=2) + "\n", encoding="utf-8")
    return path
