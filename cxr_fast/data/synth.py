"""Synthetic chest X-ray phantoms: the toolkit's built-in dataset, so every command can be tried offline.

Each phantom is a PA chest film drawn from simple shapes (thorax, lungs, ribs, spine, heart, clavicles) with
per-image anatomical and exposure variation. The class lives only inside the lung fields:

* Pneumonia: one focal, dense, fairly sharp-edged consolidation in one lung (lobar pneumonia);
* COVID-19: hazy ground-glass patches, peripheral and in the lower zones of both lungs;
* Normal: neither.

Exposure, gain and gamma vary per image so that global brightness does not give the class away. With
``shortcut_rate`` > 0 a class-revealing text marker is burnt into a corner, as radiology departments do with
their own labels: a deliberate shortcut for the toolkit's shortcut audit to find.

Image ``i`` of a class is drawn from its own random generator seeded by ``(seed, class index, i)``, so it is
the same whatever ``n_per_class`` or ``shortcut_rate`` is (the marker only adds pixels on top).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from cxr_fast import CLASSES
from cxr_fast.data.io import MIN_SIDE
from cxr_fast.errors import CxrFastError
from cxr_fast.outputs import PARTIAL_INSIDE, check_folder_path, new_folder, work_folder_inside, write_text
from cxr_fast.progress import progress_bar

# Text and corner of each class's shortcut marker; corners are chosen to lie outside the body outline.
MARKERS = {
    "COVID-19": ("C19", "top-left"),
    "Normal": ("NRM", "top-right"),
    "Pneumonia": ("PNA", "bottom-right"),
}
MARKER_WIDTH = 0.12  # marker width as a fraction of the image side (its height is about 0.08)
MARKER_MARGIN = 0.03  # gap between the marker and the image border, as a fraction of the side
MASK_BACKGROUND, MASK_LUNG, MASK_LESION = 0, 1, 2


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _inside(r: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of ``r < 1``: 1 inside, 0 outside, with a ramp ``edge`` wide (in units of r)."""
    return _smoothstep((1.0 - r) / edge + 0.5)


def _rotate(u, v, cx, cy, tilt):
    """Coordinates of (u, v) in a frame centred at (cx, cy) and turned by ``tilt`` radians."""
    c, s = float(np.cos(tilt)), float(np.sin(tilt))  # Python floats keep the arrays float32 (speed)
    du, dv = u - float(cx), v - float(cy)
    return c * du + s * dv, -s * du + c * dv


def _ellipse_r(u, v, cx, cy, ax, ay, tilt=0.0):
    """Elliptic radius: < 1 inside the (tilted) ellipse with semi-axes ax, ay."""
    x, y = _rotate(u, v, cx, cy, tilt)
    return np.sqrt((x / ax) ** 2 + (y / ay) ** 2)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish random field with blobs about size/cells pixels wide (a small grid upscaled)."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def _superellipse_r(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Radius-like measure, 1 on the squarish curve |x|^2.5 + |y|^2.5 = 1 (sqrt, not costly general powers)."""
    x, y = np.abs(x), np.abs(y)
    return np.sqrt(x * x * np.sqrt(x) + y * y * np.sqrt(y))


def _lung(rng: np.random.Generator, side: int) -> dict:
    """Random geometry of one lung; side -1 is the image's left (patient's right), +1 the image's right."""
    return dict(
        side=side,
        cx=side * rng.uniform(0.36, 0.42),
        cy=rng.uniform(-0.12, -0.04),
        ax=rng.uniform(0.25, 0.31),
        ay=rng.uniform(0.5, 0.6),
        tilt=side * rng.uniform(-0.12, 0.04),
    )


def _lung_r(u, v, lung: dict) -> np.ndarray:
    """Radius of a lung shape: narrow apex, wide squarish base, diaphragm lower laterally than medially."""
    x, y = _rotate(u, v, lung["cx"], lung["cy"], lung["tilt"])
    y = y / lung["ay"]
    x = x / (lung["ax"] * (0.86 + 0.16 * np.clip(y, -1.0, 1.0)))
    y = y - 0.25 * lung["side"] * x * np.clip(y, 0.0, 1.0)  # deep lateral costophrenic angle
    return _superellipse_r(x, y)


