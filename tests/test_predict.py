"""predict: mixed good and bad inputs, agreement with evaluate, heatmaps, result files and the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image, ImageOps
from typer.testing import CliRunner

from cxr_fast.data.io import read_image
from cxr_fast.data.manifest import read_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.predict import find_images, model_image, model_input, predict
from tests.conftest import bare_dataset_bytes, write_dicom


@pytest.fixture
def run(tiny_runs, tmp_path):
    """A private copy of a trained tiny run: tests here write evaluations and exports into it."""
    return shutil.copytree(tiny_runs[0], tmp_path / "run")


@pytest.fixture
def good_images(tiny_data):
    manifest = read_manifest(tiny_data)
    return manifest.sort_values("path")["path"].tolist()


def mixed_folder(root, good_images):
    """Good PNG/JPEG/DICOM files (one DICOM without suffix) plus broken files and files to pass over."""
    folder = root / "inbox"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(good_images[0], folder / "a.png")
    shutil.copy(good_images[1], folder / "nested" / "b.png")
    Image.open(good_images[2]).convert("L").save(folder / "c.jpg", quality=95)
    write_dicom(folder / "d.dcm", np.asarray(read_image(good_images[3])).astype(np.uint16) * 16)  # 8 → 12 bit
    write_dicom(folder / "nested" / "IM0001", np.asarray(read_image(good_images[4])).astype(np.uint16) * 16)
    data = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("this is a text file, not an X-ray\n")
    (folder / "notes.txt").write_text("passed over: not an image suffix")
    (folder / ".hidden.png").write_bytes(data)
    (folder / "_masks").mkdir()
    (folder / "_masks" / "a.png").write_bytes(data)
    return folder


def test_model_input_equals_the_training_preprocessing(good_images):
    from cxr_fast.preprocess import load_input

    for size, n_in, mean, std in [(48, 1, [0.4], [0.25]), (40, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]:
        for path in good_images[:3]:
            ours = model_input(model_image(read_image(path), size), n_in, mean, std)
            reference = load_input(path, size, n_in, mean, std).numpy()
            assert ours.shape == reference.shape == (n_in, size, size)
            np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_find_images_walks_folders_and_passes_over_non_images(tmp_path, good_images):
    folder = mixed_folder(tmp_path, good_images)
    files, skipped = find_images([folder, folder / "a.png", tmp_path / "missing.png"])
    names = sorted(f.relative_to(folder).as_posix() for f in files if f.parent != tmp_path)
    assert names == ["a.png", "c.jpg", "d.dcm", "nested/IM0001", "nested/b.png", "text.png", "truncated.png"]
    assert tmp_path / "missing.png" in files  # named files are kept for the reader to judge
    assert skipped == []
    (tmp_path / "empty").mkdir()
    _, skipped = find_images([tmp_path / "empty"])
    assert skipped == [(tmp_path / "empty", "no image files in this folder")]


def test_predict_skips_unreadable_files_and_predicts_the_rest(run, tmp_path, good_images):
    folder = mixed_folder(tmp_path, good_images)
    mask = np.zeros((128, 128), np.uint8)
    mask[20:100, 30:100] = 255  # a lung mask saved among the films would get a confident diagnosis
    Image.fromarray(mask).save(folder / "mask.png")
    results, skipped = predict(run, [folder, tmp_path / "missing.png"], progress=False)

    assert sorted(results["path"].map(lambda p: p.split("inbox/")[-1])) == [
        "a.png", "c.jpg", "d.dcm", "nested/IM0001", "nested/b.png"]
    reasons = {p.name: r for p, r in skipped}
    assert set(reasons) == {"truncated.png", "text.png", "missing.png", "mask.png"}
    assert reasons["mask.png"].startswith("not-a-radiograph: 100% of its pixels take two grey values")
    assert reasons["truncated.png"].startswith("truncated")
    assert reasons["text.png"].startswith("not-an-image")
    assert reasons["missing.png"] == "unreadable: file not found"

    probs = results[[f"p_{c}" for c in ("COVID-19", "Normal", "Pneumonia")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert (results["predicted"] == pd.Series(np.array(["COVID-19", "Normal", "Pneumonia"])[probs.argmax(1)])).all()


def test_probabilities_equal_evaluates_calibrated_probabilities(run):
    from cxr_fast.evaluate import evaluate

    evaluation = evaluate(run, split="valid", n_boot=20, progress=False, force=True)
    expected = pd.read_csv(evaluation.out_dir / "predictions.csv")
    results, skipped = predict(run, expected["path"].tolist(), progress=False, bs=4)  # batches differ from evaluate's
    assert skipped == [] and len(results) == len(expected)
    merged = expected.merge(results, on="path", suffixes=("_evaluate", "_predict"))
    assert len(merged) == len(expected)
    for c in ("COVID-19", "Normal", "Pneumonia"):
        np.testing.assert_allclose(merged[f"p_{c}_predict"], merged[f"p_{c}_evaluate"], atol=1e-6)
    assert (merged["predicted_predict"] == merged["predicted_evaluate"]).all()


def test_heatmaps_are_written_and_never_overwrite(run, tmp_path, good_images):
    out = tmp_path / "results" / "scan.csv"
    heatmaps = tmp_path / "results" / "scan_heatmaps"
    heatmaps.mkdir(parents=True)
    taken = heatmaps / f"{Path(good_images[0]).stem}_heatmap.png"
    taken.write_bytes(b"someone else's file")

    results, _ = predict(run, good_images[:2], heatmap=True, out=out, progress=False)
    assert taken.read_bytes() == b"someone else's file"
    written = [heatmaps / p.split("/")[-1] for p in results["heatmap"]]
    assert written[0].name.endswith("_heatmap-2.png")
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > 100
    table = pd.read_csv(out)
    assert table["heatmap"].tolist() == results["heatmap"].tolist()


def test_heatmaps_default_to_a_heatmaps_folder(run, tmp_path, good_images, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results, _ = predict(run, good_images[:1], heatmap=True, progress=False)
    assert (tmp_path / results["heatmap"][0]).is_file()
    assert (tmp_path / "heatmaps").is_dir()


def test_results_files_and_refusing_to_overwrite(run, tmp_path, good_images):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    csv_out, json_out = tmp_path / "r.csv", tmp_path / "r.json"
    results, _ = predict(run, [*good_images[:3], bad], out=csv_out, progress=False)
    table = pd.read_csv(csv_out, keep_default_na=False)
    assert len(table) == 4 and table["error"].iloc[:3].tolist() == ["", "", ""]
    assert table["error"].iloc[3].startswith("not-an-image") and table["predicted"].iloc[3] == ""

    with pytest.raises(CxrFastError, match="already exists"):
        predict(run, good_images[:1], out=csv_out, progress=False)
    predict(run, good_images[:1], out=csv_out, force=True, progress=False)
    assert len(pd.read_csv(csv_out)) == 1

    predict(run, [*good_images[:2], bad], out=json_out, progress=False)
    document = json.loads(json_out.read_text())
    assert document["model"]["name"] == "run" and len(document["predictions"]) == 2
    assert document["skipped"][0]["path"] == str(bad)
    assert abs(sum(v for k, v in document["predictions"][0].items() if k.startswith("p_")) - 1) < 1e-9

    with pytest.raises(CxrFastError, match="--out must end in .csv or .json"):
        predict(run, good_images[:1], out=tmp_path / "r.xlsx", progress=False)


def test_unusable_out_paths_are_refused_before_predicting(run, tmp_path, good_images, monkeypatch):
    import cxr_fast.predict

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(cxr_fast.predict, "load_runner", no_work)
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "afile").write_text("")
    (tmp_path / "h_heatmaps").write_text("")
    for out, heatmap, problem in [(tmp_path / "folder.csv", False, "is a folder"),
                                  (tmp_path / "afile" / "r.csv", False, "afile: exists and is not a folder"),
                                  (tmp_path / "h.csv", True, "h_heatmaps: exists and is not a folder")]:
        with pytest.raises(CxrFastError, match=problem):
            predict(run, good_images[:1], out=out, heatmap=heatmap, force=True, progress=False)


def test_a_run_that_predicts_nothing_keeps_the_earlier_results(run, tmp_path, good_images):
    out = tmp_path / "r.csv"
    predict(run, good_images[:3], out=out, progress=False)
    before = out.read_bytes()
    results, skipped = predict(run, [tmp_path / "missing.png"], out=out, force=True, progress=False)
    assert results.empty and len(skipped) == 1
    assert out.read_bytes() == before


def test_user_mistakes_are_one_line_errors(run, good_images):
    with pytest.raises(CxrFastError, match="--runtime"):
        predict(run, good_images[:1], runtime="tensorflow", progress=False)
    with pytest.raises(CxrFastError, match="at least one"):
        predict(run, [], progress=False)
    (run / "eval").mkdir(exist_ok=True)  # a folder inside the bundle (made by evaluate), not a bundle itself
    with pytest.raises(CxrFastError, match="not a cxr_fast run bundle"):
        predict(run / "eval", good_images[:1], progress=False)


def cli_app():
    from cxr_fast.cli import console, err_console, user_errors
    from cxr_fast.cli_predict import register

    app = typer.Typer()
    register(app, user_errors, console, err_console)
    return app


def test_cli_predict_prints_results_and_skipped_files(run, tmp_path, good_images):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    runner = CliRunner()
    result = runner.invoke(cli_app(), ["predict", str(run), good_images[0], str(bad), "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 0, result.output
    assert "research tool, not a diagnosis" in result.output
    assert "bad.png" in result.output and "not-an-image" in result.output
    assert (tmp_path / "r.csv").is_file()

    result = runner.invoke(cli_app(), ["predict", str(run), str(bad)])  # one file: the error names it and why, once
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith(f"error: {bad}: not-an-image")
    assert result.output.count("not-an-image") == 1, result.output
    result = runner.invoke(cli_app(), ["predict", str(run), str(bad), str(tmp_path / "missing.png")])
    assert result.exit_code == 1 and "error: no image could be predicted (2 files skipped, listed above)" in result.output

    # names are the user's text, not rich markup
    shutil.copy(good_images[0], tmp_path / "film[left].png")
    (tmp_path / "ok[red].png").write_text("not an image")
    result = runner.invoke(cli_app(), ["predict", str(run), str(tmp_path / "film[left].png"),
                                       str(tmp_path / "ok[red].png"), "--out", str(tmp_path / "r[1].csv")])
    assert result.exit_code == 0, result.output
    assert "film[left].png" in result.output and "ok[red].png" in result.output and "r[1].csv" in result.output


def test_a_heatmap_of_an_image_whose_name_leaves_no_room_for_the_suffix_is_still_written(run, tmp_path, good_images):
    # a 250-byte name is legal, but name + "_heatmap.png" is not: it crashed after the work, losing every result
    import shutil

    from cxr_fast.outputs import short_stem

    long = tmp_path / ("é" * 120 + "x" * 6 + ".png")
    shutil.copy(good_images[0], long)
    results, _ = predict(run, [long, good_images[1]], heatmap=True, out=tmp_path / "r.csv", progress=False)
    written = Path(results["heatmap"][0])
    assert written.is_file() and written.name == short_stem(long.stem) + "_heatmap.png"
    assert len(written.name.encode()) <= 255 and written.name.startswith("é" * 100)
    assert short_stem("é" * 150) == "é" * 100  # cut on a character boundary: 200 bytes of two-byte characters


def test_folders_are_walked_as_prepare_walks_them(tmp_path, good_images):
    # PACS exports name DICOMs by UID or IMG.001, class folders may be links, and predict's own heatmap figures
    # are not X-rays: the first two were dropped without a word, the third predicted on every rerun
    folder = tmp_path / "pacs"
    folder.mkdir()
    pixels = np.asarray(read_image(good_images[0])).astype(np.uint16) * 16
    write_dicom(folder / "1.2.840.113619.2.55.3.6046", pixels)
    write_dicom(folder / "IMG.001", pixels)
    elsewhere = tmp_path / "kept-elsewhere"
    elsewhere.mkdir()
    shutil.copy(good_images[1], elsewhere / "b.png")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    for heatmaps in ("heatmaps", "scan_heatmaps"):
        (folder / heatmaps).mkdir()
        shutil.copy(good_images[2], folder / heatmaps / "x_heatmap.png")
    files, skipped = find_images([folder])
    assert sorted(f.relative_to(folder).as_posix() for f in files) == [
        "1.2.840.113619.2.55.3.6046", "IMG.001", "linked/b.png"]
    assert skipped == []


def test_a_heatmap_cut_short_by_a_full_disk_is_removed_and_named(tmp_path, monkeypatch):
    # a 20 KB stump of a PNG stayed among the heatmaps, and the error named no file
    import builtins
    import errno

    import cxr_fast.predict

    class FillsUp:
        def __init__(self, path, mode):
            self.file = builtins.open(path, mode)

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(cxr_fast.predict, "open", FillsUp, raising=False)
    with pytest.raises(OSError, match="No space left") as caught:
        cxr_fast.predict.write_new_file(tmp_path / "heatmaps", "a_heatmap", b"x" * 1000)
    assert caught.value.filename == str(tmp_path / "heatmaps" / "a_heatmap.png")
    assert list((tmp_path / "heatmaps").iterdir()) == []


def test_films_under_any_name_in_a_folder_are_read_by_content(run, tmp_path, good_images):
    # a folder's .jfif, .webp and IMG.006 films and a camera's _DSC0001.JPG were passed over by their names without
    # a word, though prepare read them all; a note is still passed over, and a file that is no image is listed
    folder = tmp_path / "inbox"
    folder.mkdir()
    image = Image.open(good_images[0]).convert("L")
    image.save(folder / "download.jfif", format="JPEG", quality=95)
    image.save(folder / "film.webp", format="WEBP", lossless=True)
    image.save(folder / "IMG.006", format="PNG")
    image.save(folder / "_DSC0001.JPG", format="JPEG", quality=95)
    (folder / "report.txt").write_text("a note: passed over")
    (folder / "_meta.csv").write_text("the toolkit's own: passed over")
    (folder / "IMG.007").write_bytes(b"not an image")
    results, skipped = predict(run, [folder], progress=False)
    assert sorted(Path(p).name for p in results["path"]) == ["IMG.006", "_DSC0001.JPG", "download.jfif", "film.webp"]
    assert [(path.name, reason.split(":")[0]) for path, reason in skipped] == [("IMG.007", "not-an-image")]


def test_a_file_name_that_is_not_utf8_is_predicted_and_written_escaped(run, tmp_path, good_images):
    # a Latin-1 name from an old share: the results file crashed at the very end, losing every result
    import os

    folder = tmp_path / "share"
    folder.mkdir()
    shutil.copy(good_images[0], os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    shutil.copy(good_images[1], folder / "ok.png")
    for out in (tmp_path / "r.csv", tmp_path / "r.json"):
        results, _ = predict(run, [folder], out=out, progress=False)
        assert len(results) == 2
    assert "caf\\xe9.png" in (tmp_path / "r.csv").read_text(encoding="utf-8")
    document = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))  # strict JSON
    assert sorted(Path(row["path"]).name for row in document["predictions"]) == ["caf\\xe9.png", "ok.png"]
    # and its heatmap: a name that is not UTF-8 crashed the name of the figure made from it (the escape's backslash,
    # which Windows and USB sticks refuse in a name, as "_")
    results, _ = predict(run, [folder], heatmap=True, out=tmp_path / "h.csv", progress=False)
    assert sorted(Path(h).name for h in results["heatmap"]) == ["caf_xe9_heatmap.png", "ok_heatmap.png"]


def test_ctrl_c_says_how_far_it_got_and_what_was_kept(run, tmp_path, good_images, monkeypatch):
    import cxr_fast.predict

    real_map, calls = cxr_fast.predict.occlusion_map, []

    def interrupted_at_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_map(*args)

    monkeypatch.setattr(cxr_fast.predict, "occlusion_map", interrupted_at_the_second)
    out = tmp_path / "r.csv"
    with pytest.raises(KeyboardInterrupt, match=f"after 1 of 3 images; {out} was not written; the heatmaps made so "
                                                f"far are in {tmp_path / 'r_heatmaps'}"):
        predict(run, good_images[:3], heatmap=True, out=out, bs=1, progress=False)
    assert not out.exists() and len(list((tmp_path / "r_heatmaps").iterdir())) == 1


def test_pacs_names_keep_their_dots_in_heatmaps_and_collide_nowhere(run, tmp_path, good_images):
    # Path.stem cut UIDs at their last dot: every file of an export became 1.2.826.0.1.3680043.8.498_heatmap.png,
    # -2, -3; and a DICOM with neither preamble nor suffix was passed over in a folder without a word
    folder = tmp_path / "export"
    (folder / "series1").mkdir(parents=True)
    (folder / "series2").mkdir()
    pixels = [np.asarray(read_image(p)).astype(np.uint16) * 16 for p in good_images[:3]]
    write_dicom(folder / "series1" / "1.2.826.0.1.3680043.8.498.311", pixels[0])
    write_dicom(folder / "series1" / "1.2.826.0.1.3680043.8.498.312", pixels[1])
    write_dicom(tmp_path / "full.dcm", pixels[2])
    (folder / "series2" / "1.2.826.0.1.3680043.8.498.311").write_bytes(bare_dataset_bytes(tmp_path / "full.dcm"))
    results, skipped = predict(run, [folder], heatmap=True, out=tmp_path / "r.csv", progress=False)
    assert skipped == [] and len(results) == 3
    assert sorted(Path(h).name for h in results["heatmap"]) == [
        "1.2.826.0.1.3680043.8.498.311_heatmap-2.png", "1.2.826.0.1.3680043.8.498.311_heatmap.png",
        "1.2.826.0.1.3680043.8.498.312_heatmap.png"]

    result = CliRunner().invoke(cli_app(), ["predict", str(run), str(folder)])
    assert result.exit_code == 0, result.output
    # the same name in two series is shown with its folder, so the rows can be told apart
    assert "series1/" in result.output and "series2/" in result.output
    assert result.output.count("…") == 0  # a long name wraps; cut short, its distinguishing end was lost


def test_the_table_shows_bare_names_unless_two_are_the_same():
    from cxr_fast.cli_predict import display_names

    assert display_names(["/a/x.png", "/b/y.png"]) == ["x.png", "y.png"]
    assert display_names(["/s/a/IMG1", "/s/b/IMG1", "/s/b/IMG2"]) == ["a/IMG1", "b/IMG1", "b/IMG2"]


def test_a_heatmap_is_the_occlusion_map_of_the_predicted_class_against_black_aligned_with_the_image(
        run, tmp_path, good_images, monkeypatch):
    # the map drawn must be the predicted class's, occluded with black (0 in [0, 1] pixels, -mean/std once
    # normalised, as interpret's), and drawn over the image it was computed on, not transposed
    import torch

    import cxr_fast.predict
    from cxr_fast.attribution import occlusion_maps
    from cxr_fast.bundle import load_run

    bundle = load_run(run)
    with torch.no_grad():
        predicted = {f: int(bundle.model(bundle.load_input(f)[None]).argmax()) for f in good_images}
    chosen = [next(f for f in good_images if predicted[f] == k) for k in sorted(set(predicted.values()))]
    assert any(predicted[f] != 0 for f in chosen)  # a map of the first class would not pass for these
    drawn = []
    monkeypatch.setattr(cxr_fast.predict, "heatmap_png",
                        lambda pixels, attr, title, label: drawn.append((pixels, attr, label)) or b"png")
    predict(run, chosen, heatmap=True, out=tmp_path / "r.csv", progress=False)

    black = torch.tensor([-m / s for m, s in zip(bundle.config["mean"], bundle.config["std"], strict=True)])
    for f, (pixels, attr, label) in zip(chosen, drawn, strict=True):
        k = predicted[f]
        x = bundle.load_input(f)
        expected = occlusion_maps(bundle.model, x, baseline=black.view(-1, 1, 1), targets=[k])[0].numpy()
        assert label == f"occlusion → {bundle.classes[k]}"
        np.testing.assert_allclose(attr, expected, atol=1e-4)
        resized = read_image(f).resize((bundle.size, bundle.size), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(pixels, np.asarray(resized))


def test_probabilities_are_the_softmax_of_the_logits_over_the_bundle_s_temperature(run, good_images):
    # calibration is the bundle's temperature, read from its config.json: set to 2.5 here, whatever was fitted
    import torch

    from cxr_fast.bundle import load_run

    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "temperature": 2.5}))
    bundle = load_run(run)
    with torch.no_grad():
        logits = bundle.model(torch.stack([bundle.load_input(f) for f in good_images[:4]])).numpy().astype(np.float64)
    expected = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(1, keepdims=True)
    results, _ = predict(run, good_images[:4], progress=False)
    np.testing.assert_allclose(results[[f"p_{c}" for c in bundle.classes]].to_numpy(), expected, atol=1e-5)


def test_a_heatmap_name_taken_twice_gets_the_next_free_number(tmp_path):
    from cxr_fast.predict import unique_path, write_new_file

    (tmp_path / "x_heatmap.png").write_bytes(b"first")
    (tmp_path / "x_heatmap-2.png").write_bytes(b"second")
    assert unique_path(tmp_path, "x_heatmap") == tmp_path / "x_heatmap-3.png"
    assert write_new_file(tmp_path, "x_heatmap", b"third") == tmp_path / "x_heatmap-3.png"
    assert [(tmp_path / n).read_bytes() for n in ("x_heatmap.png", "x_heatmap-2.png")] == [b"first", b"second"]


def test_a_second_predict_into_a_results_file_another_process_is_writing_refuses(tiny_runs, tiny_data, tmp_path):
    # Two predicts with one --out (a cron job beside a person) both passed the "exists?" check and both wrote it:
    # both exited 0, and the file held only the later one's images (seen with real processes), replaced without
    # --force; they also shared its .NAME.partial.
    from tests.conftest import HOLDING_LOCK, another_process

    out = tmp_path / "results.csv"
    images = read_manifest(tiny_data)["path"].tolist()[:2]
    with another_process(HOLDING_LOCK, out) as first:
        with pytest.raises(CxrFastError, match=rf"{out}: is being written by another cxrfast process \(pid {first.pid}\)"):
            predict(tiny_runs[0], images, out=out, progress=False)
    assert not out.exists()
    results, _ = predict(tiny_runs[0], images, out=out, progress=False)  # the lock went with its process
    assert len(pd.read_csv(out)) == len(results) == 2


def test_a_results_csv_ends_its_rows_as_a_text_file_does_on_windows_too(tmp_path, monkeypatch):
    """pandas ends CSV rows with os.linesep ("\\r\\n" on Windows), and the text writer turns each "\\n" into "\\r\\n"
    there, so a table handed over with pandas' own endings came out "\\r\\r\\n": a blank row after every row in Excel
    and in Python's csv module. The text given to the writer must end its rows with "\\n" alone on any system."""
    import csv
    import os

    from cxr_fast.predict import write_results

    monkeypatch.setattr(os, "linesep", "\r\n")  # as on Windows, for pandas
    results = pd.DataFrame({"path": ["a.png", "b.png"], "predicted": ["Normal", "Pneumonia"], "p_Normal": [0.9, 0.2]})
    write_results(tmp_path / "r.csv", results, [(tmp_path / "c.png", "not-an-image")], runner=None)
    data = (tmp_path / "r.csv").read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 4
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        assert [row[:2] for row in csv.reader(f)] == [["path", "predicted"], ["a.png", "Normal"], ["b.png", "Pneumonia"],
                                                      [str(tmp_path / "c.png"), ""]]


