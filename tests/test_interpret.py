"""interpret: gallery, audit, errors, and the proof on planted shortcuts."""

import json

import captum
import numpy as np
import pandas as pd
import pytest
import torch

from cxr_fast.bundle import load_run
from cxr_fast.config import resolve_config
from cxr_fast.data.manifest import prepare, read_manifest
from cxr_fast.data.synth import synthesize
from cxr_fast.errors import CxrFastError
from cxr_fast.interpret import interpret
from cxr_fast.train import train
from tests.pages import image_sources, parse


def test_interpret_writes_gallery_audit_and_top_losses(tiny_runs):
    result = interpret(tiny_runs[0], n=3, audit_n=6, window=8, stride=4, progress=False)
    out = result.out_dir
    audit = json.loads((out / "audit.json").read_text())
    assert audit["verdicts"] and audit["images_audited"] >= 3
    assert {"overall", "by_class"} <= set(audit["summary"])
    assert audit["manifest_sha256"] == load_run(tiny_runs[0]).config["manifest_sha256"]
    assert audit["versions"]["torch"] == torch.__version__ and audit["versions"]["captum"] == captum.__version__
    overall = audit["summary"]["overall"]
    assert overall["mean_share_inside"] + overall["mean_share_outside"] == pytest.approx(1.0)
    losses = pd.read_csv(out / "top_losses.csv")
    assert len(losses) == 3 and {"label", "predicted", "p_true", "p_predicted", "loss"} <= set(losses.columns)
    assert losses["loss"].is_monotonic_decreasing
    sources = image_sources(out / "gallery.html")
    pngs = sorted((out / "images").glob("*.png"))
    assert len(sources) == len(pngs) + 1  # every per-image figure, plus the deletion curves
    audited = pd.read_csv(out / "audit_images.csv")
    assert len(pngs) == len(losses) + min(3, int((~audited["top_loss"]).sum()))  # all losses, n correct ones
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    # each figure links its full-size copy, which the grid would otherwise leave unreadable
    assert sorted(parse(out / "gallery.html").links) == [f"images/{p.name}" for p in pngs]
    assert 'lang=\'en\'' in (out / "gallery.html").read_text()
    deletion = audit["deletion"]
    assert len(deletion["attributed_curve"]) == len(deletion["fractions"])
    with pytest.raises(CxrFastError, match="--force"):
        interpret(tiny_runs[0], n=3, progress=False)


def test_a_mean_baseline_s_interpretation_sits_beside_the_black_one(tiny_runs, tmp_path):
    import shutil

    run = shutil.copytree(tiny_runs[1], tmp_path / "run")
    black = interpret(run, n=1, audit_n=1, progress=False).out_dir
    mean = interpret(run, n=1, audit_n=1, baseline="mean", progress=False).out_dir
    assert mean == black.with_name(black.name + "-mean") and (black / "audit.json").is_file()
    assert json.loads((mean / "audit.json").read_text())["baseline"] == "mean"


def test_interpret_errors_are_one_line(tiny_runs, tiny_data, tmp_path):
    with pytest.raises(CxrFastError, match="methods"):
        interpret(tiny_runs[0], methods=("lime",), progress=False)
    no_test = tmp_path / "no-test"
    no_test.mkdir()
    manifest = read_manifest(tiny_data)
    manifest[manifest["split"] != "test"].to_csv(no_test / "manifest.csv", index=False)
    gone = tmp_path / "gone"
    gone.mkdir()
    manifest.loc[0, "path"] = str(tmp_path / "vanished.png")
    manifest.to_csv(gone / "manifest.csv", index=False)
    with pytest.raises(CxrFastError, match="no longer exist") as e:
        interpret(tiny_runs[0], data=gone, progress=False)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ the proof

PLANTED = dict(n_per_class=40, size=96, seed=3, progress=False)
TRAIN = dict(arch="cxresnet_tiny", size=64, bs=16, lr=1e-2, epochs=12)


def _trained(tmp_path, name, **synth):
    synthesize(tmp_path / name / "src", **PLANTED, **synth)
    prepare(tmp_path / name / "src", tmp_path / name / "data", cache_size=0, progress=False)
    return train(tmp_path / name / "data", resolve_config(**TRAIN), out=tmp_path / name / "run", quiet=True)


