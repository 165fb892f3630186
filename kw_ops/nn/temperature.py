"""The temperature τ of the KW attention and its schedule (docs/semantics.md §5)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import KWAttention

__all__ = ["set_temperature", "get_temperature", "TemperatureSchedule"]


@torch.no_grad()
def set_temperature(model: nn.Module, tau: float) -> int:
    """Set τ of every KW attention in `model`; returns how many were set."""
    if not 0 <= tau <= 1:
        raise ValueError(f"set_temperature: tau must be in [0, 1], got {tau!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, KWAttention):
            module.temperature.fill_(tau)
            count += 1
    return count


def get_temperature(model: nn.Module) -> float | None:
    """τ of the model's KW attentions (None if it has none)."""
    for module in model.modules():
        if isinstance(module, KWAttention):
            return float(module.temperature)
    return None


class TemperatureSchedule:
    """τ = max(0, τ0 · (T - t) / max(1, T)), T = iters_per_epoch · epochs, t the 1-based iteration.

    Call `step(model)` once per training iteration before the forward. The paper uses epochs = 20
    (ResNet, ConvNeXt) or 15 (MobileNetV2); τ0 = 1. `state_dict()` / `load_state_dict()` resume it.

    >>> schedule = TemperatureSchedule(iters_per_epoch=100, epochs=20)
    >>> schedule.value(1), schedule.value(1000), schedule.value(2000)
    (0.9995, 0.5, 0.0)
    """

    def __init__(self, iters_per_epoch: int, epochs: float = 20, tau0: float = 1.0):
        if iters_per_epoch < 1 or epochs < 0 or not 0 <= tau0 <= 1:
            raise ValueError(f"TemperatureSchedule: need iters_per_epoch >= 1, epochs >= 0 and tau0 in [0, 1], got "
                             f"{iters_per_epoch}, {epochs}, {tau0}")
        self.total = int(iters_per_epoch * epochs)
        self.tau0 = tau0
        self.iteration = 0

    def value(self, iteration: int) -> float:
        """τ at the 1-based global iteration."""
        return max(0.0, self.tau0 * (self.total - iteration) / max(1, self.total))

    def step(self, model: nn.Module) -> float:
        """Advance one iteration and set τ on the model; returns τ."""
        self.iteration += 1
        tau = self.value(self.iteration)
        set_temperature(model, tau)
        return tau

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "total": self.total, "tau0": self.tau0}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.total, self.tau0 = state["iteration"], state["total"], state["tau0"]
