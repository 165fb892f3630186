"""Load the KW authors' checkpoints (docs/semantics.md §8) into our presets, and write ours in their format.

Their format differs from our state_dict in four ways:
- warehouses are `warehouse_manager.weights.<i>` ([n, c_out, c_in, *cell_k]), i = the order in which
  each warehouse was first reserved (= `kw_ops.warehouses(model)` order for our presets); ours are
  `<first member path>.warehouse.cells` (kw_ops state_dicts saved before listed them under every member's
  path: those load too);
- their KWLinear wraps a `.conv` submodule: `classifier.1.conv.attention.fc1.weight` is our
  `classifier.1.attention.fc1.weight`;
- τ and β (`attention.temperature`, `attention.beta`) are not in it;
- their 1x/4x MobileNetV2 head is a bare Linear `classifier` (our `classifier.1`): models list such
  renames in a `reference_aliases` class attribute ({their key: our key}).
Everything else uses the same (torchvision / reference) module names.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..nn import KWLayer, KWLinear, set_temperature, warehouses

__all__ = ["load_pretrained", "reference_state_dict", "reference_key_map"]

_WAREHOUSE_KEY = "warehouse_manager.weights.{}"
_NOT_IN_REFERENCE = ("attention.beta", "attention.temperature")


def reference_key_map(model: nn.Module) -> dict[str, list[str]]:
    """{key in the authors' format: [our state_dict keys holding that tensor]}, in our state_dict order."""
    index = {id(w): i for i, w in enumerate(warehouses(model))}
    kw_layers = {name: module for name, module in model.named_modules() if isinstance(module, KWLayer)}
    mapping: dict[str, list[str]] = {}
    for key in model.state_dict():
        layer_path, layer = _kw_owner(key, kw_layers)
        if layer is not None:
            rest = key[len(layer_path) + 1:] if layer_path else key
            if rest in _NOT_IN_REFERENCE:
                continue
            if rest == "warehouse.cells":
                theirs = _WAREHOUSE_KEY.format(index[id(layer.warehouse)])
            elif isinstance(layer, KWLinear):
                theirs = f"{layer_path}.conv.{rest}" if layer_path else f"conv.{rest}"
            else:
                theirs = key
        else:
            theirs = key
        mapping.setdefault(theirs, []).append(key)
    return mapping


def _legacy_cell_keys(model: nn.Module) -> dict[str, str]:
    """{`<member>.warehouse.cells` of each KW layer that does not hold its warehouse's registration: the model's
    key of those cells}: the keys under which kw_ops state_dicts listed a shared warehouse before it was
    registered once."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, KWLayer)]
    key = lambda name: f"{name}.warehouse.cells" if name else "warehouse.cells"
    owners = {id(m.warehouse): key(name) for name, m in layers if "warehouse" in m._modules}
    return {key(name): owners[id(m.warehouse)] for name, m in layers
            if "warehouse" not in m._modules and id(m.warehouse) in owners}


def _kw_owner(key: str, kw_layers: Mapping[str, KWLayer]) -> tuple[str, KWLayer | None]:
    """The KW layer whose state a key belongs to (the longest KW layer path prefixing it)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:cut])
        if path in kw_layers:
            return path, kw_layers[path]
    return "", None


def reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model's state in the authors' checkpoint format (each warehouse once, no τ / β)."""
    ours = model.state_dict()
    return {theirs: ours[keys[0]] for theirs, keys in reference_key_map(model).items()}


def _unwrap(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """A bare state_dict from {'model': sd} / {'state_dict': sd} wrappers, without a 'module.' prefix."""
    for wrapper in ("state_dict", "model"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


@torch.no_grad()
def load_pretrained(model: nn.Module, state_dict: Mapping, *, warn: bool = True) -> nn.Module:
    """Load a checkpoint in the KW authors' format (docs/semantics.md §8) into `model`; returns the model.

    Every key is mapped to ours and every shape checked before anything is copied: a checkpoint
    with a missing, unexpected or mis-shaped key is refused (ValueError naming the first bad key)
    and the model is left untouched. τ is set to 0 (their checkpoints are trained to the end of
    the schedule and do not store it), with a warning; β is kept (it is derived from the plan).
    A kw_ops state_dict of the same model (τ and β included) loads as is, τ untouched, also one saved
    by earlier kw_ops with a shared warehouse's cells under every member.

    Example (a checkpoint file of the authors')::

        model = kw_ops.models.create("resnet18_kw1x")
        kw_ops.models.load_pretrained(model, torch.load("kw1x_resnet18.pth", map_location="cpu"))
    """
    checkpoint = _unwrap(state_dict)
    ours = model.state_dict()
    legacy = _legacy_cell_keys(model)
    own_format = set(checkpoint) - set(legacy) == set(ours)  # a kw_ops state_dict: τ and β included
    mapping = {k: [k] for k in ours} if own_format else reference_key_map(model)
    aliases = {**getattr(model, "reference_aliases", {}), **legacy}
    problems: list[str] = []
    target: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for key, value in checkpoint.items():
        theirs = key if key in mapping else aliases.get(key, key)
        if theirs not in mapping:
            problems.append(f"unexpected key {key!r} (no such parameter or buffer in {type(model).__name__})")
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"key {key!r} holds a {type(value).__name__}, not a tensor")
            continue
        seen.add(theirs)
        for our_key in mapping[theirs]:
            if tuple(value.shape) != tuple(ours[our_key].shape):
                problems.append(f"key {key!r} has shape {tuple(value.shape)}, the model's {our_key!r} "
                                f"{tuple(ours[our_key].shape)}")
                break
            target[our_key] = value
    missing = [k for k in mapping if k not in seen]
    problems += [f"missing key {k!r} (the model's {mapping[k][0]!r})" for k in missing]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"load_pretrained: checkpoint does not match {type(model).__name__}: {problems[0]}{more}; "
                         f"nothing was loaded")
    merged = {k: target.get(k, v) for k, v in ours.items()}
    model.load_state_dict(merged, strict=True)
    if not own_format and any(isinstance(m, KWLayer) for m in model.modules()):
        set_temperature(model, 0.0)
        if warn:
            warnings.warn("load_pretrained: the temperature τ of every KW attention is set to 0 (the end of the "
                          "schedule; checkpoints in the authors' format do not store it)", stacklevel=2)
    return model