@pytest.mark.slow
def test_audit_flags_a_planted_shortcut_and_passes_a_clean_model(tmp_path):
    # A model trained where a corner marker gives the class away and the lesions are faint...
    cheat = interpret(_trained(tmp_path, "cheat", shortcut_rate=1.0, lesion_contrast=0.2), n=4, audit_n=30,
                      progress=False)
    # ...and one trained on clear lesions with no markers at all.
    clean = interpret(_trained(tmp_path, "clean", shortcut_rate=0.0, lesion_contrast=1.5), n=4, audit_n=30,
                      progress=False)
    cheat_overall = cheat.audit["summary"]["overall"]
    clean_overall = clean.audit["summary"]["overall"]
    assert any("likely shortcut" in v for v in cheat.verdicts), cheat.verdicts
    assert cheat_overall["mean_share_marker"] > 0.5, cheat_overall  # the marker box holds most of the evidence
    assert not any("likely shortcut" in v for v in clean.verdicts), clean.verdicts
    assert clean_overall["lung_preference"] > cheat_overall["lung_preference"]


def test_bad_counts_and_windows_are_refused_before_any_prediction(tiny_runs, monkeypatch):
    import cxr_fast.interpret

    monkeypatch.setattr(cxr_fast.interpret, "predict_logits", lambda *a, **k: pytest.fail("predicted first"))
    with pytest.raises(CxrFastError, match="--n must be a whole number ≥ 1 .got 0.; --window must be a whole number ≥ 1"):
        interpret(tiny_runs[0], n=0, window=0, progress=False)
    with pytest.raises(CxrFastError, match="--audit-n must be a whole number ≥ 0 .got -1."):
        interpret(tiny_runs[0], audit_n=-1, progress=False)
    # a window the input cannot hold, or a stride past the window, once failed only on the first map
    with pytest.raises(CxrFastError, match="window 1000 is larger than the image side"):
        interpret(tiny_runs[0], window=1000, progress=False)
    with pytest.raises(CxrFastError, match="stride 12 is larger than the window 8"):
        interpret(tiny_runs[0], window=8, stride=12, progress=False)


def test_audit_sample_gives_n_correct_predictions_with_shortfalls_filled():
    from cxr_fast.interpret import audit_sample

    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 0])  # class 2 has one correct prediction
    probs = np.eye(3)[pred]
    sample = audit_sample(probs, y, 6)
    assert len(sample) == 6 and all(pred[i] == y[i] for i in sample)
    assert {int(y[i]) for i in sample[:3]} == {0, 1, 2}  # the first round shows every class
    assert audit_sample(probs, y, 0) == []
    assert len(audit_sample(probs, y, 100)) == 11  # every correct prediction, no more


def test_top_losses_leave_the_model_on_its_own_device(tiny_runs, tiny_data, monkeypatch):
    # on a machine with a GPU, fastai's default device, the Learner moved the model there and the occlusion maps
    # after it, fed from the CPU, failed: "meta" stands in for the GPU here
    import fastai.data.core
    import torch

    from cxr_fast.interpret import top_losses

    run = load_run(tiny_runs[0])
    items = read_manifest(tiny_data).query("split == 'test'").reset_index(drop=True)
    monkeypatch.setattr(fastai.data.core, "default_device", lambda *a, **k: torch.device("meta"))
    top_losses(run, items, 3, np.zeros((len(items), len(run.classes)), dtype=np.float32))
    assert {p.device.type for p in run.model.parameters()} == {"cpu"}


