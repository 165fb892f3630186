"""DY-Conv (Chen et al., CVPR 2020): K full kernels mixed per sample by a softmax attention.

    π_b = softmax(fc2(relu(fc1(GAP(x_b)))) / T)                  [B, K]
    W_b = Σ_k π_bk W_k,  b_b = Σ_k π_bk b_k,  y_b = conv(x_b, W_b) + b_b

Formulations (`formulation=`, or `set_baseline_formulation(model, ...)`):
- 'released': W_b for every sample, then one conv over the batch with groups = B · g (the
  authors' code and the reimplementation the KW and ODConv papers acknowledge).
- 'mix': output mixing: one dense conv with the K kernels stacked (K · C_out filters), then
  y_b = Σ_k π_bk y_bk. K times the conv FLOPs but no per-sample weights.
- 'fast' (default): 1x1 kernels: a batched matmul with W_b; K = 1: output mixing (one dense conv, no
  per-sample weights); otherwise the grouped conv. Output mixing also has the fewer multiply-adds at
  one output position (K · L <= K + L for L = H' · W' = 1), but measured on CPU at batch 2, 32x32 it was
  slower there: ResNet18 DY-Conv (4x) training 604 vs 327 ms, ResNet50 816 vs 604 ms (oneDNN's weight
  gradient of the stacked conv), so it is not chosen for that. `path(H, W)` says which runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.attention import AttentionLinear
from .common import BaselineConv2d, check_kernel_function, kernel_attention

__all__ = ["DYConv2d", "DYAttention", "DY_REDUCTION", "DY_HIDDEN_OFFSET"]

#: hidden width of the attention MLP: max(int(C_in · DY_REDUCTION) + hidden_offset, 1).
DY_REDUCTION = 0.25
#: the reimplementation docs/baselines.md §2 follows adds 1; hidden_offset=0 (some copies of it) is the
#: variant that reproduces the published MobileNetV2 + DY-Conv (4x) size (12.40M; 12.42M with 1).
DY_HIDDEN_OFFSET = 1


class DYAttention(nn.Module):
    """π [B, K] = softmax(fc2(relu(fc1(GAP(x)))) / T); fc1 C_in -> int(C_in/4) + 1 without bias, no norm.
    kernel_function='caf': KW's CAF instead of the softmax (Table 10)."""

    def __init__(self, in_channels: int, num_kernels: int, hidden_offset: int = DY_HIDDEN_OFFSET, device=None,
                 dtype=None, *, kernel_function: str = "softmax"):
        super().__init__()
        check_kernel_function(kernel_function, "DYAttention")
        self.kernel_function = kernel_function
        factory = {"device": device, "dtype": dtype}
        self.hidden = max(int(in_channels * DY_REDUCTION) + hidden_offset, 1)
        self.fc1 = AttentionLinear(in_channels, self.hidden, bias=False, **factory)
        self.fc2 = AttentionLinear(self.hidden, num_kernels, bias=True, **factory)

    def reset_parameters(self) -> None:
        """fc1, fc2: kaiming-normal (fan_out) weights, zero bias."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W], temperature [] -> π [B, K] (softmax: rows sum to 1; CAF: |π| sums to < 1)."""
        pooled = x.mean(dim=(2, 3))
        return kernel_attention(self.fc2(F.relu(self.fc1(pooled))), temperature, self.kernel_function)


