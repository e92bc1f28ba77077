"""Architectures: every registered local arch (and a few timm ones) through the one registry."""

import json

import pytest
import torch
import torch.nn as nn

from cxr_fast.archs import (
    LOCAL_ARCHS,
    ConvNet,
    CXResnet,
    LayerStack,
    classifier_head,
    conv_stack,
    create_model,
    list_models,
    make_layer,
    model_config,
    model_from_config,
    param_groups,
)
from cxr_fast.errors import CxrFastError

TIMM_ARCHS = ["resnet18", "efficientnet_lite0", "mobilenetv3_small_050"]
ALL_ARCHS = list(LOCAL_ARCHS) + TIMM_ARCHS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("n_in", [1, 3])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_forward_backward_any_size_and_channels(arch, n_in):
    model = create_model(arch, n_in=n_in, n_classes=5)
    assert (model.arch, model.n_in, model.n_classes) == (arch, n_in, 5)
    n_features = model.head[-1].in_features
    for size in (64, 96):
        model.zero_grad()
        x = torch.randn(2, n_in, size, size)
        logits = model(x)
        assert logits.shape == (2, 5)
        assert model.features(x).shape == (2, n_features)
        logits.logsumexp(1).sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert model.head[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list(LOCAL_ARCHS))
def test_the_package_s_own_architectures_keep_register_arch_s_rules(arch):
    # the package puts its architectures into LOCAL_ARCHS directly, past register_arch's checks: a builder argument
    # without a default (a keyword-only one, say) was listed by `cxrfast models`, then refused by train as "Object of
    # type type is not JSON serializable"; register_arch names the argument
    from cxr_fast.archs.registry import check_arch

    builder, variant = LOCAL_ARCHS[arch]
    check_arch(arch, builder, variant)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_config_rebuilds_the_exact_model(arch):
    model = create_model(arch, n_in=1, n_classes=3).eval()
    cfg = json.loads(json.dumps(model_config(model)))  # a run bundle keeps it as JSON
    rebuilt = model_from_config(cfg).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert model_config(rebuilt) == cfg


def test_config_keeps_non_default_arguments():
    model = create_model("cxresnet", n_in=3, n_classes=2, width=0.5, depths=(1, 2, 1, 1), hidden=32)
    rebuilt = model_from_config(json.loads(json.dumps(model_config(model))))
    assert rebuilt.arch_kwargs["depths"] == [1, 2, 1, 1]
    assert len(rebuilt.body.stage2) == 2
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


def test_none_is_a_value_not_the_default():
    # a recipe's `hidden: null` means no hidden layer; it was dropped, and the 64-unit default built instead
    model = create_model("convnet", hidden=None)
    assert model.arch_kwargs["hidden"] is None and not hasattr(model.head, "hidden")
    assert model_from_config(json.loads(json.dumps(model_config(model)))).arch_kwargs["hidden"] is None
    with pytest.raises(CxrFastError, match=r"width must be a number > 0 .* \(got None\)"):
        create_model("cxresnet_tiny", width=None)


def test_model_config_needs_the_architecture():
    with pytest.raises(CxrFastError, match="arch"):
        model_from_config({"n_in": 1, "n_classes": 3, "arch_kwargs": {}})


def test_unknown_arch_suggests_close_names():
    with pytest.raises(CxrFastError) as err:
        create_model("resnt18")
    message = str(err.value)
    assert "\n" not in message and "resnt18" in message and "resnet18" in message
    with pytest.raises(CxrFastError, match="convnet"):
        create_model("convnett")
    with pytest.raises(CxrFastError, match="not a cxr_fast or timm architecture .list them with `cxrfast models`"):
        create_model("qqqqzz")


def test_unknown_arguments_are_named():
    with pytest.raises(CxrFastError, match="depthz"):
        create_model("cxresnet", depthz=(1, 1, 1, 1))
    with pytest.raises(CxrFastError, match="resnet18"):
        create_model("resnet18", no_such_option=1)


@pytest.mark.parametrize("arch, kwargs, named", [
    ("cxresnet", {"width": -1}, "width must be a number > 0"),
    ("cxresnet", {"width": 0}, "width must be a number > 0"),
    ("cxresnet_tiny", {"width": "half"}, "width must be a number > 0"),
    ("convnet", {"dropout": 1.5}, r"dropout must be a number in \[0, 1\)"),
    ("cxresnet", {"depths": [1, 0, 1, 1]}, "depths must be a list of whole numbers ≥ 1"),
    ("convnet", {"hidden": 2.5}, "hidden must be a whole number ≥ 1, or null"),
    ("convnet", {"layers": ["relu", "no_such_layer"]}, "unknown layer .no_such_layer."),
    ("convnet", {"layers": 5}, "convnet: layers must be a list of layer names"),
    ("convnet", {"layers": "relu"}, "convnet: layers must be a list"),  # was read letter by letter: "unknown layer 'r'"
])
def test_bad_argument_values_are_one_line_errors(arch, kwargs, named):
    with pytest.raises(CxrFastError, match=named) as e:
        create_model(arch, **kwargs)
    assert "\n" not in str(e.value)


