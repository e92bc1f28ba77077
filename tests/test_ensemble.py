"""`cxrfast ensemble`: run bundles averaged into one bundle that every other command takes as a model."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxr_fast.archs import create_model
from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.calibration import softmax
from cxr_fast.cli import app
from cxr_fast.compare import compare_runs
from cxr_fast.config import resolve_config
from cxr_fast.data.io import read_image
from cxr_fast.data.manifest import read_manifest
from cxr_fast.ensemble import AveragedEnsemble, build_ensemble
from cxr_fast.errors import CxrFastError
from cxr_fast.seen import read_seen
from cxr_fast.train import train


@pytest.fixture(scope="module")
def ensemble_dir(tiny_runs, tmp_path_factory):
    return build_ensemble(tiny_runs, tmp_path_factory.mktemp("ens") / "ensemble", progress=False)


@pytest.fixture(scope="module")
def mixed_dir(tiny_data, tiny_runs, tmp_path_factory):
    """A frozen-feature run at 64 px (ImageNet normalisation) averaged with a 48-px run (the data's own)."""
    root = tmp_path_factory.mktemp("mixed")
    cfg = resolve_config(arch="frozen_lite", size=64, bs=8, class_weights=True,
                         arch_kwargs={"backbones": ["tf_efficientnet_lite0"], "sizes": [48, 64]})
    frozen = train(tiny_data, cfg, out=root / "frozen", quiet=True)
    return build_ensemble([frozen, tiny_runs[0]], root / "ensemble", progress=False)


def test_probabilities_are_the_mean_of_the_members_calibrated_ones(ensemble_dir, tiny_runs, tiny_data):
    ensemble = load_run(ensemble_dir)
    assert ensemble.temperature == 1.0 and ensemble.size == 48
    test = read_manifest(tiny_data).query("split == 'test'")
    members = [load_run(r) for r in tiny_runs]
    expected = np.mean([softmax(predict_logits(m, test, progress=False), m.temperature) for m in members], axis=0)
    np.testing.assert_allclose(softmax(predict_logits(ensemble, test, progress=False)), expected, atol=1e-6)

    metrics = json.loads((ensemble_dir / "metrics.json").read_text())
    valid = read_manifest(tiny_data).query("split == 'valid'")
    predicted = predict_logits(ensemble, valid, progress=False).argmax(1)
    truth = valid["label"].map(ensemble.classes.index).to_numpy()
    assert metrics["valid_balanced_accuracy"] == pytest.approx(
        np.mean([np.mean(predicted[truth == k] == k) for k in np.unique(truth)]))
    assert set(metrics["members"]) == {r.name for r in tiny_runs}
    assert len(read_seen(ensemble_dir)) == sum(len(read_seen(r)) for r in tiny_runs)


def test_each_member_gets_the_image_in_its_own_normalisation_and_size():
    members = [create_model("cxresnet_tiny", n_in=1, n_classes=3) for _ in range(2)]
    specs = [{"size": 64, "mean": [0.5], "std": [0.25], "temperature": 1.0, "model": {"n_classes": 3}},
             {"size": 32, "mean": [0.2], "std": [0.1], "temperature": 2.0, "model": {"n_classes": 3}}]
    ensemble = AveragedEnsemble(members, specs, mean=[0.5], std=[0.25]).eval()
    pixels = torch.rand(1, 1, 64, 64)  # an image in [0, 1], normalised the ensemble's way below
    x = (pixels - 0.5) / 0.25
    torch.testing.assert_close(ensemble.member_input(x, 0), x)
    second = ensemble.member_input(x, 1)
    assert second.shape == (1, 1, 32, 32)
    resized = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(second, (resized - 0.2) / 0.1, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        probs = ensemble(x).exp()
        expected = (members[0](x).softmax(1) + (members[1](second) / 2.0).softmax(1)) / 2
    torch.testing.assert_close(probs, expected)


def test_members_must_agree_on_classes_channels_and_manifest(tiny_runs, tmp_path):
    with pytest.raises(CxrFastError, match="at least two run folders"):
        build_ensemble(tiny_runs[:1], tmp_path / "one")
    for key, value, message in (("data", "/elsewhere/manifest", "the test split must be unseen"),
                                ("classes", ["A", "B", "C"], "its classes"),
                                ("n_in", 3, "n_in")):  # caught on loading: the model itself has 1 channel
        other = shutil.copytree(tiny_runs[1], tmp_path / key)
        config = json.loads((other / "config.json").read_text())
        config[key] = value
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(CxrFastError, match=message):
            build_ensemble([tiny_runs[0], other], tmp_path / f"ens-{key}")
        assert not (tmp_path / f"ens-{key}").exists()


def test_a_manifest_named_by_its_folder_or_its_file_is_one_manifest(tiny_runs, tmp_path):
    # `train --data D` and `train --data D/manifest.csv` were taken for two manifests by ensemble and compare
    other = shutil.copytree(tiny_runs[1], tmp_path / "by-file")
    config = json.loads((other / "config.json").read_text())
    config["data"] = str(Path(config["data"]) / "manifest.csv")
    (other / "config.json").write_text(json.dumps(config))
    build_ensemble([tiny_runs[0], other], tmp_path / "ens")
    assert (tmp_path / "ens" / "model.safetensors").is_file()
    result = compare_runs([tiny_runs[0], other], out=tmp_path / "cmp", n_boot=50)
    assert len(result.table) == 2


def test_an_existing_folder_is_never_overwritten(ensemble_dir, tiny_runs):
    before = (ensemble_dir / "config.json").read_text()
    result = CliRunner().invoke(app, ["ensemble", *map(str, tiny_runs), "--out", str(ensemble_dir)])
    assert result.exit_code == 1 and "already exists" in result.output
    assert (ensemble_dir / "config.json").read_text() == before


def test_cli_reports_the_valid_score_of_the_average_and_its_members(tiny_runs, tmp_path):
    result = CliRunner().invoke(app, ["ensemble", *map(str, tiny_runs), "--out", str(tmp_path / "ens")])
    assert result.exit_code == 0, result.output
    assert "valid balanced accuracy" in result.output and tiny_runs[0].name in result.output


def test_evaluate_interpret_and_predict_take_a_mixed_ensemble_as_one_model(mixed_dir, tiny_data, tmp_path):
    from cxr_fast.evaluate import evaluate
    from cxr_fast.interpret import interpret
    from cxr_fast.predict import predict

    ensemble = load_run(mixed_dir)
    assert ensemble.size == 64 and ensemble.config["mean"] != load_run(ensemble.config["members"][1]).config["mean"]
    n_test = int((read_manifest(tiny_data)["split"] == "test").sum())
    evaluation = evaluate(mixed_dir)
    assert evaluation.metrics["n"] == n_test
    # no temperature was fitted for the average: the report must not claim one was
    report = (evaluation.out_dir / "report.md").read_text()
    assert "calibrated by its own temperature" in report and "Temperature scaling (T = 1.00" not in report
    images = read_manifest(tiny_data).sort_values("path")["path"].tolist()[:3]
    results, _ = predict(mixed_dir, images, progress=False)
    assert len(results) == 3 and np.allclose(results.filter(like="p_").sum(1), 1.0)

    result = interpret(mixed_dir, n=1, audit_n=2, window=16, stride=16, progress=False)
    assert (result.out_dir / "gallery.html").is_file()
    refused = CliRunner().invoke(app, ["interpret", str(mixed_dir), "--methods", "occlusion,gradcam", "--force"])
    assert refused.exit_code == 1 and "Grad-CAM needs one spatial feature map" in refused.output


def test_onnx_export_of_a_mixed_ensemble_matches_pytorch(mixed_dir, tiny_data, tmp_path):
    if os.environ.get("CI") != "true":  # CI installs the onnx extra and must run this; a user may not have it
        pytest.importorskip("onnxruntime")
    from cxr_fast.export import OnnxRunner, export_onnx
    from cxr_fast.predict import TorchRunner, model_image, model_input

    export_onnx(mixed_dir, tmp_path / "onnx")
    onnx_runner, torch_runner = OnnxRunner(tmp_path / "onnx"), TorchRunner(mixed_dir)
    paths = read_manifest(tiny_data).sort_values("path")["path"].tolist()[:3]
    batch = np.stack([model_input(model_image(read_image(p), 64), 1, torch_runner.mean, torch_runner.std)
                      for p in paths])
    np.testing.assert_allclose(onnx_runner.logits(batch), torch_runner.logits(batch), atol=1e-4)


def test_compare_puts_an_ensemble_beside_its_members(ensemble_dir, tiny_runs, tmp_path):
    from cxr_fast.compare import compare_runs

    result = compare_runs([*tiny_runs, ensemble_dir], out=tmp_path / "cmp", n_boot=50)
    assert list(result.table["arch"]) == ["cxresnet_tiny", "cxresnet_tiny", "ensemble"]
    assert result.table["params"].iloc[2] == result.table["params"].iloc[0] + result.table["params"].iloc[1]


def test_the_same_run_twice_is_refused_and_members_with_one_name_keep_both_scores(tiny_runs, tmp_path):
    with pytest.raises(CxrFastError, match="given twice"):
        build_ensemble([tiny_runs[0], tiny_runs[0].parent / ".." / tiny_runs[0].parent.name / tiny_runs[0].name],
                       tmp_path / "twice", progress=False)
    assert not (tmp_path / "twice").exists()
    copy = shutil.copytree(tiny_runs[0], tmp_path / "copy")  # a copied folder was averaged with its original
    with pytest.raises(CxrFastError, match=r"copy: the same weights as .*seed0 \(a copy\?\)"):
        build_ensemble([tiny_runs[0], copy], tmp_path / "copied", progress=False)
    assert not (tmp_path / "copied").exists()
    namesake = shutil.copytree(tiny_runs[1], tmp_path / "elsewhere" / tiny_runs[0].name)  # runs/seed0, elsewhere/seed0
    ensemble = build_ensemble([tiny_runs[0], namesake], tmp_path / "ens", progress=False)
    members = json.loads((ensemble / "metrics.json").read_text())["members"]
    assert members == {str(tiny_runs[0]): load_run(tiny_runs[0]).metrics["valid_balanced_accuracy"],
                       str(namesake): load_run(namesake).metrics["valid_balanced_accuracy"]}


def test_an_out_that_is_a_file_is_refused(tiny_runs, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(CxrFastError, match="afile: exists and is not a folder"):
        build_ensemble(tiny_runs, tmp_path / "afile", progress=False)
    assert (tmp_path / "afile").read_text() == "keep me"


def test_an_interrupted_build_leaves_no_folder_to_be_taken_for_a_bundle(tiny_runs, tmp_path, monkeypatch):
    import cxr_fast.ensemble

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_fast.ensemble, "_score_valid", interrupt)  # Ctrl-C while the valid split is scored
    with pytest.raises(KeyboardInterrupt):
        build_ensemble(tiny_runs, tmp_path / "ens", progress=False)
    assert not (tmp_path / "ens").exists()  # so the same command can simply be run again
    monkeypatch.undo()
    assert load_run(build_ensemble(tiny_runs, tmp_path / "ens", progress=False)).metrics["valid_balanced_accuracy"]


def test_a_bundle_is_built_aside_and_an_empty_out_of_the_users_survives_a_failure(tiny_runs, tmp_path, monkeypatch):
    # a kill left --out holding the weights without config.json, which the rerun refused; and a failure deleted the
    # empty folder the user had made for it
    import cxr_fast.ensemble

    real_score, during = cxr_fast.ensemble._score_valid, []

    def look_then_fail(*args, **kwargs):
        during.append(sorted(p.name for p in (tmp_path / "ens").iterdir()))  # what a kill now would leave there
        raise OSError(28, "No space left on device")

    (tmp_path / "ens").mkdir()
    monkeypatch.setattr(cxr_fast.ensemble, "_score_valid", look_then_fail)
    with pytest.raises(OSError):
        build_ensemble(tiny_runs, tmp_path / "ens", progress=False)
    assert during == [[".partial"]]  # the half-built bundle sits in the hidden work folder, not in --out
    assert (tmp_path / "ens").is_dir() and list((tmp_path / "ens").iterdir()) == []
    monkeypatch.setattr(cxr_fast.ensemble, "_score_valid", real_score)
    assert (build_ensemble(tiny_runs, tmp_path / "ens", progress=False) / "config.json").is_file()


def test_members_trained_on_different_versions_of_a_manifest_are_refused(tiny_runs, ensemble_dir, tmp_path):
    assert load_run(ensemble_dir).config["manifest_sha256"] == load_run(tiny_runs[0]).config["manifest_sha256"]
    other = shutil.copytree(tiny_runs[1], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "manifest_sha256": "0" * 64}))
    with pytest.raises(CxrFastError, match="trained on different versions of that manifest"):
        build_ensemble([tiny_runs[0], other], tmp_path / "ens", progress=False)


