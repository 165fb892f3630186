"""Attention of one KW layer (docs/semantics.md §3): GAP -> fc1 -> norm -> ReLU -> fc2 -> CAF -> temperature blend.

τ (`temperature`) and β (`beta`) are buffers, so they travel with state_dict, `.to()` and dtype casts.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CAF_EPS, MIN_HIDDEN, MIN_NONLOCAL_BASIS, KWConfig
from .planning import ZERO_CELL

__all__ = ["KWAttention", "AttentionLinear", "caf"]


def caf(z: torch.Tensor) -> torch.Tensor:
    """The contrasting-driven attention function over the last dim: z / (Σ|z| + ε)."""
    return z / (z.abs().sum(dim=-1, keepdim=True) + CAF_EPS)


def _normalise(z: torch.Tensor, function: str) -> torch.Tensor:
    """Attention function over the last dim (n cells + the zero cell)."""
    if function == "caf":
        return caf(z)
    if function == "softmax":
        return z.softmax(dim=-1)
    if function == "sigmoid":
        return z.sigmoid()
    return z.clamp_min(0) / (z.abs().sum(dim=-1, keepdim=True) + CAF_EPS)  # relu_l1


class AttentionLinear(nn.Linear):
    """nn.Linear initialised as the dynamic-conv attentions are: kaiming-normal weight (fan_out, relu), zero bias.

    Its own `reset_parameters` does it, so re-initialising every module (deferred initialisation: build on
    the meta device, `to_empty`, `reset_parameters` of each module) gives the attention's initialisation,
    not nn.Linear's.
    """

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.numel():
            nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class KWAttention(nn.Module):
    """Attentions α [B, m, n] of one layer's m mixtures over the n cells of its warehouse.

    in_channels: channels pooled from the layer's input; m, n: mixtures and warehouse cells;
    out_channels, spatial: the layer's output channels and kernel positions (used by KW*, config.omni);
    beta: the cell of each mixture at τ = 1 (-1: zero cell; a tuple: several cells, see
    KWConfig.init); start: the layer's first cell
    (used by the non-local basis); config: the warehouse's KWConfig.
    """

    def __init__(self, in_channels: int, m: int, n: int, beta, start: int, config: KWConfig,
                 device=None, dtype=None, *, out_channels: int | None = None, spatial: int = 1):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.m, self.n, self.start, self.spatial = m, n, start, spatial
        self.function = config.attention
        self.norm_kind = config.norm
        hidden = max(int(in_channels * config.reduction), MIN_HIDDEN)
        self.fc1 = AttentionLinear(in_channels, hidden, bias=config.norm != "batch", **factory)
        if config.norm == "batch":
            self.norm1 = nn.BatchNorm1d(hidden, **factory)
        elif config.norm == "layer":
            self.norm1 = nn.LayerNorm(hidden, **factory)
        else:
            self.norm1 = nn.Identity()
        self.num_local = self.num_basis = None
        if config.nonlocal_basis_ratio < 1:
            self.num_local = int(config.budget * m)
            num_nonlocal = n - self.num_local  # 0 while the layer is alone in its warehouse
            self.num_basis = max(int(num_nonlocal * config.nonlocal_basis_ratio), MIN_NONLOCAL_BASIS)
            self.fc2 = AttentionLinear(hidden, (self.num_local + self.num_basis + 1) * m, bias=False, **factory)
            self.fc3 = AttentionLinear(self.num_basis, num_nonlocal, bias=False, **factory)  # empty while alone
            self.basis_bias = nn.Parameter(torch.empty(m * (n + 1), **factory))
        else:
            self.fc2 = AttentionLinear(hidden, m * (n + 1), bias=True, **factory)
        self._beta_cells = tuple((row, n if cell == ZERO_CELL else cell) for row, cells in enumerate(beta)
                                 for cell in (cells if isinstance(cells, tuple) else (cells,)))
        self.register_buffer("beta", torch.empty(m, n + 1, **factory))
        self.blend = config.init != "none"  # 'none': no β, the temperature plays no part
        self.omni = config.omni
        if self.omni:  # KW*: ODConv's other three attentions (sigmoid heads)
            if out_channels is None or m % spatial:
                raise ValueError(f"KWAttention: KW* needs out_channels and m={m} a multiple of the spatial cells "
                                 f"{spatial}, got {out_channels}")
            self.channel_fc = AttentionLinear(hidden, in_channels, **factory)
            self.filter_fc = AttentionLinear(hidden, out_channels, **factory)
            self.spatial_fc = AttentionLinear(hidden, spatial, **factory)
        self.register_buffer("temperature", torch.empty((), **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the weights (kaiming-normal, fan_out), β (one-hot rows from the plan) and τ = 0."""
        self.beta.zero_()
        if self._beta_cells:
            rows, columns = torch.tensor(self._beta_cells, dtype=torch.long, device=self.beta.device).unbind(1)
            self.beta[rows, columns] = 1
        self.temperature.zero_()
        for layer in self.modules():
            if isinstance(layer, AttentionLinear):
                layer.reset_parameters()
        if isinstance(self.norm1, (nn.BatchNorm1d, nn.LayerNorm)):
            self.norm1.reset_parameters()
        if self.num_basis is not None:
            nn.init.zeros_(self.basis_bias)

    def extra_repr(self) -> str:
        text = f"m={self.m}, n={self.n}, function={self.function!r}"
        return text + (f", nonlocal_basis={self.num_basis}" if self.num_basis is not None else "")

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = self.fc2(hidden)
        if self.num_basis is None:
            return z.view(-1, self.m, self.n + 1)
        z = z.view(-1, self.num_local + self.num_basis + 1)
        local, basis, zero = z[:, : self.num_local], z[:, self.num_local : -1], z[:, -1:]
        nonlocal_ = self.fc3(basis)
        z = torch.cat([nonlocal_[:, : self.start], local, nonlocal_[:, self.start :], zero], dim=1)
        return (z.view(-1, self.m * (self.n + 1)) + self.basis_bias).view(-1, self.m, self.n + 1)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.norm_kind == "batch" and x.shape[0] == 1:
            raise ValueError(
                "KWAttention: BatchNorm1d in the KW attention cannot train on a batch of 1 sample. Train with "
                "batch >= 2, call model.eval() for inference, or build the model with KWConfig(norm='layer') "
                "or KWConfig(norm='none'), which can train on one sample."
            )
        pooled = x.flatten(2).mean(dim=-1)
        return F.relu(self.norm1(self.fc1(pooled)))

    def _alpha(self, hidden: torch.Tensor) -> torch.Tensor:
        alpha = _normalise(self._logits(hidden), self.function)
        if self.blend:
            tau = self.temperature
            alpha = (1 - tau) * alpha + tau * self.beta
        alpha = alpha[..., : self.n]
        if self.omni:  # mixture j = (s * GO + go) * GI + gi covers kernel position s
            spatial = torch.sigmoid(self.spatial_fc(hidden)).view(-1, self.spatial, 1, 1)
            alpha = (alpha.view(-1, self.spatial, self.m // self.spatial, self.n) * spatial).view(-1, self.m, self.n)
        return alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, *size] -> α [B, m, n] (zero-cell column dropped; KW*: times the spatial attention)."""
        return self._alpha(self._hidden(x))

    def forward_omni(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KW*: x [B, C_in, *size] -> (α [B, m, n], input-channel [B, C_in], output-channel [B, C_out] attentions)."""
        hidden = self._hidden(x)
        return self._alpha(hidden), torch.sigmoid(self.channel_fc(hidden)), torch.sigmoid(self.filter_fc(hidden))
