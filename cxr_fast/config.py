"""Training configuration: dataclass defaults → recipes/*.yaml → CLI flags.

Unknown recipe keys are errors (a typo must not silently train with a default), and the resolved config is
saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxr_fast.errors import CxrFastError, parse_yaml


@dataclass
class TrainConfig:
    arch: str = "cxresnet"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = "none"  # none | hub | PATH | efficientnet-lite0/1/2
    n_in: int = 1  # input channels: X-rays are grayscale; 3 replicates the gray channel
    size: int = 128  # training image side in pixels
    epochs: int = 5
    freeze_epochs: int = 1  # only with pretrained weights: head-only epochs before unfreezing
    lr_mult: float = 100  # unfrozen phase: the body learns lr_mult times slower than the head (fastai's fine_tune)
    bs: int = 32
    lr: float | str = 3e-3  # a number, or "auto" for lr_find's suggestion
    wd: float | None = None
    pct_start: float = 0.25
    class_weights: bool = False  # weight the loss by inverse class frequency
    label_smoothing: float = 0.0  # share of each target spread over all classes (for noisy labels)
    mixup: float = 0.0  # MixUp's Beta(α, α) parameter: training images blended in pairs; 0 turns it off
    augment: bool = True
    # channels-last memory layout: training steps 1.5x faster for tf_efficientnet_lite0 on a 2-core CPU but only
    # 1.1x for cxresnet and convnet (docs/benchmarks.md), so a recipe switches it on where it pays
    channels_last: bool = False
    seed: int = 0
    num_workers: int = 0
    stats_sample: int = 256  # training images used to compute normalisation statistics

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The largest image side a model may read, twice the 1024 px of the highest-resolution chest X-ray studies: a run's
# config.json from someone else asking for 100000 px made every command that predicts allocate 10 GB per image.
MAX_SIZE = 2048

# name: (type, test, what the test means); a recipe is hand-written YAML, so its types are checked too
LIMITS: dict[str, tuple[type, Any, str]] = {
    "n_in": (int, lambda v: v in (1, 3), "1 or 3"),
    "size": (int, lambda v: 32 <= v <= MAX_SIZE, f"a whole number from 32 to {MAX_SIZE} (pixels)"),
    "epochs": (int, lambda v: v >= 1, "a whole number ≥ 1"),
    "freeze_epochs": (int, lambda v: v >= 0, "a whole number ≥ 0"),
    "bs": (int, lambda v: v >= 2, "a whole number ≥ 2, as batch norm needs two images per batch to train"),
    "lr_mult": (float, lambda v: v > 0, "a number > 0"),
    "wd": (float, lambda v: v >= 0, "a number ≥ 0"),  # None: fastai's default
    "pct_start": (float, lambda v: 0 < v < 1, "a number between 0 and 1"),
    "label_smoothing": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "mixup": (float, lambda v: v >= 0, "a number ≥ 0"),
    "num_workers": (int, lambda v: v >= 0, "a whole number ≥ 0"),
    "stats_sample": (int, lambda v: v >= 1, "a whole number ≥ 1"),
    "seed": (int, lambda v: 0 <= v < 2**32, "a whole number from 0 to 2³² − 1"),  # numpy's and torch's range
}


def _within(value: Any, kind: type, allowed) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # bool is an int to Python, not to a user
        return False
    if not math.isfinite(value):  # YAML reads .inf and .nan as numbers
        return False
    return (kind is float or float(value).is_integer()) and bool(allowed(value))


def _recipes_dir() -> Path:
    """The shipped recipes: packaged as cxr_fast/recipes in a wheel, the checkout's recipes/ otherwise."""
    packaged = Path(__file__).resolve().parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


RECIPES_DIR = _recipes_dir()


RECIPE_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))  # what a recipe or --set may set


