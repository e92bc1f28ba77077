"""Architecture plugins: installed packages that declare entry points in the group ``cxr_fast.archs``.

Each test "installs" a package the way pip leaves one on sys.path, as a `NAME-VERSION.dist-info` folder (METADATA and
entry_points.txt) beside its module, so importlib.metadata finds it with no network and no pip."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cxr_fast.archs import create_model, list_models, register_arch, registry
from cxr_fast.cli import app
from cxr_fast.errors import CxrFastError

PLUGIN_MODULE = """
import torch
import torch.nn as nn
from cxr_fast.archs import classifier_head, conv_stack

MADE_AT_IMPORT = torch.zeros(1)  # a plugin module may make tensors as it imports

def build_plugnet(n_in, n_classes, width=4):
    body = nn.Sequential(conv_stack(n_in, width, ["relu", "maxpool"]), conv_stack(width, 2 * width, ["relu"]))
    return body, classifier_head(2 * width, n_classes)

def build_plugnet_wide(n_in, n_classes, width=8):  # a variant: the same network with other defaults
    return build_plugnet(n_in, n_classes, width)

def build_needs_depth(n_in, n_classes, depth):
    return build_plugnet(n_in, n_classes)
"""


def install(root, dist, entry_points, module="myplug_archs", source=PLUGIN_MODULE, version="0.1"):
    """Write the package `dist` under `root`: its module, and the metadata that declares `entry_points`."""
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[cxr_fast.archs]\n{lines}")
    if module:
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path standing for site-packages, and a registry that has not yet read its plugins."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))  # also clears importlib's caches, metadata's included
    monkeypatch.setattr(registry, "_PLUGINS", None)
    yield root
    for name in [n for n in sys.modules if n.startswith("myplug")]:
        del sys.modules[name]


def uninstall(root, monkeypatch):
    shutil.rmtree(root)
    root.mkdir()
    importlib.invalidate_caches()
    for name in [n for n in sys.modules if n.startswith("myplug")]:
        del sys.modules[name]
    monkeypatch.setattr(registry, "_PLUGINS", None)  # a new process


def test_a_plugin_architecture_is_listed_trained_and_reloaded(site, tiny_data, tmp_path, monkeypatch):
    from cxr_fast.bundle import load_run
    from cxr_fast.config import resolve_config
    from cxr_fast.train import train
    from tests.conftest import TINY

    install(site, "myplug", {"plugnet": "myplug_archs:build_plugnet", "plugnet_wide": "myplug_archs:build_plugnet_wide"})
    reads = []
    monkeypatch.setattr(registry, "entry_points", lambda **kw: reads.append(kw) or entry_points(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a working plugin warns about nothing
        assert list_models("plugnet*") == [("plugnet", "plugin myplug 0.1"), ("plugnet_wide", "plugin myplug 0.1")]
    result = CliRunner().invoke(app, ["models", "plug*"])
    assert result.exit_code == 0, result.output
    assert "plugnet_wide" in result.output and "plugin myplug 0.1" in result.output
    assert ("cxresnet", "local") in list_models("cxresnet") and list_models("resnet18") == [("resnet18", "timm")]

    run = train(tiny_data, resolve_config(epochs=1, **{**TINY, "arch": "plugnet_wide"}), out=tmp_path / "run", quiet=True)
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["arch"], model["arch_kwargs"]) == ("plugnet_wide", {"width": 8})  # the variant's own default
    assert load_run(run).model.body[1].conv.out_channels == 16
    assert reads == [{"group": "cxr_fast.archs"}]  # read once, for listing, training and loading alike
    # the registry read afresh, as in a new process, with the module first imported by load_run: not on the meta
    # device it builds its skeleton on, where the module's tensors would be left without data
    monkeypatch.setattr(registry, "_PLUGINS", None)
    del sys.modules["myplug_archs"]
    assert load_run(run).model.body[0].conv.out_channels == 8
    assert sys.modules["myplug_archs"].MADE_AT_IMPORT.device.type == "cpu"
    # and a new process of the command line finds it with nothing but the package on its path
    image = pd.read_csv(tiny_data / "manifest.csv")["path"][0]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parents[1])])}
    done = subprocess.run([sys.executable, "-c", "from cxr_fast.cli import app; app()", "predict", str(run), image],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(image).name in done.stdout and "warning" not in done.stderr
    # with the package uninstalled, the run says what is missing and where, in one line
    uninstall(site, monkeypatch)
    with pytest.raises(CxrFastError) as raised:
        load_run(run)
    message = str(raised.value)
    assert str(run / "config.json") in message and "'plugnet_wide' is not known" in message
    assert "install the plugin package that provides it" in message
    result = CliRunner().invoke(app, ["interpret", str(run)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "'plugnet_wide' is not known to this process: install the plugin" in result.output
    # installed but broken, it is the run's error, said once (not first as a warning)
    install(site, "myplug", {"plugnet_wide": "myplug_archs:build_plugnet_wide"}, source="import no_such_module_here\n",
            version="0.2")
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_PLUGINS", None)  # a new process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CxrFastError, match=r"config.json: architecture plugin 'plugnet_wide' .*from myplug 0.2 "
                                               r"could not be loaded \(ModuleNotFoundError"):
            load_run(run)


def test_a_broken_plugin_warns_and_fails_only_when_asked_for(site, tiny_data):
    install(site, "myplug", {
        "plugnet": "myplug_archs:build_plugnet",
        "brokenimp": "myplug_missing_module:build",  # the package's module fails to import
        "nodefault": "myplug_archs:build_needs_depth",  # breaks check_arch's rules
        "notcallable": "myplug_archs:nn",  # a module, not a builder
    })
    with pytest.warns(UserWarning) as caught:
        model = create_model("plugnet", n_in=1, n_classes=2)  # a command that needs none of the broken ones
    assert model.body[0].conv.out_channels == 4
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3, messages
    assert messages[0].startswith("architecture plugin 'brokenimp' (myplug_missing_module:build) from myplug 0.1 "
                                  "could not be loaded (ModuleNotFoundError: No module named 'myplug_missing_module')")
    assert "'nodefault' (myplug_archs:build_needs_depth) from myplug 0.1 breaks the registry's rules: nodefault: " \
           "the builder's argument 'depth' needs a default" in messages[1]
    assert "'notcallable' (myplug_archs:nn) from myplug 0.1 is a module, not a builder" in messages[2]
    assert all("\n" not in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not at every consultation
        assert [n for n, source in list_models("*") if source.startswith("plugin")] == ["plugnet"]

    # asked for by name it is an error that says why, and the warning about it is not repeated
    registry._PLUGINS = None
    with pytest.warns(UserWarning) as caught:
        with pytest.raises(CxrFastError, match=r"^architecture plugin 'brokenimp' .*from myplug 0.1 could not be loaded"):
            create_model("BrokenImp")
    assert not any("brokenimp" in str(w.message) for w in caught) and len(caught) == 2
    with pytest.warns(UserWarning, match="'brokenimp'"):  # asked for nodefault, the others are warnings
        result = CliRunner().invoke(app, ["train", "--data", str(tiny_data), "--arch", "nodefault"])
    assert result.exit_code == 1
    assert "error: architecture plugin 'nodefault'" in result.output and "needs a default" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_plugin_cannot_take_a_cxr_fast_timm_or_another_plugins_name(site, monkeypatch):
    install(site, "myplug", {"cxresnet": "myplug_archs:build_plugnet", "resnet18": "myplug_archs:build_plugnet",
                             "ensemble": "myplug_archs:build_plugnet", "twin": "myplug_archs:build_plugnet"})
    install(site, "otherplug", {"twin": "myplug_archs:build_plugnet_wide"}, module=None, version="2.0")
    with pytest.warns(UserWarning) as caught:
        cxresnet = create_model("cxresnet", n_in=1, n_classes=2)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 4, messages
    assert "'cxresnet' (myplug_archs:build_plugnet) from myplug 0.1 is not used: cxresnet is cxr_fast's own" in messages[0]
    assert "'ensemble' (myplug_archs:build_plugnet) from myplug 0.1 is not used" in messages[1]
    assert "'resnet18' (myplug_archs:build_plugnet) from myplug 0.1 is not used: resnet18 is a timm architecture" \
           in messages[2]
    assert "'twin' is declared by 2 packages (myplug 0.1, otherplug 2.0): none is used" in messages[3]
    # the names keep their meaning: cxr_fast's CXResnet and timm's ResNet, not the plugin's two-stage network
    assert type(cxresnet.body).__name__ == "CXResnet" and type(create_model("resnet18").body).__name__ == "ResNet"
    assert list_models("cxresnet") == [("cxresnet", "local")] and list_models("resnet18") == [("resnet18", "timm")]
    with pytest.raises(CxrFastError, match=r"'twin' is declared by 2 packages \(myplug 0.1, otherplug 2.0\)"):
        create_model("twin")
    # nor can a script's register_arch take a name an installed plugin claims
    monkeypatch.setattr(registry, "LOCAL_ARCHS", dict(registry.LOCAL_ARCHS))  # should the refusal fail
    sys.modules.pop("myplug_archs", None)
    import myplug_archs

    with pytest.raises(CxrFastError, match=r"twin: already claimed by the installed architecture plugin 'twin'"):
        register_arch("twin", myplug_archs.build_plugnet)
    register_arch("twin2", myplug_archs.build_plugnet)  # a free name is taken as before


def test_a_plugin_architecture_trains_data_parallel(site, tiny_data, tmp_path):
    # each process of --distributed is a new Python that reads the installed plugins itself
    install(site, "myplug", {"plugnet": "myplug_archs:build_plugnet"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parents[1])]),
           "CUDA_VISIBLE_DEVICES": ""}  # two CPU processes, GPU or not
    run = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-c", "from cxr_fast.cli import app; app()", "train", "--data",
                           str(tiny_data), "--arch", "plugnet", "--size", "32", "--epochs", "1", "--bs", "16",
                           "--distributed", "--nproc", "2", "--out", str(run)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["model"]["arch"] == "plugnet"
    assert json.loads((run / "metrics.json").read_text())["processes"] == 2
