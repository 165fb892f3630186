"""Warehouse planning (docs/semantics.md §1, §4) on hand-planned layers: cell shapes, m, n, β and refusals."""
import pytest
import torch.nn as nn

import kw_ops
from kw_ops import KWConfig, PlanningError
from kw_ops.nn.planning import ZERO_CELL, WeightShape, plan_warehouse

# A small stage: 64->64 3x3, 64->128 3x3, 128->128 1x1 (gcd out 64, in 64).
STAGE = [WeightShape(64, 64, (3, 3), "a"), WeightShape(128, 64, (3, 3), "b"), WeightShape(128, 128, (1, 1), "c")]


def test_cells_and_mixtures_at_1x():
    plan = plan_warehouse("s", STAGE, KWConfig())
    assert plan.cell_shape == (64, 64, 1, 1)
    assert [p.grid for p in plan.layers] == [(9, 1, 1), (9, 2, 1), (1, 2, 2)]
    assert [p.m for p in plan.layers] == [9, 18, 4]
    assert plan.n == 31  # b * Σm, the static kernels' weights exactly
    assert plan.n * 64 * 64 == 64 * 64 * 9 + 128 * 64 * 9 + 128 * 128
    assert [p.beta for p in plan.layers][0] == tuple(range(9))
    plan.check_complete()


@pytest.mark.parametrize("budget, n", [(2, 62), (4, 124)])
def test_integer_budget_gives_strided_beta(budget, n):
    plan = plan_warehouse("s", STAGE, KWConfig(budget=budget))
    assert plan.n == n
    first, second, _ = plan.layers
    assert first.beta == tuple(range(0, 9 * budget, budget))
    assert second.start == 9 * budget and second.beta[1] == 9 * budget + budget
    assert plan.consumed == n


def test_half_budget_with_halved_cells():
    plan = plan_warehouse("s", STAGE, KWConfig.preset("kw1d2x"))
    assert plan.cell_shape == (32, 32, 1, 1)
    assert [p.m for p in plan.layers] == [36, 72, 16]
    assert plan.n == 62
    # j % 2 == (j // 2) % 2 gets a fresh cell: 0, 3, 4, 7, 8, ...
    assert plan.layers[0].beta[:8] == (0, ZERO_CELL, ZERO_CELL, 1, 2, ZERO_CELL, ZERO_CELL, 3)
    assert [p.consumed for p in plan.layers] == [18, 36, 8] and [p.start for p in plan.layers] == [0, 18, 54]
    assert plan.layers[1].beta[:4] == (18, ZERO_CELL, ZERO_CELL, 19)
    plan.check_complete()


def test_in_and_out_ratios_cut_their_own_sides():
    plan = plan_warehouse("s", STAGE, KWConfig(in_ratio=0.5, out_ratio=0.25))
    assert plan.cell_shape == (16, 32, 1, 1)  # out: gcd 64 x 0.25, in: gcd 64 x 0.5
    assert [p.grid for p in plan.layers] == [(9, 4, 2), (9, 8, 2), (1, 8, 4)]