class DYConv2d(BaselineConv2d):
    """DY-Conv drop-in for nn.Conv2d: x [B, C_in, H, W] (or [C_in, H, W]) -> [B, C_out, H', W'].

    num_kernels: K (4 in "DY-Conv (4x)"); weight [K, C_out, C_in/g, kh, kw], bias [K, C_out].
    The temperature T is the 0-dim buffer `temperature` (1 for inference; see
    `set_baseline_temperature` and `BaselineTemperatureSchedule.dyconv`). hidden_offset: the
    attention's hidden width is int(C_in / 4) + hidden_offset (see DY_HIDDEN_OFFSET). kernel_function:
    'softmax' (DY-Conv's) or 'caf' (KW's, the paper's Table 10).

    >>> conv = DYConv2d(16, 32, 3, padding=1, num_kernels=4)
    >>> conv(torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 32, 8, 8])
    """

    formulations = ("fast", "released", "mix")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, num_kernels: int = 4, formulation: str = "fast",
                 hidden_offset: int = DY_HIDDEN_OFFSET, kernel_function: str = "softmax", padding_mode: str = "zeros",
                 device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                         formulation, num_kernels, factory)
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **factory)) if bias else None
        self.attention = DYAttention(in_channels, num_kernels, hidden_offset, **factory,
                                     kernel_function=kernel_function)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each kernel (and bias) initialised like nn.Conv2d's; the attention kaiming-normal (fan_out); T = 1."""
        super().reset_parameters()
        fan_in = self.weight_numel // self.out_channels
        for k in range(self.num_kernels):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias[k], -bound, bound)
        self.attention.reset_parameters()

    def extra_repr(self) -> str:
        text = self._geometry_repr() + f", num_kernels={self.num_kernels}"
        if self.bias is None:
            text += ", bias=False"
        return text + (f", formulation={self.formulation!r}" if self.formulation != "fast" else "")

    def path(self, height: int, width: int) -> str:
        """The computation `forward` runs for an input of height × width: 'grouped', 'mix' or 'bmm'."""
        if self.formulation != "fast":
            return "grouped" if self.formulation == "released" else "mix"
        if self.kernel_size == (1, 1):
            return "bmm"
        return "mix" if self.num_kernels == 1 else "grouped"

    def mixed_weight(self, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """π [B, K] -> (W_b [B, C_out, C_in/g, kh, kw], b_b [B, C_out] or None)."""
        batch = pi.shape[0]
        weight = (pi @ self.weight.reshape(self.num_kernels, -1)).reshape(batch, *self.weight.shape[1:])
        bias = pi @ self.bias if self.bias is not None else None
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] (or unbatched [C_in, H, W]) -> [B, C_out, H', W']."""
        x, unbatched = self._check_input(x, self.weight)
        batch = x.shape[0]
        if batch == 0:
            y = self._conv(self._pad(x), self.weight[0], None if self.bias is None else self.bias[0], self.groups)
            return y.squeeze(0) if unbatched else y
        pi = self.attention(x, self.temperature)
        path = self.path(x.shape[2], x.shape[3])
        x = self._pad(x)
        if path == "mix":
            y = self._forward_mix(x, pi)
        elif path == "bmm":
            weight, bias = self.mixed_weight(pi)
            y = self._grouped_matmul(weight.flatten(2), self._pointwise_input(x))
            y = y if bias is None else y + bias[:, :, None, None]
        else:
            weight, bias = self.mixed_weight(pi)
            y = self._conv(x.reshape(1, -1, *x.shape[2:]), weight.flatten(0, 1),
                           None if bias is None else bias.flatten(), batch * self.groups)
            y = y.reshape(batch, self.out_channels, *y.shape[2:])
        return y.squeeze(0) if unbatched else y

    def _forward_mix(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """Output mixing: stack the K kernels group-major ([g, K, C_out/g] filters), one conv, Σ_k π_bk y_bk."""
        K, g, out_g = self.num_kernels, self.groups, self.out_channels // self.groups
        stacked = self.weight.reshape(K, g, out_g, *self.weight.shape[2:]).transpose(0, 1).flatten(0, 2)
        y = self._conv(x, stacked, None, g)
        y = y.reshape(x.shape[0], g, K, out_g, *y.shape[2:])
        y = torch.einsum("bgkohw,bk->bgohw", y, pi).flatten(1, 2)
        return y if self.bias is None else y + (pi @ self.bias)[:, :, None, None]
