"""KW layers: drop-in replacements for nn.Conv1d/2d/3d and nn.Linear over a shared warehouse."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import KWConfig
from ..ops import kw_conv
from ..ops.dispatch import run_for_layer
from .attention import KWAttention
from .geometry import ConvGeometry
from .planning import LayerPlan, WarehousePlan, WeightShape
from .warehouse import Warehouse

__all__ = ["KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "KWLayer"]


class KWLayer(ConvGeometry):
    """Base of the KW convolutions: geometry, warehouse binding, attention and the op call.

    A layer is bound to a Warehouse (shared with other layers), to a KWConfig (a private
    warehouse with those settings) or to nothing (a private warehouse with KWConfig()).
    `backend` forces the op backend of this layer ('torch', 'triton', 'cpp'; None: kw_ops.ops.dispatch decides
    per call, `kw_ops.ops.use_backend()` or KW_OPS_BACKEND force one); it can be changed later as `layer.backend`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, warehouse: Warehouse | KWConfig | None = None,
                 padding_mode: str = "zeros", backend: str | None = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        name = type(self).__name__
        self.backend = backend
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        if warehouse is None or isinstance(warehouse, KWConfig):
            warehouse = Warehouse("private", warehouse, device=device, dtype=dtype)
        if not isinstance(warehouse, Warehouse):
            raise TypeError(f"{name}: warehouse must be a Warehouse, a KWConfig or None, "
                            f"got {type(warehouse).__name__}")
        warehouse.adopt_factory(device, dtype, who=name)
        warehouse.join(self)  # sets self.warehouse: a submodule of its first member only (see warehouse.py)

    # -- warehouse binding -------------------------------------------------------------------
    def weight_shape(self, index: int = 0) -> WeightShape:
        """The static weight this layer stands for: [out, in / groups, *kernel]."""
        return WeightShape(self.out_channels, self.in_channels // self.groups, self.kernel_size,
                           getattr(self, "_name", None) or f"{type(self).__name__}#{index}")

    def _bind(self, layer_plan: LayerPlan, plan: WarehousePlan) -> None:
        """(Re)build the attention for this share of the warehouse, in the layer's train/eval mode."""
        cells = self.warehouse.cells
        factory = {"device": cells.device, "dtype": cells.dtype}
        self.attention = KWAttention(self.in_channels, layer_plan.m, plan.n, layer_plan.beta, layer_plan.start,
                                     self.warehouse.config, **factory, out_channels=self.out_channels,
                                     spatial=layer_plan.grid[0]).train(self.training)
        self.m, self.grid = layer_plan.m, layer_plan.grid
        self.__dict__.pop("_call_state", None)  # forward's cached references: the attention is new

    @property
    def layer_plan(self) -> LayerPlan:
        return self.warehouse.layer_plan(self)

    def reset_parameters(self) -> None:
        """Re-initialise this layer's attention, its slice of the warehouse and its bias."""
        self.attention.reset_parameters()
        self.warehouse.init_slice(self.layer_plan)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Load as any module does; a member that does not hold the warehouse's registration also takes the
        cells under its own prefix (`<member>.warehouse.cells`), as state_dicts of earlier kw_ops list them."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "warehouse.cells"
        if "warehouse" not in self._modules and key in state_dict:
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            self.warehouse._load_from_state_dict(state_dict, prefix + "warehouse.", local_metadata, strict, [],
                                                 unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        text = self._geometry_repr()
        if self.bias is None:
            text += ", bias=False"
        return text + f", warehouse={self.warehouse.name!r}, m={self.m}"

    # -- forward ----------------------------------------------------------------------------
    def _state(self) -> tuple:
        """(warehouse, attention, geometry) of this layer's calls, looked up once per plan (the module attribute
        lookups cost a few microseconds each, per call of every layer; _bind drops it when the attention is
        rebuilt). geometry: (out_channels, kernel_size, stride, padding, dilation, groups) as the op takes it."""
        state = self.__dict__.get("_call_state")
        if state is None:
            geometry = (self.out_channels, self.kernel_size, self.stride, self._conv_padding, self.dilation,
                        self.groups)
            state = self.__dict__["_call_state"] = (self.warehouse, self.attention, geometry)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, *size] (or unbatched [C_in, *size]) -> [B, C_out, *out_size]."""
        warehouse, attention, geometry = self._state()
        warehouse.check_complete()
        compiling = torch.compiler.is_compiling()
        if not compiling:  # (a flag flipped in a compiled graph would recompile)
            warehouse.mark_used()
        cells, bias = warehouse.cells, self.bias
        x, unbatched = self._check_input(x, cells)
        autocast = torch.is_autocast_enabled(x.device.type)
        omni = attention.omni
        if omni:  # KW*: input channels scaled before the conv, output channels after it
            attn, channel, filter_ = attention.forward_omni(x)
            x = x * channel.view(*channel.shape, *(1,) * self.dims)
        else:
            attn = attention(x)
        if autocast:
            dtype = torch.get_autocast_dtype(x.device.type)
            x, attn, cells = x.to(dtype), attn.to(dtype), warehouse.cells_as(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if self._pre_pad is not None:
            x = self._pad(x)
        name = self.__dict__.get("_name")
        if compiling:  # the public entry, which compiles to the op (kw_ops.ops.dispatch)
            y = kw_conv(x, attn, cells, bias, out_channels=geometry[0], kernel_size=geometry[1], stride=geometry[2],
                        padding=geometry[3], dilation=geometry[4], groups=geometry[5], backend=self.backend, name=name)
        else:
            y = run_for_layer(self.__dict__.setdefault("_dispatch_cache", {}), x, attn, cells, bias, geometry,
                              self.backend, name)
        if omni:
            y = y * filter_.view(*filter_.shape, *(1,) * self.dims).to(y.dtype)
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

    Like nn.Linear it takes an empty batch (B = 0) and an unbatched input [in_features].

    As in the paper (docs/semantics.md §2) the input is treated as [B, in_features, L] (L = product of the
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
        """x [B, ..., in_features] (or unbatched [in_features]) -> [B, ..., out_features]; B may be 0."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"KWLinear: expected input [B, ..., {self.in_features}] or [{self.in_features}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KWLinear: expected {self.in_features} input features, got {x.shape[-1]} "
                             f"(input shape {tuple(x.shape)})")
        if x.dim() == 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        tokens = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), self.in_features).transpose(1, 2)
        y = super().forward(tokens)
        return y.transpose(1, 2).reshape(*x.shape[:-1], self.out_features)
