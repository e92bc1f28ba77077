"""Attribution maps for chest X-ray classifiers: occlusion for all classes at once, plus Captum wrappers.

Everything here takes one normalised image tensor ``[C, H, W]`` (or ``[1, C, H, W]``) and a model that
returns logits ``[B, n_classes]``, and returns plain tensors on the CPU; drawing is done elsewhere. The work runs
on the device the model's weights are on (a GPU with `load_run(..., device="cuda")`), wherever the image is.

Why occlusion is reimplemented instead of calling Captum's ``Occlusion``: Captum runs one full sweep of
occluded images per target class (and, by default, one image per forward pass). The occluded images do
not depend on the class, so :func:`occlusion_maps` builds them once, runs them in batches and reads every
class's logit from the same forward passes. The maps equal Captum's to float precision (the tests check
this for every class); only the work is shared.

Why fastai's ``fastai.callback.captum.CaptumInterpretation`` is not used: in fastai 2.8 it imports
``captum.insights`` (removed in Captum 0.8/0.9) and ``ipykernel``, so it fails to import with Captum 0.9.
We call Captum directly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from cxr_fast.errors import CxrFastError

__all__ = [
    "default_window",
    "occlusion_maps",
    "occlusion_maps_coarse_to_fine",
    "captum_occlusion",
    "integrated_gradients",
    "gradcam",
    "overlay_rgb",
    "benchmark_occlusion",
]


# ----------------------------------------------------------------------------------------------- helpers


def model_device(model: nn.Module) -> torch.device:
    """The device the model's weights are on; the CPU for a module with none (an ONNX model behind a wrapper)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _as_single_image(x: Tensor, model: nn.Module) -> Tensor:
    """Accept ``[C,H,W]`` or ``[1,C,H,W]``; return ``[C,H,W]`` on the model's device."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise CxrFastError(
            f"attribution: expected one image [C,H,W] or [1,C,H,W], got shape {tuple(x.shape)}"
        )
    return x.to(model_device(model))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise CxrFastError(f"attribution: window/stride must be an int or (height, width), got {v}")
    return v  # type: ignore[return-value]


def default_window(height: int, width: int) -> tuple[int, int]:
    """Default occlusion window and stride: about 1/8 of the shorter side, stride half the window.

    At 224 px that is a 28-px window moved 14 px at a time (15 × 15 = 225 occlusions): small enough to
    separate the two lungs from the mediastinum and from a corner marker, coarse enough to run on a CPU.
    """
    window = max(1, round(min(height, width) / 8))
    return window, max(1, window // 2)


def check_window(size: int, window: int, stride: int) -> None:
    """Refuse, before any slow work, a window or stride that occlusion cannot use on a `size`-pixel input."""
    _window_starts(size, window, stride)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis, exactly as Captum's ``Occlusion`` places them.

    Captum starts at 0, steps by ``stride`` and makes ``ceil((size - window) / stride) + 1`` steps, so the
    last window may hang over the edge; it is then cut off there (smaller than the others).
    """
    if window > size:
        raise CxrFastError(f"attribution: occlusion window {window} is larger than the image side {size}")
    if window < size and stride > window:
        # Captum refuses this too: some pixels would never be occluded.
        raise CxrFastError(f"attribution: occlusion stride {stride} is larger than the window {window}")
    if stride < 1 or window < 1:
        raise CxrFastError(
            f"attribution: window and stride must be ≥ 1, got window {window}, stride {stride}"
        )
    n = math.ceil((size - window) / stride) + 1
    return [i * stride for i in range(n)]


def _cover_matrix(size: int, window: int, starts: Sequence[int], device) -> Tensor:
    """``[n_windows, size]`` 0/1 matrix: row i marks the pixels covered by window i along this axis."""
    idx = torch.arange(size, device=device)
    s = torch.as_tensor(list(starts), device=device)[:, None]
    return ((idx >= s) & (idx < s + window)).float()


