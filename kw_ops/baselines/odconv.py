"""ODConv (Li, Zhou, Yao, ICLR 2022): omni-dimensional dynamic convolution.

    h = relu(BN(fc(GAP(x))))                                      [B, A], A = max(int(C_in/16), 16)
    α_c = sigmoid(fc_c(h)/T) [B, C_in]      α_f = sigmoid(fc_f(h)/T) [B, C_out]  (1 for depthwise)
    α_s = sigmoid(fc_s(h)/T) [B, kh·kw]  (1 for 1x1)      α_w = softmax(fc_w(h)/T) [B, K]  (1 for K = 1)
    W_b = Σ_k α_w[b,k] (α_s[b] ⊙ W_k),  y_b = conv(x_b ⊙ α_c[b], W_b) ⊙ α_f[b] (+ bias)

Formulations (`formulation=`, or `set_baseline_formulation(model, ...)`):
- 'released': as the authors' code: x ⊙ α_c, W_b = Σ_k (α_s α_w[k] W_k) over a [B, K, C_out,
  C_in/g, kh, kw] product, one conv with groups = B · g, ⊙ α_f.
- 'fast' (default): W_b = α_s ⊙ (α_w @ W) (a matmul, no K-fold intermediate); 1x1 kernels run
  as a batched matmul; α_c and α_f are folded into W_b when that is fewer multiplies (C_out ·
  C_in/g · kh · kw <= C_in · H · W + C_out · H' · W', per sample), else applied to x and y.
- both: the released pointwise fast path when k = 1 and K = 1: y = conv(x ⊙ α_c, W) ⊙ α_f.
`path(H, W)` says which computation runs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.attention import AttentionLinear
from .common import BaselineConv2d, check_kernel_function, kernel_attention

__all__ = ["ODConv2d", "ODAttention", "OD_REDUCTION", "OD_MIN_HIDDEN"]

#: attention width A = max(int(C_in · OD_REDUCTION), OD_MIN_HIDDEN).
OD_REDUCTION = 1 / 16
OD_MIN_HIDDEN = 16


class ODAttention(nn.Module):
    """The four ODConv attentions from one trunk GAP -> fc (no bias) -> BatchNorm -> ReLU.

    Heads (Linear with bias, logits / T): channel (always), filter (None for a depthwise conv:
    C_in = C_out = groups), spatial (None for 1x1 kernels), kernel (None for K = 1; softmax, or KW's CAF
    with kernel_function='caf', the paper's Table 10).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], groups: int,
                 num_kernels: int, device=None, dtype=None, *, kernel_function: str = "softmax"):
        super().__init__()
        check_kernel_function(kernel_function, "ODAttention")
        self.kernel_function = kernel_function
        factory = {"device": device, "dtype": dtype}
        self.hidden = max(int(in_channels * OD_REDUCTION), OD_MIN_HIDDEN)
        self.fc = AttentionLinear(in_channels, self.hidden, bias=False, **factory)
        self.bn = nn.BatchNorm1d(self.hidden, **factory)
        depthwise = in_channels == groups == out_channels
        spatial = kernel_size[0] * kernel_size[1]
        self.channel_fc = AttentionLinear(self.hidden, in_channels, **factory)
        self.filter_fc = None if depthwise else AttentionLinear(self.hidden, out_channels, **factory)
        self.spatial_fc = None if spatial == 1 else AttentionLinear(self.hidden, spatial, **factory)
        self.kernel_fc = None if num_kernels == 1 else AttentionLinear(self.hidden, num_kernels, **factory)

    def reset_parameters(self) -> None:
        """The heads: kaiming-normal (fan_out) weights, zero biases; the BatchNorm as new."""
        for layer in (self.fc, self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc):
            if layer is not None:
                layer.reset_parameters()
        self.bn.reset_parameters()

    def forward(self, x: torch.Tensor, temperature: torch.Tensor):
        """x [B, C_in, H, W], temperature [] -> (α_c [B, C_in], α_f [B, C_out], α_s [B, kh·kw], α_w [B, K]);
        skipped attentions are None (= 1)."""
        if self.training and x.shape[0] == 1:
            raise ValueError("ODAttention: the BatchNorm in the ODConv attention cannot train on a batch of 1 "
                             "sample; train with batch >= 2 or call model.eval() for inference")
        h = F.relu(self.bn(self.fc(x.mean(dim=(2, 3)))))
        channel = (self.channel_fc(h) / temperature).sigmoid()
        filter_ = None if self.filter_fc is None else (self.filter_fc(h) / temperature).sigmoid()
        spatial = None if self.spatial_fc is None else (self.spatial_fc(h) / temperature).sigmoid()
        kernel = None if self.kernel_fc is None else kernel_attention(self.kernel_fc(h), temperature,
                                                                      self.kernel_function)
        return channel, filter_, spatial, kernel