def test_a_run_inside_an_ensemble_given_beside_it_is_refused(ensemble_dir, tiny_runs, tmp_path):
    with pytest.raises(CxrFastError, match=f"{tiny_runs[0]}: already a member of {ensemble_dir}; it would be weighted twice"):
        build_ensemble([ensemble_dir, tiny_runs[0]], tmp_path / "ens", progress=False)
    assert not (tmp_path / "ens").exists()


def test_one_path_instead_of_a_list_and_a_killed_build_s_leftovers_are_named(tiny_runs, tmp_path):
    from cxr_fast.compare import compare_runs

    for build in (build_ensemble, compare_runs):
        with pytest.raises(CxrFastError, match="takes a list of run folders, got the single path"):
            build(str(tiny_runs[0]))
    killed = tmp_path / "ens"  # what a SIGKILL part-way through an ensemble leaves
    killed.mkdir()
    shutil.copy(tiny_runs[0] / "model.safetensors", killed)
    with pytest.raises(CxrFastError, match="holds an unfinished bundle .weights without config.json"):
        build_ensemble(tiny_runs, killed, progress=False)


def test_an_ensemble_of_runs_whose_manifest_was_prepared_again_is_refused_before_any_folder(tiny_runs, tmp_path):
    data = shutil.copytree(load_run(tiny_runs[0]).config["data"], tmp_path / "data")
    members = []
    for run in tiny_runs:
        copy = shutil.copytree(run, tmp_path / run.name)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "data": str(data)}))
        members.append(copy)
    manifest = data / "manifest.csv"
    manifest.write_bytes(manifest.read_bytes().replace(b",train,", b",valid,", 1))
    with pytest.raises(CxrFastError, match="the manifest changed since"):
        build_ensemble(members, tmp_path / "ens", progress=False)
    assert not (tmp_path / "ens").exists()