def coloured_copy(film, path):
    """The film in false colour (R = a, G = a/2, B = 255 - a): every pixel's channels spread over 63 levels or more,
    as in a photo or a colour-map figure, while its grey reading keeps the film's many levels."""
    a = np.asarray(read_image(film)).astype(np.uint8)
    Image.fromarray(np.dstack([a, a // 2, 255 - a]), "RGB").save(path)
    return path


def test_a_colour_image_is_predicted_with_a_warning_and_a_grey_one_without(run, tmp_path, good_images):
    photo = coloured_copy(good_images[0], tmp_path / "photo.png")
    grey_rgb = tmp_path / "grey-rgb.jpg"  # a film saved as a colour JPEG is still a grey film
    Image.open(good_images[1]).convert("RGB").save(grey_rgb, quality=75)
    results, skipped = predict(run, [good_images[2], photo, grey_rgb], progress=False)
    assert skipped == [] and len(results) == 3  # flagged, never dropped
    by_name = {Path(p).name: w for p, w in zip(results["path"], results["warning"])}
    assert by_name[Path(good_images[2]).name] == "" and by_name["grey-rgb.jpg"] == ""
    assert by_name["photo.png"].startswith("a colour image (100% of its pixels are coloured)")
    assert results.loc[results["path"] == str(photo), [c for c in results if c.startswith("p_")]].sum(axis=1).item() \
        == pytest.approx(1)

    predict(run, [photo, grey_rgb], out=tmp_path / "r.csv", progress=False)
    table = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    assert table["warning"].str.startswith("a colour image").tolist() == [True, False]
    predict(run, [photo, grey_rgb], out=tmp_path / "r.json", progress=False)
    rows = json.loads((tmp_path / "r.json").read_text())["predictions"]
    assert rows[0]["warning"].startswith("a colour image")
    assert rows[1]["warning"] is None  # null for no warning, as serve's API answers; CSV keeps an empty cell

    result = CliRunner().invoke(cli_app(), ["predict", str(run), str(photo), str(grey_rgb)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {photo}: a colour image"), result.output


def test_an_inverted_film_is_predicted_with_a_warning_beside_its_colour_one(run, tmp_path, good_images):
    negative = tmp_path / "negative.png"  # a PACS export with the wrong photometric setting
    ImageOps.invert(read_image(good_images[0])).save(negative)
    colour_negative = coloured_copy(negative, tmp_path / "colour-negative.png")
    results, skipped = predict(run, [good_images[1], negative, colour_negative], out=tmp_path / "r.csv", progress=False)
    assert skipped == [] and len(results) == 3  # flagged, never dropped
    by_name = {Path(p).name: w for p, w in zip(results["path"], results["warning"])}
    assert by_name[Path(good_images[1]).name] == ""
    assert by_name["negative.png"].startswith("looks like an inverted (negative) film")
    colour, inverted = by_name["colour-negative.png"].split(" | ")  # both readable
    assert colour.startswith("a colour image") and inverted == by_name["negative.png"]
    table = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    assert table["warning"].tolist() == results["warning"].tolist()

    result = CliRunner().invoke(cli_app(), ["predict", str(run), str(negative)])
    assert result.exit_code == 0, result.output
    assert f"warning: {negative}: looks like an inverted" in result.output
