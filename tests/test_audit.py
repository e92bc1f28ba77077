import math

import numpy as np
import pytest
import torch
from torch import nn

from cxr_fast.audit import (
    MIN_IMAGES,
    attribution_shares,
    audit_summary,
    deletion_curve,
    flags_shortcut,
    parse_box,
    region_masks,
    verdict,
)
from cxr_fast.errors import CxrFastError

H = W = 40


def lungs_mask():
    """Two rectangular 'lungs' covering 36 % of a 40 × 40 image."""
    m = np.zeros((H, W), dtype=bool)
    m[8:32, 6:18] = True
    m[8:32, 22:34] = True
    return m


def test_shares_add_to_one_and_ignore_negative_evidence():
    rng = np.random.default_rng(0)
    attr = rng.normal(size=(H, W))
    s = attribution_shares(attr, lungs_mask())
    assert s["share_inside"] + s["share_outside"] == pytest.approx(1.0)
    assert s["area_inside"] == pytest.approx(lungs_mask().mean())
    assert s["positive_total"] == pytest.approx(np.clip(attr, 0, None).sum())
    # Making negative values more negative changes nothing: only evidence *for* the class counts.
    s2 = attribution_shares(np.where(attr < 0, 10 * attr, attr), lungs_mask())
    assert s2["share_inside"] == pytest.approx(s["share_inside"])


def test_all_evidence_inside_the_lungs():
    attr = np.where(lungs_mask(), 1.0, -0.5)
    s = attribution_shares(attr, lungs_mask())
    assert s["share_inside"] == 1.0 and s["share_outside"] == 0.0
    assert s["lung_preference"] == math.inf
    assert s["density_inside"] == pytest.approx(1 / lungs_mask().mean())


def test_all_evidence_in_the_marker_box():
    attr = np.zeros((H, W))
    attr[1:5, 32:38] = 2.0
    s = attribution_shares(attr, lungs_mask(), marker_box="32,1,38,5")
    assert s["share_marker"] == 1.0 and s["has_marker"]
    assert s["area_marker"] == pytest.approx(24 / (H * W))
    assert s["share_outside"] == 1.0 and s["share_corners"] == 1.0 and s["share_border"] > 0.5
    assert s["lung_preference"] == 0.0
    no_box = attribution_shares(attr, lungs_mask(), marker_box="")
    assert math.isnan(no_box["share_marker"]) and not no_box["has_marker"]


def test_uniform_map_has_no_lung_preference():
    s = attribution_shares(np.ones((3, H, W)), lungs_mask())  # channels are summed
    assert s["share_inside"] == pytest.approx(lungs_mask().mean())
    assert s["density_inside"] == pytest.approx(1.0)
    assert s["lung_preference"] == pytest.approx(1.0)
    assert s["share_border"] == pytest.approx(s["area_border"])


def test_no_positive_evidence_gives_nan_and_bad_input_raises():
    s = attribution_shares(-np.ones((H, W)), lungs_mask())
    assert math.isnan(s["share_inside"]) and s["positive_total"] == 0
    with pytest.raises(CxrFastError):
        attribution_shares(np.ones((H, W + 1)), lungs_mask())
    with pytest.raises(CxrFastError):
        parse_box("1,2,three,4")


def test_region_masks_border_and_corners():
    r = region_masks((100, 50), border_frac=0.1)
    assert r["border"][0, 25] and r["border"][50, 0] and not r["border"][50, 25]
    assert r["border"].mean() == pytest.approx(1 - 0.8 * 0.8)
    assert r["corners"].mean() == pytest.approx(4 * 0.2 * 0.2)
    assert parse_box((1, 2, 3, 4)) == (1, 2, 3, 4) and parse_box(None) is None


def _rows(kind, n=6):
    rows = []
    for _ in range(n):
        attr = np.zeros((H, W))
        if kind == "outside":  # evidence on the image border, away from the lungs
            attr[:4, :] = 1.0
            attr[10:20, 8:14] = 0.2  # a little inside
        elif kind == "inside":
            attr[10:30, 8:16] = 1.0
            attr[:2, :] = 0.1
        elif kind == "uniform":
            attr[:] = 1.0
        elif kind == "marker":
            attr[1:5, 32:38] = 1.0
            attr[lungs_mask()] = 0.2
        rows.append(
            attribution_shares(attr, lungs_mask(), marker_box="32,1,38,5" if kind == "marker" else None)
        )
    return rows