def test_members_recording_the_manifest_digest_two_ways_make_an_ensemble(tiny_runs, tmp_path):
    # runs of 2026-11-27 (before commit fcfd3ab) recorded the SHA-256 of manifest.csv's bytes: the same manifest as a
    # later run's digest of its split, not "different versions of that manifest"
    data = load_run(tiny_runs[0]).config["data"]
    old = shutil.copytree(tiny_runs[0], tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    legacy = hashlib.sha256((Path(data) / "manifest.csv").read_bytes()).hexdigest()
    (old / "config.json").write_text(json.dumps({**config, "manifest_sha256": legacy}))
    ensemble = build_ensemble([old, tiny_runs[1]], tmp_path / "ens", progress=False)
    assert load_run(ensemble).config["data"] == data


def test_the_command_notes_an_average_below_its_best_member_without_telling_to_drop_it(tmp_path, monkeypatch):
    # the members' valid scores are selected maxima: lite0 + frozen_lite scored 0.865 against frozen_lite's 0.878 on
    # valid, then 0.890 against 0.876 on test, so "leave out the weaker runs" would have dropped the better model
    import json

    import cxr_fast.ensemble

    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "metrics.json").write_text(json.dumps(
        {"valid_balanced_accuracy": 0.938, "members": {"demo": 0.958, "run2": 0.333}}))
    monkeypatch.setattr(cxr_fast.ensemble, "build_ensemble", lambda runs, out: tmp_path / "ens")
    result = CliRunner().invoke(app, ["ensemble", "a", "b", "--out", str(tmp_path / "ens")])
    assert result.exit_code == 0 and "below its best member on valid (0.938 < 0.958)" in result.output
    assert "cxrfast compare ENSEMBLE RUN" in result.output and "leave out the weaker" not in result.output


