"""The temperature a network's dynamic convs are trained with, by its kind of layers.

    kind = temperature_kind(model)                    # 'kw', 'dyconv' or 'odconv'
    schedule = build_schedule(kind, iters_per_epoch, epochs=temp_epochs)
    schedule.step(model)                              # every iteration, before the forward
    read_temperature(model, kind)                     # what the model has now (None without such layers)

KW: τ falls linearly from 1 to 0 over the recipe's temp_epochs, every iteration (`kw_ops.nn.TemperatureSchedule`).
DY-Conv and ODConv follow their papers (`kw_ops.baselines.BaselineTemperatureSchedule`): T falls from 30 to 1
over 10 epochs (BASELINE_TEMP_EPOCHS; `--temp-epochs` changes it), once per epoch for DY-Conv and every
iteration for ODConv. A static network has the KW kind: its schedule sets nothing.
"""
from __future__ import annotations

import torch.nn as nn

from ..baselines import BaselineTemperatureSchedule, DYConv2d, ODConv2d, get_baseline_temperature
from ..baselines.common import ANNEAL_EPOCHS
from ..nn import TemperatureSchedule, get_temperature

__all__ = ["BASELINE_TEMP_EPOCHS", "SYMBOLS", "build_schedule", "read_temperature", "temperature_kind"]

#: epochs over which DY-Conv and ODConv anneal T from 30 to 1 (both papers)
BASELINE_TEMP_EPOCHS = float(ANNEAL_EPOCHS)
#: how the progress line and the epoch summary name the temperature of each kind
SYMBOLS = {"kw": "τ", "dyconv": "T", "odconv": "T"}


def temperature_kind(model: nn.Module) -> str:
    """'dyconv' or 'odconv' when the model has DY-Conv or ODConv layers, 'kw' otherwise."""
    for module in model.modules():
        if isinstance(module, DYConv2d):
            return "dyconv"
        if isinstance(module, ODConv2d):
            return "odconv"
    return "kw"


def build_schedule(kind: str, iters_per_epoch: int, epochs: float):
    """The schedule of `kind` over `epochs` epochs of `iters_per_epoch` iterations; `step(model)` sets the
    model's temperature for the next iteration, `iteration` counts the steps done, `state_dict()` resumes it."""
    if kind == "kw":
        return TemperatureSchedule(iters_per_epoch, epochs)
    if kind not in ("dyconv", "odconv"):
        raise ValueError(f"build_schedule: kind must be 'kw', 'dyconv' or 'odconv', got {kind!r}")
    return BaselineTemperatureSchedule(iters_per_epoch, epochs, per_epoch=kind == "dyconv")


def read_temperature(model: nn.Module, kind: str) -> float | None:
    """The temperature the model's layers of `kind` have (None for a network without them)."""
    return get_temperature(model) if kind == "kw" else get_baseline_temperature(model)