def test_verdict_flags_outside_heavy_and_passes_inside_heavy():
    rows = _rows("outside") + _rows("inside")
    preds = ["COVID-19"] * 6 + ["Normal"] * 6
    labels = [0] * 3 + [1] * 3 + [1] * 6
    summary = audit_summary(rows, labels=labels, preds=preds)
    assert summary["grouped_by"] == "prediction"
    covid, normal = summary["by_class"]["COVID-19"], summary["by_class"]["Normal"]
    assert covid["n"] == 6 and covid["accuracy"] == 0.5 and normal["accuracy"] == 1.0
    assert covid["mean_share_outside"] > 0.8 and covid["lung_preference"] < 1
    assert covid["frac_images_outside_dense"] == 1.0
    assert normal["mean_share_inside"] > 0.8 and normal["lung_preference"] > 2
    lines = verdict(summary).splitlines()
    assert lines[0].startswith("COVID-19 predictions") and "likely shortcut" in lines[0]
    assert "border band" in lines[0]
    assert lines[1].startswith("Normal predictions") and "no sign of a shortcut" in lines[1]
    assert lines[-1].startswith("All images")


def test_the_pooled_line_does_not_clear_a_class_flagged_above_it():
    # one COVID-19 prediction reading the border among many lung-based ones: pooled, the evidence is in the lungs,
    # and the last line, read as the summary, said "no sign of a shortcut" under a flagged class
    rows = _rows("outside", n=2) + _rows("inside", n=10)
    summary = audit_summary(rows, preds=["COVID-19"] * 2 + ["Normal"] * 10)
    lines = verdict(summary).splitlines()
    assert "likely shortcut" in lines[0] and "no sign of a shortcut" in lines[-1]
    assert lines[-1].endswith("Pooled, that hides the shortcut flagged above for COVID-19 predictions.")
    assert flags_shortcut(lines[-1])  # highlighted in the gallery like the line it points to
    clean = verdict(audit_summary(_rows("inside"), preds=["Normal"] * 6)).splitlines()
    assert not clean[-1].endswith("predictions.") and not any(flags_shortcut(line) for line in clean)
    # a pooled line that flags the marker itself, as the demo's does, hides nothing, though it also says
    # "no clear shortcut" of the lungs
    marked = verdict(audit_summary(_rows("marker") + _rows("uniform", n=12), preds=["COVID-19"] * 6 + ["Normal"] * 12))
    assert "likely shortcut" in marked.splitlines()[-1] and "no clear shortcut" in marked.splitlines()[-1]
    assert "Pooled, that hides" not in marked


def test_verdict_does_not_call_a_uniform_map_a_shortcut():
    # 64 % of an even map lies outside lungs covering 36 %; that is diffuse, not a shortcut.
    summary = audit_summary(_rows("uniform"), labels=[2] * 6)
    assert summary["grouped_by"] == "label"
    assert summary["by_class"]["Pneumonia"]["mean_share_outside"] == pytest.approx(0.64)
    text = verdict(summary)
    assert "Pneumonia images" in text and "diffuse" in text and "shortcut" in text
    assert "likely shortcut" not in text


def test_verdict_flags_a_text_marker():
    summary = audit_summary(_rows("marker"), preds=[0] * 6)
    assert summary["by_class"]["COVID-19"]["n_with_marker"] == 6
    assert "text marker" in verdict(summary) and "likely shortcut" in verdict(summary)


def test_audit_summary_checks_lengths():
    with pytest.raises(CxrFastError):
        audit_summary(_rows("inside", 2), preds=[0])


class RegionModel(nn.Module):
    """Class 0's logit grows with the brightness of one rectangle; class 1 is a constant."""

    def __init__(self):
        super().__init__()
        self.region = torch.zeros(16, 16)
        self.region[4:8, 4:8] = 1.0

    def forward(self, x):
        evidence = (x[:, 0] * self.region).sum(dim=(1, 2)) / 4
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