def test_the_summary_notes_an_ensemble_below_its_best_member_on_valid(tmp_path):
    import json

    from cxr_fast.ensemble import ensemble_summary

    def summary_of(**metrics):
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
        return ensemble_summary(tmp_path)

    line, note = summary_of(valid_balanced_accuracy=0.81, members={"a": 0.84, "b": 0.79})
    assert "valid balanced accuracy 0.810 (members: a 0.840, b 0.790)" in line
    assert note.startswith("the ensemble scores below its best member on valid (0.810 < 0.840)")
    # its members were chosen on valid too, so the average's valid score is not free of that choice
    assert "the ensemble's only through those members" in note
    line, note = summary_of(valid_balanced_accuracy=0.86, members={"a": 0.84, "b": None})
    assert "(members: a 0.840)" in line and note is None
    line, note = summary_of(valid_balanced_accuracy=None, members={"a": 0.84, "b": 0.79})
    assert "(2 members); its training manifest is not at hand" in line and note is None


def test_each_member_s_own_temperature_calibrates_it_before_the_average(tiny_runs, tiny_data, tmp_path):
    # the tiny runs' fitted temperatures are 1: set others, so that a member's temperature left out would show
    members = []
    for run, temperature in zip(tiny_runs, (2.0, 0.5), strict=True):
        copy = shutil.copytree(run, tmp_path / run.name)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "temperature": temperature}))
        members.append(copy)
    ensemble = load_run(build_ensemble(members, tmp_path / "ens", progress=False))
    test = read_manifest(tiny_data).query("split == 'test'")
    logits = [predict_logits(load_run(m), test, progress=False).astype(np.float64) for m in members]
    expected = (softmax(logits[0] / 2.0) + softmax(logits[1] / 0.5)) / 2
    np.testing.assert_allclose(softmax(predict_logits(ensemble, test, progress=False)), expected, atol=1e-6)


