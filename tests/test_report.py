"""Plots and the HTML/Markdown report: every figure is drawn, embedded, written and linked; text is escaped."""

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cxr_fast import plots
from cxr_fast.calibration import fit_temperature, reliability_bins, softmax
from cxr_fast.errors import CxrFastError
from cxr_fast.metrics import bootstrap_ci, classification_metrics, pr_curves, roc_curves
from cxr_fast.report import DISCLAIMER, Section, figure_filename, write_metrics_json, write_report
from tests.pages import parse

CLASSES = ["COVID-19", "Normal", "Pneumonia"]


@pytest.fixture(scope="module")
def evaluation():
    """Metrics and every evaluation figure of a small fake model, as `evaluate` would make them."""
    rng = np.random.default_rng(0)
    n = 240
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 2.0
    logits *= 3  # over-confident
    temperature = fit_temperature(logits[:120], y[:120])
    probs, calibrated = softmax(logits[120:]), softmax(logits[120:], temperature)
    y = y[120:]

    metrics = classification_metrics(y, probs, CLASSES)
    metrics["balanced_accuracy_ci"] = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=200)
    raw_bins, cal_bins = reliability_bins(probs, y), reliability_bins(calibrated, y)
    metrics.update(ece=raw_bins["ece"], ece_calibrated=cal_bins["ece"], temperature=temperature)

    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2, 3],
            "train_loss": [1.1, 0.8, 0.6, 0.5],
            "valid_loss": [1.0, 0.85, 0.7, 0.72],
            "accuracy": [0.5, 0.6, 0.7, 0.69],
            "balanced_accuracy": [0.45, 0.58, 0.7, 0.68],
            "train_accuracy": [0.5, 0.65, 0.75, 0.8],
        }
    )
    figures = {
        "confusion matrix": plots.plot_confusion_matrix(metrics["confusion_matrix"], CLASSES),
        "roc": plots.plot_roc_curves(roc_curves(y, probs, CLASSES)),
        "pr": plots.plot_pr_curves(pr_curves(y, probs, CLASSES)),
        "reliability": plots.plot_reliability(raw_bins, cal_bins, temperature),
        "training curves": plots.plot_training_curves(history),
    }
    return metrics, figures


def test_plots_return_figures_with_the_expected_content(evaluation):
    metrics, figures = evaluation
    assert all(isinstance(f, Figure) for f in figures.values())
    # Confusion matrix: two heat maps (plus two colour bars), each cell annotated.
    heatmaps = [ax for ax in figures["confusion matrix"].axes if ax.images]
    assert len(heatmaps) == 2
    assert {t.get_text() for t in heatmaps[0].texts} == {
        str(v) for row in metrics["confusion_matrix"] for v in row
    }
    assert all(t.get_text().endswith("%") for t in heatmaps[1].texts)

    roc_legend = [t.get_text() for t in figures["roc"].axes[0].get_legend().get_texts()]
    for name in CLASSES:
        auc = metrics["per_class"][name]["roc_auc"]
        assert f"{name} (AUC {auc:.3f})" in roc_legend
    pr_legend = " ".join(t.get_text() for t in figures["pr"].axes[0].get_legend().get_texts())
    assert pr_legend.count("AP ") == 3

    titles = [ax.get_title() for ax in figures["reliability"].axes]
    assert f"ECE {metrics['ece']:.3f}" in titles[0]
    assert f"ECE {metrics['ece_calibrated']:.3f}" in titles[1] and "T = " in titles[1]
    assert len(figures["training curves"].axes) == 2


def test_pr_plot_of_a_one_class_test_set_says_its_average_precision_is_undefined():
    # every threshold has precision 1 without negatives; the legend read "AP nan"
    y = np.ones(4, dtype=int)
    probs = np.array([[0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.6, 0.2, 0.2]])
    fig = plots.plot_pr_curves(pr_curves(y, probs, CLASSES))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["COVID-19 (no positives)", "Normal (AP undefined: no negatives)", "Pneumonia (no positives)"]


