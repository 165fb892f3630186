"""Warehouse planning (docs/semantics.md §1, §4): cell shape, mixtures per layer, warehouse size and β.

Pure functions over static weight shapes, so plans can be checked against the authors'
fixtures without building a network.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ..config import KWConfig

__all__ = ["WeightShape", "LayerPlan", "WarehousePlan", "plan_warehouse", "PlanningError"]

#: β value of a mixture assigned to the zero cell e_z (column n of the attention).
ZERO_CELL = -1


class PlanningError(ValueError):
    """A warehouse whose layers cannot be cut into its cells, or whose cells cannot all be assigned."""


@dataclasses.dataclass(frozen=True)
class WeightShape:
    """The static weight of one layer: [out_channels, in_channels // groups, *kernel]."""

    out_channels: int
    in_per_group: int
    kernel: tuple[int, ...]
    name: str = "?"


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's share of a warehouse.

    grid:  (S, GO, GI): spatial cells, output-channel blocks, input-channel blocks; m = S*GO*GI.
    start: first warehouse cell of the layer's slice; consumed: cells in the slice.
    beta:  the cell each mixture is assigned at τ = 1 (ZERO_CELL for e_z), length m; a tuple of
           cells per mixture for KWConfig.init 'all_to_one', 'many_to_one' and 'none' (empty).
    """

    name: str
    grid: tuple[int, int, int]
    start: int
    consumed: int
    beta: tuple[int, ...]

    @property
    def m(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclasses.dataclass(frozen=True)
class WarehousePlan:
    """Cell shape [c_out, c_in, *cell_kernel], size n and the layers' slices, in member order."""

    name: str
    cell_out: int
    cell_in: int
    cell_kernel: tuple[int, ...]
    n: int
    layers: tuple[LayerPlan, ...]

    @property
    def cell_shape(self) -> tuple[int, ...]:
        return (self.cell_out, self.cell_in, *self.cell_kernel)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.cell_shape)

    @property
    def total_mixtures(self) -> int:
        return sum(layer.m for layer in self.layers)

    @property
    def consumed(self) -> int:
        return sum(layer.consumed for layer in self.layers)

    def check_complete(self) -> None:
        """Raise unless the β slices use every cell exactly once (docs/semantics.md §4)."""
        if self.consumed != self.n:
            layers = ", ".join(f"{p.name} (m={p.m}, {p.consumed} cells)" for p in self.layers)
            raise PlanningError(
                f"warehouse {self.name!r}: its {self.n} cells cannot be assigned one-to-one: the layers "
                f"{layers} take {self.consumed} cells in all (Σm = {self.total_mixtures}). Choose a budget "
                f"for which every layer's m is a multiple of k² (b = 1/k), a budget < 1 that is not 1/k "
                f"(the first n mixtures get the n cells), or an integer budget."
            )


def _beta_slice(m: int, start: int, n: int, config: KWConfig) -> tuple[tuple, int]:
    """β of one layer's mixtures and the number of cells its slice takes (docs/semantics.md §4, Table 13).

    An entry is a cell index (ZERO_CELL: the zero cell) or, for the strategies that give a mixture
    several cells or none, a tuple of cell indices.
    """
    b, init = config.budget, config.init
    if init == "many_to_one":
        per = config.cells_per_mixture
        return tuple(tuple(range(start + j * per, start + (j + 1) * per)) for j in range(m)), m * per
    if init == "one_to_many":
        k = config.mixtures_per_cell
        return tuple(start + j // k for j in range(m)), -(-m // k)
    if b >= 1:
        per = config.cells_per_mixture
        beta, taken = tuple(start + j * per for j in range(m)), m * per
    elif config.mixtures_per_cell is not None:  # b = 1/k: the authors' pattern
        k = config.mixtures_per_cell
        beta, taken = [], 0
        for j in range(m):
            if j % k == (j // k) % k:
                beta.append(start + taken)
                taken += 1
            else:
                beta.append(ZERO_CELL)
        beta = tuple(beta)
    else:  # any other b < 1: the first n mixtures of the warehouse get the n cells
        taken = max(min(m, n - start), 0)
        beta = tuple(start + j if j < taken else ZERO_CELL for j in range(m))
    if init == "all_to_one":
        beta = (tuple(range(n)),) * m
    elif init == "none":
        beta = ((),) * m
    return beta, taken


def plan_warehouse(name: str, shapes: Sequence[WeightShape], config: KWConfig) -> WarehousePlan:
    """Plan a warehouse shared by layers of the given static weight shapes, in member order.

    Raises PlanningError when a layer cannot be cut into the cell shape (a ratio that does not
    divide its channels, or kernels that differ without spatial partition).
    """
    if not shapes:
        raise PlanningError(f"warehouse {name!r} has no layers to plan")
    dims = {len(s.kernel) for s in shapes}
    if len(dims) != 1:
        raise PlanningError(
            f"warehouse {name!r}: layers of different dimensionality cannot share cells: "
            + ", ".join(f"{s.name} (kernel {s.kernel})" for s in shapes)
        )
    gcd_out = math.gcd(*(s.out_channels for s in shapes))
    gcd_in = math.gcd(*(s.in_per_group for s in shapes))
    cell_out = max(int(gcd_out * config.out_ratio), 1)
    cell_in = max(int(gcd_in * config.in_ratio), 1)
    if config.spatial_partition:
        cell_kernel = (1,) * dims.pop()
    else:
        kernels = {s.kernel for s in shapes}
        if len(kernels) != 1:
            raise PlanningError(
                f"warehouse {name!r}: without spatial partition every layer must have the same kernel; got "
                + ", ".join(f"{s.name} {s.kernel}" for s in shapes)
            )
        cell_kernel = kernels.pop()

    grids = []
    for s in shapes:
        if s.out_channels % cell_out or s.in_per_group % cell_in:
            raise PlanningError(
                f"warehouse {name!r}: layer {s.name} with weight [{s.out_channels}, {s.in_per_group}, "
                f"{', '.join(map(str, s.kernel))}] cannot be cut into cells of {cell_out} x {cell_in} channels "
                f"(gcd of the warehouse's out/in channels {gcd_out}/{gcd_in} times out_ratio "
                f"{config.out_ratio} / in_ratio {config.in_ratio}); pick ratios that divide the gcds"
            )
        spatial = math.prod(s.kernel) // math.prod(cell_kernel)
        grids.append((spatial, s.out_channels // cell_out, s.in_per_group // cell_in))

    total = sum(math.prod(g) for g in grids)
    n = max(int(config.budget * total), 1)
    layers, start = [], 0
    for s, grid in zip(shapes, grids):
        beta, taken = _beta_slice(math.prod(grid), start, n, config)
        layers.append(LayerPlan(s.name, grid, start, taken, beta))
        start += taken
    return WarehousePlan(name, cell_out, cell_in, cell_kernel, n, tuple(layers))