def test_top_losses_are_wrong_predictions_only(tiny_runs, tiny_data):
    from cxr_fast.bundle import load_run, predict_logits
    from cxr_fast.calibration import softmax
    from cxr_fast.interpret import top_losses

    run = load_run(tiny_runs[0])
    manifest = read_manifest(tiny_data)
    items = manifest[manifest["split"] != "train"].reset_index(drop=True)
    logits = predict_logits(run, items, progress=False)
    probs = softmax(logits, run.temperature)
    y = items["label"].map(run.classes.index).to_numpy()
    wrong = int((probs.argmax(1) != y).sum())
    assert 0 < wrong < len(items)  # both kinds present, so leaving out the correct ones is tested
    losses, _ = top_losses(run, items, len(items), logits)
    assert len(losses) == wrong and (losses["label"] != losses["predicted"]).all()
    assert losses["loss"].is_monotonic_decreasing
    # each row is its own image's: the cross-entropy of the network's own logits, and the calibrated probabilities
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    for row in losses.to_dict("records"):
        i = row["index"]
        assert row["path"] == items["path"][i] and row["label"] == items["label"][i]
        assert row["loss"] == pytest.approx(-log_probs[i, y[i]], rel=1e-4)
        assert row["p_true"] == pytest.approx(probs[i, y[i]]) and row["p_predicted"] == pytest.approx(probs[i].max())