def test_plot_comparison_with_and_without_parameter_counts():
    results = [
        {"name": "resnet18", "balanced_accuracy": 0.81, "ci_low": 0.77, "ci_high": 0.85, "params": 11.2e6},
        {"name": "convnet", "balanced_accuracy": 0.74, "ci_low": 0.69, "ci_high": 0.79, "params": 0.4e6},
        {"name": "cxresnet", "balanced_accuracy": 0.86, "ci_low": 0.82, "ci_high": 0.9, "params": 2.1e6},
    ]
    fig = plots.plot_comparison(results)
    assert len(fig.axes) == 2
    ticks = fig.axes[0].get_yticks()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    bottom_to_top = [label for _, label in sorted(zip(ticks, labels, strict=True))]
    assert bottom_to_top == ["convnet", "resnet18", "cxresnet"]  # best drawn at the top
    without_params = plots.plot_comparison(pd.DataFrame(results).drop(columns="params"))
    assert len(without_params.axes) == 1
    with pytest.raises(CxrFastError, match="ci_low"):
        plots.plot_comparison([{"name": "a", "balanced_accuracy": 0.5}])


def test_training_curves_need_their_columns():
    with pytest.raises(CxrFastError, match="valid_loss"):
        plots.plot_training_curves(
            pd.DataFrame({"epoch": [0], "train_loss": [1.0], "accuracy": [0.5], "balanced_accuracy": [0.5]})
        )


def test_report_embeds_every_figure_and_links_every_png(tmp_path, evaluation):
    metrics, figures = evaluation
    shift = "Test images are 3x brighter than training images <script>alert(1)</script>"
    sections = [
        Section(
            "Calibration",
            text="Temperature fitted on the valid split.\n\n- fitted once\n- applied to test",
            figures=["reliability"],
        ),
        ("Notes", "Model & data: synthetic | tiny"),
    ]
    html_path, md_path = write_report(
        tmp_path / "out",
        "Evaluation of <model>",
        sections,
        figures,
        metrics,
        warnings=[shift],
        meta={"Model": "resnet18", "Cases": 120},
    )

    page = parse(html_path)
    sources = [img["src"] for img in page.images]
    assert len(sources) == len(figures)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in sources}
    written = {(tmp_path / "out" / figure_filename(name)).read_bytes() for name in figures}
    assert embedded == written  # each figure embedded is the PNG written next to the report
    assert all(png.startswith(b"\x89PNG") for png in written)
    # the alt text says what a figure shows, for a reader who cannot see it: its titles, not its file's name
    assert {img["alt"] for img in page.images} == {
        "Confusion matrix; Counts; Row-normalised (recall on the diagonal)", "ROC curves (one-vs-rest)",
        "Precision-recall curves (one-vs-rest)", f"Before temperature scaling: ECE {metrics['ece']:.3f}; After "
        f"temperature scaling (T = {metrics['temperature']:.2f}): ECE {metrics['ece_calibrated']:.3f}",
        "Training curves; Loss; Accuracy"}

    assert any(m.get("name") == "viewport" for m in page.metas)
    raw_html = html_path.read_text(encoding="utf-8")
    assert "<script>" not in raw_html and "&lt;script&gt;" in raw_html
    text = " ".join(page.text)
    assert shift in text and DISCLAIMER in text and "Evaluation of <model>" in text
    assert f"{metrics['balanced_accuracy']:.3f}" in text
    low, high = metrics["balanced_accuracy_ci"]
    assert f"95% CI {low:.3f}–{high:.3f}" in text
    assert f"{metrics['ece_calibrated']:.3f}" in text
    for name in CLASSES:
        assert name in text
    assert "fitted once" in text and "<li>fitted once</li>" in raw_html

    markdown = md_path.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert sorted(links) == pngs and len(pngs) == len(figures)
    assert all((tmp_path / "out" / link).is_file() for link in links)
    assert "| COVID-19 |" in markdown and "<script>" not in markdown
    assert "- ⚠ Test images are 3x brighter than training images \\<script\\>alert(1)\\</script\\>" in markdown
    assert "synthetic \\| tiny" not in markdown  # section text is Markdown already: written as is
    # The reliability figure appears in its section, not in the leftover "Figures" section.
    assert (
        markdown.index("## Calibration") < markdown.index("(reliability.png)") < markdown.index("## Figures")
    )


