"""What DY-Conv and ODConv share: conv geometry, input checks, formulations, temperature and its schedules.

Both baselines keep their temperature T (> 0, logits are divided by it) in a 0-dim buffer
`temperature`, so it travels with state_dict, `.to()` and dtype casts. T = 1 is the inference value
the benchmarks use and the default of a new layer; training anneals it from 30 (docs/baselines.md §4).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.attention import caf
from ..nn.geometry import ConvGeometry
from ..ops.torch_impl import conv_output_size

__all__ = [
    "BaselineConv2d", "BaselineTemperatureSchedule", "FORMULATIONS", "INFERENCE_TEMPERATURE", "KERNEL_FUNCTIONS",
    "check_kernel_function", "get_baseline_temperature", "kernel_attention", "set_baseline_formulation", "set_baseline_temperature",
]

#: T used for inference and benchmarks (and the value of a freshly built layer).
INFERENCE_TEMPERATURE = 1.0
#: T at the start of training in both papers.
INITIAL_TEMPERATURE = 30.0
#: epochs over which both papers anneal T to 1.
ANNEAL_EPOCHS = 10
#: 'released': per-sample weights + one conv with groups = B (the authors' code);
#: 'fast': the cheapest pure-PyTorch formulation for the layer (see each layer's `path()`);
#: 'mix': DY-Conv only, output mixing forced (one dense conv with K·C_out filters, then Σ_k π_k y_k).
FORMULATIONS = ("fast", "released", "mix")
#: Attention over the K kernels: the papers' softmax, or KW's CAF (the paper's Table 10).
KERNEL_FUNCTIONS = ("softmax", "caf")


def check_kernel_function(function: str, who: str) -> None:
    if function not in KERNEL_FUNCTIONS:
        raise ValueError(f"{who}: kernel_function must be one of {KERNEL_FUNCTIONS}, got {function!r}")


def kernel_attention(logits: torch.Tensor, temperature: torch.Tensor, function: str) -> torch.Tensor:
    """[B, K] kernel attention from logits: softmax(z / T), or CAF z / (Σ|z| + ε) (T cancels out but for ε)."""
    scaled = logits / temperature
    return caf(scaled) if function == "caf" else scaled.softmax(dim=-1)


class BaselineConv2d(ConvGeometry):
    """Geometry, checks, padding and temperature of the dynamic-conv baselines (not used directly)."""

    dims = 2
    formulations: tuple[str, ...] = ("fast", "released")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 padding_mode: str, formulation: str, num_kernels: int, factory: dict):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        if not isinstance(num_kernels, int) or isinstance(num_kernels, bool) or num_kernels < 1:
            raise ValueError(f"{type(self).__name__}: num_kernels must be a positive int, got {num_kernels!r}")
        self.formulation = formulation
        self.num_kernels = num_kernels
        # the K kernels W_k: [K, C_out, C_in / groups, kh, kw] (initialised by the subclass)
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels // groups, *self.kernel_size,
                                               **factory))
        self.register_buffer("temperature", torch.tensor(INFERENCE_TEMPERATURE, **factory))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T back to INFERENCE_TEMPERATURE; the subclasses re-initialise their kernels and attention too."""
        self.temperature.fill_(INFERENCE_TEMPERATURE)

    # -- settings ---------------------------------------------------------------------------
    @property
    def formulation(self) -> str:
        return self._formulation

    @formulation.setter
    def formulation(self, value: str) -> None:
        if value not in self.formulations:
            raise ValueError(f"{type(self).__name__}: formulation must be one of {self.formulations}, got {value!r}")
        self._formulation = value

    @property
    def weight_numel(self) -> int:
        """Elements of one kernel W_k: C_out · C_in/g · kh · kw."""
        return self.out_channels * self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    # -- forward helpers ----------------------------------------------------------------------
    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self._conv_padding, self.dilation, groups)

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        """H', W' of the conv for an (already pre-padded) input of height × width."""
        out_h, out_w = conv_output_size((height, width), self.kernel_size, self.stride, self._conv_padding,
                                        self.dilation)
        return out_h, out_w

    def _pointwise_input(self, x: torch.Tensor) -> torch.Tensor:
        """A 1x1 conv's receptive field: the (pre-padded) input zero-padded and subsampled by the stride."""
        ph, pw = self._conv_padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        sh, sw = self.stride
        return x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x

    def _grouped_matmul(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample 1x1 conv as a batched matmul: weight [B, C_out, C_in/g], x [B, C_in, H, W] -> [B, C_out, H, W]."""
        batch, _, height, width = x.shape
        g = self.groups
        w = weight.reshape(batch, g, self.out_channels // g, self.in_channels // g)
        y = torch.matmul(w, x.reshape(batch, g, self.in_channels // g, height * width))
        return y.reshape(batch, self.out_channels, height, width)


# -- temperature ------------------------------------------------------------------------------
def _baseline_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, BaselineConv2d)]


@torch.no_grad()
def set_baseline_temperature(model: nn.Module, temperature: float) -> int:
    """Set T of every DY-Conv / ODConv layer in `model` (T > 0; 1 for inference); returns how many were set.

    >>> from kw_ops.baselines import DYConv2d
    >>> set_baseline_temperature(DYConv2d(8, 8, 3), 30.0)
    1
    """
    if not temperature > 0:
        raise ValueError(f"set_baseline_temperature: temperature must be > 0, got {temperature!r}")
    layers = _baseline_layers(model)
    for layer in layers:
        layer.temperature.fill_(temperature)
    return len(layers)


def get_baseline_temperature(model: nn.Module) -> float | None:
    """T of the model's DY-Conv / ODConv layers (None if it has none)."""
    layers = _baseline_layers(model)
    return float(layers[0].temperature) if layers else None


def set_baseline_formulation(model: nn.Module, formulation: str) -> int:
    """Choose the forward formulation of every DY-Conv / ODConv layer in `model`; returns how many were set.

    formulation: 'released' (per-sample weights + one conv with groups = B, as in the authors' code),
    'fast' (the cheapest pure-PyTorch formulation per layer) or 'mix' (DY-Conv layers only; ODConv
    layers then get 'fast').
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"set_baseline_formulation: formulation must be one of {FORMULATIONS}, got {formulation!r}")
    layers = _baseline_layers(model)
    for layer in layers:
        layer.formulation = formulation if formulation in layer.formulations else "fast"
    return len(layers)


class BaselineTemperatureSchedule:
    """T = t_end + max(0, (t_start - t_end) · (N - t) / N), N = iters_per_epoch · epochs, t the 0-based step.

    ODConv anneals per iteration (`odconv`); DY-Conv linearly over epochs (`dyconv`: per_epoch=True,
    t counts whole epochs). Call `step(model)` once per training iteration before the forward;
    `state_dict()` / `load_state_dict()` resume it.

    >>> schedule = BaselineTemperatureSchedule.odconv(iters_per_epoch=100)
    >>> schedule.value(0), schedule.value(500), schedule.value(1000)
    (30.0, 15.5, 1.0)
    >>> BaselineTemperatureSchedule.dyconv(iters_per_epoch=100).value(150)   # epoch 1 of 10
    27.1
    """

    def __init__(self, iters_per_epoch: int, epochs: float = ANNEAL_EPOCHS, t_start: float = INITIAL_TEMPERATURE,
                 t_end: float = INFERENCE_TEMPERATURE, per_epoch: bool = False):
        if iters_per_epoch < 1 or epochs < 0 or not t_start >= t_end > 0:
            raise ValueError(f"BaselineTemperatureSchedule: need iters_per_epoch >= 1, epochs >= 0 and "
                             f"t_start >= t_end > 0, got {iters_per_epoch}, {epochs}, {t_start}, {t_end}")
        self.iters_per_epoch = iters_per_epoch
        self.total = int(iters_per_epoch * epochs)
        self.t_start, self.t_end, self.per_epoch = t_start, t_end, per_epoch
        self.iteration = 0

    @classmethod
    def dyconv(cls, iters_per_epoch: int) -> BaselineTemperatureSchedule:
        """DY-Conv: 30 -> 1 linearly over the first 10 epochs, one value per epoch."""
        return cls(iters_per_epoch, per_epoch=True)

    @classmethod
    def odconv(cls, iters_per_epoch: int) -> BaselineTemperatureSchedule:
        """ODConv: 30 -> 1 linearly over the first 10 epochs' iterations."""
        return cls(iters_per_epoch)

    def value(self, iteration: int) -> float:
        """T at the 0-based global iteration."""
        if self.per_epoch:
            iteration -= iteration % self.iters_per_epoch
        return self.t_end + max(0.0, (self.t_start - self.t_end) * (self.total - iteration) / max(1, self.total))

    def step(self, model: nn.Module) -> float:
        """Set T of the current iteration on the model, then advance; returns T."""
        temperature = self.value(self.iteration)
        set_baseline_temperature(model, temperature)
        self.iteration += 1
        return temperature

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "total": self.total, "iters_per_epoch": self.iters_per_epoch,
                "t_start": self.t_start, "t_end": self.t_end, "per_epoch": self.per_epoch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("iteration", "total", "iters_per_epoch", "t_start", "t_end", "per_epoch"):
            setattr(self, key, state[key])