def test_deletion_curve_faithful_map_beats_random_order():
    model = RegionModel()
    x = torch.ones(1, 16, 16)
    known = model.region.numpy() + 0.01 * np.random.default_rng(0).random((16, 16))
    d = deletion_curve(model, x, known, target=0, steps=16, seed=0)
    assert len(d["fractions"]) == len(d["attributed_curve"]) == len(d["random_curve"]) == 17
    assert d["attributed_curve"][0] == pytest.approx(d["random_curve"][0])  # same start: nothing deleted
    assert d["attributed_curve"][-1] == pytest.approx(0.5)  # all deleted: both logits 0
    assert d["attributed_auc"] < d["random_auc"] - 0.1
    # A map that points away from the evidence is no better than random.
    wrong = deletion_curve(model, x, -known, target=0, steps=16, seed=0)
    assert wrong["attributed_auc"] > d["attributed_auc"] + 0.1


def test_maps_that_are_almost_all_negative_are_left_out_not_called_shortcuts():
    # Occluding anything makes the model more sure of "Normal" (its evidence is the absence of findings): the
    # map is negative everywhere but for a faint positive speck in a corner. That is no shortcut.
    absent = -np.ones((H, W))
    absent[0:3, 0:3] = 0.5  # 4.5 positive against 1591 negative
    rows = [attribution_shares(absent, lungs_mask()) for _ in range(4)]
    assert rows[0]["positive_fraction"] == pytest.approx(4.5 / (4.5 + 1591))
    assert rows[0]["share_outside"] == 1.0  # the shares alone would say "all evidence outside the lungs"
    inside = np.zeros((H, W))
    inside[lungs_mask()] = 1.0
    rows += [attribution_shares(inside, lungs_mask()) for _ in range(2)]
    summary = audit_summary(rows, preds=["Normal"] * 4 + ["Pneumonia"] * 2)
    normal = summary["by_class"]["Normal"]
    assert normal["n"] == 4 and normal["n_with_evidence"] == 0 and math.isnan(normal["lung_preference"])
    assert summary["overall"]["n_with_evidence"] == 2 and summary["overall"]["mean_share_inside"] == 1.0
    lines = verdict(summary).splitlines()
    assert lines[0].startswith("Normal predictions: no positive evidence to audit in 4 of 4")
    assert "shortcut" not in lines[0]
    assert "2 of 6 without" not in lines[-1] and "4 of 6 without positive evidence left out" in lines[-1]
    assert "no sign of a shortcut" in lines[-1]


def test_without_a_lung_field_the_verdict_never_says_no_sign_of_a_shortcut():
    # an empty lung mask (the estimate found none) once fell through to "mostly inside the lungs"
    attr = np.zeros((H, W))
    attr[:6, :6] = 1.0  # every bit of evidence in a corner
    no_lungs = np.zeros((H, W), dtype=bool)
    summary = audit_summary([attribution_shares(attr, no_lungs)] * 3, preds=[0] * 3)
    text = verdict(summary)
    assert "no sign of a shortcut" not in text and "no lung field was found" in text
    assert "100 % in the corners" in text
    # beside images with lungs, they are left out of the lung figures rather than counted as evidence outside
    rows = _rows("inside") + [attribution_shares(attr, no_lungs)] * 2
    stats = audit_summary(rows, preds=[1] * 8)["by_class"]["Normal"]
    assert stats["n_with_lungs"] == 6 and stats["mean_share_inside"] == audit_summary(_rows("inside"))["overall"][
        "mean_share_inside"]
    assert "2 without a lung field left out" in verdict(audit_summary(rows, preds=[1] * 8))


def test_a_marker_box_grown_by_a_large_window_is_flagged_only_for_dense_evidence():
    # a box of 20 % of the image holding 20 % of an even map's evidence is no shortcut; 83 % of it is one
    big_box = "0,0,20,16"  # 20 × 16 of 40 × 40 = 20 %
    even = np.ones((H, W))
    assert "text marker" not in verdict(audit_summary([attribution_shares(even, lungs_mask(), big_box)] * 3,
                                                      preds=[0] * 3))
    dense = even.copy()
    dense[:16, :20] = 20.0
    assert "text marker" in verdict(audit_summary([attribution_shares(dense, lungs_mask(), big_box)] * 3,
                                                  preds=[0] * 3))


