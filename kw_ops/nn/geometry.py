"""Convolution geometry shared by the KW layers and the DY-Conv / ODConv baselines: argument checks,
'same'/'valid' and padding modes, input checks with unbatched inputs, and the repr."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.functional import normalize_tuple

__all__ = ["ConvGeometry", "PADDING_MODES"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class ConvGeometry(nn.Module):
    """Base of conv-like layers: checked and normalised geometry as nn.Conv*d spells it.

    After __init__: in_channels, out_channels, groups, kernel_size, stride, dilation, padding (as
    given, normalised), padding_mode, `_pre_pad` (F.pad amounts the conv cannot do itself: asymmetric
    'same' or a non-zero padding mode; None if none) and `_conv_padding` (the conv's symmetric ints).
    """

    dims: int = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 padding_mode: str):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: in_channels={in_channels} and out_channels={out_channels} must both be "
                             f"divisible by groups={groups}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = normalize_tuple(kernel_size, self.dims, f"{name}.kernel_size")
        self.stride = normalize_tuple(stride, self.dims, f"{name}.stride")
        self.dilation = normalize_tuple(dilation, self.dims, f"{name}.dilation")
        if min(self.kernel_size + self.stride + self.dilation) < 1:
            raise ValueError(f"{name}: kernel_size, stride and dilation must be >= 1, got {self.kernel_size}, "
                             f"{self.stride}, {self.dilation}")
        self.padding_mode = padding_mode
        self.padding = padding if isinstance(padding, str) else normalize_tuple(padding, self.dims, f"{name}.padding")
        self._pre_pad, self._conv_padding = self._resolve_padding(padding)

    def _resolve_padding(self, padding):
        """(F.pad amounts applied before the conv or None, the conv's symmetric int padding)."""
        name, dims = type(self).__name__, self.dims
        if padding == "valid":
            amounts = [(0, 0)] * dims
        elif padding == "same":
            if any(s != 1 for s in self.stride):
                raise ValueError(f"{name}: padding='same' needs stride 1, got stride={self.stride}")
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            amounts = [(t // 2, t - t // 2) for t in totals]
        elif isinstance(padding, str):
            raise ValueError(f"{name}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        else:
            pads = normalize_tuple(padding, dims, f"{name}.padding")
            if min(pads) < 0:
                raise ValueError(f"{name}: padding must be >= 0, got {pads}")
            amounts = [(p, p) for p in pads]
        if self.padding_mode == "zeros" and all(lo == hi for lo, hi in amounts):
            return None, tuple(lo for lo, _ in amounts)
        return [v for lo_hi in reversed(amounts) for v in lo_hi], (0,) * dims  # F.pad: last dim first

    def _geometry_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self.dims:
            text += f", padding={self.padding}"
        if self.dilation != (1,) * self.dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text

    def _check_input(self, x: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Check x against the layer (rank, channels, floating dtype equal to `reference`'s unless autocast);
        returns (x with a batch dim, whether it was unbatched)."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: input must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: input must be floating point, got {x.dtype}")
        unbatched = x.dim() == self.dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != self.dims + 2:
            spatial = ("L", "H, W", "D, H, W")[self.dims - 1]
            raise ValueError(f"{name}: expected input [B, {self.in_channels}, {spatial}] ({self.dims + 2}-D) or "
                             f"unbatched [{self.in_channels}, {spatial}] ({self.dims + 1}-D), got shape "
                             f"{tuple(x.shape[1:] if unbatched else x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: expected {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape[1:] if unbatched else x.shape)})")
        if x.dtype != reference.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name}: input dtype {x.dtype} differs from the layer's {reference.dtype}; "
                            f"cast the input or the model (model.to(dtype))")
        return x, unbatched

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the padding the conv itself cannot (asymmetric 'same', non-zero padding modes)."""
        if self._pre_pad is None:
            return x
        return F.pad(x, self._pre_pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