def test_token_models_are_refused_with_a_reason():
    with pytest.raises(CxrFastError, match="token"):
        create_model("vit_tiny_patch16_224", n_in=3)


def test_list_models_filters_local_then_timm():
    everything = list_models()
    names = [name for name, _ in everything]
    assert everything[: len(LOCAL_ARCHS)] == [(name, "local") for name in LOCAL_ARCHS]
    assert ("resnet18", "timm") in everything and len(names) == len(set(names))
    assert list_models("cxresnet*") == [(n, "local") for n in LOCAL_ARCHS if n.startswith("cxresnet")]
    assert list_models("CXResnet*") == list_models("cxresnet*")  # as --arch CXResnet trains cxresnet
    assert list_models("ResNet18") == [("resnet18", "timm")]
    resnets = list_models("resnet1*")
    assert ("resnet18", "timm") in resnets and all(
        src == "timm" and n.startswith("resnet1") for n, src in resnets
    )


def test_layer_stack_names_its_children():
    stack = LayerStack(nn.Linear(4, 8), ["relu", "batchnorm", ("dropout", {"p": 0.3}), "relu"])
    assert list(dict(stack.named_children())) == ["linear", "relu", "batchnorm", "dropout", "relu2"]
    assert isinstance(stack.batchnorm, nn.BatchNorm1d) and stack.batchnorm.num_features == 8
    assert stack.dropout.p == 0.3 and stack.out_channels == 8
    conv = LayerStack(nn.Conv2d(1, 6, 3), ["maxpool", "batchnorm"])
    assert isinstance(conv.batchnorm, nn.BatchNorm2d) and isinstance(conv.maxpool, nn.MaxPool2d)
    with pytest.raises(CxrFastError, match="swish"):
        make_layer("swish", 4)


def test_convnet_is_the_study_network_at_any_size():
    model = create_model("convnet", n_in=1, n_classes=3).eval()
    assert isinstance(model.body, ConvNet)
    stacks = list(model.body.children())
    assert [s.conv.out_channels for s in stacks] == [16, 64, 128, 256, 512]
    assert all(list(dict(s.named_children())) == ["conv", "relu", "maxpool", "batchnorm"] for s in stacks)
    assert model.head.hidden.linear.out_features == 64 and isinstance(
        model.head.hidden.batchnorm, nn.BatchNorm1d
    )
    with torch.no_grad():
        assert model(torch.randn(2, 1, 224, 224)).shape == (2, 3)


def test_cxresnet_depth_width_and_projections():
    model = create_model("cxresnet", n_in=1, depths=[2, 1, 1, 3], width=0.5)
    body = model.body
    assert isinstance(body, CXResnet)
    assert [len(getattr(body, f"stage{i}")) for i in range(1, 5)] == [2, 1, 1, 3]
    assert body.stem.conv.out_channels == 8 and body.out_channels == 256
    assert isinstance(body.stage1.block1.shortcut, LayerStack)  # stride 2, 8 -> 32 channels: projected
    assert isinstance(body.stage1.block2.shortcut, nn.Identity)
    with pytest.raises(CxrFastError, match="depths"):
        create_model("cxresnet", depths=[1, 1])


def test_param_groups_split_body_from_head():
    model = create_model("cxresnet_tiny")
    body, head = param_groups(model)
    assert {id(p) for p in body}.isdisjoint({id(p) for p in head})
    assert len(body) + len(head) == len(list(model.parameters()))
    assert any(p is model.head[-1].weight for p in head)


def test_scratch_models_use_data_statistics():
    model = create_model("resnet18")
    assert model.pretrained_stats is None and model.weights_source == "none"