def find_recipe(name: str | Path) -> Path:
    """A recipe file, or the name of one in the project's recipes/ folder ("demo" → recipes/demo.yaml)."""
    path = Path(name)
    # is_file, not exists: `cxrfast demo --out demo` makes a folder called demo, which must not hide the recipe
    if not path.is_file() and path.suffix == "" and (RECIPES_DIR / f"{path.name}.yaml").is_file():
        return RECIPES_DIR / f"{path.name}.yaml"
    return path


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = find_recipe(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise CxrFastError(f"{path}: recipe file not found (shipped recipes: {shipped})")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CxrFastError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CxrFastError(f"{path}: a recipe must be a mapping of option: value")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise CxrFastError(f"{path}: unknown recipe keys {unknown}; known keys: {sorted(RECIPE_KEYS)}")
    return data


def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` options as recipe values: VALUE is read as YAML (`wd=1e-4`, `augment=false`,
    `arch_kwargs={width: 0.5}`), so any recipe option can be set from the command line."""
    settings: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CxrFastError(f"--set {item!r}: expected KEY=VALUE, e.g. --set wd=1e-4")
        if key not in RECIPE_KEYS:
            raise CxrFastError(f"--set {item!r}: no option {key!r}; known: {', '.join(sorted(RECIPE_KEYS))}")
        if key in settings:
            raise CxrFastError(f"--set {key} given twice")
        try:
            settings[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CxrFastError(f"--set {item!r}: not a valid value ({str(e).splitlines()[0]})") from None
    return settings


def resolve_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then every override that is not None (an unset CLI flag keeps the recipe's)."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    new_arch, recipe_arch = overrides.get("arch"), values.get("arch", TrainConfig.arch)
    if (values.get("arch_kwargs") and overrides.get("arch_kwargs") is None and isinstance(new_arch, str)
            and isinstance(recipe_arch, str) and new_arch.lower() != recipe_arch.lower()):
        # A recipe's arch_kwargs are written for its own arch: another would be built half-width, or refuse them.
        warnings.warn(f"{find_recipe(recipe).name}'s arch_kwargs {values.pop('arch_kwargs')} are for {recipe_arch}; "
                      f"{new_arch} is built with its own defaults", stacklevel=2)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - RECIPE_KEYS)
    if unknown:  # as --set words it, not TrainConfig's "unexpected keyword argument"
        raise CxrFastError(f"no option {', '.join(map(repr, unknown))}; known: {', '.join(sorted(RECIPE_KEYS))}")
    cfg = TrainConfig(**values)  # every key is a field (checked above), and every field has a default
    for name, (kind, _, _) in LIMITS.items():
        # YAML 1.1 reads 1e-4 (no dot) as text, though it reads 1.0e-4 as a number: both are meant as numbers,
        # and 1e3 as a whole number where one is needed (stats_sample: 1e3)
        if kind in (float, int) and isinstance(getattr(cfg, name), str):
            try:
                number = float(getattr(cfg, name))
            except ValueError:
                continue  # reported below with the option's rule
            if kind is float:
                setattr(cfg, name, number)
            elif number.is_integer():
                setattr(cfg, name, int(number))
    if isinstance(cfg.lr, str) and cfg.lr != "auto":
        try:
            cfg.lr = float(cfg.lr)
        except ValueError:
            raise CxrFastError(f"--lr must be a number or 'auto', got {cfg.lr!r}") from None
    problems = [f"{name} must be {rule} (got {getattr(cfg, name)!r})"
                for name, (kind, allowed, rule) in LIMITS.items()
                if not (name == "wd" and cfg.wd is None) and not _within(getattr(cfg, name), kind, allowed)]
    if cfg.lr != "auto" and not _within(cfg.lr, float, lambda v: v > 0):
        problems.append(f"lr must be a number > 0 or 'auto' (got {cfg.lr!r})")
    problems += [f"{name} must be true or false (got {getattr(cfg, name)!r})"
                 for name in ("class_weights", "augment", "channels_last") if not isinstance(getattr(cfg, name), bool)]
    problems += [f"{name} must be text (got {getattr(cfg, name)!r})"
                 for name in ("arch", "weights") if not isinstance(getattr(cfg, name), str)]
    if not isinstance(cfg.arch_kwargs, dict):
        problems.append(f"arch_kwargs must be a mapping of argument: value (got {cfg.arch_kwargs!r})")
    if problems:
        where = f"{find_recipe(recipe)}: " if recipe else ""
        raise CxrFastError(f"{where}bad training option: " + "; ".join(problems))
    for name, (kind, _, _) in LIMITS.items():
        value = getattr(cfg, name)
        if kind is int:
            setattr(cfg, name, int(value))  # a recipe's "epochs: 4.0" must not reach range()
        elif value is not None:
            setattr(cfg, name, float(value))  # "mixup: 1" must not reach torch, whose Dirichlet refuses integers
    if cfg.lr != "auto":
        cfg.lr = float(cfg.lr)
    return cfg


def contract_problem(spec: dict) -> str | None:
    """What is wrong with the input/output contract a run's config.json or an export's preprocessing.json states
    (classes, channels, size, normalisation, temperature), or None. Both are checked on loading, so a damaged or
    hand-edited file is one line naming it, not a traceback, or wrong figures, after every image was predicted."""
    classes = spec["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):
        return f"classes must be a list of two or more different names, got {classes!r}"
    return input_problem(spec)


def input_problem(spec: dict) -> str | None:
    """What is wrong with the channels, size, normalisation and temperature `spec` states, or None: the part of
    `contract_problem` that an ensemble's members, each reading the image its own way, state too."""
    n_in, size = spec["n_in"], spec["size"]
    if not (is_whole(n_in) and n_in in (1, 3)):
        return f"n_in must be 1 or 3, got {n_in!r}"
    if not (is_whole(size) and 16 <= size <= MAX_SIZE):
        return f"size must be a whole number of pixels from 16 to {MAX_SIZE}, got {size!r}"
    for key in ("mean", "std"):
        values = spec[key]
        if not (isinstance(values, list) and len(values) == n_in and all(is_number(v) for v in values)):
            return f"{key} must be {n_in} number{'s' if n_in > 1 else ''}, got {values!r}"
    if not all(v > 0 for v in spec["std"]):
        return f"std must be positive, got {spec['std']!r}"
    temperature = spec.get("temperature", 1.0)
    if not (is_number(temperature) and temperature > 0):
        return f"temperature must be a positive number, got {temperature!r}"
    return None


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