def test_audit_json_is_strict_json_with_counts_and_the_window_used(tiny_runs):
    result = interpret(tiny_runs[1], n=2, audit_n=3, progress=False)  # no window given: the default is recorded
    text = (result.out_dir / "audit.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"audit.json holds {name}"))
    assert report["summary"]["overall"]["mean_share_marker"] is None  # the phantoms here carry no text marker
    assert all(isinstance(count, int) for _, _, count in report["most_confused"])
    assert report["window"] == 6 and report["stride"] == 3  # 48 px / 8, half of that
    assert ">nan<" not in (result.out_dir / "gallery.html").read_text()  # table cells; base64 images may hold "nan"


def test_each_attribution_method_gets_its_own_scale_and_colour_bar():
    from cxr_fast.gallery import attribution_figure

    image = np.full((32, 32), 128, dtype=np.uint8)
    small = np.zeros((32, 32))
    small[8:16, 8:16] = 0.002  # occlusion's logit changes
    large = np.zeros((32, 32))
    large[16:24, 16:24] = 0.03  # Grad-CAM's values, ten times larger
    fig = attribution_figure(image, {"occlusion → Normal": small, "occlusion → Pneumonia (true)": -small,
                                     "Grad-CAM → Normal": large, "Grad-CAM → COVID-19": np.zeros((32, 32))}, "t")
    panels = [ax for ax in fig.axes if ax.get_title() and ax.get_title() != "X-ray"]
    limits = {ax.get_title().split("\n")[0]: ax.images[-1].get_clim()[1] for ax in panels}
    assert limits["occlusion → Normal"] == limits["occlusion → Pneumonia (true)"] == pytest.approx(0.002)
    assert limits["Grad-CAM → Normal"] == pytest.approx(0.03)  # not washing the occlusion maps out
    bars = sorted(ax.get_ylabel() for ax in fig.axes if ax.get_ylabel())
    assert bars == ["Grad-CAM (class activation, relative)", "occlusion (logit change)"]
    assert any("no signal" in ax.get_title() for ax in panels)  # an all-zero map says so


def test_the_stride_recorded_is_the_one_used_when_only_the_window_is_given(tiny_runs, tmp_path):
    import shutil

    run = shutil.copytree(tiny_runs[1], tmp_path / "run")
    report = interpret(run, n=1, audit_n=1, window=10, force=True, progress=False).audit
    assert report["window"] == 10 and report["stride"] == 5  # occlusion_maps moves a given window by half of it


def test_black_is_black_in_every_channel_of_a_three_channel_model(tmp_path):
    # interpret, predict and serve occlude with the value a black image normalises to, channel by channel
    import torch
    from PIL import Image

    from cxr_fast.bundle import Run
    from cxr_fast.interpret import baseline_value
    from cxr_fast.predict import black_baseline

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's: three different channels
    run = Run(path=tmp_path, model=torch.nn.Identity(), config={"mean": mean, "std": std, "n_in": 3, "size": 16})
    half_black = np.zeros((64, 64), np.uint8)
    half_black[:, 32:] = np.linspace(0, 255, 32)  # a plain black sheet is refused as no radiograph
    Image.fromarray(half_black).save(tmp_path / "black.png")
    black = run.load_input(tmp_path / "black.png")[..., :6]  # the left columns, untouched by resizing
    fill = baseline_value(run, "black")
    torch.testing.assert_close(torch.broadcast_to(fill, black.shape), black)
    np.testing.assert_array_equal(fill.numpy(), black_baseline(mean, std))
    assert baseline_value(run, "mean").abs().sum() == 0


def test_nothing_to_interpret_is_a_one_line_error(tiny_runs, tmp_path, monkeypatch):
    import shutil

    import cxr_fast.interpret

    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    # a model that gets every image right has no top losses; with --audit-n 0 nothing is left to attribute
    monkeypatch.setattr(cxr_fast.interpret, "top_losses", lambda *a, **k: (pd.DataFrame({"index": []}), []))
    with pytest.raises(CxrFastError, match="nothing to interpret: the model gets all .* images right"):
        interpret(run, n=1, audit_n=0, force=True, progress=False)


def test_a_window_over_a_quarter_of_the_input_warns_that_the_lung_figures_blur(tiny_runs, tmp_path):
    size = load_run(tiny_runs[0]).size
    with pytest.warns(UserWarning, match="over a quarter of the .* the audit's lung figures are blurred"):
        interpret(tiny_runs[0], n=1, audit_n=1, window=size // 4 + 1, progress=False, force=True)



def test_an_implausible_lung_estimate_is_left_out_like_a_missing_one(monkeypatch):
    # on real films the estimate sometimes takes a whole collimation frame (70-88 % of the film) or two specks
    import cxr_fast.interpret
    from cxr_fast.interpret import lung_mask_for

    row = pd.Series({"path": "x.png"})
    for area, source in ((0.0, "not found"), (0.02, "implausible"), (0.30, "estimated"), (0.80, "implausible")):
        mask = np.zeros((50, 50), dtype=bool)
        mask.flat[: int(area * mask.size)] = True
        monkeypatch.setattr(cxr_fast.interpret, "estimate_lung_field", lambda image, m=mask: m)
        lungs, found = lung_mask_for(row, np.zeros((50, 50), np.uint8), 50)
        assert found == source and lungs.any() == (source == "estimated")


def test_a_ground_truth_lung_mask_counts_the_lesions_inside_the_lungs_as_lung(tmp_path):
    # synthetic masks mark lungs 1 and lesions 2: the lesion is part of the lung field, and evidence on it is inside
    from PIL import Image

    from cxr_fast.interpret import lung_mask_for

    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 0:16] = 1  # a lung in 2×2 blocks, so that halving the size keeps exactly one value per block
    mask[8:16, 8:16] = 2  # a lesion in it
    Image.fromarray(mask).save(tmp_path / "mask.png")
    row = pd.Series({"path": "x.png", "mask": str(tmp_path / "mask.png")})
    lungs, source = lung_mask_for(row, np.zeros((16, 16), np.uint8), 16)
    expected = np.zeros((16, 16), bool)
    expected[4:12, 0:8] = True
    assert source == "ground truth"
    np.testing.assert_array_equal(lungs, expected)


def test_a_marker_box_is_scaled_by_the_film_s_own_width_and_height_and_grown_by_the_margin():
    # a 200 × 100 film squished to 50 × 50: x shrinks 4 times, y twice
    from cxr_fast.interpret import marker_box_for

    row = pd.Series({"marker_box": "20,10,60,30", "width": 200, "height": 100})
    assert marker_box_for(row, 50) == (5, 5, 15, 15)
    assert marker_box_for(row, 50, margin=2) == (3, 3, 17, 17)
    # partly covered pixels count: x0 5.25 → 5, y0 5.5 → 5, x1 15.25 → 16, y1 15.5 → 16
    assert marker_box_for(pd.Series({**row, "marker_box": "21,11,61,31"}), 50) == (5, 5, 16, 16)
    # the margin stops at the image's edges
    assert marker_box_for(pd.Series({**row, "marker_box": "0,0,200,100"}), 50, margin=3) == (0, 0, 50, 50)
    assert marker_box_for(pd.Series({**row, "marker_box": ""}), 50) is None


def test_the_deletion_check_reuses_the_maps_the_audit_made(tiny_runs, monkeypatch):
    # it made the maps of up to 8 images a second time: minutes on a CPU for a large model
    import cxr_fast.attribution

    real, calls = cxr_fast.attribution.occlusion_maps, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cxr_fast.attribution, "occlusion_maps", counted)
    result = interpret(tiny_runs[0], n=2, audit_n=4, window=8, stride=8, progress=False, force=True)
    assert len(calls) == result.audit["images_audited"] and result.audit["deletion"]["images"] >= 1


