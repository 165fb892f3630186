"""KW settings as data: one frozen dataclass per warehouse, with the paper's named presets."""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

__all__ = ["KWConfig", "NORMS", "ATTENTION_FUNCTIONS", "INIT_STRATEGIES", "PRESETS"]

#: Norm layers the attention MLP can use between fc1 and ReLU.
NORMS = ("batch", "layer", "none")
#: Attention functions: CAF (the paper's), and the alternatives of its Tables 8/10.
ATTENTION_FUNCTIONS = ("caf", "softmax", "sigmoid", "relu_l1")
#: β initialisations (Appendix A.2, Table 13): the paper's one-to-one assignment and the ablated alternatives.
INIT_STRATEGIES = ("one_to_one", "all_to_one", "none", "many_to_one", "one_to_many")

#: ε of the contrasting-driven attention function z / (Σ|z| + ε) (docs/semantics.md §3).
CAF_EPS = 1e-3
#: Smallest hidden width of the attention MLP: max(int(C_in * reduction), MIN_HIDDEN).
MIN_HIDDEN = 16
#: Smallest number of non-local basis logits: max(int(NL * ratio), MIN_NONLOCAL_BASIS).
MIN_NONLOCAL_BASIS = 16
#: How close 1/b must be to an integer k for a budget b < 1 to count as 1/k.
RECIPROCAL_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class KWConfig:
    """Settings of one KernelWarehouse warehouse and the attention of its layers.

    budget:       b, the convolutional parameter budget; n = max(int(b * Σm), 1). An integer ≥ 1 or
                  any 0 < b < 1. b = 1/k keeps the authors' β pattern (docs/semantics.md §4); any other b < 1
                  gets the paper's rule (Appendix A.2): the first n mixtures of the warehouse, in
                  member order, one fresh cell each, the rest the zero cell.
    in_ratio, out_ratio: cell sides relative to the greatest common divisor of the layers'
                  input / output channels (the paper's b < 1 presets use 0.5).
    spatial_partition: cells of kernel 1 (True, every preset) or the layers' common kernel.
    reduction:    hidden width of the attention MLP = max(int(C_in * reduction), 16).
    norm:         'batch' (BatchNorm1d, the paper's), 'layer' (LayerNorm, ConvNeXt) or 'none'.
    attention:    'caf' (default) or one of the paper's ablated alternatives.
    nonlocal_basis_ratio: < 1 enables the non-local basis attention (ResNet50 1/2x uses 1/16).
    init:         β initialisation (Table 13): 'one_to_one' (the paper's); 'all_to_one' (every cell
                  to every mixture, β = 1 everywhere); 'none' (no β, τ ignored); 'many_to_one'
                  (b ≥ 2 integer: mixture j gets b fresh cells); 'one_to_many' (b = 1/k: k
                  consecutive mixtures share one cell, no zero cell).
    omni:         KW* (Table 17): the attention also computes ODConv's input-channel, output-channel
                  and spatial attentions (sigmoid heads on the same hidden features) besides the
                  attention over cells; needs spatial_partition.
    """

    budget: float = 1.0
    in_ratio: float = 1.0
    out_ratio: float = 1.0
    spatial_partition: bool = True
    reduction: float = 1 / 16
    norm: str = "batch"
    attention: str = "caf"
    nonlocal_basis_ratio: float = 1.0
    init: str = "one_to_one"
    omni: bool = False

    def __post_init__(self):
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float, Fraction)) or not math.isfinite(b) or b <= 0:
            raise ValueError(f"KWConfig.budget: expected a positive number (an integer >= 1 or 0 < b < 1), got {b!r}")
        if b >= 1 and b != int(b):
            raise ValueError(f"KWConfig.budget: a budget >= 1 must be an integer (1, 2, 4, ...), got {b!r}")
        for field in ("in_ratio", "out_ratio", "reduction", "nonlocal_basis_ratio"):
            value = getattr(self, field)
            if not isinstance(value, (int, float, Fraction)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"KWConfig.{field}: expected a positive number, got {value!r}")
        if self.norm not in NORMS:
            raise ValueError(f"KWConfig.norm: expected one of {NORMS}, got {self.norm!r}")
        if self.attention not in ATTENTION_FUNCTIONS:
            raise ValueError(f"KWConfig.attention: expected one of {ATTENTION_FUNCTIONS}, got {self.attention!r}")
        if self.omni and not self.spatial_partition:
            raise ValueError("KWConfig.omni (KW*) folds its spatial attention into the attention of the kernel's "
                             "spatial cells: it needs spatial_partition=True")
        if self.init not in INIT_STRATEGIES:
            raise ValueError(f"KWConfig.init: expected one of {INIT_STRATEGIES}, got {self.init!r}")
        if self.init == "many_to_one" and (b < 2 or b != int(b)):
            raise ValueError(f"KWConfig.init='many_to_one' hands b cells to each mixture: it needs an integer "
                             f"budget >= 2, got {b!r}")
        if self.init == "one_to_many" and self.mixtures_per_cell is None:
            raise ValueError(f"KWConfig.init='one_to_many' shares one cell among k mixtures: it needs a budget "
                             f"1/k (1/2, 1/4, ...), got {b!r}")

    @property
    def cells_per_mixture(self) -> int:
        """int(b) for b ≥ 1: cells handed to each mixture by the β initialisation."""
        return int(self.budget)

    @property
    def mixtures_per_cell(self) -> int | None:
        """k for b = 1/k (k ≥ 2): one mixture in k gets a fresh cell, the others the zero cell; else None."""
        if self.budget >= 1 or abs(1 / self.budget - round(1 / self.budget)) > RECIPROCAL_TOLERANCE:
            return None
        return round(1 / self.budget)

    def replace(self, **changes) -> KWConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **changes) -> KWConfig:
        """The paper's named budgets: 'kw1d4x', 'kw1d2x', 'kw1x', 'kw2x', 'kw4x'."""
        if name not in PRESETS:
            raise ValueError(f"KWConfig.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **changes)


PRESETS = {
    "kw1d4x": KWConfig(budget=0.25, in_ratio=0.5, out_ratio=0.5),
    "kw1d2x": KWConfig(budget=0.5, in_ratio=0.5, out_ratio=0.5),
    "kw1x": KWConfig(budget=1),
    "kw2x": KWConfig(budget=2),
    "kw4x": KWConfig(budget=4),
}