def test_a_marker_below_the_flag_but_above_its_share_is_a_possible_shortcut():
    # 12 % of the evidence on a marker box of 4 % is three times its share: no flag, but not "no clear shortcut"
    box = "0,0,8,8"  # 64 of 1,600 pixels: 4 %
    attr = np.where(lungs_mask(), 1.0, 0.1)  # the lungs' evidence is dense: no lung shortcut
    attr[:8, :8] = 1.43  # 92 of 764: 12 %
    text = verdict(audit_summary([attribution_shares(attr, lungs_mask(), box)] * 3, preds=[0] * 3))
    assert "possible shortcut" in text and "likely shortcut" not in text
    assert "from the marker and the half-window around it (4 % of the image)" in text


def _group(preference: float, n: int = 24, area: float = 0.2) -> dict:
    """Pooled stats of a group whose evidence has this lung preference (lungs covering `area` of the image)."""
    inside = preference * area / (preference * area + 1 - area)
    return dict(n=n, n_with_evidence=n, n_with_lungs=n, n_with_marker=0, mean_share_marker=math.nan,
                mean_area_marker=math.nan, mean_share_inside=inside, mean_share_outside=1 - inside,
                mean_area_inside=area, lung_preference=preference, mean_share_border=0.1, mean_share_corners=0.02)


def test_only_evidence_clearly_denser_outside_the_lungs_is_a_likely_shortcut():
    # a model at chance with a near-even occlusion map (18 % of the evidence for 19 % of lungs, preference 0.96)
    # was told "likely shortcut" on 4 images
    def said(preference, n=24):
        return verdict({"grouped_by": "prediction", "by_class": {}, "overall": _group(preference, n)})

    assert "likely shortcut" in said(0.6)
    assert "possible shortcut" in said(0.9) and "likely shortcut" not in said(0.9)
    assert "diffuse" in said(1.2) and "shortcut:" not in said(1.2)
    assert "too few to be sure" in said(0.96, n=4) and "possible shortcut" in said(0.96, n=4)
    assert "too few" not in said(0.96, n=MIN_IMAGES)


def test_a_site_whose_images_are_read_outside_the_lungs_is_flagged_on_its_own_line():
    # 12 images from one hospital read by their border among 40 lung-based ones from another, spread over classes:
    # no class and not the pool is flagged, the site is, and the pooled line says it hides it
    rows = _rows("outside", n=12) + _rows("inside", n=40)
    preds = ["COVID-19", "Normal", "Pneumonia", "Normal"] * 13
    sites = ["south"] * 12 + ["north"] * 40
    summary = audit_summary(rows, preds=preds, sites=sites)
    assert summary["by_site"]["south"]["n"] == 12 and summary["by_site"]["south"]["lung_preference"] < 0.8
    lines = verdict(summary).splitlines()
    by_who = {line.split(" take ")[0].split(" (")[0]: line for line in lines}
    assert "likely shortcut" in by_who["Images from south"] and "no sign" in by_who["Images from north"]
    assert lines[-1].endswith("Pooled, that hides the shortcut flagged above for images from south.")
    assert "by_site" not in audit_summary(rows, preds=preds, sites=["north"] * 52)
    with pytest.raises(CxrFastError, match="3 sites for 52 attribution rows"):
        audit_summary(rows, preds=preds, sites=["a", "b", "c"])


def test_every_image_a_little_denser_outside_the_lungs_counts_as_outside_dense():
    # the share of images "denser outside than inside" counted only those below the shortcut threshold (0.8): an
    # image with 1.2 times the lungs' density outside them (preference 1 / 1.2 ≈ 0.83) was left uncounted
    lungs = lungs_mask()
    a_little_outside = np.where(lungs, 1.0, 1.2)
    a_little_inside = np.where(lungs, 1.2, 1.0)
    rows = [attribution_shares(m, lungs) for m in (a_little_outside, a_little_outside, a_little_inside)]
    assert rows[0]["lung_preference"] == pytest.approx(1 / 1.2) and rows[2]["lung_preference"] == pytest.approx(1.2)
    assert audit_summary(rows)["overall"]["frac_images_outside_dense"] == pytest.approx(2 / 3)