def _lung_point(lung: dict, x: float, y: float) -> tuple[float, float]:
    """Image coordinates of a point given in the lung's own units (x across, y down, both about -1..1)."""
    c, s = np.cos(lung["tilt"]), np.sin(lung["tilt"])
    dx, dy = x * lung["ax"] * (0.86 + 0.16 * y), y * lung["ay"]
    return float(lung["cx"] + c * dx - s * dy), float(lung["cy"] + s * dx + c * dy)


def _band(v, centre, half_width):
    """Soft horizontal-ish band of given half width around a curve ``centre`` (an array like v)."""
    return _smoothstep(1.0 - ((v - centre) / half_width) ** 2) ** 0.5


def _lesions(rng, label, u, v, lungs, size, lung_field) -> np.ndarray:
    """Opacity (0..1) that the class adds inside the lungs; all zeros for Normal."""
    opacity = np.zeros_like(u)
    if label == "Pneumonia":
        lung = lungs[rng.integers(2)]
        y = rng.uniform(-0.35, 0.55)
        cx, cy = _lung_point(lung, rng.uniform(-0.45, 0.45) * np.sqrt(1 - y * y), y)
        r = _ellipse_r(u, v, cx, cy, rng.uniform(0.1, 0.16), rng.uniform(0.11, 0.18), rng.uniform(-0.6, 0.6))
        r = r + 0.18 * _smooth_noise(rng, size, 7)  # ragged, non-elliptic outline
        blob = _inside(r, 0.18)
        if rng.random() < 0.6:  # a fissure gives lobar consolidation one straight, sharp border
            angle = rng.uniform(0, 2 * np.pi)
            offset = (u - cx) * np.cos(angle) + (v - cy) * np.sin(angle)
            blob = blob * _smoothstep(0.5 - (offset - rng.uniform(0.0, 0.06)) / 0.02)
        opacity = blob * (0.8 + 0.2 * _smooth_noise(rng, size, 20))  # mottled, air-bronchogram texture
    elif label == "COVID-19":
        for lung in lungs:
            for _ in range(rng.integers(2, 5)):
                y = rng.uniform(0.05, 0.75)
                x = lung["side"] * rng.uniform(0.55, 0.9) * np.sqrt(1 - y * y)
                cx, cy = _lung_point(lung, x, y)
                r = _ellipse_r(
                    u, v, cx, cy, rng.uniform(0.09, 0.14), rng.uniform(0.1, 0.16), rng.uniform(-1, 1)
                )
                opacity = np.maximum(opacity, np.exp(-1.5 * r * r))  # hazy, no sharp border
        opacity = opacity * (0.75 + 0.25 * _smooth_noise(rng, size, 24))
    return np.clip(opacity, 0.0, 1.0) * lung_field


