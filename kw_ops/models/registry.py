"""Model builders registered by name: `create("resnet18_kw4x")`, `list_models("resnet*")`.

A builder is any callable returning an nn.Module; `register` adds it under a name. KW presets
are registered with their `KWRecipe` (config, sharing rule, per-warehouse overrides), so the
same recipe can KW-ify the static twin: `recipe("resnet18_kw1x").apply(create("resnet18"))`
builds the same network as `create("resnet18_kw1x")`.

Other packages (e.g. `kw_ops.baselines`, the DY-Conv / ODConv presets) register their builders
with the same decorator; the modules named in `PLUGIN_MODULES` are imported on the first lookup
when they are installed, so their names show up in `list_models()` without a circular import.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
from collections.abc import Mapping
from typing import Callable

import torch.nn as nn

from ..config import KWConfig
from ..nn import convert

__all__ = ["KWRecipe", "register", "register_recipe", "create", "list_models", "recipe", "is_model",
           "PLUGIN_MODULES"]

#: Modules that register more builders; imported (if present) before the first lookup.
PLUGIN_MODULES = ("kw_ops.baselines", "kw_ops.train.tiny")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_RECIPES: dict[str, KWRecipe] = {}
_plugins_loaded = False


@dataclasses.dataclass(frozen=True)
class KWRecipe:
    """How a KW preset is made from its static twin: `convert(static, config, sharing, overrides)`.

    static:    registered name of the static twin (e.g. 'resnet18').
    config:    the KWConfig of every warehouse not named in `overrides`.
    sharing:   rule (module path, module) -> warehouse name, or None to keep the layer static.
    overrides: warehouse name -> changed KWConfig fields (or a whole KWConfig).
    """

    static: str
    config: KWConfig
    sharing: Callable[[str, nn.Module], str | None]
    overrides: Mapping[str, KWConfig | Mapping] = dataclasses.field(default_factory=dict)

    def apply(self, model: nn.Module) -> nn.Module:
        """KW-ify a static twin in place (returns it)."""
        return convert(model, self.config, sharing=self.sharing, overrides=dict(self.overrides))

    def build(self, **kwargs) -> nn.Module:
        """The static twin built with `kwargs` (num_classes, in_chans, drop rates, ...), then KW-ified."""
        return self.apply(create(self.static, **kwargs))


def register(name: str | None = None, *, overwrite: bool = False):
    """Decorator registering a model builder under `name` (default: the function's name).

    Example::

        @register("tiny_net")
        def tiny_net(num_classes=10, in_chans=3):
            return nn.Conv2d(in_chans, num_classes, 1)

        create("tiny_net", num_classes=3)
    """
    def decorator(builder: Callable[..., nn.Module]):
        key = name or builder.__name__
        if key in _BUILDERS and not overwrite and _BUILDERS[key] is not builder:
            raise ValueError(f"register: a model named {key!r} is already registered "
                             f"({_BUILDERS[key].__module__}.{_BUILDERS[key].__qualname__}); pass overwrite=True")
        _BUILDERS[key] = builder
        return builder

    return decorator


def register_recipe(name: str, kw_recipe: KWRecipe, *, doc: str = "", overwrite: bool = False) -> None:
    """Register a KW preset: builder `name(**kwargs)` = `kw_recipe.build(**kwargs)`."""
    def builder(**kwargs) -> nn.Module:
        return kw_recipe.build(**kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc or f"{kw_recipe.static} KW-ified with {kw_recipe.config} (recipe {name!r})."
    register(name, overwrite=overwrite)(builder)
    _RECIPES[name] = kw_recipe


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in PLUGIN_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(module)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _load_plugins()
    return sorted(n for n in _BUILDERS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    _load_plugins()
    return name in _BUILDERS


def create(name: str, **kwargs) -> nn.Module:
    """Build a registered model; kwargs go to its builder (num_classes, in_chans, drop_rate, ...).

    >>> import kw_ops.models
    >>> model = kw_ops.models.create("resnet18_kw1x", num_classes=10)
    >>> kw_ops.count_parameters(kw_ops.models.create("resnet18_kw1x"))
    11932148
    """
    _load_plugins()
    if name not in _BUILDERS:
        close = fnmatch.filter(_BUILDERS, f"*{name.split('_')[0]}*") or sorted(_BUILDERS)
        raise ValueError(f"create: unknown model {name!r}; known models like it: {sorted(close)}")
    return _BUILDERS[name](**kwargs)


def recipe(name: str) -> KWRecipe:
    """The KWRecipe of a registered KW preset."""
    _load_plugins()
    if name not in _RECIPES:
        raise ValueError(f"recipe: {name!r} is not a registered KW preset; KW presets: {sorted(_RECIPES)}")
    return _RECIPES[name]
