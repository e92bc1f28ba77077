"""The study's plain convolutional network, made independent of input size, channels and classes.

The study stacks five convolution blocks (16 -> 64 -> 128 -> 256 -> 512 channels), each a 3x3 convolution,
ReLU, 2x2 max-pool and batch norm, then flattens 512x7x7 into a 64-unit hidden layer with batch norm and a
classifier. Here the flatten becomes an adaptive average pool, so the same weights work at 64 px and 224 px.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn

from cxr_fast.archs.layers import LayerSpec, classifier_head, conv_stack, scaled_width

STUDY_WIDTHS = (16, 64, 128, 256, 512)
STUDY_LAYERS = ("relu", "maxpool", "batchnorm")


class ConvNet(nn.Sequential):
    """Body of the study's network: one `LayerStack` per width, named ``stack1`` ... ``stackN``.

    Every stack halves the resolution (the max-pool), so the input must be at least 2**len(widths) pixels.
    """

    def __init__(
        self,
        n_in: int = 1,
        widths: Sequence[int] = STUDY_WIDTHS,
        width: float = 1.0,
        layers: Sequence[LayerSpec] = STUDY_LAYERS,
    ):
        channels = [n_in] + [scaled_width(c, width) for c in widths]
        stacks = OrderedDict(
            (f"stack{i + 1}", conv_stack(c_in, c_out, layers))
            for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]))
        )
        super().__init__(stacks)
        self.out_channels = channels[-1]


def build_convnet(
    n_in: int,
    n_classes: int,
    widths: Sequence[int] = STUDY_WIDTHS,
    width: float = 1.0,
    layers: Sequence[LayerSpec] = STUDY_LAYERS,
    hidden: int = 64,
    dropout: float = 0.0,
) -> tuple[nn.Module, nn.Sequential]:
    """(body, head) of a ConvNet; the head carries the study's 64-unit hidden layer with batch norm."""
    body = ConvNet(n_in, widths, width, layers)
    return body, classifier_head(body.out_channels, n_classes, hidden=hidden, dropout=dropout)


# Registered variants: name -> arguments for `build_convnet` (read once, when the registry is imported).
VARIANTS: dict[str, dict] = {
    "convnet": {},  # the study's network
}