def _render(rng: np.random.Generator, label: str, size: int, lesion_contrast: float):
    """Draw one phantom: returns (uint8 image, uint8 mask)."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    u, v = np.meshgrid(grid, grid)  # u: left -> right, v: top -> bottom, both in -1..1

    # Soft tissue: thorax plus neck, denser towards the middle where the body is thicker. A squarish
    # outline (superellipse) gives shoulders; a slight waist keeps the lower corners air, free for markers.
    by = (v - rng.uniform(0.12, 0.2)) / rng.uniform(1.02, 1.1)
    bx = u / (rng.uniform(0.78, 0.86) * (1.0 - 0.15 * np.clip(by, 0.0, 1.0)))
    r_body = _superellipse_r(bx, by)
    neck = _inside(_ellipse_r(u, v, 0.0, -0.95, rng.uniform(0.2, 0.26), 0.35), 0.15)
    body = np.maximum(_inside(r_body, 0.06), neck)
    img = 0.03 + body * (0.42 + 0.18 * np.clip(1 - r_body * r_body, 0, 1))

    # Lungs: dark fields, minus the heart, which hides the lower medial part of the image-right lung.
    lungs = [_lung(rng, -1), _lung(rng, +1)]
    lung_soft = np.maximum(*[_inside(_lung_r(u, v, lung), 0.14) for lung in lungs])
    heart_centre = rng.uniform(0.06, 0.12), rng.uniform(0.26, 0.34)  # left of the patient: image right
    heart_axes = rng.uniform(0.28, 0.36), rng.uniform(0.2, 0.26)  # heart size varies
    heart = _inside(_ellipse_r(u, v, *heart_centre, *heart_axes, rng.uniform(-0.45, -0.2)), 0.12)
    lung_field = lung_soft * (1.0 - heart)
    img -= lung_field * (0.36 + 0.06 * v)  # lung bases look denser: more overlying tissue

    # Bones: spine with vertebral end plates, posterior ribs arching over the lungs, clavicles.
    spine_x = rng.uniform(-0.02, 0.02)
    plates = 0.8 + 0.2 * np.cos(2 * np.pi * (v - rng.uniform(0, 0.12)) / 0.12) ** 2
    img += 0.12 * _smoothstep(1 - np.abs(u - spine_x) / 0.06) * plates * body
    cage = _inside(_ellipse_r(u, v, 0.0, -0.04, 0.74, 0.72), 0.15)
    top, spacing = rng.uniform(-0.8, -0.72), rng.uniform(0.1, 0.12)
    for side in (-1, 1):
        a = np.maximum(side * (u - spine_x), 0.0)  # distance from the spine on this side
        on_side = _smoothstep((a - 0.04) / 0.04)
        # Ten ribs at once: each pixel's offset from the nearest rib curve "top + k * spacing + arch(a)".
        phase = (v - top + 0.3 * a - 0.75 * a * a) / spacing
        nearest = np.clip(np.round(phase), 0, 9)
        img += 0.06 * _band((phase - nearest) * spacing, 0.0, 0.022) * on_side * cage
        clavicle = -0.66 + rng.uniform(-0.04, 0.04) - 0.3 * a + 0.25 * a * a
        img += 0.12 * _band(v, clavicle, 0.03) * on_side * _smoothstep((0.62 - a) / 0.08)

    # Texture: hila and vessel-like markings fading towards the lung edges, mottled soft tissue.
    hila = sum(
        np.exp(-((u - lung["cx"] * 0.55) ** 2 + (v - lung["cy"] - 0.05) ** 2) / 0.03) for lung in lungs
    )
    vessels = 0.035 + 0.03 * hila
    img += lung_field * (0.09 * hila + vessels * _smooth_noise(rng, size, 28))
    img += body * 0.02 * _smooth_noise(rng, size, 8)

    # The class signal, then the film: exposure, contrast, gamma and grain differ on every image.
    opacity = _lesions(rng, label, u, v, lungs, size, lung_field)
    strength = {"Pneumonia": 0.28, "COVID-19": 0.26}.get(label, 0.0)
    img += lesion_contrast * strength * opacity
    img = img * rng.uniform(0.85, 1.25) + rng.uniform(-0.08, 0.1)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.75, 1.35)
    img += rng.uniform(0.01, 0.03) * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    mask = np.where(lung_field > 0.5, MASK_LUNG, MASK_BACKGROUND).astype(np.uint8)
    if lesion_contrast > 0:  # an invisible lesion is no lesion: contrast 0 leaves masks lung-only
        mask[(mask == MASK_LUNG) & (opacity > 0.35)] = MASK_LESION
    return image, mask


def _stamp_marker(image: np.ndarray, label: str) -> tuple[int, int, int, int]:
    """Burn the class's text marker into its corner (in place); returns its box (x0, y0, x1, y1), x1/y1 excluded."""
    text, corner = MARKERS[label]
    font = ImageFont.load_default_imagefont()  # the bitmap font: identical on every machine
    left, top, right, bottom = font.getbbox(text)
    small = Image.new("L", (right - left + 3, bottom - top + 2), 0)
    draw = ImageDraw.Draw(small)
    for dx in (1, 2):  # drawn twice, one pixel apart: bold strokes survive downscaling to 64 px
        draw.text((dx - left, 1 - top), text, fill=255, font=font)
    size = image.shape[0]
    width = max(8, round(MARKER_WIDTH * size))
    height = max(5, round(width * small.height / small.width))
    patch = np.asarray(small.resize((width, height), Image.BILINEAR))
    margin = round(MARKER_MARGIN * size)
    x0 = margin if corner.endswith("left") else size - margin - width
    y0 = margin if corner.startswith("top") else size - margin - height
    region = image[y0 : y0 + height, x0 : x0 + width]
    np.maximum(region, patch, out=region)
    return x0, y0, x0 + width, y0 + height


