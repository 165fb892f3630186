"""KW layers: drop-in replacements for nn.Conv1d/2d/3d and nn.Linear over a shared warehouse."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import KWConfig
from ..ops import kw_conv
from ..ops.export_impl import export_conv, exporting
from ..ops.functional import normalize_tuple
from .attention import KWAttention
from .planning import LayerPlan, WarehousePlan, WeightShape
from .warehouse import Warehouse

__all__ = ["KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "KWLayer"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class KWLayer(nn.Module):
    """Base of the KW convolutions: geometry, warehouse binding, attention and the op call.

    A layer is bound to a Warehouse (shared with other layers), to a KWConfig (a private
    warehouse with those settings) or to nothing (a private warehouse with KWConfig()).
    """

    dims: int = 0
    # KW op backend for this layer ('torch', 'triton', 'cuda'; None: use_backend() / KW_OPS_BACKEND / automatic)
    backend: str | None = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, warehouse: Warehouse | KWConfig | None = None,
                 padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: in_channels={in_channels} and out_channels={out_channels} must both be "
                             f"divisible by groups={groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = normalize_tuple(kernel_size, self.dims, f"{name}.kernel_size")
        self.stride = normalize_tuple(stride, self.dims, f"{name}.stride")
        self.dilation = normalize_tuple(dilation, self.dims, f"{name}.dilation")
        if any(k < 1 for k in self.kernel_size) or any(s < 1 for s in self.stride) or any(d < 1 for d in self.dilation):
            raise ValueError(f"{name}: kernel_size, stride and dilation must be >= 1, got {self.kernel_size}, "
                             f"{self.stride}, {self.dilation}")
        self.padding_mode = padding_mode
        self.padding = padding if isinstance(padding, str) else normalize_tuple(padding, self.dims, f"{name}.padding")
        self._pre_pad, self._conv_padding = self._resolve_padding(padding)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        if warehouse is None or isinstance(warehouse, KWConfig):
            warehouse = Warehouse("private", warehouse, device=device, dtype=dtype)
        if not isinstance(warehouse, Warehouse):
            raise TypeError(f"{name}: warehouse must be a Warehouse, a KWConfig or None, got {type(warehouse).__name__}")
        warehouse.adopt_factory(device, dtype, who=name)
        self.warehouse = warehouse
        warehouse.join(self)

    # -- geometry ---------------------------------------------------------------------------
    def _resolve_padding(self, padding):
        """(F.pad amounts applied before the op or None, the op's symmetric int padding)."""
        dims = self.dims
        if padding == "valid":
            amounts = [(0, 0)] * dims
        elif padding == "same":
            if any(s != 1 for s in self.stride):
                raise ValueError(f"{type(self).__name__}: padding='same' needs stride 1, got stride={self.stride}")
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            amounts = [(t // 2, t - t // 2) for t in totals]
        elif isinstance(padding, str):
            raise ValueError(f"{type(self).__name__}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        else:
            pads = normalize_tuple(padding, dims, f"{type(self).__name__}.padding")
            if any(p < 0 for p in pads):
                raise ValueError(f"{type(self).__name__}: padding must be >= 0, got {pads}")
            amounts = [(p, p) for p in pads]
        if self.padding_mode == "zeros" and all(lo == hi for lo, hi in amounts):
            return None, tuple(lo for lo, _ in amounts)
        flat = [v for lo_hi in reversed(amounts) for v in lo_hi]  # F.pad wants last dim first
        return flat, (0,) * dims

    def weight_shape(self, index: int = 0) -> WeightShape:
        """The static weight this layer stands for: [out, in / groups, *kernel]."""
        return WeightShape(self.out_channels, self.in_channels // self.groups, self.kernel_size,
                           getattr(self, "_name", None) or f"{type(self).__name__}#{index}")

    def _bind(self, layer_plan: LayerPlan, plan: WarehousePlan) -> None:
        """(Re)build the attention for this layer's share of the warehouse (called by the warehouse)."""
        cells = self.warehouse.cells
        factory = {"device": cells.device, "dtype": cells.dtype}
        self.attention = KWAttention(self.in_channels, layer_plan.m, plan.n, layer_plan.beta, layer_plan.start,
                                     self.warehouse.config, **factory)
        self.m, self.grid = layer_plan.m, layer_plan.grid

    @property
    def layer_plan(self) -> LayerPlan:
        return self.warehouse.layer_plan(self)

    def reset_parameters(self) -> None:
        """Re-initialise this layer's attention, its slice of the warehouse and its bias."""
        self.attention.reset_parameters()
        self.warehouse.init_slice(self.layer_plan)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self.dims:
            text += f", padding={self.padding}"
        if self.dilation != (1,) * self.dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text + f", warehouse={self.warehouse.name!r}, m={self.m}"

    # -- forward ----------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: input must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: input must be floating point, got {x.dtype}")
        if x.dim() != self.dims + 2:
            raise ValueError(f"{name}: expected input [B, {self.in_channels}, *{self.dims} spatial dims] "
                             f"({self.dims + 2}-D) or unbatched ({self.dims + 1}-D), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: expected {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, *size] (or unbatched [C_in, *size]) -> [B, C_out, *out_size]."""
        unbatched = isinstance(x, torch.Tensor) and x.dim() == self.dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        self._check_input(x)
        self.warehouse.check_complete()
        cells, bias = self.warehouse.cells, self.bias
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and x.dtype != cells.dtype:
            raise TypeError(f"{type(self).__name__}: input dtype {x.dtype} differs from the layer's {cells.dtype}; "
                            f"cast the input or the model (model.to(dtype))")
        attn = self.attention(x)
        if autocast:
            dtype = torch.get_autocast_dtype(x.device.type)
            x, attn, cells = x.to(dtype), attn.to(dtype), cells.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if self._pre_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pre_pad, mode=mode)
        if exporting():  # ONNX / torch.export / tracing: a formulation whose batch stays symbolic
            y = export_conv(x, attn, cells, bias, self.out_channels, self.kernel_size, self.stride,
                            self._conv_padding, self.dilation, self.groups)
        else:
            y = kw_conv(x, attn, cells, bias, out_channels=self.out_channels, kernel_size=self.kernel_size,
                        stride=self.stride, padding=self._conv_padding, dilation=self.dilation, groups=self.groups,
                        backend=self.backend)
        return y.squeeze(0) if unbatched else y


class KWConv1d(KWLayer):
    """KW drop-in for nn.Conv1d: x [B, C_in, L] -> [B, C_out, L']."""

    dims = 1


class KWConv2d(KWLayer):
    """KW drop-in for nn.Conv2d: x [B, C_in, H, W] -> [B, C_out, H', W'].

    >>> conv = KWConv2d(16, 32, 3, padding=1, warehouse=KWConfig(budget=4))
    >>> conv(torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 32, 8, 8])
    """

    dims = 2


class KWConv3d(KWLayer):
    """KW drop-in for nn.Conv3d: x [B, C_in, D, H, W] -> [B, C_out, D', H', W']."""

    dims = 3


class KWLinear(KWLayer):
    """KW drop-in for nn.Linear: x [B, ..., in_features] -> [B, ..., out_features].

    As in the paper (SPEC §2) the input is treated as [B, in_features, L] (L = product of the
    middle dims) and goes through a KW 1-D convolution with kernel 1; the attention pools
    over the L tokens of each sample.
    """

    dims = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 warehouse: Warehouse | KWConfig | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, 1, bias=bias, warehouse=warehouse, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"warehouse={self.warehouse.name!r}, m={self.m}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ..., in_features] -> [B, ..., out_features]."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"KWLinear: expected input [B, ..., {self.in_features}] (at least 2-D), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KWLinear: expected {self.in_features} input features, got {x.shape[-1]} "
                             f"(input shape {tuple(x.shape)})")
        tokens = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
        y = super().forward(tokens)
        return y.transpose(1, 2).reshape(*x.shape[:-1], self.out_features)


def static_params(layer: KWLayer) -> int:
    """Weights of the static layer this KW layer replaces (for describe())."""
    return layer.out_channels * layer.in_channels // layer.groups * math.prod(layer.kernel_size)
