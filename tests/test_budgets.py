"""Any budget 0 < b < 1 (Appendix A.2's rule), per-warehouse budgets, and Table 13's β initialisations."""
import pytest
import torch
import torch.nn as nn

from oracle import kw_conv_loop

import kw_ops
from kw_ops import KWConfig, PlanningError
from kw_ops.nn.planning import ZERO_CELL, WeightShape, plan_warehouse

# 16->16 3x3 (m = 9) and 16->16 1x1 (m = 1) at cells 16x16: Σm = 10.
STAGE = [WeightShape(16, 16, (3, 3), "a"), WeightShape(16, 16, (1, 1), "b")]


def test_three_quarters_gives_the_first_n_mixtures_one_cell_each():
    plan = plan_warehouse("s", STAGE, KWConfig(budget=0.75))
    assert plan.n == 7  # int(0.75 * 10)
    assert plan.layers[0].beta == (0, 1, 2, 3, 4, 5, 6, ZERO_CELL, ZERO_CELL)
    assert plan.layers[1].beta == (ZERO_CELL,) and plan.layers[1].consumed == 0
    plan.check_complete()


Z = ZERO_CELL
# 16->16 1x1 (m = 1), 16->32 1x1 (GO = 2: m = 2), 16->16 3x3 (m = 9) at cells 16x16: Σm = 12.
THREE = [WeightShape(16, 16, (1, 1), "a"), WeightShape(32, 16, (1, 1), "b"), WeightShape(16, 16, (3, 3), "c")]


@pytest.mark.parametrize("budget, n, betas, starts", [
    (0.75, 9, ((0,), (1, 2), (3, 4, 5, 6, 7, 8, Z, Z, Z)), (0, 1, 3)),  # the third layer takes the last 6 cells
    (0.6, 7, ((0,), (1, 2), (3, 4, 5, 6, Z, Z, Z, Z, Z)), (0, 1, 3)),
    (0.3, 3, ((0,), (1, 2), (Z,) * 9), (0, 1, 3)),  # none left for the third
    (0.15, 1, ((0,), (Z, Z), (Z,) * 9), (0, 1, 1)),  # none left for the second
])
def test_budget_below_one_not_one_over_k_hands_later_layers_the_cells_left(budget, n, betas, starts):
    """b < 1 not 1/k: the first n mixtures of the warehouse, in layer order, get cells 0..n-1; a later layer's
    slice starts where the earlier ones ended and takes what is left (maybe none)."""
    plan = plan_warehouse("s", THREE, KWConfig(budget=budget))
    assert plan.n == n
    assert tuple(p.beta for p in plan.layers) == betas
    assert tuple(p.start for p in plan.layers) == starts
    assert [p.consumed for p in plan.layers] == [sum(c != Z for c in beta) for beta in betas]
    plan.check_complete()