def make_phantom(
    label: str,
    index: int = 0,
    size: int = 256,
    seed: int = 0,
    shortcut_rate: float = 0.0,
    lesion_contrast: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int] | None]:
    """One phantom: (uint8 image [size, size], uint8 mask, marker box or None). Same arguments, same pixels."""
    rng = np.random.default_rng([seed, CLASSES.index(label), index])
    with_marker = rng.random() < shortcut_rate  # drawn first, so the anatomy never depends on the rate
    image, mask = _render(rng, label, size, lesion_contrast)
    box = _stamp_marker(image, label) if with_marker else None
    return image, mask, box


README = """Synthetic chest X-ray phantoms made by cxr_fast.data.synth.synthesize (cxrfast).

These are NOT real radiographs. They are drawn from simple shapes so the toolkit can be tried offline.
  <class>/<class>_NNNN.png          8-bit grayscale images; classes: COVID-19, Normal, Pneumonia
  _masks/<class>/<class>_NNNN.png   uint8 masks: 0 background, 1 lung field, 2 lesion (inside the lungs)
  _meta.csv                         relpath,label,mask,marker,marker_box (paths relative to this folder;
                                    marker 1 when a class-revealing text marker was burnt in, and its
                                    box "x0,y0,x1,y1" in image pixels, x1/y1 excluded)
Pneumonia: one dense focal consolidation in one lung. COVID-19: hazy peripheral lower-zone patches in
both lungs. Normal: neither. Markers: {markers}.
Settings: {settings}
"""


def synthesize(
    out: Path,
    n_per_class: int = 100,
    size: int = 256,
    shortcut_rate: float = 0.0,
    seed: int = 0,
    lesion_contrast: float = 1.0,
    progress: bool = True,
    force: bool = False,
) -> pd.DataFrame:
    """Write ``n_per_class`` phantoms per class under ``out`` and return the table saved as ``_meta.csv``.

    ``shortcut_rate`` is the chance that an image carries its class marker; ``lesion_contrast`` scales the
    class signal (0 makes the classes indistinguishable). ``out`` must be empty unless ``force`` is True, in
    which case the phantoms of an earlier run are replaced (its other files kept) once the new set is complete.
    """
    out = Path(out)
    # one message per mistake, in the CLI's words (--size etc.; the Python names differ only by "_")
    for wrong, rule in [(n_per_class < 1, "--n-per-class must be at least 1"),
                        # smaller images would all be refused by `data prepare` (cxr_fast.data.io.MIN_SIDE)
                        (size < MIN_SIDE, f"--size must be at least {MIN_SIDE} (pixels)"),
                        (not 0.0 <= shortcut_rate <= 1.0, "--shortcut-rate must be between 0 and 1"),
                        (seed < 0, "--seed must be 0 or more"),
                        (lesion_contrast < 0, "--lesion-contrast must be 0 or more")]:
        if wrong:
            raise CxrFastError(f"{out}: {rule}")
    check_folder_path(out, "output folder")
    filled = out.exists() and any(p.name != PARTIAL_INSIDE for p in out.iterdir())  # a stopped run's work folder
    stopped = (out / UNFINISHED).is_file()  # a stopped swap's mix of two sets: nothing finished there to keep
    if filled and not (force or stopped):
        raise CxrFastError(f"{out}: folder is not empty; choose another or add --force to replace its phantoms")
    try:
        if not out.exists():  # a new set appears whole or not at all: a kill halfway leaves no folder to mistake for one
            with new_folder(out) as work:
                return _write_phantoms(work, n_per_class, size, shortcut_rate, seed, lesion_contrast, progress)
        # An existing folder may hold the user's other files, so it is not replaced: the new set is drawn in a work
        # folder inside it while the old set stays whole, and only the finished set is swapped in.
        with work_folder_inside(out) as work:
            meta = _write_phantoms(work, n_per_class, size, shortcut_rate, seed, lesion_contrast, progress)
            _swap_in(work, out)
        return meta
    except KeyboardInterrupt:  # say what the folder holds now, not just "interrupted"
        if (out / UNFINISHED).is_file():
            raise KeyboardInterrupt(f"{out}: {UNFINISHED_TEXT.strip()}") from None
        kept = "the phantoms there are as they were" if filled else "no phantoms were written"
        raise KeyboardInterrupt(f"{out}: synth interrupted; {kept}") from None