@contextmanager
def _eval_mode(model: nn.Module):
    """Attribute the model as used for prediction (BatchNorm running stats, no dropout), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _baseline_tensor(baseline: float | Tensor, x: Tensor) -> Tensor:
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if b.dim() == 4 and b.shape[0] == 1:
        b = b[0]
    try:
        return torch.broadcast_to(b, x.shape)
    except RuntimeError as e:
        raise CxrFastError(
            f"attribution: baseline of shape {tuple(b.shape)} does not broadcast to the image {tuple(x.shape)}"
        ) from e


def _occlusion_from_windows(
    model: nn.Module,
    x: Tensor,
    rows: Tensor,
    cols: Tensor,
    pairs: Tensor,
    baseline: Tensor,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Run the occluded copies given by window pairs; return (sum of diffs per pixel [K,H,W], counts [H,W]).

    ``rows``/``cols`` are cover matrices ``[nH,H]``/``[nW,W]``; ``pairs`` ``[N,2]`` lists the (row, col)
    window indices to evaluate. The attribution of a window is ``f(x) - f(x occluded)`` for every logit;
    it is spread over the pixels the window covers, and each pixel averages the windows that covered it.
    """
    _, H, W = x.shape
    with torch.no_grad():
        reference = model(x[None]).float()[0]  # [K]
        diffs = []
        for start in range(0, len(pairs), batch_size):
            p = pairs[start : start + batch_size]
            mask = (rows[p[:, 0]][:, :, None] * cols[p[:, 1]][:, None, :]).bool()[:, None]  # [b,1,H,W]
            occluded = torch.where(mask, baseline[None], x[None])  # all channels occluded together
            diffs.append(reference[None] - model(occluded).float())
        diff = torch.cat(diffs)  # [N, K]
    # Scatter each window's difference back onto its rectangle. float64 keeps the sum of up to a few
    # hundred terms exact to well below the 1e-4 agreement with Captum that the tests demand.
    acc = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    r = rows[pairs[:, 0]].to(acc)  # [N,H]
    c = cols[pairs[:, 1]].to(acc)  # [N,W]
    total = torch.einsum("nk,nh,nw->khw", diff.to(acc), r, c)
    counts = torch.einsum("nh,nw->hw", r, c)
    return total, counts


# ----------------------------------------------------------------------------------------------- occlusion