class ODConv2d(BaselineConv2d):
    """ODConv drop-in for nn.Conv2d: x [B, C_in, H, W] (or [C_in, H, W]) -> [B, C_out, H', W'].

    num_kernels: K (1 for "ODConv (1x)", 4 for "(4x)"); weight [K, C_out, C_in/g, kh, kw].
    bias=False as in the released ODConv (which has none); bias=True adds a static bias after the
    filter attention. The temperature T is the 0-dim buffer `temperature` (1 for inference; see
    `set_baseline_temperature` and `BaselineTemperatureSchedule.odconv`). The attention has a
    BatchNorm: training needs batches of >= 2 samples. kernel_function: 'softmax' (ODConv's) or 'caf'
    (KW's, the paper's Table 10) for the attention over the K kernels.

    >>> conv = ODConv2d(16, 32, 3, padding=1, num_kernels=4).eval()
    >>> conv(torch.randn(1, 16, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, num_kernels: int = 4, formulation: str = "fast",
                 kernel_function: str = "softmax", padding_mode: str = "zeros", device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                         formulation, num_kernels, factory)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.attention = ODAttention(in_channels, out_channels, self.kernel_size, groups, num_kernels, **factory,
                                     kernel_function=kernel_function)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each kernel kaiming-normal (fan_out, relu) as in the released code; bias 0; the attention re-initialised;
        T = 1."""
        super().reset_parameters()
        for k in range(self.num_kernels):
            nn.init.kaiming_normal_(self.weight[k], mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.reset_parameters()

    def extra_repr(self) -> str:
        text = self._geometry_repr() + f", num_kernels={self.num_kernels}"
        if self.bias is not None:
            text += ", bias=True"
        return text + (f", formulation={self.formulation!r}" if self.formulation != "fast" else "")

    @property
    def pointwise(self) -> bool:
        """The released fast path applies: 1x1 kernel and K = 1 (no per-sample weight)."""
        return self.kernel_size == (1, 1) and self.num_kernels == 1

    def path(self, height: int, width: int) -> str:
        """The computation `forward` runs for an input of height × width:
        'pointwise', 'released', 'bmm', 'bmm+fold', 'grouped' or 'grouped+fold'."""
        if self.pointwise:
            return "pointwise"
        if self.formulation == "released":
            return "released"
        if self._pre_pad is not None:
            height += self._pre_pad[2] + self._pre_pad[3]
            width += self._pre_pad[0] + self._pre_pad[1]
        out_h, out_w = self._output_size(height, width)
        fold = self.weight_numel <= self.in_channels * height * width + self.out_channels * out_h * out_w
        return ("bmm" if self.kernel_size == (1, 1) else "grouped") + ("+fold" if fold else "")

    def mixed_weight(self, spatial: torch.Tensor | None, kernel: torch.Tensor | None, batch: int) -> torch.Tensor:
        """α_s [B, kh·kw] or None, α_w [B, K] or None -> W_b = α_s ⊙ Σ_k α_w[k] W_k, [B, C_out, C_in/g, kh, kw]."""
        if kernel is None:
            weight = self.weight.expand(batch, *self.weight.shape[1:])
        else:
            weight = (kernel @ self.weight.reshape(self.num_kernels, -1)).reshape(batch, *self.weight.shape[1:])
        if spatial is not None:
            weight = weight * spatial.reshape(batch, 1, 1, *self.kernel_size)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] (or unbatched [C_in, H, W]) -> [B, C_out, H', W']."""
        x, unbatched = self._check_input(x, self.weight)
        batch = x.shape[0]
        if batch == 0:
            y = self._conv(self._pad(x), self.weight[0], self.bias, self.groups)
            return y.squeeze(0) if unbatched else y
        channel, filter_, spatial, kernel = self.attention(x, self.temperature)
        path = self.path(x.shape[2], x.shape[3])
        x = self._pad(x)
        if path == "pointwise":
            y = self._conv(x * channel[:, :, None, None], self.weight[0], None, self.groups)
        elif path == "released":
            y = self._forward_released(x, channel, spatial, kernel)
        else:
            weight = self.mixed_weight(spatial, kernel, batch)
            fold = path.endswith("+fold")
            if fold:
                weight = self._fold(weight, channel, filter_)
            else:
                x = x * channel[:, :, None, None]
            if path.startswith("bmm"):
                y = self._grouped_matmul(weight.flatten(2), self._pointwise_input(x))
            else:
                y = self._conv(x.reshape(1, -1, *x.shape[2:]), weight.flatten(0, 1), None, batch * self.groups)
                y = y.reshape(batch, self.out_channels, *y.shape[2:])
            if fold:
                filter_ = None
        if filter_ is not None:
            y = y * filter_[:, :, None, None]
        return self._finish(y, unbatched)

    def _finish(self, y: torch.Tensor, unbatched: bool) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y.squeeze(0) if unbatched else y

    def _forward_released(self, x, channel, spatial, kernel) -> torch.Tensor:
        """The authors' formulation: x ⊙ α_c, Σ over a [B, K, C_out, C_in/g, kh, kw] product, grouped conv."""
        batch = x.shape[0]
        x = x * channel[:, :, None, None]
        weight = self.weight.unsqueeze(0)
        if spatial is not None:
            weight = weight * spatial.reshape(batch, 1, 1, 1, *self.kernel_size)
        if kernel is not None:
            weight = weight * kernel.reshape(batch, self.num_kernels, 1, 1, 1, 1)
        weight = weight.sum(dim=1).expand(batch, *self.weight.shape[1:])
        y = self._conv(x.reshape(1, -1, *x.shape[2:]), weight.flatten(0, 1), None, batch * self.groups)
        return y.reshape(batch, self.out_channels, *y.shape[2:])

    def _fold(self, weight: torch.Tensor, channel: torch.Tensor, filter_: torch.Tensor | None) -> torch.Tensor:
        """W_b [B, C_out, C_in/g, kh, kw] ⊙ α_f[o] ⊙ α_c[input channel of (o, i)] (grouped channel layout)."""
        batch, g = weight.shape[0], self.groups
        out_g, in_g = self.out_channels // g, self.in_channels // g
        weight = weight.reshape(batch, g, out_g, in_g, -1) * channel.reshape(batch, g, 1, in_g, 1)
        if filter_ is not None:
            weight = weight * filter_.reshape(batch, g, out_g, 1, 1)
        return weight.reshape(batch, self.out_channels, in_g, *self.kernel_size)