def test_a_manifest_with_sites_gets_an_audit_line_per_site(tiny_runs, tmp_path):
    src = tmp_path / "src"
    for site, seed in (("north", 7), ("south", 8)):
        synthesize(src / site, n_per_class=4, size=64, seed=seed, progress=False)
    prepare(src, tmp_path / "sites", sites=True, cache_size=0, progress=False)
    result = interpret(tiny_runs[0], data=tmp_path / "sites", n=2, audit_n=4, progress=False)
    assert set(result.audit["summary"]["by_site"]) == {"north", "south"}
    assert sum(line.startswith("Images from ") for line in result.verdicts) == 2
    per_image = pd.read_csv(result.out_dir / "audit_images.csv")
    assert set(per_image["site"]) == {"north", "south"}


def test_gallery_links_open_images_whose_names_hold_url_characters(tmp_path):
    # Figures are named after the X-ray: unquoted, "a#b" linked to file "a" (the rest a fragment), "x?" to "x"
    # with a query, and "p%41" to "pA".
    from urllib.parse import unquote, urlsplit

    from cxr_fast.gallery import write_gallery

    names = ["001_a#b.png", "002_x?.png", "003_p%41.png", "004_sp ace.png", "005_<q'\"&>.png"]
    figures = [(name, b"png", f"images/{name}") for name in names]
    page = write_gallery(tmp_path / "gallery.html", "t", [], [("Top losses", "", figures)])
    links = parse(page).links
    assert [unquote(urlsplit(link).path) for link in links] == [f"images/{name}" for name in names]
    assert not any(urlsplit(link).fragment or urlsplit(link).query for link in links)


def test_a_lung_mask_that_is_a_decompression_bomb_or_no_image_is_a_one_line_error(tmp_path):
    # A manifest from someone else names the masks: one claiming 100000 × 100000 pixels ended interpret in PIL's
    # DecompressionBombError traceback, a text file in UnidentifiedImageError's.
    import struct
    import zlib

    from cxr_fast.interpret import lung_mask_for

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                        + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    (tmp_path / "text.png").write_text("not a mask")
    for name, problem in (("bomb.png", "header claims 10000 megapixels, more than the 64 megapixel limit"),
                          ("text.png", "not an image file PIL can identify")):
        row = pd.Series({"path": "x.png", "mask": str(tmp_path / name)})
        with pytest.raises(CxrFastError, match=f"{tmp_path / name}: {problem}") as e:
            lung_mask_for(row, np.zeros((16, 16), np.uint8), 16)
        assert "\n" not in str(e.value)


def test_a_second_interpret_of_a_run_refuses_at_once_while_another_process_writes_the_same_results(tiny_runs,
                                                                                                  monkeypatch):
    # as evaluate: the second used to spend its minutes of occlusion maps, then delete the first one's work folder
    import cxr_fast.interpret as interpret_module
    from tests.conftest import HOLDING_LOCK, another_process

    out = tiny_runs[0] / "interpret" / "data-test"

    def predicted(*args, **kwargs):
        raise AssertionError("refused only after the slow part")

    monkeypatch.setattr(interpret_module, "predict_logits", predicted)
    with another_process(HOLDING_LOCK, out) as first:
        with pytest.raises(CxrFastError, match=rf"{out}: is being written by another cxrfast process \(pid {first.pid}\)"):
            interpret(tiny_runs[0], force=True)