# Left in a phantom folder while `synthesize` swaps a new set in; `data prepare` refuses such a folder.
UNFINISHED = "_unfinished.txt"
UNFINISHED_TEXT = "cxrfast data synth was stopped while writing here; run it again.\n"


def _swap_in(work: Path, out: Path) -> None:
    """Put the complete set drawn in `work` in place of the phantoms in `out`, keeping every other file there. The
    folder is marked unfinished from the first old file removed until the last new one is in: a kill in between
    leaves no mix of two sets for `prepare` to take, nor old marker boxes paired with new images."""
    write_text(out / UNFINISHED, UNFINISHED_TEXT)
    for stale in (out / "_meta.csv", out / "_README.txt"):
        stale.unlink(missing_ok=True)
    for folder in [Path(label) for label in CLASSES] + [Path("_masks", label) for label in CLASSES]:
        for old in (out / folder).glob(f"{folder.name}_*.png"):  # stale phantoms of a larger earlier run go too
            old.unlink()
        (out / folder).mkdir(parents=True, exist_ok=True)
        for new in (work / folder).iterdir():
            new.rename(out / folder / new.name)
    for name in ("_README.txt", "_meta.csv"):
        (work / name).rename(out / name)
    shutil.rmtree(work)
    (out / UNFINISHED).unlink()  # last: the set is whole


def _write_phantoms(out: Path, n_per_class: int, size: int, shortcut_rate: float, seed: int, lesion_contrast: float,
                    progress: bool) -> pd.DataFrame:
    for label in CLASSES:
        (out / label).mkdir(parents=True, exist_ok=True)
        (out / "_masks" / label).mkdir(parents=True, exist_ok=True)

    jobs = [(label, i) for label in CLASSES for i in range(n_per_class)]
    rows = []
    with progress_bar(progress) as bar:
        task = bar.add_task("Synthesising phantoms", total=len(jobs))
        for label, i in jobs:
            image, mask, box = make_phantom(label, i, size, seed, shortcut_rate, lesion_contrast)
            name = f"{label}_{i:04d}.png"
            Image.fromarray(image).save(out / label / name)
            Image.fromarray(mask).save(out / "_masks" / label / name)
            rows.append(
                dict(
                    relpath=f"{label}/{name}",
                    label=label,
                    mask=f"_masks/{label}/{name}",
                    marker=int(box is not None),
                    marker_box=",".join(map(str, box)) if box else "",
                )
            )
            bar.advance(task)
    meta = pd.DataFrame(rows, columns=["relpath", "label", "mask", "marker", "marker_box"])
    meta.to_csv(out / "_meta.csv", index=False)
    settings = (
        f"n_per_class={n_per_class} size={size} shortcut_rate={shortcut_rate} seed={seed} "
        f"lesion_contrast={lesion_contrast}"
    )
    markers = ", ".join(f"{label} '{text}' {corner}" for label, (text, corner) in MARKERS.items())
    (out / "_README.txt").write_text(  # "_": never taken for a class folder
        README.format(markers=markers, settings=settings), encoding="utf-8"
    )
    return meta