def test_report_without_metrics_for_compare(tmp_path):
    table = pd.DataFrame({"model": ["a", "b"], "balanced_accuracy": [0.8, np.nan], "params": [10, 20]})
    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    html_path, md_path = write_report(
        tmp_path, "Comparison", [Section("Models", table=table, figures=["bars"])], {"bars": fig}
    )
    page = parse(html_path)
    assert len(page.images) == 1
    text = " ".join(page.text)
    assert "Summary" not in text and "0.800" in text and "—" in text
    assert "| a | 0.800 | 10 |" in md_path.read_text(encoding="utf-8")


def test_report_rejects_clashing_or_unknown_figures(tmp_path):
    fig = Figure()
    fig.add_subplot()
    with pytest.raises(CxrFastError, match="roc_curve.png"):
        write_report(tmp_path, "x", figures={"roc curve": fig, "roc/curve": fig})
    with pytest.raises(CxrFastError, match="missing"):
        write_report(tmp_path, "x", [Section("A", figures=["missing"])], {"present": fig})


def test_metrics_json_round_trip(tmp_path, evaluation):
    metrics, _ = evaluation
    path = write_metrics_json(
        tmp_path / "metrics.json", {**metrics, "nan": np.float64("nan"), "arr": np.arange(3),
                                    "lung_preference": np.float64("inf"), "low": -np.inf}
    )
    loaded = json.loads(path.read_text())
    # an infinite lung preference (all evidence inside the lungs) was written null, as "nothing to measure" is
    assert loaded["lung_preference"] == "inf" and loaded["low"] == "-inf"
    assert loaded["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert loaded["per_class"]["Normal"]["support"] == metrics["per_class"]["Normal"]["support"]
    assert loaded["nan"] is None and loaded["arr"] == [0, 1, 2]
    assert loaded["balanced_accuracy_ci"] == list(metrics["balanced_accuracy_ci"])


def _markdown_table(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the table under `## heading` (header row first, the --- row left out)."""
    block = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_the_per_class_and_confusion_tables_hold_sklearn_s_numbers_under_their_own_headings(tmp_path):
    from sklearn.metrics import (
        average_precision_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3))
    logits[np.arange(90), y] += 1.0
    probs = softmax(logits)
    pred = probs.argmax(1)
    _, md_path = write_report(tmp_path, "t", metrics=classification_metrics(y, probs, CLASSES))
    markdown = md_path.read_text(encoding="utf-8")

    from scipy.stats import binomtest

    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    table = _markdown_table(markdown, "Per-class metrics")
    assert table[0] == ["class", "support", "precision", "recall", "specificity", "NPV", "F1", "ROC AUC", "AP"]
    for k, name in enumerate(CLASSES):
        tn = int(((pred != k) & (y != k)).sum())
        specificity, npv = tn / (y != k).sum(), tn / (pred != k).sum()
        # each proportion with its 95 % Wilson interval, from scipy's own implementation and the counts
        counts = [((pred == k) & (y == k)).sum(), (pred == k).sum()], [((pred == k) & (y == k)).sum(), (y == k).sum()], \
                 [tn, (y != k).sum()], [tn, (pred != k).sum()]
        intervals = [binomtest(int(a), int(b)).proportion_ci(0.95, method="wilson") for a, b in counts]
        expected = [name, str(support[k])] + [
            f"{v:.3f} ({ci.low:.3f}–{ci.high:.3f})" for v, ci in zip((precision[k], recall[k], specificity, npv),
                                                                     intervals, strict=True)
        ] + [f"{v:.3f}" for v in (f1[k], roc_auc_score(y == k, probs[:, k]), average_precision_score(y == k, probs[:, k]))]
        assert table[1 + k] == expected
    cm = confusion_matrix(y, pred)
    assert not np.array_equal(cm, cm.T)  # a transposed table would show
    table = _markdown_table(markdown, "Confusion matrix")
    assert table[0] == ["true \\ predicted", *CLASSES]
    assert [row[1:] for row in table[1:]] == [[str(v) for v in row] for row in cm]
    assert [row[0] for row in table[1:]] == CLASSES
    # in the HTML each cell has a column header and a row header (its class), as a screen reader names a cell by both
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<th scope="col">true \\ predicted</th>' + "".join(f'<th scope="col">{c}</th>' for c in CLASSES) in page
    for name, row in zip(CLASSES, cm, strict=True):
        assert f'<tr><th scope="row">{name}</th>' + "".join(f"<td>{v}</td>" for v in row) + "</tr>" in page


def test_per_class_intervals_show_beside_their_figure_and_not_where_the_figure_is_undefined(tmp_path):
    # 2 Normal, both called Normal; Pneumonia never true, never called: recall undefined, precision 0 by convention
    y, probs = np.array([1, 1, 0]), np.eye(3)[[1, 1, 0]]
    metrics = classification_metrics(y, probs, CLASSES)
    _, md_path = write_report(tmp_path, "t", metrics=metrics)
    markdown = md_path.read_text(encoding="utf-8")
    assert "95 % Wilson score interval" in markdown.split("## Per-class metrics", 1)[1].split("|", 1)[0]
    rows = {row[0]: row for row in _markdown_table(markdown, "Per-class metrics")[1:]}
    # 2 of 2 found: 0.342–1.000, not the 1.000–1.000 a bootstrap gives; 1 of 1: 0.207–1.000
    assert rows["Normal"][2:6] == ["1.000 (0.342–1.000)", "1.000 (0.342–1.000)", "1.000 (0.207–1.000)",
                                   "1.000 (0.207–1.000)"]
    assert rows["Pneumonia"][2:6] == ["0.000", "—", "1.000 (0.439–1.000)", "1.000 (0.439–1.000)"]
    # in the HTML the interval is a second, smaller line of the same cell
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<td>1.000<br><span class="ci">(0.342–1.000)</span></td>' in page
    # a metrics.json written before the intervals: the bare figures, and no note about brackets
    for row in metrics["per_class"].values():
        for key in ("precision", "recall", "specificity", "npv"):
            del row[f"{key}_ci"]
    _, md_path = write_report(tmp_path / "old", "t", metrics=metrics)
    markdown = md_path.read_text(encoding="utf-8")
    assert "Wilson" not in markdown
    assert _markdown_table(markdown, "Per-class metrics")[2][2:6] == ["1.000", "1.000", "1.000", "1.000"]


def test_summary_cards_read_each_number_from_its_own_key():
    from cxr_fast.report import summary_cards

    metrics = {"accuracy": 0.61, "n": 40, "balanced_accuracy": 0.52, "macro_f1": 0.43, "macro_roc_auc": 0.74,
               "ece": 0.15, "ece_calibrated": 0.06, "temperature": 1.734}
    assert summary_cards(metrics) == [("Accuracy", "0.610", "n = 40"), ("Balanced accuracy", "0.520", ""),
                                      ("Macro F1", "0.430", ""), ("Macro ROC AUC", "0.740", ""),
                                      ("ECE (raw)", "0.150", "calibrated 0.060 (T = 1.73)")]
    # nothing rescaled (an ensemble, or too few mistakes to fit): one ECE, the raw one, which is also the calibrated
    assert summary_cards({"ece": 0.15, "ece_calibrated": 0.15, "temperature": 1.0}) == [("ECE", "0.150", "")]
    assert summary_cards({"accuracy": 0.5, "n": 8, "accuracy_ci": [0.25, 0.75], "ci_level": 0.9}) == [
        ("Accuracy", "0.500", "90% CI 0.250–0.750")]
    assert summary_cards({"balanced_accuracy": 0.5, "balanced_accuracy_ci": [float("nan"), float("nan")]}) == [
        ("Balanced accuracy", "0.500", "")]  # an interval that could not be computed is left out, not "—–—"


def test_cells_markdown_and_text_keep_their_meaning(tmp_path):
    from cxr_fast.report import confusion_table, format_value

    assert [format_value(v) for v in (True, np.bool_(False), np.int64(7), np.float32(0.5), 2.0, None, float("nan"),
                                      pd.NA, "x")] == ["True", "False", "7", "0.500", "2.000", "—", "—", "—", "x"]
    assert confusion_table({"confusion_matrix": [[1, 2], [3, 4]], "per_class": {"a": {}, "b": {}, "c": {}}}) is None
    rows = [{"class": "a|b", "note": "two\nlines"}, {"class": "c", "extra": 3}]  # a column first seen in row 2
    _, md_path = write_report(tmp_path, "t", [Section("Notes", text="- one\nnot a list item", table=rows)],
                              meta={"Temperature": 1.23456})
    markdown = md_path.read_text(encoding="utf-8")
    assert _markdown_table(markdown, "Notes") == [["class", "note", "extra"], ["a\\|b", "two lines", "—"],
                                                  ["c", "—", "3"]]
    assert "- **Temperature**: 1.235" in markdown
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<p>- one<br>not a list item</p>" in page and "<li>" not in page


def _cells(ax) -> dict[tuple[int, int], str]:
    """A heat map's annotations by (row, column) of the cell they sit on."""
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_the_confusion_figure_s_rates_are_row_normalised_and_each_label_sits_on_its_cell():
    cm = [[5, 1, 0], [2, 2, 0], [0, 0, 0]]  # rows: true class; the third class has no images
    counts, rates = [ax for ax in plots.plot_confusion_matrix(cm, CLASSES).axes if ax.images]
    assert _cells(counts) == {(i, j): str(cm[i][j]) for i in range(3) for j in range(3)}
    assert _cells(rates) == {(0, 0): "83%", (0, 1): "17%", (0, 2): "0%", (1, 0): "50%", (1, 1): "50%", (1, 2): "0%",
                             (2, 0): "n/a", (2, 1): "n/a", (2, 2): "n/a"}
    np.testing.assert_allclose(rates.images[0].get_array(), [[5 / 6, 1 / 6, 0], [0.5, 0.5, 0], [0, 0, 0]])
    # each colour bar says what its colours count, and the rates' bar reads in % as its cells do
    fig = plots.plot_confusion_matrix(cm, CLASSES)
    fig.canvas.draw()
    counts_bar, rates_bar = [ax for ax in fig.axes if not ax.images]
    assert counts_bar.get_ylabel() == "images" and rates_bar.get_ylabel() == "share of the true class"
    ticks = [t.get_text() for t in rates_bar.get_yticklabels() if t.get_text()]
    assert ticks[0] == "0%" and ticks[-1] == "100%" and all(t.endswith("%") for t in ticks)


def test_roc_and_pr_figures_draw_each_curve_the_right_way_round():
    roc = plots.plot_roc_curves({"COVID-19": {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.7, 1.0], "auc": 0.75},
                                 "Normal": None})
    lines = {line.get_label(): line for line in roc.axes[0].get_lines()}
    assert list(lines["COVID-19 (AUC 0.750)"].get_xdata()) == [0.0, 0.2, 1.0]
    assert list(lines["COVID-19 (AUC 0.750)"].get_ydata()) == [0.0, 0.7, 1.0]
    pr = plots.plot_pr_curves({"COVID-19": {"recall": [1.0, 0.5, 0.0], "precision": [0.4, 0.8, 1.0],
                                            "average_precision": 0.7, "prevalence": 0.3}})
    lines = pr.axes[0].get_lines()
    (curve,) = [line for line in lines if line.get_label() == "COVID-19 (AP 0.700)"]
    assert list(curve.get_xdata()) == [1.0, 0.5, 0.0] and list(curve.get_ydata()) == [0.4, 0.8, 1.0]
    chance = [line for line in lines if line is not curve]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.3, 0.3]  # a guess's precision: the prevalence


