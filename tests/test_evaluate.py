"""evaluate and compare on tiny trained runs."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cxr_fast
from cxr_fast.bundle import load_run
from cxr_fast.compare import compare_runs
from cxr_fast.config import find_recipe
from cxr_fast.data.manifest import prepare, read_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluate import domain_auc, evaluate
from tests.pages import image_sources, parse


def test_evaluate_writes_predictions_metrics_figures_and_report(tiny_runs, tiny_data):
    result = evaluate(tiny_runs[0], n_boot=200, progress=False)
    out = result.out_dir
    assert out == tiny_runs[0] / "eval" / "data-test"
    predictions = pd.read_csv(out / "predictions.csv")
    prob_cols = [c for c in predictions if c.startswith("p_")]
    assert prob_cols == ["p_COVID-19", "p_Normal", "p_Pneumonia"]
    np.testing.assert_allclose(predictions[prob_cols].sum(axis=1), 1.0, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "macro_average_precision",
                "confusion_matrix", "balanced_accuracy_ci", "macro_roc_auc_ci", "ece", "ece_calibrated", "per_class"):
        assert key in metrics, key
    lo, hi = metrics["balanced_accuracy_ci"]
    assert lo <= metrics["balanced_accuracy"] <= hi
    # what the intervals and probabilities came from, for a folder copied away from its run
    assert metrics["bootstrap"] == {"replicates": 200, "seed": 0}
    assert metrics["manifest_sha256"] == load_run(tiny_runs[0]).config["manifest_sha256"]  # the data it scored
    assert metrics["versions"]["numpy"] == np.__version__ and metrics["versions"]["cxr_fast"] == cxr_fast.__version__
    assert sum(map(sum, metrics["confusion_matrix"])) == len(predictions)
    for fig in ("confusion_matrix", "roc_curves", "pr_curves", "reliability"):
        assert (out / f"{fig}.png").is_file(), fig
    sources = image_sources(out / "report.html")
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    # every figure's title, and so its alt text, names the model, the data and the number of images it shows
    n_test = int((read_manifest(tiny_data)["split"] == "test").sum())
    shown = f"{tiny_runs[0].name} on data-test ({n_test} images)"
    alts = [image["alt"] for image in parse(out / "report.html").images]
    assert len(alts) == 4 and all(shown in alt for alt in alts), alts
    md_alts = re.findall(r"!\[([^\]]*)\]", (out / "report.md").read_text())
    assert len(md_alts) == 4 and all(shown in alt for alt in md_alts), md_alts
    assert shown in Image.open(out / "confusion_matrix.png").info["Title"]  # a PNG copied out still says it
    with pytest.raises(CxrFastError, match="--force"):
        evaluate(tiny_runs[0], n_boot=200, progress=False)


def test_evaluate_tta_and_valid_split(tiny_runs, tiny_data, tmp_path):
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    plain = evaluate(run, split="valid", n_boot=100, progress=False)
    valid = read_manifest(tiny_data).query("split == 'valid'")
    assert list(plain.predictions["path"]) == list(valid["path"]) and plain.metrics["n"] == len(valid)
    result = evaluate(run, split="valid", tta=True, n_boot=100, progress=False)
    assert result.out_dir.name == "data-valid-tta" and result.metrics["tta"] is True
    assert plain.out_dir.name == "data-valid" and (plain.out_dir / "metrics.json").is_file()  # kept beside it
    assert result.metrics["data"] == plain.metrics["data"] == "data-valid"


def test_evaluate_tta_refits_the_temperature_on_the_valid_splits_tta_predictions(tiny_runs, tiny_data, tmp_path):
    # The single-view T was applied to the mean of four views' logits; on six cxr-dev runs a T refitted on the valid
    # split's TTA logits gave a lower test NLL every time (docs/benchmarks.md). 3.0 is no fit of these logits.
    from typer.testing import CliRunner

    from cxr_fast.bundle import predict_logits
    from cxr_fast.calibration import fit_temperature, logits_nll, softmax
    from cxr_fast.cli import app
    from cxr_fast.data.manifest import label_indices

    run_dir = _with_temperature(tiny_runs[0], tmp_path, 3.0)
    config_before = (run_dir / "config.json").read_bytes()
    run, manifest = load_run(run_dir), read_manifest(tiny_data)
    valid, test = (manifest[manifest["split"] == s].reset_index(drop=True) for s in ("valid", "test"))
    fitted = fit_temperature(predict_logits(run, valid, tta=True, progress=False),
                             label_indices(valid["label"], run.classes))
    result = evaluate(run_dir, tta=True, n_boot=20, progress=False)
    m = result.metrics
    assert m["temperature"] == pytest.approx(fitted) and fitted != 3.0
    assert (m["temperature_single_view"], m["temperature_used"], m["temperature_valid_images"]) == (3.0, "tta", len(valid))
    assert m["temperature_tta"] == m["temperature"]
    test_logits, y = predict_logits(run, test, tta=True, progress=False), label_indices(test["label"], run.classes)
    assert m["nll_calibrated"] == pytest.approx(logits_nll(test_logits, y, fitted))
    probs = result.predictions[[f"p_{c}" for c in run.classes]].to_numpy()
    np.testing.assert_allclose(probs, softmax(test_logits, fitted), atol=1e-6)  # predictions.csv is scaled by it too
    assert json.loads((result.out_dir / "metrics.json").read_text())["temperature_used"] == "tta"
    said = ("fitted on the valid split&#x27;s TTA predictions" if fitted != 1.0 else  # too few valid mistakes to fit
            "wrong predictions with TTA to fit one")
    assert said in (result.out_dir / "report.html").read_text()
    assert (run_dir / "config.json").read_bytes() == config_before  # fitted again each time, stored nowhere
    # without TTA the run's own temperature, and none of the TTA keys
    plain = evaluate(run_dir, n_boot=20, progress=False).metrics
    assert plain["temperature"] == 3.0 and "temperature_used" not in plain
    shown = CliRunner().invoke(app, ["evaluate", str(run_dir), "--tta", "--force"])
    assert shown.exit_code == 0, shown.output
    assert (f"TTA: temperature refitted on the {len(valid)} valid images' TTA predictions, T = {fitted:.3f} "
            "(single-view T = 3.000, not used)") in shown.output.replace("\n", " ")


def _external_copy(tiny_data, tmp_path, transform):
    """A manifest made from the tiny data's images after `transform` (another 'hospital')."""
    src = tmp_path / "other"
    for row in read_manifest(tiny_data).itertuples():
        target = src / row.label / (str(row.sha256)[:12] + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        transform(Image.open(row.path)).save(target)
    prepare(src, tmp_path / "other-data", cache_size=0, progress=False)
    return tmp_path / "other-data"


def test_external_validation_uses_all_images_and_warns_on_shift(tiny_runs, tiny_data, tmp_path):
    from PIL import ImageOps

    other = _external_copy(tiny_data, tmp_path, lambda im: ImageOps.invert(im.convert("L")))
    result = evaluate(tiny_runs[0], data=other, n_boot=100, progress=False)
    assert result.metrics["n"] == len(read_manifest(other))
    assert result.shift["out_of_distribution"], result.shift
    assert "Distribution shift" in (result.out_dir / "report.html").read_text()


def test_calibration_text_says_which_temperature_a_tta_evaluation_used(tiny_runs):
    from cxr_fast.evaluate import calibration_text, tta_temperature_line

    run = load_run(tiny_runs[0])
    common = {"tta": True, "ece": 0.1, "ece_calibrated": 0.05, "temperature_single_view": 1.4}
    refit = {**common, "temperature": 1.1, "temperature_tta": 1.1, "temperature_used": "tta", "temperature_valid_images": 9}
    assert "T = 1.10, fitted on the valid split's TTA predictions, as evaluated here; training's single-view T is " \
           "1.40" in calibration_text(run, refit)
    assert tta_temperature_line(refit) == ("TTA: temperature refitted on the 9 valid images' TTA predictions, "
                                           "T = 1.100 (single-view T = 1.400, not used)")
    kept = {**common, "temperature": 1.4, "temperature_tta": None, "temperature_used": "single_view",
            "temperature_note": "the training manifest has no valid images"}
    assert "not on TTA predictions: the training manifest has no valid images" in calibration_text(run, kept)
    assert tta_temperature_line(kept) == ("TTA: temperature not refitted, single-view T = 1.400 kept: the training "
                                          "manifest has no valid images")
    assert tta_temperature_line({"tta": False, "temperature": 1.4}) is None


def test_external_tta_refits_on_the_training_valid_split_or_keeps_the_single_view_temperature(tiny_runs, tiny_data,
                                                                                               tmp_path):
    # Another collection has no valid split of its own: T is refitted on the training manifest's valid images, the
    # ones training calibrated on; where that manifest is gone (a bundle shared alone) the single-view T is kept, and
    # the evaluation says so rather than failing.
    other = _external_copy(tiny_data, tmp_path, lambda im: im)
    at_hand = _with_temperature(tiny_runs[0], tmp_path / "a", 3.0)
    m = evaluate(at_hand, data=other, tta=True, n_boot=20, progress=False).metrics
    assert m["temperature_used"] == "tta" and m["temperature"] != 3.0
    assert m["temperature_valid_images"] == int((read_manifest(tiny_data)["split"] == "valid").sum())
    gone = _with_temperature(tiny_runs[0], tmp_path / "b", 3.0, data=str(tmp_path / "moved-away"))
    result = evaluate(gone, data=other, tta=True, n_boot=20, progress=False)
    m = result.metrics
    assert (m["temperature"], m["temperature_tta"], m["temperature_used"]) == (3.0, None, "single_view")
    assert "not at hand" in m["temperature_note"]
    assert "on single views of the valid split, not on TTA predictions" in (result.out_dir / "report.html").read_text()


def test_tta_keeps_the_single_view_temperature_when_valid_images_are_gone(tiny_runs, tiny_data, tmp_path):
    # The training manifest is there and unchanged, but a valid film was deleted since (a cleaned-up share): the refit
    # would be on fewer films than training calibrated on, so the single-view T is kept and the note says why.
    from cxr_fast.data.manifest import manifest_digest

    data = _external_copy(tiny_data, tmp_path, lambda im: im)
    run = _with_temperature(tiny_runs[0], tmp_path, 2.0, data=str(data), manifest_sha256=manifest_digest(data))
    valid = read_manifest(data).query("split == 'valid'")
    Path(valid["path"].iloc[0]).unlink()
    m = evaluate(run, tta=True, n_boot=20, progress=False).metrics
    assert (m["temperature"], m["temperature_tta"], m["temperature_used"]) == (2.0, None, "single_view")
    assert m["temperature_note"] == f"1 of the training manifest's {len(valid)} valid images no longer exist"


def test_predictions_flag_the_colour_images_prepare_found_as_predict_does(tiny_runs, tiny_data, tmp_path):
    # predict's results named a colour photo or chart in a `warning` column; evaluate's predictions.csv said nothing
    other = _external_copy(tiny_data, tmp_path, lambda im: im)
    old = pd.read_csv(other / "manifest.csv").drop(columns=["colour", "upright"])  # as prepare wrote it before them
    old.to_csv(other / "old.csv", index=False)
    unknown = evaluate(tiny_runs[0], data=other / "old.csv", n_boot=20, progress=False)
    assert "warning" not in pd.read_csv(unknown.out_dir / "predictions.csv").columns  # nothing measured, no claim
    film = read_manifest(tiny_data).query("split == 'test'").iloc[0]  # a copy of a training film would be left out
    a = np.asarray(Image.open(film.path).convert("L"))
    Image.fromarray(np.dstack([a, a // 2, 255 - a]), "RGB").save(tmp_path / "other" / film.label / "photo.png")
    Image.fromarray(255 - a).save(tmp_path / "other" / film.label / "negative.png")  # and a negative film
    prepare(tmp_path / "other", tmp_path / "with-photo", cache_size=0, progress=False)
    result = evaluate(tiny_runs[0], data=tmp_path / "with-photo", n_boot=20, progress=False)
    table = pd.read_csv(result.out_dir / "predictions.csv", keep_default_na=False)
    flagged = table[table["warning"] != ""].sort_values("path")
    assert [Path(p).name for p in flagged["path"]] == ["negative.png", "photo.png"] and len(table) > 2
    negative, photo = flagged["warning"]
    assert photo.startswith("a colour image (100% of its pixels are coloured)")
    assert negative.startswith("looks like an inverted (negative) film")  # predict's words
    # and the evaluation says so where it is read, not only in the CSV (they are scored like the others)
    assert result.metrics["flagged_images"] == 2 and "flagged_images" not in unknown.metrics
    sentence = f"2 of {result.metrics['n']} images look like no upright grey chest film (in colour, or a negative film)"
    assert sentence in (result.out_dir / "report.html").read_text(encoding="utf-8")
    from typer.testing import CliRunner

    from cxr_fast.cli import app

    shown = CliRunner().invoke(app, ["evaluate", str(tiny_runs[0]), "--data", str(tmp_path / "with-photo"), "--force"])
    assert shown.exit_code == 0 and f"warning: {sentence}" in shown.output.replace("\n", " "), shown.output


def test_domain_auc_is_chance_for_alike_and_high_for_different():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 5)), rng.normal(size=(80, 5))
    assert domain_auc(a, b) < 0.7
    assert domain_auc(a, b + 3) > 0.95


def test_evaluate_errors_are_one_line(tiny_runs, tiny_data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = pd.read_csv(tiny_data / "manifest.csv")
    manifest.loc[0, "label"] = "Tuberculosis"
    manifest.to_csv(bad / "manifest.csv", index=False)
    with pytest.raises(CxrFastError, match="Tuberculosis") as e:
        evaluate(tiny_runs[0], data=bad, progress=False)
    assert "\n" not in str(e.value)
    gone = tmp_path / "gone"
    gone.mkdir()
    manifest = read_manifest(tiny_data)
    manifest.loc[0, "path"] = str(tmp_path / "no-such.png")
    manifest.to_csv(gone / "manifest.csv", index=False)
    with pytest.raises(CxrFastError, match="no longer exist") as e:
        evaluate(tiny_runs[0], data=gone, progress=False)
    assert "\n" not in str(e.value)


def test_a_setting_with_one_run_has_no_spread_not_a_spread_of_zero(tmp_path):
    from cxr_fast.compare import summarise

    table = pd.DataFrame({"run": ["a0", "a1", "b0"], "arch": ["a", "a", "b"], "setting": ["x", "x", "y"],
                          "balanced_accuracy": [0.8, 0.9, 0.7], **{k: 0.5 for k in (
                              "ci_low", "ci_high", "macro_f1", "macro_roc_auc", "ece", "params", "train_seconds",
                              "images_per_s")}})
    summary = summarise(table).set_index("arch")
    assert summary.loc["a", "balanced_accuracy_sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert np.isnan(summary.loc["b", "balanced_accuracy_sd"])
    summary.to_csv(tmp_path / "comparison.csv")
    assert (tmp_path / "comparison.csv").read_text().splitlines()[2].startswith("b,1,0.7,,")


def test_runs_that_share_a_seed_are_not_passed_off_as_a_spread_across_seeds(tiny_runs, tmp_path):
    import shutil

    twin = shutil.copytree(tiny_runs[0], tmp_path / "resumed", ignore=shutil.ignore_patterns("eval", "interpret"))
    with pytest.warns(UserWarning, match="trained alike with the same seed 0; the spread shown .* not a spread across"):
        result = compare_runs([tiny_runs[0], twin, tiny_runs[1]], out=tmp_path / "cmp", n_boot=20)
    assert result.summary["runs"].tolist() == [3]


def test_compare_on_the_valid_split_says_so_in_its_report(tiny_runs, tmp_path):
    # compare_runs(split="valid") scored the valid images under a report headed "the shared test split"
    result = compare_runs(tiny_runs, out=tmp_path / "cmp", split="valid", n_boot=20)
    report = (tmp_path / "cmp" / "report.html").read_text()
    assert result.split == "valid" and "shared valid split" in report and "same valid images" in report
    assert "test split" not in report and "test images" not in report
    assert Image.open(tmp_path / "cmp" / "comparison.png").info["Title"].startswith(
        "Architecture comparison on the valid split;")  # the figure too, copied out of the report


def test_compare_two_runs_gives_table_csv_and_mcnemar(tiny_runs, tmp_path, monkeypatch):
    from cxr_fast import plots

    original, drawn = plots.plot_comparison, []
    monkeypatch.setattr(plots, "plot_comparison", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    result = compare_runs(tiny_runs, out=tmp_path / "cmp", n_boot=100)
    # the two seeds' bar is their mean, its error bar the mean of their intervals: the axis says so
    assert drawn[-1].axes[0].get_xlabel() == "balanced accuracy (error bars: mean of its runs' 95 % bootstrap CIs)"
    assert len(result.table) == 2 and set(result.table["seed"]) == {0, 1}
    assert (tmp_path / "cmp" / "comparison.csv").is_file() and (tmp_path / "cmp" / "report.html").is_file()
    csv = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert {"balanced_accuracy", "ci_low", "ci_high", "macro_f1", "macro_roc_auc", "ece", "params",
            "train_seconds", "images_per_s"} <= set(csv.columns)
    assert len(result.mcnemar) == 1 and 0.0 <= result.mcnemar["p_value"][0] <= 1.0
    # every pair is tested uncorrected: the report says so, as evaluation.md does
    assert "without correction for multiple comparisons" in (tmp_path / "cmp" / "report.html").read_text()
    summary = result.summary
    assert summary["runs"].tolist() == [2]  # same arch, two seeds → one row with mean ± sd
    assert summary["balanced_accuracy"][0] == pytest.approx(result.table["balanced_accuracy"].mean())
    with pytest.raises(CxrFastError, match="at least two"):
        compare_runs(tiny_runs[:1], out=tmp_path / "cmp2")
    same_run_twice = [tiny_runs[0], tiny_runs[0].parent / ".." / tiny_runs[0].parent.name / tiny_runs[0].name]
    with pytest.raises(CxrFastError, match="the same run is given twice"):  # it would be compared with itself
        compare_runs(same_run_twice, out=tmp_path / "cmp3")
    assert not (tmp_path / "cmp3").exists()


def test_compare_keeps_one_architecture_trained_two_ways_apart(tiny_runs, tiny_data, tmp_path):
    from cxr_fast.config import resolve_config
    from cxr_fast.train import train
    from tests.conftest import TINY

    longer = train(tiny_data, resolve_config(epochs=3, seed=0, **TINY), out=tmp_path / "longer", quiet=True)
    result = compare_runs([*tiny_runs, longer], out=tmp_path / "cmp", n_boot=50)
    labels = dict(zip(result.summary["arch"], result.summary["runs"], strict=True))
    # the two seeds of the 2-epoch recipe are one setting; the 3-epoch run is another, not a third "seed"
    assert labels == {f"cxresnet_tiny ({tiny_runs[0].name})": 2, "cxresnet_tiny (longer)": 1}
    # the report: one run has no spread ("—", not 0.000); p is never shown as 0.000; exact tests have no statistic
    report = (tmp_path / "cmp" / "report.md").read_text()
    single = next(line for line in report.splitlines() if line.startswith("| cxresnet_tiny (longer) |"))
    assert single.split("|")[4].strip() == "—"
    assert "0.000 |" not in next(line for line in report.splitlines() if "| exact |" in line)


def test_compare_shows_a_tiny_p_value_as_below_a_thousandth(tiny_runs, tmp_path, monkeypatch):
    import cxr_fast.compare

    monkeypatch.setattr(cxr_fast.compare, "mcnemar", lambda *a: {"b": 24, "c": 0, "statistic": 0.0,
                                                                    "p_value": 1.19e-07, "method": "exact"})
    compare_runs(tiny_runs, out=tmp_path / "cmp", n_boot=20)
    row = next(line for line in (tmp_path / "cmp" / "report.md").read_text().splitlines() if "| exact |" in line)
    assert "< 0.001" in row and "0.000" not in row


def test_compare_trains_each_architecture_under_one_budget(tiny_data, tmp_path):
    from cxr_fast.compare import compare_archs

    result = compare_archs(tiny_data, ["cxresnet_tiny", "convnet"], out=tmp_path / "cmp", quiet=True,
                           size=48, epochs=1, bs=16)
    assert sorted(result.summary["arch"]) == ["convnet", "cxresnet_tiny"]
    runs = sorted(p.name for p in (tmp_path / "cmp" / "runs").iterdir())
    assert runs == ["convnet-seed0", "cxresnet_tiny-seed0"]
    assert (tmp_path / "cmp" / "report" / "comparison.csv").is_file()
    assert len(result.mcnemar) == 1
    with pytest.raises(CxrFastError, match="--archs or --recipes"):
        compare_archs(tiny_data, out=tmp_path / "cmp2")



def test_compare_names_a_recipe_s_runs_by_the_recipe_so_two_recipes_of_one_arch_do_not_collide(tiny_data, tmp_path,
                                                                                               monkeypatch):
    import cxr_fast.compare
    import cxr_fast.train

    trained = []
    monkeypatch.setattr(cxr_fast.train, "train", lambda data, cfg, out, quiet, resume: trained.append((out.name, cfg.arch)) or out)
    monkeypatch.setattr(cxr_fast.compare, "compare_runs", lambda runs, out: runs)
    cxr_fast.compare.compare_archs(tiny_data, recipes=["demo", "cxresnet"], out=tmp_path / "cmp")
    assert trained == [("demo-seed0", "cxresnet"), ("cxresnet-seed0", "cxresnet")]  # both recipes train cxresnet
    with pytest.raises(CxrFastError, match="given twice: demo-seed0 .two runs would share one folder"):
        cxr_fast.compare.compare_archs(tiny_data, recipes=["demo", "recipes/demo.yaml"], out=tmp_path / "cmp2")
    assert len(trained) == 2  # refused before training
    for folder in ("a", "b"):  # two recipe files of one name: each run named by its folder too
        (tmp_path / folder).mkdir()
        shutil.copy(find_recipe("demo"), tmp_path / folder / "lite.yaml")
    cxr_fast.compare.compare_archs(tiny_data, recipes=[tmp_path / "a" / "lite.yaml", tmp_path / "b" / "lite.yaml"],
                                   out=tmp_path / "cmp3")
    assert [name for name, _ in trained[2:]] == ["a-lite-seed0", "b-lite-seed0"]
    for folder in ("x/recipes", "y/recipes"):  # two folders of one name: as many folders as tell them apart
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(find_recipe("demo"), tmp_path / folder / "lite.yaml")
    cxr_fast.compare.compare_archs(tiny_data, recipes=[tmp_path / "x/recipes/lite.yaml", tmp_path / "y/recipes/lite.yaml"],
                                   out=tmp_path / "cmp4")
    assert [name for name, _ in trained[4:]] == ["x-recipes-lite-seed0", "y-recipes-lite-seed0"]
    shutil.copy(find_recipe("demo"), tmp_path / "x" / "recipes" / "lite.yml")  # one folder, one stem: whole names
    cxr_fast.compare.compare_archs(tiny_data, recipes=[tmp_path / "x/recipes/lite.yaml", tmp_path / "x/recipes/lite.yml"],
                                   out=tmp_path / "cmp5")
    assert [name for name, _ in trained[6:]] == ["lite.yaml-seed0", "lite.yml-seed0"]


def test_compare_refuses_runs_of_different_manifests_before_scoring_them(tiny_runs, tmp_path, monkeypatch):
    import cxr_fast.compare

    other = shutil.copytree(tiny_runs[1], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["data"] = str(tmp_path / "elsewhere")
    (other / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(cxr_fast.compare, "score_run", lambda *a, **k: pytest.fail("scored before refusing"))
    with pytest.raises(CxrFastError, match="trained on different manifests"):
        cxr_fast.compare.compare_runs([tiny_runs[0], other], out=tmp_path / "cmp")
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "report.html").write_text("earlier")
    with pytest.raises(CxrFastError, match="already exists"):
        cxr_fast.compare.compare_runs(tiny_runs, out=tmp_path / "cmp")


def test_split_with_external_data_is_refused_and_a_fitted_split_is_flagged_as_optimistic(tiny_runs, tiny_data, tmp_path):
    from cxr_fast.evaluate import select_items

    run = load_run(tiny_runs[0])
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    with pytest.raises(CxrFastError, match="--split valid applies to the training manifest; with --data every image"):
        select_items(run, other, "valid")
    assert len(select_items(run, other, "test")[0]) == len(read_manifest(other))  # the default: every image
    with pytest.warns(UserWarning, match="valid split are optimistic: the kept epoch and the temperature were chosen"):
        select_items(run, None, "valid")
    with pytest.warns(UserWarning, match="train split are optimistic: the model learned from these images"):
        select_items(run, None, "train")


def test_two_datasets_in_folders_of_one_name_get_their_own_results(tiny_runs, tiny_data, tmp_path):
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    first = shutil.copytree(tiny_data, tmp_path / "a" / "ext")
    second = shutil.copytree(tiny_data, tmp_path / "b" / "ext")
    one = evaluate(run, data=first, n_boot=50, progress=False)
    kept = (one.out_dir / "metrics.json").read_text()
    two = evaluate(run, data=second, n_boot=50, progress=False)  # no --force needed, and nothing replaced
    assert one.out_dir.name == "ext-all" and two.out_dir.name.startswith("ext-all-") and two.out_dir != one.out_dir
    assert (one.out_dir / "metrics.json").read_text() == kept
    assert json.loads((two.out_dir / "metrics.json").read_text())["manifest"] == str(second.resolve())
    with pytest.raises(CxrFastError, match="add --force"):  # the same dataset again is still refused
        evaluate(run, data=second, n_boot=50, progress=False)



def test_a_manifest_prepared_again_since_training_is_refused(tiny_runs, tmp_path):
    # Preparing again into the run's data folder (another seed, more images) reshuffles the splits: the "test"
    # images would then include ones the model learned from, and every score would be silently inflated.
    from cxr_fast.interpret import interpret

    data = shutil.copytree(load_run(tiny_runs[0]).config["data"], tmp_path / "data")
    runs = []
    for name, original in (("run", tiny_runs[0]), ("other", tiny_runs[1])):
        run = shutil.copytree(original, tmp_path / name)
        config = json.loads((run / "config.json").read_text())
        assert config["manifest_sha256"]
        (run / "config.json").write_text(json.dumps({**config, "data": str(data)}))
        runs.append(run)
    evaluate(runs[0], force=True)  # the manifest as trained on
    manifest = data / "manifest.csv"
    manifest.write_bytes(manifest.read_bytes().replace(b",train,", b",test,", 1))  # a training image now "test"
    for score in (lambda: evaluate(runs[0], force=True), lambda: compare_runs(runs, out=tmp_path / "c"),
                  lambda: interpret(runs[0], n=1, audit_n=1, progress=False)):
        with pytest.raises(CxrFastError, match=f"{data}: the manifest changed since run was trained on it") as e:
            score()
        assert "\n" not in str(e.value)


def test_the_report_of_a_fitted_split_says_it_is_optimistic(tiny_runs, tmp_path):
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    with pytest.warns(UserWarning, match="optimistic"):
        result = evaluate(run, split="valid", n_boot=50, force=True, progress=False)
    assert "Scores on the valid split are optimistic" in (result.out_dir / "report.html").read_text()
    plain = evaluate(run, n_boot=50, force=True, progress=False)
    assert "optimistic" not in (plain.out_dir / "report.html").read_text()


def test_a_stopped_compare_leaves_no_half_written_out_and_a_file_as_out_is_refused(tiny_runs, tmp_path, monkeypatch):
    import cxr_fast.report

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_fast.report, "write_report", interrupt)  # Ctrl-C after the CSV files, before the page
    with pytest.raises(KeyboardInterrupt):
        compare_runs(tiny_runs, out=tmp_path / "cmp", n_boot=20)
    assert not (tmp_path / "cmp").exists() and not list(tmp_path.glob(".cmp*"))
    monkeypatch.undo()
    assert (compare_runs(tiny_runs, out=tmp_path / "cmp", n_boot=20).out_dir / "report.html").is_file()
    (tmp_path / "afile").write_text("keep")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(CxrFastError, match="afile: exists and is not a folder"):
            compare_runs(tiny_runs, out=out, n_boot=20)


def test_a_file_where_a_runs_eval_or_interpret_folder_goes_is_refused_before_any_work(tiny_runs, tmp_path,
                                                                                      monkeypatch):
    # both commands predicted (and interpret drew every map) first, then died with a NotADirectoryError traceback
    import cxr_fast.evaluate
    import cxr_fast.interpret

    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    for module in (cxr_fast.evaluate, cxr_fast.interpret):
        monkeypatch.setattr(module, "predict_logits", lambda *a, **k: pytest.fail("predicted first"))
    for name in ("eval", "interpret"):
        shutil.rmtree(run / name, ignore_errors=True)  # other tests' results on the shared run
        (run / name).write_text("in the way")
    with pytest.raises(CxrFastError, match=r"run/eval: exists and is not a folder \(move it away\)"):
        evaluate(run, n_boot=10, progress=False)
    with pytest.raises(CxrFastError, match=r"run/interpret: exists and is not a folder \(move it away\)"):
        cxr_fast.interpret.interpret(run, progress=False)


def test_a_compare_of_one_run_is_refused_before_it_trains(tiny_data, tmp_path, monkeypatch):
    import cxr_fast.train
    from cxr_fast.compare import compare_archs

    monkeypatch.setattr(cxr_fast.train, "train", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(CxrFastError, match=r"needs at least two runs, and this would train one \(convnet-seed0\)"):
        compare_archs(tiny_data, ["convnet"], out=tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_compare_tells_apart_runs_of_one_folder_name(tiny_runs, tmp_path):
    namesake = shutil.copytree(tiny_runs[1], tmp_path / "elsewhere" / tiny_runs[0].name)
    result = compare_runs([tiny_runs[0], namesake], out=tmp_path / "cmp", n_boot=20)
    assert list(result.table["run"]) == [str(tiny_runs[0]), str(namesake)]
    assert (result.mcnemar["model_a"] != result.mcnemar["model_b"]).all()
    assert str(result.table["seed"].dtype) == "Int64"
    runs_table = (tmp_path / "cmp" / "report.md").read_text()
    assert '{"' not in runs_table  # the recipe's JSON stays in runs.csv



def test_compare_fills_an_existing_empty_out_such_as_the_current_folder(tiny_runs, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    compare_runs(tiny_runs, out=".", n_boot=20)
    assert (here / "report.html").is_file() and (here / "runs.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # nothing left beside it



def test_another_manifest_file_in_the_training_folder_is_another_collection(tiny_runs, tmp_path):
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    data = shutil.copytree(config["data"], tmp_path / "data")
    (run / "config.json").write_text(json.dumps({**config, "data": str(data)}))
    shutil.copy(data / "manifest.csv", data / "other.csv")  # --data may name a manifest file: not the one trained on
    result = evaluate(run, data=data / "other.csv", n_boot=20, progress=False)
    assert result.out_dir.name == "data-other-all"  # every image of it less those seen, not the training test split


def test_two_manifests_of_one_folder_get_their_own_results(tiny_runs, tiny_data, tmp_path):
    # both were written to ext-all, and --force on the second deleted the first one's results
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    ext = shutil.copytree(tiny_data, tmp_path / "ext")
    manifest = pd.read_csv(ext / "manifest.csv")
    manifest[manifest["label"] != "Normal"].to_csv(ext / "no_normal.csv", index=False)
    whole = evaluate(run, data=ext, n_boot=20, progress=False)
    kept = (whole.out_dir / "predictions.csv").read_text()
    part = evaluate(run, data=ext / "no_normal.csv", n_boot=20, progress=False)
    evaluate(run, data=ext / "no_normal.csv", n_boot=20, force=True, progress=False)
    assert (whole.out_dir.name, part.out_dir.name) == ("ext-all", "ext-no_normal-all")
    assert (whole.out_dir / "predictions.csv").read_text() == kept
    assert json.loads((part.out_dir / "metrics.json").read_text())["manifest"] == str((ext / "no_normal.csv").resolve())


def test_the_manifest_check_looks_at_the_split_only_and_a_missing_manifest_is_one_line(tiny_runs, tmp_path):
    from cxr_fast.interpret import interpret

    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    data = shutil.copytree(config["data"], tmp_path / "data")
    (run / "config.json").write_text(json.dumps({**config, "data": str(data)}))
    # rewritten with rows reordered, a column added (prepare again with an image cache) and CRLF line ends: the
    # split is the same, so it is still the manifest the run was trained on
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.iloc[::-1].assign(note="x").to_csv(data / "manifest.csv", index=False, lineterminator="\r\n")
    evaluate(run, n_boot=20, progress=False)
    shutil.rmtree(data)  # moved or deleted since training
    with pytest.raises(CxrFastError, match=f"{data}: manifest not found") as e:
        evaluate(run, n_boot=20, force=True, progress=False)
    assert "\n" not in str(e.value)
    # ... and says how to point the run to its new place, not to prepare a new one
    assert f'write its new folder as "data" in {run / "config.json"}, or give it to evaluate or interpret as --data' \
        in str(e.value)
    with pytest.raises(CxrFastError, match="moved or deleted since run was trained on it"):
        interpret(run, n=2, audit_n=2, progress=False)


def test_an_interrupted_compare_resumes_keeping_its_finished_runs(tiny_data, tmp_path, monkeypatch, capsys):
    from fastai.callback.core import Callback

    import cxr_fast.train
    from cxr_fast.compare import compare_archs
    from tests.conftest import TINY

    class CtrlCAfterFirstEpoch(Callback):
        order = 60  # after the checkpoint is written

        def after_epoch(self):
            raise KeyboardInterrupt

    real_train, calls = cxr_fast.train.train, []

    def second_run_interrupted(data, cfg, **kwargs):
        calls.append(kwargs["out"].name)
        if len(calls) == 2:
            kwargs["extra_cbs"] = [CtrlCAfterFirstEpoch()]
        return real_train(data, cfg, **kwargs)

    monkeypatch.setattr(cxr_fast.train, "train", second_run_interrupted)
    settings = dict(seeds=(0, 1), out=tmp_path / "cmp", epochs=2, size=TINY["size"], bs=TINY["bs"], lr=TINY["lr"],
                    quiet=True)
    with pytest.raises(KeyboardInterrupt, match="cxresnet_tiny-seed1 .1 of 2 runs finished.*--resume"):
        compare_archs(tiny_data, ["cxresnet_tiny"], **settings)
    first = tmp_path / "cmp" / "runs" / "cxresnet_tiny-seed0"
    kept = (first / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(CxrFastError, match="trained with other settings .epochs 2, not 3"):
        compare_archs(tiny_data, ["cxresnet_tiny"], **{**settings, "epochs": 3}, resume=True)
    # the interrupted run too: it resumed at its own 2 epochs beside runs of 3, in one report, without a word
    with pytest.raises(CxrFastError, match="cxresnet_tiny-seed1: trained with other settings .epochs 2, not 3"):
        compare_archs(tiny_data, ["cxresnet_tiny", "convnet"], **{**settings, "epochs": 3, "seeds": (1,)},
                      resume=True)
    assert calls == ["cxresnet_tiny-seed0", "cxresnet_tiny-seed1"]
    capsys.readouterr()
    result = compare_archs(tiny_data, ["cxresnet_tiny"], **{**settings, "quiet": False}, resume=True)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("compare:")]
    assert said == ["compare: keeping the finished run cxresnet_tiny-seed0 (1 of 2)",
                    "compare: resuming cxresnet_tiny-seed1 (2 of 2)"]  # it said "training" for both
    assert (first / "model.safetensors").stat().st_mtime_ns == kept  # the finished run was not trained again
    assert calls == ["cxresnet_tiny-seed0", "cxresnet_tiny-seed1", "cxresnet_tiny-seed1"]  # the other resumed
    assert len(result.table) == 2 and (tmp_path / "cmp" / "report" / "report.html").is_file()
    # run again once finished: it said "training" each kept run, then refused the report folder it had written
    with pytest.raises(CxrFastError, match=r"cmp: this comparison is finished \(its report: .*report\); nothing to "
                                           "resume"):
        compare_archs(tiny_data, ["cxresnet_tiny"], **{**settings, "quiet": False}, resume=True)
    assert "compare: training" not in capsys.readouterr().err
    with pytest.raises(CxrFastError, match="no interrupted comparison to resume"):
        compare_archs(tiny_data, ["cxresnet_tiny"], **{**settings, "out": tmp_path / "none"}, resume=True)


def test_a_compare_stopped_before_its_first_epoch_is_started_again_by_the_same_command(tiny_data, tmp_path,
                                                                                      monkeypatch):
    # it left an empty OUT/runs, and the same command was refused as "an unfinished comparison is here"
    import cxr_fast.train
    from cxr_fast.compare import compare_archs
    from tests.conftest import TINY

    real_train = cxr_fast.train.train

    def stopped_at_once(data, cfg, *, out, **kwargs):
        out.mkdir(parents=True)  # as train's Ctrl-C handler leaves an --out it made: empty
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_fast.train, "train", stopped_at_once)
    settings = dict(seeds=(0, 1), out=tmp_path / "cmp", epochs=1, size=TINY["size"], bs=TINY["bs"], lr=TINY["lr"],
                    quiet=True)
    with pytest.raises(KeyboardInterrupt, match="0 of 2 runs finished"):
        compare_archs(tiny_data, ["cxresnet_tiny"], **settings)
    assert (tmp_path / "cmp" / "runs" / "cxresnet_tiny-seed0").is_dir()
    monkeypatch.setattr(cxr_fast.train, "train", real_train)
    result = compare_archs(tiny_data, ["cxresnet_tiny"], **settings)
    assert len(result.table) == 2
    # a folder holding anything of a run is not taken for an empty one
    (tmp_path / "other" / "runs" / "a").mkdir(parents=True)
    (tmp_path / "other" / "runs" / "a" / "notes.txt").write_text("mine")
    with pytest.raises(CxrFastError, match="an unfinished comparison is here"):
        compare_archs(tiny_data, ["cxresnet_tiny"], **{**settings, "out": tmp_path / "other"})
    assert (tmp_path / "other" / "runs" / "a" / "notes.txt").read_text() == "mine"


def metrics_table_text(width: int = 250, **metrics) -> str:
    """The console table of made-up metrics (the figures a test does not set are placeholders)."""
    from rich.console import Console

    from cxr_fast.evaluate import metrics_table

    metrics = {"run": "r", "data": "d", "n": 5, "balanced_accuracy": 0.5, "balanced_accuracy_ci": [0.3, 0.7],
               "accuracy": 0.6, "macro_f1": 0.5, "macro_roc_auc": None, "temperature": 1.0, "ece": 0.1,
               "per_class": {}, **metrics}
    console = Console(record=True, width=width)
    console.print(metrics_table(metrics))
    return console.export_text()


def test_console_per_class_row_names_every_per_class_figure_and_dashes_the_undefined():
    from cxr_fast.metrics import classification_metrics

    y = np.array([0, 0, 1, 1, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 0, 1]]  # C never called: its NPV is 5 of the 6, its recall 0
    m = classification_metrics(y, probs, ["A", "B", "C"])["per_class"]
    text = metrics_table_text(per_class=m)
    # by hand: A called twice (1 right), B four times (2 right), C never; the Wilson intervals of those counts
    # (1 of 2: 0.09–0.91, 3 of 4: 0.30–0.95, ...; tests/test_metrics.py checks the formula)
    assert "│   A               │ R 0.50 (0.09–0.91)  Spec 0.75 (0.30–0.95)  n 2 " in text
    assert "│                   │ P 0.50 (0.09–0.91)  NPV 0.75 (0.30–0.95)  F1 0.50 " in text
    assert "│   B               │ R 0.67 (0.21–0.94)  Spec 0.33 (0.06–0.79)  n 3 " in text
    assert "│                   │ P 0.50 (0.15–0.85)  NPV 0.50 (0.09–0.91)  F1 0.57 " in text
    # C's one image missed: 0 of 1 is anything up to 0.79; never called, its precision is 0 by convention, no interval
    assert "│   C               │ R 0.00 (0.00–0.79)  Spec 1.00 (0.57–1.00)  n 1 " in text
    assert "│                   │ P 0.00  NPV 0.83 (0.44–0.97)  F1 0.00 " in text
    everything_b = classification_metrics(np.array([1, 1]), np.eye(3)[[1, 1]], ["A", "B", "C"])["per_class"]
    text = metrics_table_text(per_class=everything_b)
    assert "│   B               │ R 1.00 (0.34–1.00)  Spec —  n 2 " in text
    assert "│                   │ P 1.00 (0.34–1.00)  NPV —  F1 1.00 " in text
    # a metrics.json written before the intervals: the figures alone
    for row in m.values():
        for key in ("precision", "recall", "specificity", "npv"):
            del row[f"{key}_ci"]
    text = metrics_table_text(per_class=m)
    assert "│   A               │ R 0.50  Spec 0.75  n 2 " in text and "│                   │ P 0.50  NPV 0.75  F1 0.50 " in text


def test_console_per_class_rows_fit_100_columns_beside_the_widest_label():
    from cxr_fast.metrics import classification_metrics

    y = np.array([0] * 19 + [1] * 1079 + [2] * 2)
    probs = np.eye(3)[np.where(np.arange(len(y)) % 7 == 0, (y + 1) % 3, y)]  # every class right and wrong somewhere
    m = classification_metrics(y, probs, ["COVID-19", "Normal", "Pneumonia"])["per_class"]
    marker = {"with_marker": {"correct": 3, "n": 4}, "without_marker": {"correct": 3, "n": 4}}  # the widest label
    text = metrics_table_text(width=100, per_class=m, by_marker=marker)
    assert "│ accuracy with / without a text marker │" in text
    lines = text.splitlines()
    for name in ("COVID-19", "Normal", "Pneumonia"):
        (row,) = [i for i, line in enumerate(lines) if f"│   {name} " in line]
        # each figure with its interval on one line, nothing wrapped: the row's two lines, then the next class
        assert "R " in lines[row] and "Spec " in lines[row] and "n " in lines[row]
        assert "P " in lines[row + 1] and "NPV " in lines[row + 1] and "F1 " in lines[row + 1]
        assert lines[row + 2].startswith(("│   ", "└"))
    assert max(len(line) for line in lines) <= 100


def test_accuracy_is_split_by_text_marker_where_markers_are_known():
    # a model reading a planted marker scores better where it is: the headline figure alone overstates it
    from cxr_fast.evaluate import accuracy_by_marker, marker_text

    items = pd.DataFrame({"marker_box": ["1,1,5,5", "", "1,1,5,5", None, ""]})
    y = np.array([0, 1, 2, 0, 1])
    logits = np.eye(3)[[0, 0, 2, 0, 2]]  # right on both marked images, on one of three unmarked
    split = accuracy_by_marker(items, y, logits)
    assert split == {"with_marker": {"n": 2, "correct": 2, "accuracy": 1.0},
                     "without_marker": {"n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3)}}
    assert "marker: 1.00 (2 of 2); on those without: 0.33 (1 of 3)" in marker_text(split)
    assert accuracy_by_marker(pd.DataFrame({"marker_box": ["", ""]}), y[:2], logits[:2]) is None
    assert "accuracy with / without a text marker │ 2/2 / 1/3" in metrics_table_text(by_marker=split)
    assert accuracy_by_marker(pd.DataFrame({"path": ["a", "b"]}), y[:2], logits[:2]) is None


def test_a_temperature_that_worsens_the_log_loss_here_is_a_caution():
    from cxr_fast.evaluate import calibration_worse

    base = {"temperature": 0.17, "ece": 0.092, "ece_calibrated": 0.127}
    assert "sharpens (T < 1)" in calibration_worse({**base, "nll": 0.378, "nll_calibrated": 0.952})
    assert calibration_worse({**base, "nll": 0.378, "nll_calibrated": 0.300}) is None
    assert calibration_worse({**base, "temperature": 1.0, "nll": 0.3, "nll_calibrated": 0.4}) is None
    assert "(predictions.csv, predict, serve)" in calibration_worse({**base, "nll": 0.378, "nll_calibrated": 0.952})
    # a T refitted on TTA predictions is applied in this evaluation only: predict and serve use training's
    tta = calibration_worse({**base, "nll": 0.378, "nll_calibrated": 0.952, "tta": True, "temperature_used": "tta"})
    assert "fitted on the valid split's TTA predictions" in tta and "predict, serve" not in tta
    # the console names the figure it judges by: beside an ECE that fell, "worse" alone read as a contradiction
    text = metrics_table_text(temperature=1.3, ece=0.156, ece_calibrated=0.079, nll=0.769, nll_calibrated=0.823)
    assert "0.156 → 0.079  (log-loss rose 0.769 → 0.823: see the report)" in text


def test_the_console_table_is_titled_as_the_figures_are():
    from cxr_fast.evaluate import evaluation_subject

    for tta in (False, True):
        subject = evaluation_subject({"run": "r", "data": "d-test", "n": 5, "tta": tta})
        assert subject == "r on d-test (5 images" + (", with TTA)" if tta else ")")
        assert metrics_table_text(data="d-test", tta=tta).splitlines()[0].strip() == subject


def test_a_temperature_at_its_upper_bound_is_named_and_a_tiny_rise_is_shown():
    # a run at chance got T = 100 (the search's bound): every calibrated probability near 1/3, shown as ECE
    # 0.081 → 0.001, beside "log-loss rose 1.098 → 1.098"
    from cxr_fast.calibration import fit_temperature, flattens_everything

    rng = np.random.default_rng(0)
    noise = rng.normal(size=(90, 3)) * 0.01  # logits that say nothing about the labels
    T = fit_temperature(noise, rng.integers(0, 3, 90))
    assert flattens_everything(T) and not flattens_everything(1.7)
    text = metrics_table_text(temperature=T, ece=0.081, ece_calibrated=0.001, nll=1.09794, nll_calibrated=1.09846)
    assert "log-loss rose 1.0979 → 1.0985" in text
    assert "the fit's upper bound" in text and "a low ECE here means nothing" in text


def test_inference_speed_is_timed_after_an_untimed_warm_up(tiny_runs, monkeypatch):
    # the first pass pays one-off costs: timed alone, the run given first looked slowest, and img/s depended on
    # the order of the arguments
    import cxr_fast.compare
    from cxr_fast.bundle import load_run, predict_logits

    calls = []

    def recording(run, items, **kwargs):
        calls.append(len(items))
        return predict_logits(run, items, **kwargs)

    monkeypatch.setattr(cxr_fast.compare, "predict_logits", recording)
    row, _, _ = cxr_fast.compare.score_run(load_run(tiny_runs[0]), n_boot=10)
    n_test = calls[-1]
    assert calls == [min(n_test, cxr_fast.compare.WARM_UP_IMAGES), n_test] and row["images_per_s"] > 0


def test_metrics_are_split_by_site_where_the_manifest_names_sites():
    # a model that learned one hospital's look is right there and wrong elsewhere: the pooled figure hides it
    from cxr_fast.evaluate import metrics_by_site, site_table

    items = pd.DataFrame({"site": ["A", "A", "A", "B", "B", "B"]})
    y = np.array([0, 1, 2, 0, 1, 1])
    logits = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 5  # all right at A; at B one of three, and no class-2 image
    by_site = metrics_by_site(items, y, logits, ["COVID-19", "Normal", "Pneumonia"])
    assert by_site["A"]["balanced_accuracy"] == pytest.approx(1.0)
    assert by_site["B"] == {"n": 3, "accuracy": pytest.approx(1 / 3), "balanced_accuracy": pytest.approx(0.25),
                            "balanced_accuracy_ci": [0.0, 0.5],  # resampling B's two Normal films: recall 0, ½ or 1
                            "recall": {"COVID-19": 0.0, "Normal": 0.5, "Pneumonia": None},
                            # Wilson intervals of 0/1 and 1/2, as classification_metrics gives them; none without images
                            "recall_ci": {"COVID-19": pytest.approx([0.0, 0.7935], abs=1e-4),
                                          "Normal": pytest.approx([0.0945, 0.9055], abs=1e-4), "Pneumonia": None}}
    assert by_site["A"]["balanced_accuracy_ci"] == [1.0, 1.0]
    assert list(site_table(by_site).loc[1, ["site", "balanced accuracy", "95 % interval", "recall Normal",
                                            "recall Pneumonia"]]) == ["B", "0.250", "(0.000–0.500)", "0.50 (0.09–0.91)", "—"]
    old = {site: {k: x for k, x in v.items() if k != "recall_ci"} for site, v in by_site.items()}  # before intervals
    assert site_table(old).loc[1, "recall Normal"] == "0.50"
    assert metrics_by_site(pd.DataFrame({"site": ["A"] * 3}), y[:3], logits[:3], ["a", "b", "c"]) is None
    assert metrics_by_site(pd.DataFrame({"path": ["x"] * 3}), y[:3], logits[:3], ["a", "b", "c"]) is None
    assert "balanced accuracy at B │ 0.250 (0.000–0.500) (n 3; recall 0.00 / 0.50 / —)" in metrics_table_text(
        by_site=by_site)
    one_class = metrics_by_site(items, np.array([0, 1, 2, 1, 1, 1]), logits, ["COVID-19", "Normal", "Pneumonia"])
    assert "(n 3; recall — / 0.67 / —; Normal only: that class's recall)" in metrics_table_text(by_site=one_class)
    assert site_table(one_class).loc[1, "balanced accuracy"] == "0.667 (one class only)"


def test_external_data_prepared_with_sites_is_scored_by_site(tiny_runs, tiny_data, tmp_path):
    src = tmp_path / "sites"
    for i, row in enumerate(read_manifest(tiny_data).itertuples()):
        target = src / ("north" if i % 2 else "south") / row.label / (str(row.sha256)[:12] + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row.path, target)
    prepare(src, tmp_path / "sites-data", cache_size=0, sites=True, progress=False)
    result = evaluate(tiny_runs[0], data=tmp_path / "sites-data", n_boot=100, progress=False)
    by_site = result.metrics["by_site"]
    assert sorted(by_site) == ["north", "south"] and sum(v["n"] for v in by_site.values()) == result.metrics["n"]
    assert set(result.predictions["site"]) == {"north", "south"}
    assert "By site" in (result.out_dir / "report.html").read_text()


def test_the_report_says_no_temperature_was_applied_when_none_could_be_fitted():
    # with too few valid mistakes the temperature stays 1, and the report said "T = 1.00, fitted on the valid split,
    # changes the expected calibration error from 0.040 to 0.040"
    from types import SimpleNamespace

    from cxr_fast.calibration import MIN_ERRORS_TO_FIT
    from cxr_fast.evaluate import calibration_text

    metrics = {"ece": 0.04, "ece_calibrated": 0.04}
    unfitted = calibration_text(SimpleNamespace(config={"model": {"arch": "cxresnet"}}, temperature=1.0), metrics)
    assert unfitted.startswith(f"No temperature was applied: the valid split gave fewer than {MIN_ERRORS_TO_FIT} ")
    assert "fitted on the valid split" not in unfitted and "0.040" in unfitted
    fitted = calibration_text(SimpleNamespace(config={"model": {"arch": "cxresnet"}}, temperature=1.7),
                              {"ece": 0.09, "ece_calibrated": 0.03})
    assert fitted.startswith("Temperature scaling (T = 1.70, fitted on the valid split)") and "0.090 to 0.030" in fitted


def test_tta_averages_the_logits_of_the_image_and_three_crops_never_a_flip(tiny_runs, tiny_data):
    import torch
    import torch.nn.functional as F

    from cxr_fast.bundle import predict_logits, tta_views

    def zoomed(x, top, left):  # a 46-px crop (92 % of 50) resized back to 50 px
        return F.interpolate(x[..., top : top + 46, left : left + 46], size=(50, 50), mode="bilinear",
                             align_corners=False)

    x = torch.arange(2 * 50 * 50, dtype=torch.float32).view(2, 1, 50, 50)
    views = tta_views(x)
    assert len(views) == 4 and torch.equal(views[0], x)
    for view, (top, left) in zip(views[1:], [(2, 2), (0, 0), (4, 4)], strict=True):  # centre, upper-left, lower-right
        torch.testing.assert_close(view, zoomed(x, top, left))

    run = load_run(tiny_runs[0])
    files = read_manifest(tiny_data).query("split == 'test'").sort_values("path")["path"].tolist()[:3]
    batch = torch.stack([run.load_input(f) for f in files])  # 48 px: 44-px crops at 2, 0 and 4
    crops = [batch] + [F.interpolate(batch[..., t : t + 44, t : t + 44], size=(48, 48), mode="bilinear",
                                     align_corners=False) for t in (2, 0, 4)]
    with torch.no_grad():
        expected = torch.stack([run.model(c) for c in crops]).mean(0).numpy()  # the mean of logits
    np.testing.assert_allclose(predict_logits(run, files, progress=False, tta=True), expected, atol=1e-5)


def test_logits_come_one_row_per_image_in_order_whatever_the_batch_size(tiny_runs, tiny_data):
    import torch

    from cxr_fast.bundle import predict_logits

    run = load_run(tiny_runs[0])
    files = read_manifest(tiny_data).sort_values("path")["path"].tolist()[:7]
    with torch.no_grad():
        one_by_one = np.concatenate([run.model(run.load_input(f)[None]).numpy() for f in files])
    for bs in (1, 3, 7, 32):
        np.testing.assert_allclose(predict_logits(run, files, bs=bs, progress=False), one_by_one, atol=1e-5)


def test_tta_averages_the_logits_of_the_image_and_three_crops(tiny_runs, tiny_data):
    # at 48 px the crops are 44 px (92 %): centred (offset 2), upper left (0) and lower right (4), each resized back
    import torch
    import torch.nn.functional as F

    from cxr_fast.bundle import predict_logits

    run = load_run(tiny_runs[0])
    items = read_manifest(tiny_data).query("split == 'test'").reset_index(drop=True)
    x = torch.stack([run.load_input(p) for p in items["path"]])

    def crop(top, left):
        return F.interpolate(x[..., top:top + 44, left:left + 44], size=(48, 48), mode="bilinear", align_corners=False)

    with torch.no_grad():
        expected = torch.stack([run.model(v) for v in (x, crop(2, 2), crop(0, 0), crop(4, 4))]).mean(0).numpy()
    np.testing.assert_allclose(predict_logits(run, items, progress=False, tta=True), expected, atol=1e-5)


def test_the_calibrated_figures_divide_the_logits_by_the_temperature():
    from cxr_fast.evaluate import compute_metrics

    logits = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.2, 3.0], [1.0, 0.9, 0.0]])
    y = np.array([0, 2, 2, 1])

    def nll(z):
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return -np.mean(np.log(p[np.arange(len(y)), y]))

    m = compute_metrics(y, logits, ["a", "b", "c"], temperature=2.0, n_boot=10)
    assert m["bootstrap"] == {"replicates": 10, "seed": 0}  # the record of what drew the intervals
    assert compute_metrics(y, logits, ["a", "b", "c"], temperature=2.0, n_boot=10, seed=3)["bootstrap"]["seed"] == 3
    assert m["nll"] == pytest.approx(nll(logits)) and m["nll_calibrated"] == pytest.approx(nll(logits / 2))
    assert m["temperature"] == 2.0


def test_the_log_loss_is_exact_for_a_confidently_wrong_prediction():
    from scipy.special import log_softmax

    from cxr_fast.evaluate import calibration_worse, compute_metrics

    # 50 right with margin 5, one wrong with margin 60: its probability e^-60 is no reason to count its loss as 27.6
    logits = np.zeros((51, 3))
    logits[:, 0] = 5.0
    logits[0] = [0.0, 60.0, 0.0]
    y = np.zeros(51, dtype=int)
    m = compute_metrics(y, logits, ["a", "b", "c"], temperature=3.0, n_boot=10)
    assert m["nll"] == pytest.approx(-log_softmax(logits, axis=1)[:, 0].mean())  # 1.19, not 0.55
    assert m["nll_calibrated"] == pytest.approx(-log_softmax(logits / 3, axis=1)[:, 0].mean())  # 0.71
    assert calibration_worse(m) is None  # the log-loss fell: no banner saying it rose


def _with_temperature(run_dir, tmp_path, temperature, **changes):
    """A copy of a run whose config.json says `temperature` (the tiny runs make too few valid mistakes to fit one,
    so theirs is 1 and calibrated and raw figures would agree), and any other `changes` to it."""
    copy = shutil.copytree(run_dir, tmp_path / "calibrated", ignore=shutil.ignore_patterns("eval", "interpret"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "temperature": temperature, **changes}))
    return copy


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predictions_csv_holds_probabilities_calibrated_by_the_run_s_temperature(tiny_runs, tiny_data, tmp_path):
    from cxr_fast.bundle import predict_logits

    run_dir = _with_temperature(tiny_runs[0], tmp_path, 2.0)
    result = evaluate(run_dir, n_boot=20, progress=False)
    run = load_run(run_dir)
    test = read_manifest(tiny_data).query("split == 'test'")
    expected = _softmax(predict_logits(run, test, progress=False).astype(float) / 2)
    predictions = pd.read_csv(result.out_dir / "predictions.csv")
    assert list(predictions["path"]) == list(test["path"])
    np.testing.assert_allclose(predictions[[f"p_{c}" for c in run.classes]].to_numpy(), expected, atol=1e-6)


def test_a_setting_s_summary_is_the_mean_of_its_runs_and_the_best_setting_comes_first():
    # three seeds, so that a median or a minimum would differ from the mean
    from cxr_fast.compare import summarise

    columns = ("balanced_accuracy", "ci_low", "ci_high", "macro_f1", "macro_roc_auc", "ece", "train_seconds",
               "images_per_s")
    a = {k: [0.6 + i / 100, 0.7 + i / 100, 0.95 - i / 100] for i, k in enumerate(columns)}
    table = pd.DataFrame({"run": ["a0", "a1", "a2", "b0"], "arch": ["a", "a", "a", "b"],
                          "setting": ["x", "x", "x", "y"], "params": [10, 10, 10, 20],
                          **{k: [*v, 0.8] for k, v in a.items()}})
    summary = summarise(table)
    assert list(summary["arch"]) == ["b", "a"]  # b's 0.8 above a's mean 0.75
    row = summary.set_index("arch").loc["a"]
    assert row["runs"] == 3 and row["params"] == 10
    for k, v in a.items():
        assert row[k] == pytest.approx(np.mean(v)), k
    assert row["balanced_accuracy_sd"] == pytest.approx(np.std(a["balanced_accuracy"], ddof=1))


def test_mcnemar_pairs_the_runs_predictions_on_the_same_test_images(tiny_runs, tiny_data, tmp_path, monkeypatch):
    # set predictions (the tiny runs predict much alike): the first run is right on the first half of the test
    # images, the second on every third; each is wrong elsewhere, whatever order the images come in
    import cxr_fast.compare

    test = read_manifest(tiny_data).query("split == 'test'").reset_index(drop=True)
    classes = load_run(tiny_runs[0]).classes
    y = test["label"].map(classes.index).to_numpy()
    n, row_of = len(test), {path: i for i, path in enumerate(test["path"])}
    right = {tiny_runs[0].name: np.arange(n) < n // 2, tiny_runs[1].name: np.arange(n) % 3 == 0}

    def predict(run, items, **kwargs):
        rows = [row_of[path] for path in items["path"]]
        predicted = np.where(right[run.name][rows], y[rows], (y[rows] + 1) % len(classes))
        return np.eye(len(classes))[predicted] * 5

    monkeypatch.setattr(cxr_fast.compare, "predict_logits", predict)
    result = compare_runs(tiny_runs, out=tmp_path / "cmp", n_boot=20)
    first, second = right.values()
    b, c = int((first & ~second).sum()), int((~first & second).sum())
    assert b > 0 and c > 0
    assert (result.mcnemar.loc[0, "b"], result.mcnemar.loc[0, "c"]) == (b, c)


def test_compare_shows_the_ece_of_the_calibrated_probabilities(tiny_runs, tiny_data, tmp_path):
    from cxr_fast.bundle import predict_logits
    from cxr_fast.calibration import expected_calibration_error
    from cxr_fast.compare import score_run

    run = load_run(_with_temperature(tiny_runs[0], tmp_path, 2.0))
    test = read_manifest(tiny_data).query("split == 'test'")
    y = test["label"].map(run.classes.index).to_numpy()
    logits = predict_logits(run, test, progress=False).astype(float)
    raw, calibrated = (expected_calibration_error(_softmax(z), y) for z in (logits, logits / 2))
    assert raw != pytest.approx(calibrated)  # the temperature changes the figure, so which one is shown matters
    row, _, _ = score_run(run, n_boot=10)
    assert row["ece"] == pytest.approx(calibrated)


def test_compare_refuses_a_run_whose_recipe_yaml_holds_aliases(tmp_path):
    # A bundle from someone else: nine lines of nested aliases in its recipe.yaml expand to a billion values when
    # compare JSON-encodes the setting (a MemoryError after half a minute, or the machine out of memory).
    from types import SimpleNamespace

    from cxr_fast.compare import training_setting

    (tmp_path / "recipe.yaml").write_text("arch: cxresnet_tiny\narch_kwargs:\n  a: &x [1, 2]\n  b: *x\n")
    run = SimpleNamespace(path=tmp_path, config={"model": {"arch": "cxresnet_tiny"}, "size": 48})
    with pytest.raises(CxrFastError, match=r"recipe.yaml: not valid YAML \(found alias \*x"):
        training_setting(run)


def test_a_second_evaluate_of_a_run_refuses_at_once_while_another_process_writes_the_same_results(tiny_runs,
                                                                                                 monkeypatch):
    # Two `evaluate RUN` at once used to both predict, then the second deleted the first's .data-test.partial as a
    # killed run's: one failed on a vanished figure, and the other could publish a folder holding parts of each.
    import cxr_fast.evaluate as evaluate_module
    from tests.conftest import HOLDING_LOCK, another_process

    out = tiny_runs[0] / "eval" / "data-test"

    def predicted(*args, **kwargs):
        raise AssertionError("refused only after the slow part")

    monkeypatch.setattr(evaluate_module, "predict_logits", predicted)
    with another_process(HOLDING_LOCK, out) as first:
        with pytest.raises(CxrFastError, match=rf"{out}: is being written by another cxrfast process \(pid {first.pid}\)"):
            evaluate(tiny_runs[0], force=True)


def test_evaluate_and_interpret_mark_their_data_as_read_so_no_prepare_force_replaces_it_meanwhile(tiny_runs,
                                                                                                    monkeypatch):
    # `data prepare --force` of the data an evaluation or interpretation was reading went ahead: the manifest and
    # cached copies changed under it. Both now hold a reader's mark on the data (which prepare refuses: see
    # tests/test_manifest.py), and refuse at once while a prepare writes it.
    import cxr_fast.evaluate as evaluate_module
    import cxr_fast.interpret as interpret_module
    from cxr_fast.interpret import interpret
    from cxr_fast.outputs import reader_path
    from tests.conftest import HOLDING_LOCK, another_process

    data = load_run(tiny_runs[0]).config["data"]
    marked = []

    class Stopped(Exception):
        pass

    def predicted(*args, **kwargs):  # the slow part: the mark must be there
        marked.append(reader_path(data).is_file())
        raise Stopped

    for module, command in ((evaluate_module, evaluate), (interpret_module, interpret)):
        monkeypatch.setattr(module, "predict_logits", predicted)
        with pytest.raises(Stopped):
            command(tiny_runs[0], force=True, progress=False)
        assert not reader_path(data).exists()  # and gone with the command
        with another_process(HOLDING_LOCK, data) as preparing:
            with pytest.raises(CxrFastError, match=rf"{data}: is being written by another cxrfast process \(pid "
                                                   rf"{preparing.pid}\)"):
                command(tiny_runs[0], force=True, progress=False)
    assert marked == [True, True]


def test_a_second_compare_into_an_out_another_process_is_writing_refuses_before_its_work(tiny_runs, tiny_data,
                                                                                         tmp_path, monkeypatch):
    # compare_runs scored every run before the second one noticed; `compare --resume` started beside a running
    # comparison deleted the run it was training (an empty folder in its first epoch looked like a killed one's)
    import cxr_fast.compare
    import cxr_fast.train
    from tests.conftest import HOLDING_LOCK, another_process

    monkeypatch.setattr(cxr_fast.compare, "score_run", lambda *a, **k: pytest.fail("scored first"))
    monkeypatch.setattr(cxr_fast.train, "train", lambda *a, **k: pytest.fail("trained first"))
    out = tmp_path / "cmp"
    training = out / "runs" / "cxresnet_tiny-seed0"
    training.mkdir(parents=True)  # the first comparison's run, in its first epoch
    busy = rf"{out}: is being written by another cxrfast process \(pid {{}}\)"
    with another_process(HOLDING_LOCK, out) as first:
        with pytest.raises(CxrFastError, match=busy.format(first.pid)):
            compare_runs(tiny_runs, out=out, n_boot=10)
        with pytest.raises(CxrFastError, match=busy.format(first.pid)):
            cxr_fast.compare.compare_archs(tiny_data, ["cxresnet_tiny", "convnet"], out=out, resume=True, quiet=True)
        assert training.is_dir()


def test_a_training_manifest_written_relative_to_the_run_folder_is_found_from_any_working_folder(tiny_runs, tmp_path,
                                                                                                   monkeypatch):
    # a project folder (models/ and data/) moved to a USB stick: written relative, "data" needs no edit after the move
    import os

    run = shutil.copytree(tiny_runs[0], tmp_path / "project" / "models" / "run")
    config = json.loads((run / "config.json").read_text())
    data = shutil.copytree(config["data"], tmp_path / "project" / "data")
    (run / "config.json").write_text(json.dumps({**config, "data": os.path.relpath(data, run)}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_run(run).config["data"] == str(run / ".." / ".." / "data")
    assert evaluate(run, n_boot=20, progress=False).metrics["n"] == (read_manifest(data)["split"] == "test").sum()
    # a run trained on Windows names its data by a path absolute there: kept as it is, not joined to the run folder
    (run / "config.json").write_text(json.dumps({**config, "data": "C:\\Users\\ana\\data"}))
    assert load_run(run).config["data"] == "C:\\Users\\ana\\data"
