"""CXResnet: the study's channel widths (16 -> 64 -> 128 -> 256 -> 512) with residual connections.

A stride-2 stem makes the first 16-channel map; each later width is a stage of BasicBlocks (two 3x3
convolutions plus a shortcut) whose first block halves the resolution. The shortcut is a 1x1 projection
whenever the shape changes. Depth per stage and a width multiplier are parameters, so the variants at the
bottom are one line each.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from cxr_fast.archs.layers import classifier_head, conv_stack, scaled_width
from cxr_fast.errors import CxrFastError

STUDY_WIDTHS = (16, 64, 128, 256, 512)


class BasicBlock(nn.Module):
    """conv-bn-relu, conv-bn, plus the shortcut, then relu (He et al. 2016)."""

    def __init__(self, n_in: int, n_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_stack(n_in, n_out, ("batchnorm", "relu"), stride=stride)
        self.conv2 = conv_stack(n_out, n_out, ("batchnorm",))
        needs_projection = stride != 1 or n_in != n_out
        self.shortcut = (
            conv_stack(n_in, n_out, ("batchnorm",), kernel_size=1, stride=stride)
            if needs_projection
            else nn.Identity()
        )
        # Its own module rather than a functional call, so Captum and hooks see every activation.
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def residual_stage(n_in: int, n_out: int, depth: int, stride: int = 2) -> nn.Sequential:
    blocks = [BasicBlock(n_in, n_out, stride)] + [BasicBlock(n_out, n_out) for _ in range(depth - 1)]
    return nn.Sequential(OrderedDict((f"block{i + 1}", b) for i, b in enumerate(blocks)))


class CXResnet(nn.Sequential):
    """Body: ``stem`` then ``stage1`` ... ``stageN``; total stride 2 ** len(widths), like `ConvNet`."""

    def __init__(
        self,
        n_in: int = 1,
        widths: Sequence[int] = STUDY_WIDTHS,
        depths: Sequence[int] = (1, 1, 1, 1),
        width: float = 1.0,
    ):
        if len(depths) != len(widths) - 1 or min(depths, default=1) < 1:
            raise CxrFastError(
                f"cxresnet: depths {list(depths)} must give one positive depth per stage, "
                f"i.e. {len(widths) - 1} numbers for widths {list(widths)}"
            )
        w = [scaled_width(c, width) for c in widths]
        children: OrderedDict[str, nn.Module] = OrderedDict(
            stem=conv_stack(n_in, w[0], ("batchnorm", "relu"), stride=2)
        )
        for i, depth in enumerate(depths):
            children[f"stage{i + 1}"] = residual_stage(w[i], w[i + 1], depth)
        super().__init__(children)
        self.out_channels = w[-1]


def build_cxresnet(
    n_in: int,
    n_classes: int,
    widths: Sequence[int] = STUDY_WIDTHS,
    depths: Sequence[int] = (1, 1, 1, 1),
    width: float = 1.0,
    hidden: int | None = None,
    dropout: float = 0.0,
) -> tuple[nn.Module, nn.Sequential]:
    """(body, head) of a CXResnet; by default the head is pool + linear, as in ResNets."""
    body = CXResnet(n_in, widths, depths, width)
    return body, classifier_head(body.out_channels, n_classes, hidden=hidden, dropout=dropout)


# Registered variants: name -> arguments for `build_cxresnet` (read once, when the registry is imported).
VARIANTS: dict[str, dict] = {
    "cxresnet": dict(depths=(1, 1, 1, 1)),  # the study's widths, one residual block per stage
    "cxresnet_tiny": dict(width=0.25, depths=(1, 1, 1, 1)),  # seconds per epoch on a CPU: tests and demos
    "cxresnet_wide": dict(width=1.5, depths=(1, 1, 1, 1)),  # about resnet18's size
}