def test_reliability_bars_are_each_bin_s_accuracy_and_its_gap_up_to_the_mean_confidence():
    nan = float("nan")
    bins = {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "count": [0, 2, 4, 4], "accuracy": [nan, 0.5, 0.25, 1.0],
            "confidence": [nan, 0.4, 0.6, 0.9], "ece": 0.2}
    fig = plots.plot_reliability(bins, bins, temperature=2.0)
    accuracy, gap = fig.axes[0].containers
    np.testing.assert_allclose([(p.get_x(), p.get_width(), p.get_height()) for p in accuracy],
                               [(0.25, 0.25, 0.5), (0.5, 0.25, 0.25), (0.75, 0.25, 1.0)])
    np.testing.assert_allclose([(p.get_x(), p.get_y(), p.get_height()) for p in gap],
                               [(0.25, 0.5, -0.1), (0.5, 0.25, 0.35), (0.75, 1.0, -0.1)])
    assert "T = 2.00" in fig.axes[1].get_title()


def test_training_curves_draw_each_column_and_mark_the_best_valid_balanced_accuracy():
    history = pd.DataFrame({"epoch": [0, 1, 2, 3], "train_loss": [1.1, 0.8, 0.6, 0.5],
                            "valid_loss": [1.0, 0.85, 0.7, 0.72], "accuracy": [0.5, 0.6, 0.65, 0.69],
                            "balanced_accuracy": [0.45, 0.58, 0.7, 0.68]})
    loss, acc = plots.plot_training_curves(history).axes
    drawn = {line.get_label(): list(line.get_ydata()) for ax in (loss, acc) for line in ax.get_lines()
             if not line.get_label().startswith("_")}
    assert drawn == {"train": [1.1, 0.8, 0.6, 0.5], "valid": [1.0, 0.85, 0.7, 0.72],
                     "valid accuracy": [0.5, 0.6, 0.65, 0.69], "valid balanced accuracy": [0.45, 0.58, 0.7, 0.68]}
    for ax in (loss, acc):
        marks = [line for line in ax.get_lines() if line.get_label().startswith("_")]
        assert [list(line.get_xdata()) for line in marks] == [[2, 2]]
    assert [t.get_text() for t in acc.texts] == ["best epoch 2"]