def test_a_gallery_figure_shows_evidence_for_in_red_and_against_in_blue_with_the_lungs_and_the_marker_drawn():
    from matplotlib.patches import Rectangle

    from cxr_fast.gallery import attribution_figure

    image = np.full((32, 32), 40, dtype=np.uint8)  # a dark film: shown on the 0-255 scale, not stretched
    attr = np.zeros((32, 32))
    attr[8:16, 8:16] = 0.01
    attr[0, 0] = 5.0  # one hot pixel among 2048 values: the 99.5 % quantile (0.01) sets the scale, not it
    lungs = np.zeros((32, 32), dtype=bool)
    lungs[8:24, 4:12] = True  # rows 8-23, columns 4-11
    fig = attribution_figure(image, {"occlusion → Normal": attr, "occlusion → Pneumonia": np.zeros((32, 32)),
                                     "Grad-CAM → Normal": np.zeros((32, 32))}, "t", lungs, (20, 2, 28, 6))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.images}
    assert set(panels) == {"X-ray", "occlusion → Normal", "occlusion → Pneumonia\n(all zero: no signal)",
                           "Grad-CAM → Normal\n(all zero: no signal)"}
    overlay = panels["occlusion → Normal"].images[-1]
    assert overlay.get_clim() == pytest.approx((-0.01, 0.01))
    assert panels["Grad-CAM → Normal\n(all zero: no signal)"].images[-1].get_clim() == (-1.0, 1.0)  # nothing to scale
    red, blue = overlay.to_rgba(np.array([[0.01, -0.01]]))[0]
    assert red[0] > 0.9 and red[2] < 0.1 and blue[2] > 0.9 and blue[0] < 0.1
    for ax in panels.values():
        assert ax.images[0].get_clim() == (0, 255)
        box = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(box) == 1 and box[0].get_xy() == (19.5, 1.5) and (box[0].get_width(), box[0].get_height()) == (8, 4)
        (outline,) = ax.collections
        vertices = np.concatenate([path.vertices for path in outline.get_paths()])
        assert vertices[:, 0].min() == pytest.approx(3.5) and vertices[:, 0].max() == pytest.approx(11.5)
        assert vertices[:, 1].min() == pytest.approx(7.5) and vertices[:, 1].max() == pytest.approx(23.5)


def test_the_deletion_figure_draws_each_curve_with_its_own_area():
    from cxr_fast.gallery import deletion_figure, method_of

    curves = {"fractions": np.array([0.0, 0.5, 1.0]), "attributed_curve": np.array([0.9, 0.4, 0.1]),
              "random_curve": np.array([0.9, 0.7, 0.5]), "attributed_auc": 0.45, "random_auc": 0.7}
    (ax,) = deletion_figure(curves).axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert drawn == {"most attributed first (area 0.450)": [0.9, 0.4, 0.1], "random order (area 0.700)": [0.9, 0.7, 0.5]}
    assert method_of("Grad-CAM → Normal (true)") == "Grad-CAM" and method_of("heatmap") == "occlusion"
    (ax,) = deletion_figure({**curves, "images": 8}).axes  # interpret's curves are a mean: over how many images
    assert ax.get_title() == "Deletion check (faithfulness, mean of 8 images)"


def test_the_gallery_page_highlights_warnings_formats_every_table_and_captions_every_figure(tmp_path):
    from cxr_fast.gallery import write_gallery
    from tests.pages import parse

    png = b"\x89PNG not really"
    path = write_gallery(tmp_path / "g.html", "Title", [("looks at the lungs", False), ("likely shortcut", True)],
                         [("Top losses", "worst first", [("first <film>", png, "images/a.png"), ("second", png)])],
                         [("Empty", []), ("Summary", [{"share": 0.12345, "missing": None}]), ("Counts", [{"n": 3}])])
    text = path.read_text()
    assert "<div class='verdict'>looks at the lungs</div>" in text
    assert "<div class='verdict warn'>likely shortcut</div>" in text
    # report.html's tables: a header cell for each column, and each row's first cell as its header
    assert '<tr><th scope="col">share</th><th scope="col">missing</th></tr>' in text
    assert '<tr><th scope="row">0.123</th><td>—</td></tr>' in text
    assert "<h2>Counts</h2>" in text and '<th scope="row">3</th>' in text
    assert "<h2>Empty</h2>" not in text
    assert text.count("<figcaption>") == 2 and "<figcaption>first &lt;film&gt;</figcaption>" in text
    assert parse(path).links == ["images/a.png"]