def test_register_arch_adds_a_builder_the_whole_api_takes(tiny_data, tmp_path, monkeypatch):
    from cxr_fast.archs import register_arch, registry
    from cxr_fast.bundle import load_run
    from cxr_fast.config import resolve_config
    from cxr_fast.train import train
    from tests.conftest import TINY

    monkeypatch.setattr(registry, "LOCAL_ARCHS", dict(registry.LOCAL_ARCHS))  # the registration ends with the test

    def build_tinynet(n_in, n_classes, width=16):
        body = nn.Sequential(conv_stack(n_in, width, ["relu", "maxpool"]), conv_stack(width, 2 * width, ["relu"]))
        return body, classifier_head(2 * width, n_classes)

    register_arch("tinynet_wide", build_tinynet, width=8)
    assert ("tinynet_wide", "local") in list_models("tinynet*")
    run = train(tiny_data, resolve_config(epochs=1, **{**TINY, "arch": "tinynet_wide"}), out=tmp_path / "run", quiet=True)
    assert json.loads((run / "config.json").read_text())["model"]["arch_kwargs"] == {"width": 8}
    assert load_run(run).model.body[1].conv.out_channels == 16

    def takes_anything(n_in, n_classes, **kwargs):
        return build_tinynet(n_in, n_classes)

    def needs_depth(n_in, n_classes, depth):
        return build_tinynet(n_in, n_classes)

    for name, builder, variant, problem in [
        ("tinynet_wide", build_tinynet, {}, "already a cxr_fast architecture"),
        ("TinyNet", build_tinynet, {}, "lower-case"),
        ("my/net", build_tinynet, {}, "lower-case letters, digits and _"),
        ("resnet18", build_tinynet, {}, "already a timm architecture"),
        ("ensemble", build_tinynet, {}, "reserved for cxrfast ensemble's bundles"),  # loading one would call it
        ("keyword_only", lambda *, n_in, n_classes: None, {}, r"must take \(n_in, n_classes"),
        ("anything", takes_anything, {}, r"\*kwargs cannot be recorded"),
        ("deep", needs_depth, {}, "argument 'depth' needs a default"),
        ("tinynet2", build_tinynet, {"hight": 3}, "takes no argument hight"),
    ]:
        with pytest.raises(CxrFastError, match=problem):
            register_arch(name, builder, **variant)
    # the project's own builders' argument rules are not a registered builder's: its width is a channel count and
    # its layers a number, which ConvNet's rules ("a multiplier", "a list of layer names") refused
    def build_deepnet(n_in, n_classes, width=16, layers=2):
        stacks = [conv_stack(n_in, width, ["relu"])] + [conv_stack(width, width, ["relu"]) for _ in range(layers - 1)]
        return nn.Sequential(*stacks), classifier_head(width, n_classes)

    register_arch("deepnet", build_deepnet)
    model = create_model("deepnet", layers=3, width=4)
    assert len(model.body) == 3 and model.body[0].conv.out_channels == 4
    with pytest.raises(CxrFastError, match="convnet: width must be a number > 0"):
        create_model("convnet", width=-1)
    # a run of a registered architecture, loaded where it is not registered, says so (not "close matches" in timm)
    from cxr_fast.archs import model_config, model_from_config

    config = model_config(model)
    del registry.LOCAL_ARCHS["deepnet"]
    with pytest.raises(CxrFastError, match="'deepnet' is not known to this process: install the plugin package .* if it was added with register_arch"):
        model_from_config(config)


def test_a_builder_default_a_run_bundle_cannot_record_is_refused_at_registration(monkeypatch):
    # check_arch looked at the variant's values only: a default such as act=nn.ReLU passed register_arch, `cxrfast
    # models` listed the architecture, then every create_model refused: "Object of type type is not JSON serializable"
    from cxr_fast.archs import register_arch, registry

    monkeypatch.setattr(registry, "LOCAL_ARCHS", dict(registry.LOCAL_ARCHS))

    def build_with_a_class_default(n_in, n_classes, act=nn.ReLU):
        return nn.Sequential(nn.Conv2d(n_in, 4, 3), act()), nn.Sequential(nn.Flatten(), nn.LazyLinear(n_classes))

    with pytest.raises(CxrFastError, match="classdefault: architecture arguments must be numbers, strings or lists"):
        register_arch("classdefault", build_with_a_class_default)
    assert "classdefault" not in registry.LOCAL_ARCHS


def test_a_recipe_s_dropout_and_hidden_layers_reach_the_head():
    # dropout=0.3 in a recipe must put a dropout before the classifier, and the hidden layer must carry its layers
    head = create_model("cxresnet_tiny", hidden=16, dropout=0.3).head
    assert list(dict(head.named_children())) == ["pool", "flatten", "hidden", "dropout", "classifier"]
    assert head.dropout.p == 0.3 and head.classifier.in_features == 16
    assert [type(m) for m in head.hidden.children()] == [nn.Linear, nn.ReLU, nn.BatchNorm1d]
    assert "dropout" not in dict(classifier_head(8, 3).named_children())