def test_training_curves_take_a_run_s_history_csv_as_written(tiny_runs):
    # history.csv names the valid columns valid_accuracy and valid_balanced_accuracy; a notebook user passing it
    # straight in got "training history lacks column(s) accuracy, balanced_accuracy"
    history = pd.read_csv(tiny_runs[0] / "history.csv")
    assert {"valid_accuracy", "valid_balanced_accuracy"} <= set(history.columns)
    acc = plots.plot_training_curves(history).axes[1]
    drawn = {line.get_label(): list(line.get_ydata()) for line in acc.get_lines()}
    assert drawn["valid balanced accuracy"] == list(history["valid_balanced_accuracy"])


def test_the_strength_search_marks_the_c_best_on_valid_not_on_train():
    history = pd.DataFrame({"C": [0.01, 0.1, 1.0, 10.0], "train_balanced_accuracy": [0.6, 0.8, 0.95, 1.0],
                            "valid_balanced_accuracy": [0.5, 0.7, 0.65, 0.6], "valid_loss": [1.0, 0.8, 0.9, 1.1]})
    loss, acc = plots.plot_strength_search(history).axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in acc.get_lines() if not line.get_label().startswith("_")}
    assert drawn == {"train balanced accuracy": [0.6, 0.8, 0.95, 1.0], "valid balanced accuracy": [0.5, 0.7, 0.65, 0.6]}
    assert [t.get_text() for t in acc.texts] == ["chosen C = 0.1"]