def test_lung_masks_left_behind_by_a_moved_source_folder_are_named_not_silently_estimated(tiny_runs, tmp_path):
    import shutil

    synthesize(tmp_path / "src", n_per_class=4, size=64, seed=9, progress=False)
    prepare(tmp_path / "src", tmp_path / "data", cache_size=64, progress=False)  # the copies travel with data/
    (tmp_path / "src").rename(tmp_path / "moved src")
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    with pytest.warns(UserWarning, match=f"12 of the lung masks the manifest names are missing \\(e.g. {tmp_path}/src/"):
        result = interpret(run, data=tmp_path / "data", n=1, audit_n=2, progress=False)
    assert "ground truth" not in set(pd.read_csv(result.out_dir / "audit_images.csv")["lungs"])


def test_top_losses_and_most_confused_pairs_are_fastais_from_the_predictions_at_hand(tiny_runs, tiny_data,
                                                                                      monkeypatch):
    # fastai's most_confused, then its losses, ran the model over every image once more; the rows must stay fastai's
    import torch
    from fastai.interpret import ClassificationInterpretation
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat

    from cxr_fast.bundle import predict_logits
    from cxr_fast.calibration import softmax
    from cxr_fast.data.block import build_eval_dataloaders
    from cxr_fast.data.manifest import label_indices
    from cxr_fast.interpret import most_confused, top_losses

    assert most_confused(np.array([0, 0, 1, 2, 2, 2, 1]), np.array([1, 0, 0, 1, 1, 0, 0]), ["a", "b", "c"]) == [
        ("b", "a", 2), ("c", "b", 2), ("a", "b", 1), ("c", "a", 1)]  # ties in fastai's order: true class, then predicted
    run = load_run(tiny_runs[0])
    items = read_manifest(tiny_data).reset_index(drop=True)
    logits, y = predict_logits(run, items, progress=False), label_indices(items["label"], run.classes)
    dls = build_eval_dataloaders(items, size=run.size, bs=32, n_in=run.n_in, classes=run.classes,
                                 mean=run.config["mean"], std=run.config["std"], device=torch.device("cpu"))
    learn = Learner(dls, run.model, loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging():
        fastai_interp = ClassificationInterpretation.from_learner(learn)
    fastai_pairs = fastai_interp.most_confused(min_val=1)
    assert len(fastai_pairs) > 1
    fastai_losses, fastai_order = fastai_interp.top_losses(k=len(items))
    pred = softmax(logits, run.temperature).argmax(1)
    wrong = [(i, loss) for i, loss in zip(fastai_order.tolist(), fastai_losses.tolist()) if pred[i] != y[i]]
    assert len(wrong) > 3
    passes = []
    get_preds = Learner.get_preds

    def counted(self, *args, **kwargs):
        passes.append(1)
        return get_preds(self, *args, **kwargs)

    monkeypatch.setattr(Learner, "get_preds", counted)
    losses, confused = top_losses(run, items, len(items), logits)
    assert confused == [(a, b, int(n)) for a, b, n in fastai_pairs]
    assert list(zip(losses["index"], losses["loss"])) == wrong  # the same images in the same order, the same losses
    assert passes == []  # the model's logits at hand are all it takes


def test_interpret_runs_the_model_over_the_images_once(tiny_runs, monkeypatch):
    # fastai's top losses ran the model over every image a second time, after the probabilities: count, for every
    # image outside the audit (whose maps and deletion curves show the model the image itself again), how often the
    # model is given its input as it is
    import cxr_fast.interpret

    seen = {}

    def count(module, args):
        for row in args[0].detach().cpu().numpy():
            seen[row.tobytes()] = seen.get(row.tobytes(), 0) + 1

    def loaded(run_dir, **options):
        run = load_run(run_dir, **options)
        run.model.register_forward_pre_hook(count)
        return run

    monkeypatch.setattr(cxr_fast.interpret, "load_run", loaded)
    result = interpret(tiny_runs[1], n=1, audit_n=1, window=8, stride=8, progress=False, force=True)
    run = load_run(tiny_runs[1])
    items, *_ = cxr_fast.interpret.select_unseen_items(run, None, "test")
    audited = set(pd.read_csv(result.out_dir / "audit_images.csv")["path"])
    files = [f for f, path in zip(cxr_fast.interpret.image_column(items), items["path"]) if path not in audited]
    assert len(files) >= 3
    assert [seen.get(run.load_input(f).numpy().tobytes(), 0) for f in files] == [1] * len(files)
