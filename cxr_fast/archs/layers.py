"""Building blocks that know nothing of any architecture: a layer factory, `LayerStack` and a classifier head.

A `LayerStack` is the unit the study describes: a top layer (a convolution or a linear layer) followed by a
list of layers given by name, e.g. ``("relu", "maxpool", "batchnorm")``. Names go through `make_layer`, a
tiny factory in the spirit of MONAI's `Act`/`Norm`/`Pool` factories, so an architecture is declared as data.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

from cxr_fast.errors import CxrFastError

# A layer is given by name, or by (name, keyword arguments) when a default needs changing:
# "relu", ("dropout", {"p": 0.25}), ("maxpool", {"kernel_size": 3}).
LayerSpec = str | tuple[str, dict[str, Any]]

# Every factory takes (channels, dims, **kwargs); dims is 1 after a linear layer and 2 after a convolution.
# ReLUs are not in-place: Captum's attribution methods hook module inputs and outputs, which in-place
# activations overwrite.
_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "relu": lambda channels, dims, **kw: nn.ReLU(**kw),
    "relu6": lambda channels, dims, **kw: nn.ReLU6(**kw),
    "silu": lambda channels, dims, **kw: nn.SiLU(**kw),
    "gelu": lambda channels, dims, **kw: nn.GELU(**kw),
    "maxpool": lambda channels, dims, **kw: (nn.MaxPool1d, nn.MaxPool2d)[dims - 1](
        **{"kernel_size": 2, **kw}
    ),
    "avgpool": lambda channels, dims, **kw: (nn.AvgPool1d, nn.AvgPool2d)[dims - 1](
        **{"kernel_size": 2, **kw}
    ),
    "batchnorm": lambda channels, dims, **kw: (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1](channels, **kw),
    "dropout": lambda channels, dims, **kw: nn.Dropout(**kw),
}

LAYER_NAMES = tuple(_FACTORIES)


def make_layer(spec: LayerSpec, channels: int, dims: int = 2) -> nn.Module:
    """Build one layer from its name (or ``(name, kwargs)``) for a tensor with `channels` channels."""
    name, kwargs = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
    if name not in _FACTORIES:
        raise CxrFastError(f"unknown layer {name!r}: choose from {', '.join(LAYER_NAMES)}")
    return _FACTORIES[name](channels, dims, **kwargs)


def _layer_name(spec: LayerSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


class LayerStack(nn.Sequential):
    """A top layer followed by an optional list of layers (activation, pooling, normalisation).

    Children are named after what they are (``conv``, ``relu``, ``maxpool``, ``batchnorm`` ...), so a stack
    prints and indexes readably, e.g. ``model.body.stack1.conv``. A repeated name gets a number suffix.
    """

    def __init__(self, top: nn.Module, layers: Sequence[LayerSpec] = (), top_name: str | None = None):
        if isinstance(top, nn.Conv2d):
            channels, dims, default_name = top.out_channels, 2, "conv"
        elif isinstance(top, nn.Linear):
            channels, dims, default_name = top.out_features, 1, "linear"
        else:
            raise TypeError(f"LayerStack needs a Conv2d or Linear top layer, got {type(top).__name__}")
        children: OrderedDict[str, nn.Module] = OrderedDict([(top_name or default_name, top)])
        for spec in layers:
            name = _layer_name(spec)
            unique, n = name, 1
            while unique in children:
                n += 1
                unique = f"{name}{n}"
            children[unique] = make_layer(spec, channels, dims)
        super().__init__(children)
        self.out_channels = channels


def conv_stack(
    n_in: int, n_out: int, layers: Sequence[LayerSpec] = (), kernel_size: int = 3, stride: int = 1
) -> LayerStack:
    """A 'same'-padded convolution followed by `layers`. The bias is dropped when a batch norm follows
    directly, since the norm's own shift makes it redundant."""
    bias = not (layers and _layer_name(layers[0]) == "batchnorm")
    conv = nn.Conv2d(n_in, n_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
    return LayerStack(conv, layers)


def linear_stack(n_in: int, n_out: int, layers: Sequence[LayerSpec] = ()) -> LayerStack:
    """A linear layer followed by `layers` (1-d versions of norms and pools)."""
    return LayerStack(nn.Linear(n_in, n_out), layers)


def classifier_head(
    n_features: int,
    n_classes: int,
    hidden: int | None = None,
    hidden_layers: Sequence[LayerSpec] = ("relu", "batchnorm"),
    dropout: float = 0.0,
) -> nn.Sequential:
    """Feature map [B, C, h, w] -> logits [B, n_classes].

    Average pooling over whatever spatial size arrives makes every model independent of the input size.
    The last child is always the final ``nn.Linear`` named ``classifier``; everything before it computes
    the penultimate features (see `CXRModel.features`).
    """
    children: OrderedDict[str, nn.Module] = OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())
    if hidden:
        children["hidden"] = linear_stack(n_features, hidden, hidden_layers)
        n_features = hidden
    if dropout:
        children["dropout"] = nn.Dropout(dropout)
    children["classifier"] = nn.Linear(n_features, n_classes)
    return nn.Sequential(children)


def scaled_width(channels: int, multiplier: float) -> int:
    """Channel count after a width multiplier, never below 1."""
    return max(1, int(round(channels * multiplier)))