@pytest.mark.parametrize("budget, shapes, betas", [
    # 1/2: 16->16 2x2 (m = 4), 16->32 2x2 (m = 8), 32->32 1x1 (GO = GI = 2, m = 4); n = 8
    (0.5, [WeightShape(16, 16, (2, 2), "a"), WeightShape(32, 16, (2, 2), "b"), WeightShape(32, 32, (1, 1), "c")],
     ((0, Z, Z, 1), (2, Z, Z, 3, 4, Z, Z, 5), (6, Z, Z, 7))),
    # 1/4: 16->16 4x4 (m = 16), 32->32 2x2 (m = 16); n = 8: j = 0, 5, 10, 15 of each layer
    (0.25, [WeightShape(16, 16, (4, 4), "a"), WeightShape(32, 32, (2, 2), "b")],
     tuple(tuple(start + j // 5 if j % 5 == 0 else Z for j in range(16)) for start in (0, 4))),
    # 1/2 after a layer whose m (2) is not a multiple of k² = 4: j counts within each layer, n = int(6 / 2) = 3
    (0.5, [WeightShape(32, 16, (1, 1), "a"), WeightShape(16, 16, (2, 2), "b")], ((0, Z), (1, Z, Z, 2))),
])
def test_one_over_k_pattern_restarts_in_every_layer_of_a_warehouse(budget, shapes, betas):
    """b = 1/k: mixture j of each layer (j from 0 in every layer) gets the next cell iff j % k == (j // k) % k."""
    plan = plan_warehouse("s", shapes, KWConfig(budget=budget))
    assert tuple(p.beta for p in plan.layers) == betas
    plan.check_complete()


def test_one_to_many_later_layers_share_their_own_cells():
    """init 'one_to_many' at b = 1/2: k = 2 consecutive mixtures share a cell; the second layer starts after the
    first one's cells. 16->16 2x2 (m = 4) then 16->32 1x1 (m = 2): n = 3."""
    shapes = [WeightShape(16, 16, (2, 2), "a"), WeightShape(32, 16, (1, 1), "b")]
    plan = plan_warehouse("s", shapes, KWConfig(budget=0.5, init="one_to_many"))
    assert plan.n == 3 and [p.beta for p in plan.layers] == [(0, 0, 1, 1), (2, 2)]
    plan.check_complete()


def test_one_over_k_keeps_the_authors_pattern():
    plan = plan_warehouse("s", [WeightShape(16, 16, (4, 4), "a")], KWConfig(budget=0.5))
    assert plan.layers[0].beta[:4] == (0, ZERO_CELL, ZERO_CELL, 1)  # j % 2 == (j // 2) % 2


@pytest.mark.parametrize("budget", [0.75, 0.3, 0.9])
def test_any_budget_below_one_trains_and_is_the_tiled_conv_at_tau_one(budget):
    conv = kw_ops.KWConv2d(16, 16, 3, padding=1, warehouse=KWConfig(budget=budget))
    conv.attention.temperature.fill_(1.0)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    conv.double()
    cells, weight = conv.warehouse.cells, torch.zeros(16, 16, 3, 3, dtype=torch.float64)
    for j, cell in enumerate(conv.layer_plan.beta):  # grid (9, 1, 1): mixture j is spatial position j
        if cell != ZERO_CELL:
            weight[:, :, j // 3, j % 3] = cells[cell, :, :, 0, 0]
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, weight, conv.bias, padding=1))
    conv(x).sum().backward()
    assert conv.warehouse.cells.grad is not None


def test_per_warehouse_budgets_in_one_model():
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    kw_ops.convert(net, KWConfig(), sharing=lambda name, m: f"w{name}", overrides={"w1": {"budget": 0.75}})
    assert [w.plan.n for w in kw_ops.warehouses(net)] == [9, 6]


@pytest.mark.parametrize("init, budget, rows", [
    ("all_to_one", 1, 4), ("none", 1, 0), ("many_to_one", 4, 4), ("one_to_many", 0.5, 1)])
def test_table13_initialisations(init, budget, rows):
    conv = kw_ops.KWConv2d(8, 8, 2, warehouse=KWConfig(budget=budget, init=init))
    n = conv.warehouse.plan.n
    assert conv.attention.beta[:, :n].sum(dim=1).tolist() == [rows] * conv.m
    if init == "one_to_many":
        assert conv.layer_plan.beta == (0, 0, 1, 1)
    conv.attention.temperature.fill_(1.0)
    conv(torch.randn(2, 8, 5, 5)).sum().backward()


def test_no_initialisation_ignores_the_temperature():
    conv = kw_ops.KWConv2d(8, 8, 3, warehouse=KWConfig(init="none")).eval()
    x = torch.randn(2, 8, 5, 5)
    y = conv(x)
    conv.attention.temperature.fill_(1.0)
    torch.testing.assert_close(conv(x), y)


@pytest.mark.parametrize("changes, message", [
    ({"init": "many_to_one", "budget": 1}, "integer budget >= 2"),
    ({"init": "one_to_many", "budget": 0.75}, "budget 1/k"),
    ({"init": "diagonal"}, "KWConfig.init"),
])
def test_bad_initialisations_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        KWConfig(**changes)


def test_one_to_many_that_cannot_share_evenly_is_refused():
    conv = kw_ops.KWConv2d(8, 8, 3, warehouse=KWConfig(budget=0.5, init="one_to_many"))  # m = 9: 5 cells, n = 4
    with pytest.raises(PlanningError, match="cannot be assigned one-to-one"):
        conv(torch.randn(2, 8, 5, 5))


def test_kw_star_scales_inputs_spatial_cells_and_outputs():
    conv = kw_ops.KWConv2d(6, 4, 3, padding=1, bias=False, warehouse=KWConfig(budget=2, omni=True)).double().eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    alpha, channel, filter_ = conv.attention.forward_omni(x)
    assert alpha.shape == (2, 9, conv.warehouse.plan.n) and channel.shape == (2, 6) and filter_.shape == (2, 4)
    hidden = conv.attention._hidden(x)
    conv.attention.omni = False  # α of one-dimensional KW, to check the spatial attention scales its rows
    plain = conv.attention._alpha(hidden)
    conv.attention.omni = True
    spatial = torch.sigmoid(conv.attention.spatial_fc(hidden))  # grid (9, 1, 1): mixture j is position j
    torch.testing.assert_close(alpha, plain * spatial[:, :, None])
    expected = kw_conv_loop(x * channel[:, :, None, None], alpha, conv.warehouse.cells, None, 4, (3, 3), (1, 1),
                            (1, 1), (1, 1), 1) * filter_[:, :, None, None]
    torch.testing.assert_close(conv(x), expected)


def test_kw_star_needs_spatial_partition():
    with pytest.raises(ValueError, match="spatial_partition"):
        KWConfig(omni=True, spatial_partition=False)


def test_all_to_one_gives_every_mixture_of_every_layer_all_cells():
    """Table 13 'all_to_one' in a shared warehouse: the second layer's mixtures also get all n cells, not only
    the cells of its own slice. 4->4 1x1 (m = 1) and 4->8 1x1 (m = 2) at cells 4x4: n = 3."""
    shapes = [WeightShape(4, 4, (1, 1), "a"), WeightShape(8, 4, (1, 1), "b")]
    plan = plan_warehouse("s", shapes, KWConfig(budget=1, init="all_to_one"))
    assert plan.n == 3
    assert plan.layers[0].beta == ((0, 1, 2),)
    assert plan.layers[1].beta == ((0, 1, 2), (0, 1, 2))
    assert [p.consumed for p in plan.layers] == [1, 2]


def test_kw_star_spatial_attention_scales_the_mixtures_of_each_kernel_position():
    """Mixture j = (s * GO + go) * GI + gi covers kernel position s: with GO = 2 (6 -> 8 sharing cells of 4
    output channels with a 6 -> 4 layer), mixtures 2s and 2s + 1 are both scaled by spatial attention s."""
    warehouse = kw_ops.Warehouse("w", KWConfig(budget=1, omni=True))
    with warehouse.planning_deferred():
        kw_ops.KWConv2d(6, 4, 3, padding=1, warehouse=warehouse)
        conv = kw_ops.KWConv2d(6, 8, 3, padding=1, warehouse=warehouse)
    conv = conv.double().eval()
    assert conv.layer_plan.grid == (9, 2, 1)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    hidden = conv.attention._hidden(x)
    alpha = conv.attention._alpha(hidden)
    conv.attention.omni = False
    plain = conv.attention._alpha(hidden)
    conv.attention.omni = True
    spatial = torch.sigmoid(conv.attention.spatial_fc(hidden))
    assert spatial.shape == (2, 9)
    for j in range(18):
        torch.testing.assert_close(alpha[:, j], plain[:, j] * spatial[:, j // 2, None])


@pytest.mark.parametrize("budget, k", [(1 / 93, 93), (0.25 + 1e-12, 4), (0.5 - 1e-12, 2)])
def test_reciprocal_budget_k_is_the_nearest_integer(budget, k):
    """1 / (1/93) is 92.99999999999999 in floats; a budget a rounding error off 1/k still means k."""
    assert KWConfig(budget=budget).mixtures_per_cell == k


def test_many_to_one_hands_each_mixture_its_own_b_cells():
    # 16->16 3x3 (m = 9) and 16->16 1x1 (m = 1) at b = 2: n = 20; mixture j of the first layer gets 2j, 2j + 1
    plan = plan_warehouse("s", STAGE, KWConfig(budget=2, init="many_to_one"))
    assert plan.n == 20
    assert plan.layers[0].beta == tuple((2 * j, 2 * j + 1) for j in range(9))
    assert plan.layers[1].beta == ((18, 19),) and [p.consumed for p in plan.layers] == [18, 2]