def occlusion_maps(
    model: nn.Module,
    x: Tensor,
    window: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    targets: Sequence[int] | None = None,
) -> Tensor:
    """Occlusion attribution for every class from one sweep of occluded images.

    Args:
        model: returns logits ``[B, n_classes]`` for input ``[B, C, H, W]``; evaluated in eval mode.
        x: one normalised image ``[C, H, W]`` (or ``[1, C, H, W]``).
        window, stride: occlusion square (or ``(h, w)``) and its step; the window defaults to
            :func:`default_window` (1/8 of the shorter side), the stride to half the window.
        baseline: value an occluded pixel takes (scalar, or a tensor broadcastable to ``[C, H, W]``).
            0 is the dataset mean for normalised input.
        batch_size: occluded images per forward pass.
        targets: class indices to return; default all classes.

    Returns:
        ``[K, H, W]`` float32, one map per target, in logit units: at each pixel the mean, over the windows
        covering it, of ``logit(x) - logit(x with that window set to baseline)``. Positive = evidence for
        the class. This equals Captum's ``Occlusion(model).attribute(x[None], sliding_window_shapes=(C, h,
        w), strides=(C, sh, sw), baselines=baseline, target=k)`` in every channel (channels are occluded
        together, so Captum's map is the same in each channel), including Captum's window grid: starts at
        0, ``ceil((side - window) / stride) + 1`` steps, the last window cut off at the edge.
    """
    x = _as_single_image(x, model)
    _, H, W = x.shape
    dw = default_window(H, W)
    wh, ww = _pair(window) if window is not None else (dw[0], dw[0])
    if stride is not None:
        sh, sw = _pair(stride)
    else:
        sh, sw = max(1, wh // 2), max(1, ww // 2)
    rows = _cover_matrix(H, wh, _window_starts(H, wh, sh), x.device)
    cols = _cover_matrix(W, ww, _window_starts(W, ww, sw), x.device)
    pairs = torch.cartesian_prod(torch.arange(len(rows)), torch.arange(len(cols))).to(x.device)
    with _eval_mode(model):
        total, counts = _occlusion_from_windows(
            model, x, rows, cols, pairs, _baseline_tensor(baseline, x), max(1, batch_size)
        )
    maps = (total / counts).float().cpu()
    return maps if targets is None else maps[list(targets)]


def occlusion_maps_coarse_to_fine(
    model: nn.Module,
    x: Tensor,
    coarse_window: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    keep_fraction: float = 0.25,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    targets: Sequence[int] | None = None,
) -> Tensor:
    """Occlusion in two passes: a coarse sweep everywhere, a fine sweep only where the coarse map is strong.

    1. Coarse pass: window ``coarse_window`` (default twice the fine window, stride half of it) over the
       whole image, all classes at once.
    2. Select the ``keep_fraction`` of pixels with the largest ``max over classes |coarse attribution|``.
    3. Fine pass: only the fine windows (same grid as :func:`occlusion_maps`) that overlap the selection.
       Pixels covered by an evaluated fine window get the fine attribution (averaged over the evaluated
       windows that cover them); the rest keep the coarse value scaled by fine-window area / coarse-window
       area. The scaling is there because, where the model is close to linear, occluding a window changes
       the logit by the sum of the covered pixels' contributions, so occlusion values grow with window
       area; scaling puts both parts on about the same scale for the shares computed by the audit.

    Trade-off: it runs fewer forward passes than the full fine sweep — at 224 px with focal evidence,
    about 60 % of them with ``keep_fraction=0.25`` and 40 % with 0.1 (the coarse grid costs ~1/4 of the
    fine one; the fine windows overlapping the selection are ~1.5× the selected area). In exchange
    the map is only approximate: outside the selected regions it is coarse, evidence that only shows at
    the fine scale there is missed, and pixels at the rim of the selection average fewer windows than in
    the full map. Use :func:`occlusion_maps` when the map must be exact (or match Captum).

    Returns ``[K, H, W]`` like :func:`occlusion_maps`.
    """
    if not 0 < keep_fraction <= 1:
        raise CxrFastError(f"attribution: keep_fraction must be in (0, 1], got {keep_fraction}")
    x = _as_single_image(x, model)
    _, H, W = x.shape
    fine_w = window if window is not None else default_window(H, W)[0]
    fine_s = stride if stride is not None else max(1, fine_w // 2)
    coarse_w = min(coarse_window if coarse_window is not None else 2 * fine_w, H, W)
    coarse = occlusion_maps(model, x, coarse_w, max(1, coarse_w // 2), baseline, batch_size).to(x.device)

    # Rank rather than threshold, so that ties (a flat map) cannot select more than keep_fraction.
    strength = coarse.abs().amax(dim=0).flatten()
    n_keep = max(1, math.ceil(keep_fraction * strength.numel()))
    selected = torch.zeros_like(strength)
    selected[torch.topk(strength, n_keep).indices] = 1.0
    selected = selected.view(H, W)

    rows = _cover_matrix(H, fine_w, _window_starts(H, fine_w, fine_s), x.device)
    cols = _cover_matrix(W, fine_w, _window_starts(W, fine_w, fine_s), x.device)
    # A fine window is worth evaluating when it overlaps at least one selected pixel.
    overlap = torch.einsum("ih,hw,jw->ij", rows, selected, cols)
    pairs = torch.nonzero(overlap > 0)
    result = coarse * (fine_w**2 / coarse_w**2)
    if len(pairs) == 0:
        return result.cpu() if targets is None else result[list(targets)].cpu()
    with _eval_mode(model):
        total, counts = _occlusion_from_windows(
            model, x, rows, cols, pairs, _baseline_tensor(baseline, x), max(1, batch_size)
        )
    covered = counts > 0
    fine = (total / counts.clamp(min=1)).float()
    result = torch.where(covered[None], fine, result).cpu()
    return result if targets is None else result[list(targets)]


# ----------------------------------------------------------------------------------------------- Captum


def captum_occlusion(
    model: nn.Module,
    x: Tensor,
    window: int | Sequence[int],
    stride: int | Sequence[int],
    target: int,
    baseline: float | Tensor = 0.0,
    perturbations_per_eval: int = 1,
) -> Tensor:
    """Plain Captum ``Occlusion`` for one class, for comparison and benchmarks. Returns ``[H, W]``.

    All channels are occluded together, so Captum returns the same map in every channel; channel 0 is
    returned (not the sum, so it is directly comparable with :func:`occlusion_maps`).
    """
    from captum.attr import Occlusion

    x = _as_single_image(x, model)
    C = x.shape[0]
    wh, ww = _pair(window)
    sh, sw = _pair(stride)
    if isinstance(baseline, Tensor):
        baseline = (baseline[None] if baseline.dim() == 3 else baseline).to(x.device)
    with _eval_mode(model):
        attr = Occlusion(model).attribute(
            x[None],
            sliding_window_shapes=(C, wh, ww),
            strides=(C, sh, sw),
            baselines=baseline,
            target=int(target),
            perturbations_per_eval=perturbations_per_eval,
        )
    return attr[0, 0].detach().cpu()


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: int,
    baseline: float | Tensor = 0.0,
    n_steps: int = 32,
    internal_batch_size: int | None = 32,
) -> Tensor:
    """Captum ``IntegratedGradients`` for one class, summed over channels. Returns ``[H, W]``."""
    from captum.attr import IntegratedGradients

    x = _as_single_image(x, model)
    if isinstance(baseline, Tensor):
        baseline = (baseline[None] if baseline.dim() == 3 else baseline).to(x.device)
    with _eval_mode(model):
        attr = IntegratedGradients(model).attribute(
            x[None].clone().requires_grad_(True),
            baselines=baseline,
            target=int(target),
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
        )
    return attr[0].sum(dim=0).detach().to(x.dtype).cpu()  # captum 0.7 returns float64


def has_feature_map(model: nn.Module) -> bool:
    """Whether the model has the `.body` with a spatial output that `gradcam` weights by default."""
    body = getattr(model, "body", None)
    return body is not None and not getattr(body, "pooled", False)


def gradcam(
    model: nn.Module,
    x: Tensor,
    target: int,
    layer: nn.Module | None = None,
    relu: bool = True,
) -> Tensor:
    """Grad-CAM via Captum ``LayerGradCam``, upsampled (bilinear) to the image size. Returns ``[H, W]``.

    ``layer`` defaults to ``model.body``, whose output is the last feature map before the head: Grad-CAM
    weights its channels by their mean gradient. ``relu=True`` keeps only positive evidence, as in the
    Grad-CAM paper (Captum's own default is False).
    """
    from captum.attr import LayerAttribution, LayerGradCam

    x = _as_single_image(x, model)
    if layer is None:
        layer = getattr(model, "body", None)
        if layer is None:
            raise CxrFastError("attribution: gradcam needs `layer` for a model without a `.body`")
    with _eval_mode(model):
        attr = LayerGradCam(model, layer).attribute(x[None], target=int(target), relu_attributions=relu)
    up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return up[0].sum(dim=0).detach().cpu()


# ----------------------------------------------------------------------------------------------- overlay


def overlay_rgb(
    image: np.ndarray,
    attr: np.ndarray | Tensor,
    alpha: float = 0.5,
    clip_quantile: float = 0.99,
) -> np.ndarray:
    """Blend a grayscale image with an attribution map: red = positive evidence, blue = negative.

    ``image``: ``[H, W]`` uint8 (or float in [0, 1]); ``attr``: ``[H, W]``. The map is scaled by the
    ``clip_quantile`` of its absolute values (one hot pixel should not wash out the rest). Returns
    ``[H, W, 3]`` uint8 — a plain array for the plotting/report code.
    """
    a = attr.detach().cpu().numpy() if isinstance(attr, Tensor) else np.asarray(attr, dtype=float)
    img = np.asarray(image, dtype=float)
    if img.max() > 1.0:
        img = img / 255.0
    if img.shape != a.shape:
        raise CxrFastError(f"attribution: overlay image {img.shape} and map {a.shape} differ in size")
    scale = np.quantile(np.abs(a), clip_quantile) if a.size else 0.0
    s = np.clip(a / scale, -1, 1) if scale > 0 else np.zeros_like(a)
    gray = np.repeat(img[..., None], 3, axis=-1)
    colour = np.zeros_like(gray)
    colour[..., 0] = np.clip(s, 0, 1)  # red for positive
    colour[..., 2] = np.clip(-s, 0, 1)  # blue for negative
    weight = alpha * np.abs(s)[..., None]
    out = gray * (1 - weight) + colour * weight
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------- benchmark


def benchmark_occlusion(
    model: nn.Module | None = None,
    size: int = 224,
    n_images: int = 1,
    batch_size: int = 64,
    rounds: int = 3,
    include_ppe1: bool = True,
    seed: int = 0,
) -> dict:
    """Seconds per image for all-class occlusion maps: :func:`occlusion_maps` vs plain Captum.

    Captum is called once per class, with its default ``perturbations_per_eval=1`` and with
    ``perturbations_per_eval=batch_size``; :func:`occlusion_maps_coarse_to_fine` is timed too (its maps
    are approximate). Default window/stride (:func:`default_window`). ``model`` defaults to
    ``create_model("cxresnet")`` (1 channel, 3 classes, random weights: speed does not depend on them).
    The batched methods run ``rounds`` times, interleaved, and the fastest round counts, so that a burst
    of other work on a shared machine does not favour one method; Captum with
    ``perturbations_per_eval=1`` is slow and runs once. Also reports the largest difference between
    our maps and Captum's, next to the largest map value. Run:
    ``python -c "from cxr_fast.attribution import benchmark_occlusion as b; print(b())"``.
    """
    import time

    if model is None:
        from cxr_fast.archs import create_model

        model = create_model("cxresnet")
    model.eval()
    n_in = getattr(model, "n_in", 1)
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(n_in, size, size, generator=generator) for _ in range(n_images)]
    window, stride = default_window(size, size)
    with torch.no_grad():
        n_classes = model(images[0][None]).shape[1]

    def captum_all(ppe):
        return lambda x: torch.stack(
            [
                captum_occlusion(model, x, window, stride, k, perturbations_per_eval=ppe)
                for k in range(n_classes)
            ]
        )

    methods = {
        "ours": lambda x: occlusion_maps(model, x, window, stride, batch_size=batch_size),
        "coarse_to_fine": lambda x: occlusion_maps_coarse_to_fine(model, x, window=window, stride=stride),
        f"captum_ppe{batch_size}": captum_all(batch_size),
    }
    if include_ppe1:
        methods["captum_ppe1"] = captum_all(1)
    seconds: dict[str, float] = {}
    maps: dict[str, list[Tensor]] = {}
    for r in range(max(1, rounds)):
        for name, fn in methods.items():
            if name == "captum_ppe1" and r > 0:
                continue
            start = time.perf_counter()
            maps[name] = [fn(x) for x in images]
            seconds[name] = min(seconds.get(name, math.inf), (time.perf_counter() - start) / n_images)

    exact = [name for name in maps if name.startswith("captum")]
    result = {
        "size": size,
        "window": window,
        "stride": stride,
        "n_classes": n_classes,
        "n_occlusions": len(_window_starts(size, window, stride)) ** 2,
        "threads": torch.get_num_threads(),
        **{f"{name}_s_per_image": sec for name, sec in seconds.items()},
        **{f"speedup_vs_{name}": seconds[name] / seconds["ours"] for name in exact},
        "max_abs_diff": max(
            (a - b).abs().max().item() for name in exact for a, b in zip(maps["ours"], maps[name])
        ),
        "max_abs_map": max(a.abs().max().item() for a in maps["ours"]),
    }
    return result