def test_a_convolution_followed_by_batch_norm_has_no_bias_and_others_keep_theirs():
    assert conv_stack(1, 4, ["batchnorm", "relu"]).conv.bias is None  # the norm's shift makes it redundant
    assert conv_stack(1, 4, ["relu", "batchnorm"]).conv.bias is not None
    assert conv_stack(1, 4).conv.bias is not None


def test_a_width_multiplier_rounds_to_the_nearest_channel_count_never_below_one():
    from cxr_fast.archs.layers import scaled_width

    assert [scaled_width(16, m) for m in (0.3, 0.5, 1.4, 0.01)] == [5, 8, 22, 1]  # 4.8, 8, 22.4, 0.16


def test_the_frozen_group_is_the_whole_body_and_only_the_body():
    # freeze() trains the last group only: a body parameter in it would be trained, a head one frozen
    model = create_model("cxresnet_tiny")
    body, head = param_groups(model)
    assert [id(p) for p in body] == [id(p) for p in model.body.parameters()]
    assert [id(p) for p in head] == [id(p) for p in model.head.parameters()]


def test_an_architecture_name_is_taken_in_any_case():
    assert create_model("CXResnet_Tiny").arch == "cxresnet_tiny"
    assert create_model("ResNet18").arch == "resnet18"


@pytest.mark.parametrize("name, value, weights", [
    ("checkpoint_path", "evil.pth", "none"),
    ("pretrained_cfg_overlay", {"file": "evil.pth"}, "hub"),
    ("pretrained_cfg", {"file": "evil.pth"}, "hub"),
])
def test_timm_arguments_that_load_weights_themselves_are_refused_before_any_file_is_read(tmp_path, monkeypatch,
                                                                                          name, value, weights):
    # A recipe or a run's config.json from someone else set checkpoint_path in arch_kwargs, and timm torch.loaded
    # the file it named: past --weights, and older timm versions unpickle it whole, running any code it holds.
    torch.save({"state_dict": {}}, tmp_path / "evil.pth")
    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(CxrFastError, match=f"resnet18: argument {name} refused: starting weights come from --weights"):
        create_model("resnet18", weights=weights, **{name: value})
    with pytest.raises(CxrFastError, match=f"argument {name} refused"):  # a run's config.json
        model_from_config({"arch": "resnet18", "arch_kwargs": {name: value}, "n_in": 1, "n_classes": 3})
    assert loaded == []


# ---------------------------------------------------------------------------------------------- the study's networks
# Expected values below come from the architectures as the issue describes them, counted by hand, not from the code.


def _conv_params(n_in, n_out, k, bias):
    return n_in * n_out * k * k + (n_out if bias else 0)


def _bn_params(c):
    return 2 * c  # weight and bias


def test_convnet_has_the_study_s_parameter_count_and_halves_the_resolution_in_every_stack():
    # five stacks of a 3x3 convolution with bias (the norm comes after ReLU and pooling), ReLU, 2x2 max-pool and batch
    # norm; then pooling, a 64-unit hidden layer with batch norm, and the classifier
    widths = [1, 16, 64, 128, 256, 512]
    body = sum(_conv_params(a, b, 3, True) + _bn_params(b) for a, b in zip(widths, widths[1:]))
    head = (512 * 64 + 64) + _bn_params(64) + (64 * 3 + 3)
    model = create_model("convnet", n_in=1, n_classes=3).eval()
    assert sum(p.numel() for p in model.parameters()) == body + head == 1_593_731  # "1.59 M" in docs/benchmarks.md
    stacks = [getattr(model.body, f"stack{i}") for i in range(1, 6)]  # the names a bundle's weights are saved under
    assert [s.conv.kernel_size for s in stacks] == [(3, 3)] * 5 and all(s.conv.stride == (1, 1) for s in stacks)
    assert all(s.maxpool.kernel_size == 2 and s.maxpool.stride == 2 for s in stacks)
    x = torch.randn(1, 1, 64, 64)
    sides = []
    with torch.no_grad():
        for stack in stacks:
            x = stack(x)
            sides.append(x.shape[-1])
    assert sides == [32, 16, 8, 4, 2]


