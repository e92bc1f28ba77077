import numpy as np
import pytest
import torch
from torch import nn

from cxr_fast.attribution import (
    captum_occlusion,
    default_window,
    gradcam,
    integrated_gradients,
    occlusion_maps,
    occlusion_maps_coarse_to_fine,
    overlay_rgb,
)
from cxr_fast.errors import CxrFastError


class TinyCXR(nn.Module):
    """Same interface as CXRModel (.body → feature map, .head → logits), small enough for exact checks."""

    def __init__(self, n_in=1, n_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(n_in, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes))
        with torch.no_grad():  # non-trivial BatchNorm statistics and logits of a useful size
            self.body[1].running_mean.uniform_(-0.5, 0.5)
            self.body[1].running_var.uniform_(0.5, 2.0)
            self.head[2].weight.mul_(20)
        self.eval()

    def forward(self, x):
        return self.head(self.body(x))


class RegionModel(nn.Module):
    """Class k's logit is the mean of the image inside its own rectangle: the true evidence is known."""

    def __init__(self, boxes, size):
        super().__init__()
        w = torch.zeros(len(boxes), size, size)
        for k, (y0, y1, x0, x1) in enumerate(boxes):
            w[k, y0:y1, x0:x1] = 10.0 / ((y1 - y0) * (x1 - x0))
        self.register_buffer("w", w)
        self.calls = 0

    def forward(self, x):
        self.calls += len(x)
        return torch.einsum("bchw,khw->bk", x, self.w)


@pytest.mark.parametrize(
    "n_in, shape, window, stride, baseline",
    [
        (1, (32, 32), 8, 4, 0.0),
        (3, (32, 32), 8, 4, 0.0),
        (1, (30, 27), 8, 5, 0.5),  # stride does not divide: Captum's last window is cut off at the edge
        (3, (32, 32), 7, 3, -1.0),  # nor here, in either direction
        (1, (32, 32), (8, 6), (4, 3), 0.0),  # rectangular window
    ],
)
def test_occlusion_maps_equal_captum_for_every_class(n_in, shape, window, stride, baseline):
    model = TinyCXR(n_in)
    x = torch.randn(n_in, *shape, generator=torch.Generator().manual_seed(1))
    maps = occlusion_maps(model, x, window=window, stride=stride, baseline=baseline, batch_size=16)
    assert maps.shape == (3, *shape)
    assert maps.abs().max() > 0.05  # the comparison below is not between two near-zero maps
    for k in range(3):
        reference = captum_occlusion(
            model, x, window, stride, target=k, baseline=baseline, perturbations_per_eval=64
        )
        assert (maps[k] - reference).abs().max().item() <= 1e-4


def test_occlusion_equals_captum_in_every_channel():
    from captum.attr import Occlusion

    model = TinyCXR(3)
    x = torch.randn(3, 32, 32)
    full = Occlusion(model).attribute(x[None], sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), target=2)
    maps = occlusion_maps(model, x, 8, 4, targets=[2])
    for c in range(3):
        assert (full[0, c] - maps[0]).abs().max().item() <= 1e-4


def test_occlusion_batch_size_targets_and_tensor_baseline():
    model = TinyCXR(1)
    x = torch.randn(1, 1, 24, 24)  # a batch of one is accepted too
    baseline = torch.full((1, 24, 24), 0.25)
    all_maps = occlusion_maps(model, x, 6, 3, baseline=baseline, batch_size=64)
    one_by_one = occlusion_maps(model, x, 6, 3, baseline=0.25, batch_size=1, targets=[2, 0])
    assert torch.allclose(all_maps[[2, 0]], one_by_one, atol=1e-5)


def test_occlusion_restores_training_mode():
    model = TinyCXR(1).train()
    occlusion_maps(model, torch.randn(1, 16, 16), 4, 2)
    assert model.training