def test_the_comparison_s_error_bars_span_each_model_s_interval():
    results = [
        {"name": "resnet18", "balanced_accuracy": 0.81, "ci_low": 0.70, "ci_high": 0.84, "params": 11.2e6},
        {"name": "convnet", "balanced_accuracy": 0.74, "ci_low": 0.72, "ci_high": 0.90, "params": None},
        {"name": "cxresnet", "balanced_accuracy": 0.86, "ci_low": 0.80, "ci_high": 0.88, "params": 2.1e6},
    ]
    bars, size = plots.plot_comparison(results).axes  # a size panel as soon as one model's size is known
    names = {round(y): t.get_text() for y, t in zip(bars.get_yticks(), bars.get_yticklabels(), strict=True)}
    from matplotlib.container import BarContainer

    (container,) = [c for c in bars.containers if isinstance(c, BarContainer)]
    spans = {names[round(seg[0][1])]: (seg[0][0], seg[1][0]) for seg in container.errorbar.lines[2][0].get_segments()}
    assert spans == {r["name"]: pytest.approx((r["ci_low"], r["ci_high"])) for r in results}
    assert sorted(t.get_text() for t in bars.texts) == ["0.740", "0.810", "0.860"]
    points = sorted((c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0]) for c in size.containers)
    np.testing.assert_allclose(points, [(2.1, 0.86), (11.2, 0.81)])  # millions of parameters
    spans = sorted(tuple(sorted((seg[0][1], seg[1][1]))) for c in size.containers for seg in c.lines[2][0].get_segments())
    np.testing.assert_allclose(spans, [(0.70, 0.84), (0.80, 0.88)])