def test_quarter_budget():
    plan = plan_warehouse("s", STAGE, KWConfig.preset("kw1d4x"))
    assert plan.n == int(0.25 * (36 + 72 + 16))
    beta = plan.layers[0].beta
    assigned = [j for j, cell in enumerate(beta) if cell != ZERO_CELL]
    assert assigned == [j for j in range(36) if j % 4 == (j // 4) % 4]
    plan.check_complete()



def test_fractional_budget_times_mixtures_rounds_down():
    # One 1-D layer, kernel 3, cells 4x4x1: m = 3; b = 1/2 gives b·Σm = 1.5, so n = int(1.5) = 1 (not 2).
    # β for k = 2: mixture j gets a cell iff j % 2 == (j // 2) % 2: j = 0 only, so the one cell is used once.
    plan = plan_warehouse("odd", [WeightShape(4, 4, (3,), "x")], KWConfig(budget=0.5))
    assert plan.shape == (1, 4, 4, 1) and plan.layers[0].beta == (0, ZERO_CELL, ZERO_CELL)
    plan.check_complete()
    # One 3x3 layer, m = 9, at b = 1/4: b·Σm = 2.25 -> n = 2; β takes j = 0 and 5 (j % 4 == (j // 4) % 4).
    plan = plan_warehouse("nine", [WeightShape(4, 4, (3, 3), "y")], KWConfig(budget=0.25))
    assert plan.n == 2 and [j for j, c in enumerate(plan.layers[0].beta) if c != ZERO_CELL] == [0, 5]
    plan.check_complete()
    layer = kw_ops.KWConv1d(4, 4, 3, warehouse=KWConfig(budget=0.5))
    assert tuple(layer.warehouse.cells.shape) == (1, 4, 4, 1)

def test_incomplete_budget_is_refused_with_the_numbers():
    shapes = [WeightShape(3, 1, (3,), "x"), WeightShape(3, 1, (3,), "y")]  # m = 3 each, b = 1/2
    plan = plan_warehouse("tiny", shapes, KWConfig(budget=0.5))
    with pytest.raises(PlanningError, match=r"warehouse 'tiny'.*x \(m=3, 1 cells\).*Σm = 6"):
        plan.check_complete()


def test_ratio_that_does_not_divide_is_refused():
    with pytest.raises(PlanningError, match=r"warehouse 's': layer a .* cannot be cut into cells of 19 x 64"):
        plan_warehouse("s", STAGE, KWConfig(out_ratio=0.3))


def test_without_spatial_partition_kernels_must_agree():
    with pytest.raises(PlanningError, match="same kernel"):
        plan_warehouse("s", STAGE, KWConfig(spatial_partition=False))
    plan = plan_warehouse("s", STAGE[:2], KWConfig(spatial_partition=False))
    assert plan.cell_shape == (64, 64, 3, 3) and [p.m for p in plan.layers] == [1, 2]


@pytest.mark.parametrize("budget", [0, -1, 1.5, float("nan"), True])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(ValueError, match="KWConfig.budget"):
        KWConfig(budget=budget)


def test_bad_config_fields_are_refused():
    with pytest.raises(ValueError, match="KWConfig.norm"):
        KWConfig(norm="group")
    with pytest.raises(ValueError, match="KWConfig.in_ratio"):
        KWConfig(in_ratio=0)
    with pytest.raises(ValueError, match="unknown preset"):
        KWConfig.preset("kw3x")


def _stage_net():
    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 128, 3), nn.Conv2d(128, 128, 1))


@pytest.mark.parametrize("preset", ["kw1d4x", "kw1d2x", "kw1x", "kw2x", "kw4x"])
def test_parameter_count_of_a_converted_stage_by_hand(preset):
    config = KWConfig.preset(preset)
    net = kw_ops.convert(_stage_net(), config, sharing=lambda name, m: None if name == "0" else "stage")
    (warehouse,) = kw_ops.warehouses(net)
    side = 64 if config.budget >= 1 else 32
    mixtures = (9 + 18 + 4) * (64 // side) ** 2
    n = int(config.budget * mixtures)
    assert tuple(warehouse.cells.shape) == (n, side, side, 1, 1)
    # attention per layer: fc1 C_in x 16 (no bias), BN 2*16, fc2 16 x m(n+1) + m(n+1)
    attention = sum(c_in * 16 + 32 + 17 * m * (n + 1)
                    for c_in, m in ((64, 9 * mixtures // 31), (64, 18 * mixtures // 31), (128, 4 * mixtures // 31)))
    biases = 64 + 128 + 128
    stem = 64 * 3 * 9 + 64
    assert kw_ops.count_parameters(net) == n * side * side + attention + biases + stem
