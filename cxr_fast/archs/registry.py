"""One registry for every architecture: cxr_fast's own first, then anything timm knows, then installed plugins'.

`create_model("convnet")` and `create_model("resnet18")` return the same kind of object, a `CXRModel`:
a ``body`` (image -> feature map [B, C, h, w]) and a ``head`` (feature map -> logits) plus the metadata a
run bundle needs to rebuild it (`model_config` / `model_from_config`) and to preprocess its input
(``pretrained_stats``).

A plugin is an installed package that declares an entry point in the group `PLUGIN_GROUP` (``cxr_fast.archs``):
its name is the architecture's name, its object the builder (see `plugin_archs` and docs/developing.md, Extending).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import torch
import torch.nn as nn

from cxr_fast.archs import convnet, cxresnet, frozen
from cxr_fast.archs.layers import classifier_head
from cxr_fast.archs.weights import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadReport,
    Stats,
    WeightSpec,
    channel_stats,
    efficientnet_lite_body,
    load_weights_file,
    parse_weights,
    run_bundle_stats,
    timm_hub_body,
)
from cxr_fast.config import is_number
from cxr_fast.errors import CxrFastError, first_line

Builder = Callable[..., tuple[nn.Module, nn.Sequential]]
ENSEMBLE_ARCH = "ensemble"  # the architecture name of `cxrfast ensemble`'s bundles (built in cxr_fast.ensemble)

# name -> (builder(n_in, n_classes, **kwargs) -> (body, head), the variant's own arguments)
LOCAL_ARCHS: dict[str, tuple[Builder, dict[str, Any]]] = {
    **{name: (convnet.build_convnet, kwargs) for name, kwargs in convnet.VARIANTS.items()},
    **{name: (cxresnet.build_cxresnet, kwargs) for name, kwargs in cxresnet.VARIANTS.items()},
    **{name: (frozen.build_frozen_features, kwargs) for name, kwargs in frozen.VARIANTS.items()},
}


def register_arch(name: str, builder: Builder, **variant: Any) -> None:
    """Add an architecture to the registry: `builder(n_in, n_classes, **arguments)` returns ``(body, head)``, the
    body a module giving a feature map [B, C, H, W] and the head one taking it to logits (`classifier_head(C,
    n_classes)` is cxr_fast's). `variant`: this name's own argument values, over the builder's defaults.

    Every argument after the first two needs a default and must be named (no ``*args``/``**kwargs``): a run bundle
    records them all, and rebuilds the model from them. The registration lasts for this Python process: to use
    the architecture from the command line, ship it as a plugin (an entry point in the group ``cxr_fast.archs``)
    or add it to this module's `LOCAL_ARCHS` (docs: Developing → Extending)."""
    if isinstance(name, str) and name in LOCAL_ARCHS:
        raise CxrFastError(f"{name}: already a cxr_fast architecture")
    if isinstance(name, str) and name in plugin_archs():
        raise CxrFastError(f"{name}: already claimed by the installed {plugin_archs()[name].origin}")
    check_arch(name, builder, variant)
    LOCAL_ARCHS[name] = (builder, _json_values(name, variant))


def check_arch(name: str, builder: Builder, variant: Mapping[str, Any]) -> None:
    """The rules `register_arch` enforces, less "not registered yet": also what every entry of `LOCAL_ARCHS` must
    keep, since the package's own architectures are put there directly (tests/test_archs.py checks them all)."""
    import timm

    if not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name)):  # it names run folders too
        raise CxrFastError(f"architecture name must be lower-case letters, digits and _, got {name!r}")
    if timm.is_model(name):  # a timm bundle of that name would be rebuilt by the builder
        raise CxrFastError(f"{name}: already a timm architecture")
    if name == ENSEMBLE_ARCH:  # the name `cxrfast ensemble` bundles carry: loading them would call the builder
        raise CxrFastError(f"{name}: reserved for cxrfast ensemble's bundles")
    parameters = list(inspect.signature(builder).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(parameters) < 2 or any(p.kind not in positional for p in parameters[:2]):
        raise CxrFastError(f"{name}: the builder must take (n_in, n_classes, ...)")
    for parameter in parameters[2:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise CxrFastError(f"{name}: the builder's *{parameter.name} cannot be recorded in a run bundle; name "
                               "each argument")
        if parameter.default is parameter.empty:
            raise CxrFastError(f"{name}: the builder's argument {parameter.name!r} needs a default")
    unknown = sorted(set(variant) - {p.name for p in parameters[2:]})
    if unknown:
        raise CxrFastError(f"{name}: the builder takes no argument {', '.join(unknown)}")
    # what a run bundle records: the defaults under the variant (a default such as act=nn.ReLU cannot be)
    _json_values(name, {**{p.name: p.default for p in parameters[2:]}, **variant})


class CXRModel(nn.Module):
    """Uniform wrapper: ``forward(x) = head(body(x))`` for every architecture.

    Attributes: ``arch`` and ``arch_kwargs`` (JSON values: enough to rebuild it), ``n_in``, ``n_classes``,
    ``weights_source`` ("none", "hub", "efficientnet-lite0", or a file path), ``pretrained_stats`` (the
    `Stats` the starting weights expect, or None when the data's own statistics should be used) and
    ``load_report`` (a `LoadReport` when weights came from a file).
    """

    def __init__(
        self,
        body: nn.Module,
        head: nn.Sequential,
        *,
        arch: str,
        arch_kwargs: dict[str, Any],
        n_in: int,
        n_classes: int,
        weights_source: str = "none",
        pretrained_stats: Stats | None = None,
    ):
        super().__init__()
        self.body = body
        self.head = head
        self.arch = arch
        self.arch_kwargs = arch_kwargs
        self.n_in = n_in
        self.n_classes = n_classes
        self.weights_source = weights_source
        self.pretrained_stats = pretrained_stats
        self.load_report: LoadReport | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, C]: everything but the final linear layer."""
        return self.head[:-1](self.body(x))

    @property
    def classifier(self) -> nn.Linear:
        return self.head[-1]

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, n_in={self.n_in}, n_classes={self.n_classes}, weights={self.weights_source!r}"


def create_model(
    name: str, n_in: int = 1, n_classes: int = 3, weights: str = "none", **arch_kwargs: Any
) -> CXRModel:
    """Build `name` (a cxr_fast architecture or any timm name) for `n_in` channels and `n_classes` classes.

    `weights`: none | hub | PATH | efficientnet-lite0/1/2 (see `cxr_fast.archs.weights`). Keyword arguments
    go to the architecture's builder (or to ``timm.create_model``) as given: None is a value (``hidden=None``: no
    hidden layer), not "the default".
    """
    arch_kwargs = _json_values(name, arch_kwargs)
    spec = weights if isinstance(weights, WeightSpec) else parse_weights(weights)
    arch = _resolve_name(name)
    local = _local_builder(arch)
    if local is not None:
        if spec.kind in ("hub", "efficientnet-lite"):
            kind = "cxr_fast" if arch in LOCAL_ARCHS else "plugin"
            raise CxrFastError(
                f"{arch} is a {kind} architecture with no published weights: use --weights none or PATH "
                f"(for ImageNet weights pick a timm arch, e.g. --arch tf_efficientnet_lite0 --weights efficientnet-lite0)"
            )
        builder, variant = local
        arch_kwargs = _resolve_local_kwargs(arch, builder, variant, arch_kwargs)
        try:
            body, head = builder(n_in, n_classes, **arch_kwargs)
        except (TypeError, ValueError) as e:  # a value of the right kind that the layers still cannot take
            raise CxrFastError(f"{arch}: bad arguments {arch_kwargs} ({first_line(e)})") from None
        stats = None
    else:
        body, stats = _timm_body(arch, n_in, spec, arch_kwargs)
        head = classifier_head(_feature_channels(body, n_in, arch), n_classes)
    if spec.kind == "path":  # a run bundle's weights come with the normalisation they were trained with
        stats = run_bundle_stats(spec.path, n_in) or stats
    model = CXRModel(
        body,
        head,
        arch=arch,
        arch_kwargs=arch_kwargs,
        n_in=n_in,
        n_classes=n_classes,
        weights_source=spec.source,
        pretrained_stats=stats,
    )
    if spec.kind == "path":
        model.load_report = load_weights_file(model, spec.path, arch=arch)
    return model


def _local_builder(arch: str) -> tuple[Builder, dict[str, Any]] | None:
    """(builder, variant) of a cxr_fast or plugin architecture (cxr_fast's own first); None for a timm name."""
    if arch in LOCAL_ARCHS:
        return LOCAL_ARCHS[arch]
    plugin = plugin_archs().get(arch)
    return None if plugin is None or plugin.builder is None else (plugin.builder, {})


def _resolve_name(name: str) -> str:
    import timm

    plugins = plugin_archs(wanted=name)
    for candidate in (name, name.lower()):
        # a plugin never holds a cxr_fast or timm name (refused as it loads), so their order does not matter for a
        # working one; a refused one keeps its warning, and the name keeps its cxr_fast or timm meaning
        if candidate in LOCAL_ARCHS or timm.is_model(candidate):
            return candidate
        if candidate in plugins:
            if plugins[candidate].problem:  # asked for by name: now it is an error
                raise CxrFastError(plugins[candidate].problem)
            return candidate
    known = list(LOCAL_ARCHS) + [n for n, p in plugins.items() if p.builder is not None] + timm.list_models()
    close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
    hint = (
        f"close matches: {', '.join(close)}"
        if close
        else "not a cxr_fast or timm architecture (list them with `cxrfast models` or list_models())"
    )
    raise CxrFastError(f"unknown architecture {name!r} — {hint}")


def _json_values(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Architecture arguments as JSON values (tuples become lists), so a run bundle can rebuild the model."""
    try:
        return json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as e:
        raise CxrFastError(f"{name}: architecture arguments must be numbers, strings or lists ({e})") from e


def _resolve_local_kwargs(
    arch: str, builder: Builder, variant: dict[str, Any], given: dict[str, Any]
) -> dict[str, Any]:
    """Builder defaults, overridden by the variant, overridden by the user: the complete, exact recipe."""
    params = {k: p.default for k, p in list(inspect.signature(builder).parameters.items())[2:]}
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise CxrFastError(f"{arch}: unknown argument {', '.join(unknown)} (it takes {', '.join(params)})")
    # The rules are the project's own builders' (a registered builder's `width` may be a channel count, not a
    # multiplier): another builder checks its own arguments, and a TypeError or ValueError from it is one line too.
    rules = LOCAL_ARG_RULES if builder in (convnet.build_convnet, cxresnet.build_cxresnet) else {}
    problems = [f"{name} must be {rule} (got {value!r})" for name, value in given.items()
                if name in rules and not rules[name][0](value)
                for rule in [rules[name][1]]]
    if problems:
        raise CxrFastError(f"{arch}: " + "; ".join(problems))
    return _json_values(arch, {**params, **variant, **given})


def _counts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_number(v) and v >= 1 and float(v).is_integer() for v in value)


# The ConvNet and CXResnet builders' arguments a recipe is most likely to set: checked here so that a bad value is
# one line naming the rule, not a traceback from deep inside a layer (or, for width ≤ 0, a one-channel network).
LOCAL_ARG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "width": (lambda v: is_number(v) and v > 0, "a number > 0 (a multiplier on every width)"),
    "widths": (_counts, "a list of whole numbers ≥ 1"),
    "depths": (_counts, "a list of whole numbers ≥ 1"),
    "hidden": (lambda v: v is None or (is_number(v) and v >= 1 and float(v).is_integer()), "a whole number ≥ 1, or null"),
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "layers": (lambda v: isinstance(v, list | tuple) and all(_layer_spec(x) for x in v),
               "a list of layer names, or [name, {arguments}] pairs"),
}


def _layer_spec(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list | tuple) and len(value) == 2
                                      and isinstance(value[0], str) and isinstance(value[1], dict))


# timm.create_model's own arguments for loading weights. Set in arch_kwargs by a recipe or a run's config.json from
# someone else, they made timm torch.load a file of the author's choosing (checkpoint_path always, a pretrained_cfg's
# "file" with --weights hub), past --weights and its checks; older timm versions unpickle such a file whole, running
# any code it holds.
TIMM_LOADING_ARGS = frozenset({"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay"})


def _timm_body(
    arch: str, n_in: int, spec: WeightSpec, timm_kwargs: dict[str, Any]
) -> tuple[nn.Module, Stats | None]:
    import timm

    loading = sorted(TIMM_LOADING_ARGS.intersection(timm_kwargs))
    if loading:
        raise CxrFastError(f"{arch}: argument {', '.join(loading)} refused: starting weights come from --weights "
                           "(none, hub, PATH or efficientnet-lite0/1/2) only")
    try:
        if spec.kind == "hub":
            body = timm_hub_body(arch, n_in, **timm_kwargs)
        elif spec.kind == "efficientnet-lite":
            body = efficientnet_lite_body(arch, spec.version, n_in, **timm_kwargs)
        else:
            body = timm.create_model(
                arch, pretrained=False, num_classes=0, global_pool="", in_chans=n_in, **timm_kwargs
            )
    except (TypeError, ValueError) as e:
        if not timm_kwargs:
            raise
        raise CxrFastError(f"{arch}: timm rejected the arguments {timm_kwargs} ({first_line(e)})") from None
    if spec.kind == "none":
        return body, None
    if spec.kind == "efficientnet-lite":
        return body, channel_stats(EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, n_in)
    # hub weights carry their own preprocessing; a local file for a timm arch is almost always a copy of
    # those same weights (fetched on a machine with internet), so it gets the arch's default statistics.
    cfg = getattr(body, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return body, channel_stats(tuple(mean), tuple(std), n_in)


def _feature_channels(body: nn.Module, n_in: int, arch: str) -> int:
    """Channels of the body's feature map, found by running a tiny input through it."""
    if getattr(body, "output_fmt", "NCHW") != "NCHW":
        raise CxrFastError(
            f"{arch} returns channels-last features; cxr_fast needs a convolutional timm model (resnet*, efficientnet*, convnext* ...)"
        )
    cfg = getattr(body, "pretrained_cfg", None) or {}
    sizes = (64, int(cfg.get("input_size", (3, 224, 224))[-1]))
    was_training = body.training
    body.eval()  # a batch of one must not touch the batch-norm statistics
    problem: Exception | None = None
    try:
        for size in sizes:
            try:
                with torch.no_grad():
                    out = body(torch.zeros(1, n_in, size, size))
                break
            except (RuntimeError, AssertionError, ValueError) as e:  # some models need a fixed input size
                problem = e
        else:
            raise CxrFastError(
                f"{arch}: could not run a test image through the model ({first_line(problem)})"
            )
    finally:
        body.train(was_training)
    if out.ndim != 4:
        raise CxrFastError(
            f"{arch} returns a token sequence {list(out.shape)}, not a feature map; cxr_fast needs a convolutional "
            f"timm model (resnet*, efficientnet*, convnext* ...)"
        )
    return int(out.shape[1])


def list_models(pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, source) for every architecture matching the fnmatch-style `pattern`, cxr_fast's own first, then the
    plugins', then timm's; source is "local", "plugin DISTRIBUTION VERSION" or "timm". A plugin that cannot be used is
    left out (with a warning that says why)."""
    import timm

    pattern = pattern.lower() if pattern else "*"  # as names are matched by train: --arch CXResnet works
    local = [(n, "local") for n in LOCAL_ARCHS if fnmatch.fnmatchcase(n.lower(), pattern)]
    plugins = [(n, f"plugin {p.distribution}") for n, p in plugin_archs().items()
               if p.builder is not None and fnmatch.fnmatchcase(n, pattern)]
    return local + plugins + [(n, "timm") for n in timm.list_models(pattern)]


# ---------------------------------------------------------------- plugins

PLUGIN_GROUP = "cxr_fast.archs"


@dataclass
class Plugin:
    """One entry point of `PLUGIN_GROUP`. ``builder`` is None when it cannot be used, and ``problem`` says why."""

    name: str
    origin: str  # "architecture plugin 'NAME' (module:builder) from DISTRIBUTION VERSION", for messages
    distribution: str  # "DISTRIBUTION VERSION"
    builder: Builder | None = None
    problem: str | None = None
    warned: bool = False


_PLUGINS: dict[str, Plugin] | None = None  # read once, when the registry is first consulted


def plugin_archs(wanted: str | None = None) -> dict[str, Plugin]:
    """Every architecture the installed packages declare as an entry point in `PLUGIN_GROUP`, by name: the entry
    point's name is the architecture's, its object the builder, held to `check_arch`'s rules with no variant of its own
    (a variant is a second builder with other defaults). Read and imported once per process, on first use.

    A plugin that cannot be used (it fails to import, breaks the rules, or names a cxr_fast or timm architecture or
    another plugin's) is a warning, and an error only when its name is asked for (`wanted`, which then warns about the
    others only). Not an error for everything: one broken package (built for another torch, say) would otherwise
    stop every command that consults the registry, though none of them needs it — while only a warning when asked
    for would end in "unknown architecture", hiding the plugin's own problem."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = {}  # before any import: a plugin's module that consults the registry finds it loading, not unread
        _PLUGINS.update(_load_plugins())
    for plugin in _PLUGINS.values():
        asked = wanted is not None and plugin.name in (wanted, wanted.lower())
        if plugin.problem and not plugin.warned and not (asked and not _shadowed(plugin.name)):
            plugin.warned = True
            warnings.warn(f"{plugin.problem} (commands that do not use it are unaffected)", stacklevel=2)
    return _PLUGINS


def _shadowed(name: str) -> bool:
    import timm

    return name in LOCAL_ARCHS or name == ENSEMBLE_ARCH or timm.is_model(name)


def _load_plugins() -> dict[str, Plugin]:
    import timm

    by_name: dict[str, list[EntryPoint]] = {}
    for entry_point in entry_points(group=PLUGIN_GROUP):
        by_name.setdefault(entry_point.name, []).append(entry_point)
    plugins = {}
    for name, found in by_name.items():
        dists = [_distribution(e) for e in found]
        plugin = Plugin(name, f"architecture plugin {name!r} ({found[0].value}) from {dists[0]}", dists[0])
        plugins[name] = plugin
        # Clashes are refused rather than settled by an order: a run records only the name, and would be rebuilt by
        # whichever builder won in the loading process, with weights that may even fit. cxr_fast's and timm's names
        # keep their meaning (they come first in `_resolve_name`); two plugins' are both refused.
        if len(found) > 1:
            plugin.origin = f"architecture plugin {name!r}"
            plugin.problem = (f"{plugin.origin} is declared by {len(found)} packages ({', '.join(dists)}): none is "
                              "used; uninstall all but one")
        elif name in LOCAL_ARCHS or name == ENSEMBLE_ARCH:
            plugin.problem = f"{plugin.origin} is not used: {name} is cxr_fast's own and keeps that meaning"
        elif timm.is_model(name):
            plugin.problem = f"{plugin.origin} is not used: {name} is a timm architecture and keeps that meaning"
        else:
            plugin.builder, plugin.problem = _load_builder(name, found[0], plugin.origin)
    return plugins


def _load_builder(name: str, entry_point: EntryPoint, origin: str) -> tuple[Builder | None, str | None]:
    try:
        builder = entry_point.load()
    except Exception as e:  # anything a third-party module may raise as it imports (ImportError, SyntaxError, ...)
        return None, f"{origin} could not be loaded ({type(e).__name__}: {first_line(e)})"
    if not callable(builder):
        return None, f"{origin} is a {type(builder).__name__}, not a builder(n_in, n_classes, ...)"
    try:
        check_arch(name, builder, {})
    except CxrFastError as e:
        return None, f"{origin} breaks the registry's rules: {e}"
    except (TypeError, ValueError) as e:  # inspect.signature of a callable it cannot read
        return None, f"{origin} is not a builder(n_in, n_classes, ...) ({first_line(e)})"
    return builder, None


def _distribution(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


# ---------------------------------------------------------------- run bundles

_CONFIG_KEYS = ("arch", "arch_kwargs", "n_in", "n_classes")


def model_config(model: CXRModel) -> dict[str, Any]:
    """Everything needed to rebuild `model`'s architecture and preprocessing, as JSON values."""
    stats = model.pretrained_stats
    return {
        "arch": model.arch,
        "arch_kwargs": model.arch_kwargs,
        "n_in": model.n_in,
        "n_classes": model.n_classes,
        "weights": model.weights_source,
        "pretrained_stats": None if stats is None else {"mean": list(stats.mean), "std": list(stats.std)},
    }


def model_from_config(cfg: Mapping[str, Any]) -> nn.Module:
    """The exact architecture of `model_config`'s output (a `CXRModel`, or for an ensemble bundle a
    `cxr_fast.ensemble.AveragedEnsemble`), randomly initialised: load the run's state dict next. No weights are
    fetched, so this works offline even for a model that started from hub weights."""
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise CxrFastError(f"model config lacks {', '.join(missing)}")
    # a hand-edited config must fail here in one line, not as a TypeError deep inside create_model
    if not isinstance(cfg["arch"], str):
        raise CxrFastError(f"model arch must be a name, got {cfg['arch']!r}")
    if not isinstance(cfg["arch_kwargs"], Mapping):
        raise CxrFastError(f"model arch_kwargs must be a mapping of argument names to values, got {cfg['arch_kwargs']!r}")
    stats = cfg.get("pretrained_stats")
    if stats is not None and not (isinstance(stats, Mapping) and all(
            isinstance(stats.get(key), list) and all(isinstance(v, int | float) for v in stats[key])
            for key in ("mean", "std"))):
        raise CxrFastError(f"model pretrained_stats must be null or lists 'mean' and 'std' of numbers, got {stats!r}")
    import timm

    known = cfg["arch"] in LOCAL_ARCHS or cfg["arch"] == ENSEMBLE_ARCH or timm.is_model(cfg["arch"])
    if not known and cfg["arch"] not in plugin_archs(wanted=cfg["arch"]):  # a broken plugin's: create_model says why
        # a run records the exact name it was built with: a near timm name would be a different network
        raise CxrFastError(f"the run's architecture {cfg['arch']!r} is not known to this process: install the plugin "
                           f"package that provides it (an entry point in the group {PLUGIN_GROUP}), or, if it was "
                           "added with register_arch, register it again (same name and builder) before loading the run")
    if cfg["arch"] == ENSEMBLE_ARCH:  # an average of run bundles: its config lists the members' configs
        from cxr_fast.ensemble import ensemble_from_config

        return ensemble_from_config(cfg)
    model = create_model(
        cfg["arch"],
        n_in=int(cfg["n_in"]),
        n_classes=int(cfg["n_classes"]),
        weights="none",
        **cfg["arch_kwargs"],
    )
    model.weights_source = cfg.get("weights", "none")
    model.pretrained_stats = None if stats is None else Stats(list(stats["mean"]), list(stats["std"]))
    return model


def param_groups(model: CXRModel) -> list[list[nn.Parameter]]:
    """[body parameters, head parameters]: fastai's splitter, so `freeze()` trains only the head."""
    return [list(model.body.parameters()), list(model.head.parameters())]


splitter = param_groups