def test_names_from_user_data_read_literally_in_the_markdown(tmp_path):
    """A run, site or class name with Markdown's characters in it shows as written when report.md is rendered (by a
    CommonMark renderer with GitHub's tables): no emphasis, code, link or HTML, and no table split by its |."""
    from html.parser import HTMLParser

    from markdown_it import MarkdownIt

    name = "run|1 *new* _x_ [a](b) <b>c</b> `d` ~e~ &amp; C:\\data\\run_2 a\\*b"
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    _, md_path = write_report(tmp_path, f"Evaluation of {name}", [Section("By site", table=[
        {"site": name, "note": "two\nlines"}, {"site": "plain", "note": name}], figures=[f"map {name}"])],
        {f"map {name}": fig}, warnings=[f"shift at {name}"], meta={"run": name, f"key {name}": 1})

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.rows, self.texts, self.in_cell = set(), [], [], False

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.rows[-1].append("")
                self.in_cell = True
            elif tag == "img":
                self.texts.append(dict(attrs)["alt"])

        def handle_endtag(self, tag):
            self.in_cell = self.in_cell and tag not in ("td", "th")

        def handle_data(self, data):
            self.texts.append(data)
            if self.in_cell:
                self.rows[-1][-1] += data

    page = Cells()
    page.feed(MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md_path.read_text(encoding="utf-8")))
    assert page.tags <= {"h1", "h2", "p", "ul", "li", "strong", "blockquote", "table", "thead", "tbody", "tr", "th",
                         "td", "img"}, "a name turned into formatting, a link or HTML"
    text = "\n".join(page.texts)
    for shown in (f"Evaluation of {name}", f"shift at {name}", f"map {name}", f"key {name}"):
        assert shown in text
    assert page.rows == [["site", "note"], [name, "two lines"], ["plain", name]]


def _contrast(a, b) -> float:
    """WCAG's contrast ratio of two colours (1 to 21; 4.5 is its least for normal text)."""
    from matplotlib.colors import to_rgb

    def luminance(colour):
        channels = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
        return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_the_comparison_s_values_are_readable_on_every_bar():
    """Eight models take every colour of the palette, yellow and sky blue too, and a short bar leaves its value on the
    white background: each value must stand out from what is behind it."""
    from matplotlib.colors import to_hex

    rows = [{"name": f"m{i}", "balanced_accuracy": v, "ci_low": v / 2, "ci_high": v}
            for i, v in enumerate((0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.02))]
    (bars,) = plots.plot_comparison(rows).axes
    assert len(bars.texts) == 8
    behind = {round(p.get_y() + p.get_height() / 2): (to_hex(p.get_facecolor()), p.get_width()) for p in bars.patches}
    for text in bars.texts:
        x, y = text.get_position()
        box = text.get_bbox_patch()
        colour, width = behind[round(y)]
        # a value drawn past a short bar's end sits on the white axes, unless it has its own box
        background = to_hex(box.get_facecolor()) if box is not None and box.get_alpha() >= 0.8 else (
            colour if width > x + 0.05 else "#ffffff")
        assert _contrast(text.get_color(), background) >= 4.5, (text.get_text(), text.get_color(), background)