def test_default_window_is_a_fraction_of_the_image():
    assert default_window(224, 224) == (28, 14)
    assert default_window(32, 48) == (4, 2)
    model, x = TinyCXR(1), torch.randn(1, 32, 32)
    maps = occlusion_maps(model, x)  # defaults at 32 px: window 4, stride 2
    reference = captum_occlusion(model, x, 4, 2, target=0, perturbations_per_eval=64)
    assert (maps[0] - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("window, stride", [(40, 4), (8, 9), (0, 1)])
def test_occlusion_rejects_bad_windows(window, stride):
    with pytest.raises(CxrFastError):
        occlusion_maps(TinyCXR(1), torch.randn(1, 32, 32), window, stride)


def test_occlusion_finds_the_region_a_class_depends_on():
    boxes = [(4, 12, 4, 12), (20, 28, 40, 52), (44, 60, 8, 20)]
    model = RegionModel(boxes, 64)
    maps = occlusion_maps(model, torch.ones(1, 64, 64), 8, 4)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert maps[k][inside].min() > 0
        assert maps[k][inside].mean() > 5 * maps[k][~inside].abs().mean()


def test_coarse_to_fine_concentrates_on_the_same_region_with_fewer_passes():
    boxes = [(36, 48, 40, 56), (8, 20, 8, 20), (44, 60, 4, 16)]
    x = torch.ones(1, 64, 64)
    fine_model, c2f_model = RegionModel(boxes, 64), RegionModel(boxes, 64)
    fine = occlusion_maps(fine_model, x, 8, 4)
    c2f = occlusion_maps_coarse_to_fine(c2f_model, x, window=8, stride=4, keep_fraction=0.2)
    assert c2f.shape == fine.shape
    assert c2f_model.calls < 0.7 * fine_model.calls
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        # The strongest pixel lies in the class's region, and the top 5 % of both maps largely agree.
        y, xx = np.unravel_index(int(c2f[k].argmax()), (64, 64))
        assert y0 <= y < y1 and x0 <= xx < x1
        n = int(0.05 * 64 * 64)
        top_fine = set(torch.topk(fine[k].flatten(), n).indices.tolist())
        top_c2f = set(torch.topk(c2f[k].flatten(), n).indices.tolist())
        assert len(top_fine & top_c2f) / n >= 0.6


def test_integrated_gradients_of_a_linear_model_is_weight_times_input():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 16, 16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 16 * 16, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(w.flatten(1))
    x = torch.randn(2, 16, 16)
    attr = integrated_gradients(model, x, target=1, n_steps=8)
    assert attr.shape == (16, 16)
    assert torch.allclose(attr, (w[1] * x).sum(0), atol=1e-4)


def test_gradcam_on_body_is_image_sized_and_non_negative():
    model = TinyCXR(1)
    cam = gradcam(model, torch.randn(1, 32, 32), target=0)
    assert cam.shape == (32, 32)
    assert cam.min() >= 0
    signed = gradcam(model, torch.randn(1, 32, 32), target=0, relu=False, layer=model.body[2])
    assert signed.shape == (32, 32)
    with pytest.raises(CxrFastError):
        gradcam(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), torch.randn(1, 4, 4), target=0)


def test_overlay_rgb_colours_evidence():
    image = np.full((8, 8), 128, dtype=np.uint8)
    attr = np.zeros((8, 8))
    attr[0, 0], attr[7, 7] = 1.0, -1.0
    rgb = overlay_rgb(image, attr, alpha=0.8, clip_quantile=1.0)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] > rgb[0, 0, 2]  # positive → red
    assert rgb[7, 7, 2] > rgb[7, 7, 0]  # negative → blue
    assert tuple(rgb[4, 4]) == (128, 128, 128)  # no attribution → the image unchanged
    with pytest.raises(CxrFastError):
        overlay_rgb(image, np.zeros((4, 4)))


def test_occlusion_of_a_model_left_in_training_mode_is_that_of_the_model_in_eval_mode_and_leaves_it_untouched():
    # attributing in training mode would read batch statistics of the occluded copies and move the running ones
    model = TinyCXR(1)
    x = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(3))
    expected = occlusion_maps(model, x, 8, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = occlusion_maps(model.train(), x, 8, 4)
    torch.testing.assert_close(maps, expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_overlay_scales_by_the_quantile_so_one_hot_pixel_does_not_wash_out_the_rest():
    image = np.full((10, 10), 128, dtype=np.uint8)
    attr = np.ones((10, 10))
    attr[0, 0] = 100.0  # one pixel of 100 above the 0.9 quantile (1): every other pixel is at full strength
    rgb = overlay_rgb(image, attr, alpha=0.8, clip_quantile=0.9)
    # gray 128 blended with pure red at weight 0.8: red 0.2 * 128 + 0.8 * 255 = 229.6, green and blue 0.2 * 128
    assert tuple(rgb[5, 5]) == (230, 26, 26)


def test_gradcam_is_the_gradient_weighted_feature_map_upsampled_bilinearly():
    # body: 16-px averages of a 32-px image (a 2 x 2 map); head: class 0 is the mean of the map, class 1 its negative
    model = nn.Module()
    model.body = nn.AvgPool2d(16)
    model.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model.head[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    model.forward = lambda x: model.head(model.body(x))
    x = torch.zeros(1, 32, 32)
    x[:, :16, :16], x[:, :16, 16:], x[:, 16:, :16], x[:, 16:, 16:] = 1.0, 2.0, 3.0, 4.0
    cam = gradcam(model, x, target=0, relu=False)
    feature_map = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # each cell weighted by its gradient, 1/4
    expected = nn.functional.interpolate((feature_map / 4)[None, None], size=(32, 32), mode="bilinear",
                                         align_corners=False)[0, 0]
    torch.testing.assert_close(cam, expected)