def test_convnet_stack_computes_conv_relu_maxpool_then_batch_norm():
    import torch.nn.functional as F

    stack = create_model("convnet", n_in=2, n_classes=3).body.stack1.eval()
    bn = stack.batchnorm
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 2, 10, 10)
    y = F.max_pool2d(F.relu(F.conv2d(x, stack.conv.weight, stack.conv.bias, padding=1)), 2)
    expected = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    expected = expected * bn.weight[:, None, None] + bn.bias[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(stack(x), expected)


def test_convnet_takes_width_and_dropout_from_its_arguments():
    model = create_model("convnet", n_in=3, n_classes=4, width=0.5, dropout=0.2)
    assert [s.conv.out_channels for s in model.body.children()] == [8, 32, 64, 128, 256]
    assert model.body.stack1.conv.in_channels == 3 and model.head.classifier.out_features == 4
    assert model.head.dropout.p == 0.2 and model.head.hidden.linear.in_features == 256


def test_cxresnet_has_the_study_s_parameter_count_and_total_stride_32():
    # stem: 3x3 stride-2 conv (no bias: a norm follows), BN, ReLU; each stage: a BasicBlock of two 3x3 convs with BN
    # and a 1x1 projection with BN (stride 2 and a new width); head: pool and linear
    widths = [16, 64, 128, 256, 512]
    stem = _conv_params(1, 16, 3, False) + _bn_params(16)
    stages = sum(_conv_params(a, b, 3, False) + _conv_params(b, b, 3, False) + _conv_params(a, b, 1, False)
                 + 3 * _bn_params(b) for a, b in zip(widths, widths[1:]))
    model = create_model("cxresnet", n_in=1, n_classes=3).eval()
    assert sum(p.numel() for p in model.parameters()) == stem + stages + 512 * 3 + 3 == 4_871_475  # "4.87 M"
    assert model.body.stem.conv.kernel_size == (3, 3) and model.body.stem.conv.stride == (2, 2)
    assert list(dict(model.body.stem.named_children())) == ["conv", "batchnorm", "relu"]
    with torch.no_grad():
        x = model.body.stem(torch.randn(1, 1, 64, 64))
        sides = [x.shape[-1]]
        for i in range(1, 5):
            x = getattr(model.body, f"stage{i}")(x)
            sides.append(x.shape[-1])
    assert sides == [32, 16, 8, 4, 2]


@pytest.mark.parametrize("n_in, n_out, stride, projected", [
    (4, 8, 2, True), (4, 4, 2, True), (4, 8, 1, True), (8, 8, 1, False),
])
def test_a_basic_block_adds_a_shortcut_projected_whenever_the_shape_changes(n_in, n_out, stride, projected):
    import torch.nn.functional as F

    from cxr_fast.archs.cxresnet import BasicBlock

    block = BasicBlock(n_in, n_out, stride).eval()
    stacks = [block.conv1, block.conv2] + ([block.shortcut] if projected else [])
    assert isinstance(block.shortcut, LayerStack if projected else nn.Identity)
    for stack in stacks:  # non-trivial statistics, so that a missing or misplaced norm shows
        bn = stack.batchnorm
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.bias.data.uniform_(-0.5, 0.5)

    def conv_bn(stack, x, stride, padding):
        bn = stack.batchnorm
        y = F.conv2d(x, stack.conv.weight, stack.conv.bias, stride=stride, padding=padding)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    assert block.conv1.conv.weight.shape == (n_out, n_in, 3, 3) and block.conv2.conv.weight.shape == (n_out, n_out, 3, 3)
    x = torch.randn(2, n_in, 9, 9)
    residual = conv_bn(block.conv2, F.relu(conv_bn(block.conv1, x, stride, 1)), 1, 1)
    if projected:
        assert block.shortcut.conv.weight.shape == (n_out, n_in, 1, 1)
        shortcut = conv_bn(block.shortcut, x, stride, 0)
    else:
        shortcut = x
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(residual + shortcut))


def test_cxresnet_takes_widths_and_checks_depths_itself_and_its_variants_are_the_documented_sizes():
    model = create_model("cxresnet", n_in=1, n_classes=3, widths=(8, 16, 32), depths=(1, 2))
    assert [model.body.stem.conv.out_channels, model.body.stage1.block1.conv1.conv.out_channels,
            model.body.stage2.block2.conv2.conv.out_channels, model.head.classifier.in_features] == [8, 16, 32, 32]
    with pytest.raises(CxrFastError, match="depths"):
        CXResnet(depths=(1, 0, 1, 1))  # a stage of no blocks is refused, not built with one
    tiny = create_model("cxresnet_tiny").body  # a quarter of the study's widths
    assert (tiny.stem.conv.out_channels, tiny.out_channels) == (4, 128)
    # cxresnet_wide is "about resnet18's size"
    n_wide = sum(p.numel() for p in create_model("cxresnet_wide", n_in=1, n_classes=3).parameters())
    n_resnet18 = sum(p.numel() for p in create_model("resnet18", n_in=1, n_classes=3).parameters())
    assert abs(n_wide / n_resnet18 - 1) < 0.1