def test_a_mixed_ensemble_s_model_expects_the_normalisation_its_bundle_records(mixed_dir):
    # the bundle reads images at its largest member's size in that member's statistics: the model inside must
    # convert from those very statistics to each member's own, or every member sees shifted pixels
    ensemble = load_run(mixed_dir)
    members = [load_run(m) for m in ensemble.config["members"]]
    assert ensemble.size == max(m.size for m in members) == 64

    def normalised(pixels, run):
        return (pixels - torch.tensor(run.config["mean"]).view(1, -1, 1, 1)) / torch.tensor(run.config["std"]).view(1, -1, 1, 1)

    pixels = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    x = normalised(pixels, ensemble)
    for i, member in enumerate(members):
        resized = torch.nn.functional.interpolate(pixels, size=(member.size, member.size), mode="bilinear",
                                                  align_corners=False)
        torch.testing.assert_close(ensemble.model.member_input(x, i), normalised(resized, member), atol=1e-5, rtol=1e-5)


def test_the_average_is_scored_on_the_valid_split_only(tiny_runs, tiny_data, tmp_path, monkeypatch):
    # the tiny runs score alike on valid and test, so the score itself cannot tell which split was used
    import cxr_fast.bundle

    real_logits, scored = cxr_fast.bundle.predict_logits, []

    def recording(run, items, **kwargs):
        scored.append(sorted(items["path"]))
        return real_logits(run, items, **kwargs)

    monkeypatch.setattr(cxr_fast.bundle, "predict_logits", recording)
    build_ensemble(tiny_runs, tmp_path / "ens", progress=False)
    assert scored == [sorted(read_manifest(tiny_data).query("split == 'valid'")["path"])]


@pytest.mark.parametrize("edit, problem", [
    (lambda m, e: m.update(std=[float("nan")]), "ensemble member 'seed0': std must be 1 number, got \\[nan\\]"),
    (lambda m, e: m.update(std=[0]), "ensemble member 'seed0': std must be positive, got \\[0\\]"),
    (lambda m, e: m.update(temperature=0), "ensemble member 'seed0': temperature must be a positive number, got 0"),
    (lambda m, e: m.update(size=100000), "ensemble member 'seed0': size must be a whole number of pixels from 16"),
    (lambda m, e: e.update(mean=[float("inf")]), "ensemble: mean must be 1 number, got \\[inf\\]"),
    (lambda m, e: e.update(members=e["members"][:1]), "an ensemble config must list two or more members"),
])
def test_an_ensemble_whose_member_normalisation_or_temperature_is_broken_is_refused_on_loading(
        ensemble_dir, tmp_path, edit, problem):
    # Applied inside the model, not checked with the bundle's own: a NaN or zero there made every probability NaN
    # and every prediction the first class, with exit code 0; a huge member size allocated without bound.
    run = shutil.copytree(ensemble_dir, tmp_path / "ensemble")
    config = json.loads((run / "config.json").read_text())
    arch_kwargs = config["model"]["arch_kwargs"]
    edit(arch_kwargs["members"][0], arch_kwargs)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CxrFastError, match=f"{run / 'config.json'}: {problem}") as e:
        load_run(run)
    assert "\n" not in str(e.value)