def test_names_with_dollar_signs_are_drawn_as_written_in_every_figure():
    """Between two $ matplotlib reads TeX: a class, run or file name like pt$_1$ was drawn as pt with a subscript, and
    one like a$\\b$ stopped the figure (and the command) with a parse error."""
    from matplotlib.cbook import is_math_text

    from cxr_fast.gallery import attribution_figure
    from cxr_fast.report import figure_text, png_bytes

    odd = ["pt$_1$", "a$\\b$", "c$^$d"]
    curve = {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "auc": 0.5, "recall": [1.0, 0.0], "precision": [0.5, 1.0],
             "average_precision": 0.5, "prevalence": 0.5}
    bins = {"edges": [0.0, 0.5, 1.0], "count": [1, 1], "accuracy": [0.0, 1.0], "confidence": [0.4, 0.8], "ece": 0.3}
    history = pd.DataFrame({"epoch": [0, 1], "train_loss": [1.0, 0.5], "valid_loss": [1.0, 0.6],
                            "accuracy": [0.5, 0.6], "balanced_accuracy": [0.5, 0.6]})
    figures = [
        plots.plot_confusion_matrix(np.eye(3), odd, title=f"Confusion matrix of {odd[0]}"),
        plots.plot_roc_curves(dict.fromkeys(odd, curve), title=odd[1]),
        plots.plot_pr_curves(dict.fromkeys(odd, curve), title=odd[1]),
        plots.plot_reliability(bins, bins, 2.0, title=odd[2], suptitle=odd[0]),
        plots.plot_training_curves(history, title=f"Training curves of {odd[1]}"),
        plots.plot_strength_search(pd.DataFrame({"C": [0.1, 1.0], "train_balanced_accuracy": [0.6, 0.7],
                                                 "valid_balanced_accuracy": [0.5, 0.6], "valid_loss": [1.0, 0.9]}),
                                   title=odd[2]),
        plots.plot_comparison([{"name": n, "balanced_accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "params": 1e6}
                               for n in odd], title=odd[0]),
        attribution_figure(np.zeros((8, 8)), {f"occlusion → {odd[1]}": np.ones((8, 8))}, f"{odd[2]}.png: x"),
    ]
    for fig in figures:
        texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize"))
                 if "$" in t.get_text()]
        assert texts and not [t.get_text() for t in texts if is_math_text(t.get_text())]
        alt = figure_text(fig)
        assert png_bytes(fig).startswith(b"\x89PNG")  # drawn: a$\b$ read as TeX was an error here
        assert "\\$" not in alt and any(name in alt for name in odd), alt  # the alt text shows the name as written


def test_every_confusion_cell_s_number_stands_out_from_its_colour():
    """Each count and rate, on every shade of the scale, at least WCAG's 4.5:1 for small text. The midpoint rule put
    white on mid blues (a row at 55 %, a count just over half the largest) at about 2.5:1."""
    cm = np.array([[11, 9, 0, 20], [12, 8, 0, 0], [1, 2, 3, 4], [0, 0, 0, 5]])  # rates 27.5 %, 55 %, 60 %…
    fig = plots.plot_confusion_matrix(cm, ["a", "b", "c", "d"])
    checked = 0
    for ax in (ax for ax in fig.axes if ax.images):
        image = ax.images[0]
        values = image.get_array()
        for text in ax.texts:
            x, y = (round(v) for v in text.get_position())
            assert _contrast(text.get_color(), image.cmap(image.norm(values[y, x]))) >= 4.5, text.get_text()
            checked += 1
    assert checked == 2 * cm.size