def test_an_ensemble_into_an_out_another_process_is_writing_refuses_and_leaves_its_work_alone(tiny_runs, tmp_path):
    # the second build used to delete the first one's .NAME.partial as a killed build's and write its own there
    from tests.conftest import HOLDING_LOCK, another_process

    out = tmp_path / "ens"
    (tmp_path / ".ens.partial").mkdir()
    (tmp_path / ".ens.partial" / "model.safetensors").write_bytes(b"being written")
    with another_process(HOLDING_LOCK, out) as first:
        with pytest.raises(CxrFastError, match=rf"{out}: is being written by another cxrfast process \(pid {first.pid}\)"):
            build_ensemble(tiny_runs, out, progress=False)
        assert (tmp_path / ".ens.partial" / "model.safetensors").read_bytes() == b"being written"


def test_an_ensemble_marks_the_data_it_scores_as_read_and_skips_the_score_while_it_is_prepared_again(tiny_runs,
                                                                                                       tmp_path,
                                                                                                       monkeypatch):
    # its valid score predicts over the training data: a prepare --force meanwhile replaced the images under it
    import cxr_fast.bundle
    from cxr_fast.outputs import reader_path
    from tests.conftest import HOLDING_LOCK, another_process

    data = load_run(tiny_runs[0]).config["data"]
    predict, marked = cxr_fast.bundle.predict_logits, []

    def predicted(*args, **kwargs):
        marked.append(reader_path(data).is_file())
        return predict(*args, **kwargs)

    monkeypatch.setattr(cxr_fast.bundle, "predict_logits", predicted)
    first = build_ensemble(tiny_runs, tmp_path / "ens", progress=False)
    assert marked == [True] and not reader_path(data).exists()
    assert json.loads((first / "metrics.json").read_text())["valid_balanced_accuracy"] is not None
    with another_process(HOLDING_LOCK, data):  # being prepared again: the ensemble is built, its score left out
        second = build_ensemble(tiny_runs, tmp_path / "ens2", progress=False)
    assert marked == [True] and json.loads((second / "metrics.json").read_text())["valid_balanced_accuracy"] is None


def test_a_member_run_moved_since_the_ensemble_was_built_is_still_known_as_its_member(ensemble_dir, tiny_runs,
                                                                                          tmp_path):
    # config.json lists the members where they were; moved (here: copied) elsewhere, a member is the same model
    moved = shutil.copytree(tiny_runs[1], tmp_path / "moved" / "seed1")
    with pytest.raises(CxrFastError, match=f"{moved}: already a member of {ensemble_dir}; it would be weighted twice"):
        build_ensemble([ensemble_dir, moved], tmp_path / "ens", progress=False)
    moved_ensemble = shutil.copytree(ensemble_dir, tmp_path / "moved" / "ensemble")
    with pytest.raises(CxrFastError, match=f"{tiny_runs[0]}: already a member of {moved_ensemble}"):
        build_ensemble([tiny_runs[0], moved_ensemble], tmp_path / "ens", progress=False)
    assert not (tmp_path / "ens").exists()


def test_evaluate_tta_of_an_ensemble_keeps_the_members_own_temperatures(ensemble_dir):
    # its members divide by their single-view temperatures inside it; there is no one temperature to refit
    from cxr_fast.evaluate import evaluate

    m = evaluate(ensemble_dir, tta=True, n_boot=20, progress=False).metrics
    assert (m["temperature"], m["temperature_tta"], m["temperature_used"]) == (1.0, None, "single_view")
    assert m["temperature_note"].startswith("an ensemble")
