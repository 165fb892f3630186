"""KW layers against float64 loop references; torch-layer behaviour; clear errors."""
import copy
import io
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from deferred_init import deferred_init
from oracle import caf, kw_conv_loop, relu_l1

import kw_ops
from kw_ops import KWConfig, KWConv1d, KWConv2d, KWConv3d, KWLinear, Warehouse
from kw_ops.nn.planning import ZERO_CELL

DT = torch.float64

CASES = {
    # id: (layer class, in, out, kernel, kwargs, input spatial size)
    "1d-k3-s2": (KWConv1d, 6, 4, 3, dict(stride=2, padding=1), (9,)),
    "2d-k3-pad-dil": (KWConv2d, 6, 4, 3, dict(padding=(2, 1), dilation=(2, 1)), (7, 6)),
    "2d-k1-s2-nobias": (KWConv2d, 8, 6, 1, dict(stride=2, bias=False), (5, 5)),
    "2d-groups2": (KWConv2d, 6, 4, 3, dict(groups=2, padding=1), (5, 4)),
    "2d-depthwise": (KWConv2d, 6, 6, 3, dict(groups=6, padding=1, stride=2), (6, 5)),
    "2d-same-even-k": (KWConv2d, 5, 3, (2, 3), dict(padding="same"), (5, 6)),
    "2d-valid-prime": (KWConv2d, 7, 5, 3, dict(padding="valid"), (5, 7)),
    "3d-k3": (KWConv3d, 4, 6, 3, dict(padding=1, stride=(1, 2, 1)), (3, 4, 3)),
}


def _layer(case, config=None, **extra):
    cls, cin, cout, k, kwargs, size = CASES[case]
    layer = cls(cin, cout, k, **kwargs, warehouse=Warehouse("w", config or KWConfig()), dtype=DT, **extra)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    return layer, torch.randn(3, cin, *size, dtype=DT)


def _static_padding(layer, x):
    """The input padded as the layer pads it, and the int padding left for the conv."""
    if layer._pre_pad is not None:
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, layer._pre_pad, mode=mode), layer._conv_padding
    return x, layer._conv_padding


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("preset", ["kw1x", "kw4x", "kw1d2x"])
def test_layer_matches_float64_loop(case, preset):
    try:
        layer, x = _layer(case, KWConfig.preset(preset))
        layer.warehouse.check_complete()
    except kw_ops.PlanningError as error:  # odd channels cannot be halved, or β cannot be one-to-one
        cls, cin, cout, k, kwargs, size = CASES[case]
        assert preset == "kw1d2x" and (cin % 2 or cout % 2 or cin // kwargs.get("groups", 1) % 2), error
        return
    layer.eval()
    kw_ops.set_temperature(layer, 0.3)
    attn = layer.attention(x)
    padded, padding = _static_padding(layer, x)
    expected = kw_conv_loop(padded, attn, layer.warehouse.cells, layer.bias, layer.out_channels, layer.kernel_size,
                            layer.stride, padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("formulation", ["grouped", "gemm"])
@pytest.mark.parametrize("spatial_partition", [True, False])
def test_op_formulations_match_loop(formulation, spatial_partition):
    x = torch.randn(3, 6, 7, 5, dtype=DT).to(memory_format=torch.channels_last)
    cell = (1, 1) if spatial_partition else (3, 3)
    warehouse = torch.randn(5, 2, 3, *cell, dtype=DT)
    m = (9 if spatial_partition else 1) * 4 * 2
    attn = torch.randn(3, m, 5, dtype=DT)
    bias = torch.randn(8, dtype=DT)
    y = kw_ops.ops.kw_conv(x, attn, warehouse, bias, out_channels=8, kernel_size=3, stride=(2, 1), padding=1,
                           dilation=(1, 2), formulation=formulation, backend="torch")
    expected = kw_conv_loop(x, attn, warehouse, bias, 8, (3, 3), (2, 1), (1, 1), (1, 2), 1)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_attention_is_caf_then_temperature_blend():
    layer, x = _layer("2d-groups2")
    layer.eval()
    kw_ops.set_temperature(layer, 0.25)
    att = layer.attention
    hidden = F.relu(att.norm1(att.fc1(x.mean(dim=(2, 3)))))
    z = att.fc2(hidden).view(3, layer.m, -1)
    n = layer.warehouse.cells.shape[0]
    beta = torch.zeros(layer.m, n + 1, dtype=DT)
    for j, cell in enumerate(layer.layer_plan.beta):
        beta[j, n if cell == ZERO_CELL else cell] = 1
    expected = (0.75 * caf(z) + 0.25 * beta)[..., :n]
    torch.testing.assert_close(att(x), expected)


@pytest.mark.parametrize("function", ["softmax", "sigmoid", "relu_l1"])
def test_alternative_attention_functions(function):
    layer, x = _layer("2d-groups2", KWConfig(attention=function))  # m = n = 9
    layer.eval()
    att = layer.attention
    z = att.fc2(F.relu(att.norm1(att.fc1(x.mean(dim=(2, 3)))))).view(3, layer.m, -1)
    expected = {"softmax": z.softmax(-1), "sigmoid": z.sigmoid(), "relu_l1": relu_l1(z)}[function][..., :-1]
    assert (expected > 0.01).any() and (function != "relu_l1" or (expected == 0).any())  # the clamp matters
    torch.testing.assert_close(att(x), expected)


def test_nonlocal_basis_rebuilds_rows_around_the_layer_slice():
    wh = Warehouse("w", KWConfig(budget=0.5, nonlocal_basis_ratio=1 / 16))
    with wh.planning_deferred():
        first = KWConv2d(8, 8, 3, padding=1, warehouse=wh, dtype=DT)
        layer = KWConv2d(8, 8, 3, padding=1, warehouse=wh, dtype=DT)
    att = layer.attention
    with torch.no_grad():
        att.basis_bias.normal_()
    layer.eval()
    x = torch.randn(2, 8, 4, 4, dtype=DT)
    n, m, own = wh.cells.shape[0], layer.m, att.num_local
    assert (n, m, own, att.num_basis, layer.layer_plan.start) == (9, 9, 4, 16, first.layer_plan.consumed)
    z = att.fc2(F.relu(att.norm1(att.fc1(x.mean(dim=(2, 3)))))).view(2 * m, -1)
    start = layer.layer_plan.start
    nonlocal_ = att.fc3(z[:, own:-1])
    rows = torch.cat([nonlocal_[:, :start], z[:, :own], nonlocal_[:, start:], z[:, -1:]], 1).view(2, m, n + 1)
    rows = rows + att.basis_bias.view(m, n + 1)
    torch.testing.assert_close(att(x), caf(rows)[..., :n])


def test_nonlocal_basis_own_logits_round_down():
    """The layer's own logits are int(b * m): 8 -> 8 with a 7-tap 1-D kernel (m = 7) at b = 1/2 has 3, not 4; the
    basis has the minimum 16; fc2 gives (3 + 16 + 1) logits per mixture."""
    layer = KWConv1d(8, 8, 7, warehouse=KWConfig(budget=0.5, nonlocal_basis_ratio=1 / 16))
    assert (layer.m, layer.attention.num_local, layer.attention.num_basis) == (7, 3, 16)
    assert layer.attention.fc2.out_features == (3 + 16 + 1) * 7


@pytest.mark.parametrize("config", [KWConfig.preset(p) for p in ("kw1x", "kw2x", "kw4x", "kw1d2x")]
                         + [KWConfig(budget=0.75), KWConfig(budget=0.4)],  # n = 20 / 10: the second layer's cells
                         ids=["kw1x", "kw2x", "kw4x", "kw1d2x", "b0.75", "b0.4"])  # start at 9, 11 / 1 of 18 given
def test_temperature_one_is_the_static_conv_of_the_assigned_cells(config):
    wh = Warehouse("w", config)
    with wh.planning_deferred():
        layers = [KWConv2d(8, 8, 3, padding=1, bias=False, warehouse=wh, dtype=DT),
                  KWConv2d(8, 16, 3, stride=2, bias=False, warehouse=wh, dtype=DT)]
    cells = wh.cells
    for layer in layers:
        kw_ops.set_temperature(layer, 1.0)
        layer.eval()
        c_out, c_in = cells.shape[1:3]
        s_count, go_count, gi_count = layer.grid
        weight = torch.zeros(layer.out_channels, layer.in_channels, 3, 3, dtype=DT)
        for j, cell in enumerate(layer.layer_plan.beta):
            s, rest = divmod(j, go_count * gi_count)
            go, gi = divmod(rest, gi_count)
            if cell != ZERO_CELL:
                weight[go * c_out:(go + 1) * c_out, gi * c_in:(gi + 1) * c_in, s // 3, s % 3] = cells[cell, :, :, 0, 0]
        assert weight.abs().sum() > 0  # the layer's own slice was initialised (a later layer's too)
        x = torch.randn(2, 8, 6, 6, dtype=DT)
        expected = F.conv2d(x, weight, None, layer.stride, layer._conv_padding)
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_layer_with_bias_under_cpu_autocast_runs_in_bf16(training):
    """Under torch.autocast('cpu', bfloat16) a KW layer with a bias computes in bf16 (x, attention, cells and
    bias cast), near its float32 result; parameters keep float32 gradients."""
    layer = KWConv2d(8, 8, 3, padding=1, warehouse=KWConfig()).train(training)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 8, 6, 6)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=5e-2 * expected.abs().max().item(), rtol=5e-2)
    y.float().sum().backward()
    assert layer.bias.grad.dtype == layer.warehouse.cells.grad.dtype == torch.float32


def test_kwlinear_is_a_kernel_1_conv_over_tokens():
    layer = KWLinear(6, 5, warehouse=KWConfig(budget=2), dtype=DT).eval()
    x = torch.randn(2, 4, 3, 6, dtype=DT)
    tokens = x.reshape(2, -1, 6).transpose(1, 2)
    attn = layer.attention(tokens)
    expected = kw_conv_loop(tokens, attn, layer.warehouse.cells, layer.bias, 5, (1,), (1,), (0,), (1,), 1)
    torch.testing.assert_close(layer(x), expected.transpose(1, 2).reshape(2, 4, 3, 5))
    assert layer(torch.randn(3, 6, dtype=DT)).shape == (3, 5)



def test_kwlinear_takes_empty_and_unbatched_inputs_like_nn_linear():
    layer = KWLinear(6, 5, warehouse=KWConfig(budget=2), dtype=DT).eval()
    x = torch.randn(3, 4, 6, dtype=DT)
    assert layer(x[:0]).shape == (0, 4, 5) and layer(x[:0, 0]).shape == (0, 5)
    torch.testing.assert_close(layer(x[1, 2]), layer(x[1:2, 2])[0])  # unbatched [in_features] = a batch of one
    assert layer(x[1, 2]).shape == (5,)
    empty = x[:0].requires_grad_()
    layer.train()(empty).sum().backward()
    assert empty.grad.shape == (0, 4, 6)
    with pytest.raises(ValueError, match=r"KWLinear: expected input \[B, \.\.\., 6\] or \[6\], got \(\)"):
        layer(torch.tensor(1.0, dtype=DT))

def test_padding_modes_like_nn_conv2d():
    for mode in ("reflect", "replicate", "circular"):
        layer = KWConv2d(4, 4, 3, padding=1, padding_mode=mode, bias=False, dtype=DT).eval()
        kw_ops.set_temperature(layer, 1.0)  # = the static conv of its cells (b = 1, one warehouse)
        cells = layer.warehouse.cells[:, :, :, 0, 0]  # [9, 4, 4], s-major
        static = nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode, bias=False, dtype=DT)
        with torch.no_grad():
            static.weight.copy_(cells.permute(1, 2, 0).reshape(4, 4, 3, 3))
        x = torch.randn(2, 4, 5, 6, dtype=DT)
        torch.testing.assert_close(layer(x), static(x))


def test_batch_sizes_zero_one_and_unbatched():
    layer, x = _layer("2d-groups2")
    layer.eval()
    assert layer(x[:0]).shape == (0, 4, 5, 4)
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1])
    torch.testing.assert_close(layer(x[0]), layer(x)[0])


def test_channels_last_input_and_module():
    layer, x = _layer("2d-k3-pad-dil")
    layer.eval()
    expected = layer(x)
    layer.to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), expected)


def test_gradcheck_through_layer():
    layer = KWConv2d(4, 4, 3, stride=2, padding=1, groups=2, warehouse=KWConfig(budget=2), dtype=DT).eval()
    kw_ops.set_temperature(layer, 0.4)
    x = torch.randn(2, 4, 5, 5, dtype=DT, requires_grad=True)
    params = (layer.warehouse.cells, layer.attention.fc2.weight, layer.bias)

    def run(x, cells, fc2, bias):
        with torch.nn.utils.stateless._reparametrize_module(
            layer, {"warehouse.cells": cells, "attention.fc2.weight": fc2, "bias": bias}
        ):
            return layer(x)

    assert torch.autograd.gradcheck(run, (x, *[p.detach().requires_grad_() for p in params]))


def test_state_dict_round_trip_keeps_temperature_and_beta():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 3))
    make = lambda: kw_ops.convert(copy.deepcopy(net), KWConfig.preset("kw1d2x"),
                                  sharing=lambda n, m: "s" if n != "0" else None)
    model, fresh = make(), make()
    kw_ops.set_temperature(model, 0.6)
    model.eval(), fresh.eval()
    state = model.state_dict()
    assert {"2.attention.temperature", "2.attention.beta", "2.warehouse.cells"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert kw_ops.get_temperature(fresh) == pytest.approx(0.6)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # the shared warehouse is still one tensor after loading
    assert fresh[2].warehouse.cells is fresh[3].warehouse.cells


def test_deepcopy_pickle_and_dtype_casts():
    net = kw_ops.convert(nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3)), sharing=lambda n, m: "s")
    net.eval()
    x = torch.randn(2, 4, 8, 8)
    twin = copy.deepcopy(net)
    assert twin[0].warehouse is twin[1].warehouse and twin[0].warehouse is not net[0].warehouse
    torch.testing.assert_close(twin(x), net(x))
    restored = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(restored(x), net(x))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        cast = copy.deepcopy(net).to(dtype)
        assert {p.dtype for p in cast.parameters()} == {dtype}
        assert {b.dtype for b in cast.buffers() if b.is_floating_point()} == {dtype}
        if dtype != torch.float16:  # fp16 conv on CPU needs a recent build
            assert cast(x.to(dtype)).dtype == dtype


def test_factory_kwargs_and_reset_parameters():
    layer = KWConv2d(4, 8, 3, device="cpu", dtype=DT)
    assert {p.dtype for p in layer.parameters()} == {DT}
    before = layer.warehouse.cells.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.warehouse.cells)
    assert "warehouse='private', m=9" in repr(layer)


def test_batch_one_training_with_batchnorm_says_what_to_do():
    layer = KWConv2d(4, 4, 3)
    with pytest.raises(ValueError, match=r"batch of 1.*model.eval\(\).*norm='layer'"):
        layer(torch.randn(1, 4, 5, 5))
    layer.eval()(torch.randn(1, 4, 5, 5))
    for norm in ("layer", "none"):
        layer = KWConv2d(4, 4, 3, warehouse=KWConfig(norm=norm)).train()
        layer(torch.randn(1, 4, 5, 5)).sum().backward()
        assert layer.attention.fc1.bias is not None


@pytest.mark.parametrize("bad, message", [
    (torch.randn(2, 5, 6, 6), "expected 4 input channels, got 5"),
    (torch.randn(2, 4, 6, 6, 1), "4-D"),
    (torch.ones(2, 4, 6, 6, dtype=torch.int64), "floating point"),
    (torch.randn(2, 4, 6, 6, dtype=DT), "input dtype torch.float64 differs"),
])
def test_bad_input_gets_a_clear_error(bad, message):
    layer = KWConv2d(4, 4, 3).eval()
    with pytest.raises((ValueError, TypeError), match=message):
        layer(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": 0}, r"groups must be a positive int, got 0"),
    ({"in_channels": True}, r"in_channels must be a positive int, got True"),
    ({"out_channels": 6, "groups": 4}, r"in_channels=8 and out_channels=6 must both be divisible by groups=4"),
    ({"stride": (2, 1), "padding": "same"}, r"padding='same' needs stride 1, got stride=\(2, 1\)"),
    ({"padding": -1}, r"padding must be >= 0, got \(-1, -1\)"),
    ({"dilation": (1, 0)}, r"kernel_size, stride and dilation must be >= 1, got \(3, 3\), \(1, 1\), \(1, 0\)"),
])
def test_each_bad_geometry_argument_is_refused_by_name(kwargs, message):
    """One wrong argument at a time (8 -> 8, 3x3 otherwise): groups dividing only one side, a stride that is 1
    in one dim only, a dilation of 0 in one dim."""
    arguments = {"in_channels": 8, "out_channels": 8, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        KWConv2d(**arguments)


def test_bad_construction_gets_a_clear_error():
    with pytest.raises(ValueError, match="divisible by groups=4"):
        KWConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        KWConv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(TypeError, match="warehouse must be a Warehouse"):
        KWConv2d(4, 4, 3, warehouse="stage1")
    wh = Warehouse("s", KWConfig(out_ratio=0.5))
    KWConv2d(4, 18, 1, warehouse=wh)  # cells of 9 outputs
    with pytest.raises(kw_ops.PlanningError, match=r"warehouse 's': layer .* cannot be cut into cells of 4 x 4"):
        KWConv2d(4, 27, 1, warehouse=wh)  # gcd 9 -> cells of int(4.5) = 4 outputs, which 9 is not a multiple of
    assert len(wh.members) == 1 and tuple(wh.cells.shape) == (2, 9, 4, 1, 1)


@pytest.mark.parametrize("field, value, message", [
    ("attn", torch.randn(2, 5, 4), r"attn must be \[B, m, n\] = \[2, 9, 4\]"),
    ("warehouse", torch.randn(4, 3, 4, 1, 1), "cannot be tiled by cells"),
    ("bias", torch.randn(3), r"bias must be \[4\]"),
    ("x", torch.randn(2, 4, 5), "x must be"),
])
def test_op_rejects_mismatched_shapes(field, value, message):
    args = dict(x=torch.randn(2, 4, 5, 5), attn=torch.randn(2, 9, 4), warehouse=torch.randn(4, 4, 4, 1, 1),
                bias=torch.randn(4))
    args[field] = value
    with pytest.raises(ValueError, match=message):
        kw_ops.ops.kw_conv(args["x"], args["attn"], args["warehouse"], args["bias"], out_channels=4, kernel_size=3)


def test_cells_follow_module_order_not_construction_order():
    class Block(nn.Module):  # downsample built first, registered last (as in torchvision's ResNet)
        def __init__(self):
            super().__init__()
            down = nn.Conv2d(8, 16, 1)
            self.conv1 = nn.Conv2d(8, 16, 3)
            self.down = down

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # convert plans each warehouse once: no re-plan warning
        model = kw_ops.convert(Block(), sharing=lambda n, m: "s")
    assert model.conv1.layer_plan.start == 0 and model.down.layer_plan.start == model.conv1.m
    wh = Warehouse("direct")
    down = KWConv2d(8, 16, 1, warehouse=wh)
    with pytest.warns(UserWarning, match="layer KWConv2d#1 .* joined after its plan was made"):
        conv1 = KWConv2d(8, 16, 3, warehouse=wh)
    assert down.layer_plan.start == 0  # direct construction: the order layers join
    block = nn.Module()
    block.conv1, block.down = conv1, down
    with pytest.warns(UserWarning, match="its layers were put in module order after its plan was made"):
        kw_ops.assign_cells(block)
    assert conv1.layer_plan.start == 0 and down.layer_plan.start == conv1.m


def test_assign_cells_hands_out_cells_to_members_outside_the_model_last():
    """A warehouse whose member is not registered in the model: the model's layers in module order first,
    then the outside member."""
    wh = Warehouse("s")
    with wh.planning_deferred():
        outside = KWConv2d(8, 8, 1, warehouse=wh)
        second, first = KWConv2d(8, 8, 3, warehouse=wh), KWConv2d(8, 16, 3, warehouse=wh)
    model = nn.Sequential(first, second)
    with pytest.warns(UserWarning, match="its layers were put in module order"):
        kw_ops.assign_cells(model)
    assert wh.members == (first, second, outside)
    assert [layer.layer_plan.start for layer in (first, second, outside)] == [0, 18, 27]


def test_convert_keeps_a_padding_mode():
    """A reflect-padded conv becomes a reflect-padded KW layer: the KW conv of the reflect-padded input."""
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")).double()
    layer = kw_ops.convert(net)[0].eval()
    assert layer.padding_mode == "reflect"
    x = torch.randn(2, 4, 5, 5, dtype=DT)
    attn = layer.attention(x)
    expected = kw_conv_loop(F.pad(x, (1, 1, 1, 1), mode="reflect"), attn, layer.warehouse.cells, layer.bias, 6,
                            (3, 3), (1, 1), (0, 0), (1, 1), 1)
    torch.testing.assert_close(layer(x), expected)


def test_convert_overrides_and_errors():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1))
    model = kw_ops.convert(net, KWConfig(), sharing=lambda n, m: {"0": None, "1": "a", "2": "b"}[n],
                           overrides={"b": {"budget": 4}})
    assert [w.cells.shape[0] for w in kw_ops.warehouses(model)] == [9, 4]
    assert isinstance(model[0], nn.Conv2d)
    with pytest.raises(ValueError, match="overrides name warehouses no layer joins"):
        kw_ops.convert(nn.Sequential(nn.Conv2d(3, 8, 3)), overrides={"nope": {"budget": 2}})
    assert "warehouse 0 'a': cells 8x8x1x1, n=9" in kw_ops.describe(model)



@pytest.mark.filterwarnings("ignore:convert. the KW layers. attention:UserWarning")  # small nets: attention-heavy
def test_convert_turns_every_alias_of_a_conv_into_one_kw_layer():
    shared = nn.Conv2d(8, 8, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), shared, nn.ReLU(), shared)
    net.alias = shared  # a third path to the same conv
    model = kw_ops.convert(net, sharing=lambda n, m: "s")
    assert isinstance(model[1], KWConv2d) and model[3] is model[1] and model.alias is model[1]
    (warehouse,) = kw_ops.warehouses(model)
    assert warehouse.members == (model[0], model[1])
    assert warehouse.plan.total_mixtures == 9 * 3 + 9 * 8  # cells 8x1: the shared conv counted once
    assert model[1].layer_plan.name == "1"
    assert model.eval()(torch.randn(2, 3, 7, 7)).shape == (2, 8, 5, 5)
    default = kw_ops.convert(nn.Sequential(shared, shared))  # per_layer: the warehouse of the first path
    assert default[0] is default[1] and [w.name for w in kw_ops.warehouses(default)] == ["0"]
    with pytest.raises(ValueError, match=r"Conv2d registered as \['0', '1'\] is one module.*different warehouses "
                                         r"\{'0': '0', '1': '1'\}"):
        kw_ops.convert(nn.Sequential(shared, shared), sharing=lambda name, module: name)


def test_convert_keeps_each_layers_train_or_eval_mode():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    net[1].train()
    model = kw_ops.convert(net)
    assert not any(m.training for m in model[0].modules())
    assert all(m.training for m in model[1].modules())
    model[0](torch.randn(1, 3, 6, 6))  # batch 1 in eval mode: BatchNorm uses its running statistics
    assert model[0].attention.norm1.num_batches_tracked == 0


def test_convert_warns_once_about_the_convs_it_leaves_static():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 3), nn.LazyConv2d(8, 3), Scaled(8, 8, 1),
                        nn.ConvTranspose1d(8, 8, 1))
    with pytest.warns(UserWarning) as record:
        kw_ops.convert(net, sharing=lambda n, m: None if n == "4" else f"w{n}")
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert re.fullmatch(
        r"convert: 3 layer\(s\) the sharing rule names stay static: '1' \(ConvTranspose2d: kw_ops has no transposed "
        r"KW convolution\); '2' \(LazyConv2d, not materialised: run one forward before convert\); '3' \(Scaled, a "
        r"subclass of nn.Conv2d whose forward may differ: .*\)", messages[0]), messages[0]
    assert isinstance(net[0], KWConv2d) and [type(m) for m in net[1:]] == [nn.ConvTranspose2d, nn.LazyConv2d, Scaled,
                                                                          nn.ConvTranspose1d]
    with pytest.warns(UserWarning, match=r"1 layer\(s\) the sharing rule names stay static: '0' \(ConvTranspose1d"):
        kw_ops.convert(nn.Sequential(nn.ConvTranspose1d(4, 4, 3)))  # the default rule names every conv
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kw_ops.convert(nn.Sequential(nn.ConvTranspose1d(4, 4, 3), nn.Linear(4, 4)), sharing=lambda n, m: None)


def _attention_and_cells(channels):
    """By hand, for one Conv2d(c, c, 3) in a warehouse of its own at b = 1: cells c x c, m = n = 9;
    attention fc1 c x 16 (no bias), BatchNorm 2 x 16, fc2 16 x m(n+1) with bias."""
    return channels * 16 + 2 * 16 + (16 + 1) * 9 * 10, 9 * channels * channels


def test_convert_warns_when_the_attention_outweighs_the_warehouses_tenfold():
    attention, cells = _attention_and_cells(4)  # 1,658 vs 144: 11.5x
    ratio = f"{attention / cells:.1f}x"
    with pytest.warns(UserWarning, match=rf"attention has {attention:,} parameters, {ratio} their warehouses' "
                                         rf"{cells} \(more than 10x\); heaviest warehouses: '0': .*cells 4x4x1x1 x "
                                         rf"n=9 .*a warehouse of their own or keep them static"):
        kw_ops.convert(nn.Sequential(nn.Conv2d(4, 4, 3)))
    attention, cells = _attention_and_cells(5)  # 1,642 vs 225: 7.3x
    assert attention < 10 * cells
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kw_ops.convert(nn.Sequential(nn.Conv2d(5, 5, 3)))
    awkward = nn.Sequential(nn.Conv2d(3, 7, 3), nn.Conv2d(7, 13, 3), nn.Conv2d(13, 3, 3))
    with pytest.warns(UserWarning, match=r"'all': attention 31,420,544, cells 1x1x1x1 x n=1359 = 1,359, Σm=1359, "
                                         r"layer channels \[3, 7, 13\]"):
        kw_ops.convert(awkward, sharing=lambda n, m: "all")


def test_late_join_warns_then_is_refused_once_the_warehouse_ran():
    wh = Warehouse("s")
    first = KWConv2d(8, 8, 3, warehouse=wh)
    old_cells, old_fc2 = wh.cells, first.attention.fc2.weight
    with pytest.warns(UserWarning, match=r"warehouse 's': layer KWConv2d#1 \(weight \[16, 8, 1, 1\]\) joined after "
                                         r"its plan was made; re-planning replaced its cells \(9, 8, 8, 1, 1\) by new "
                                         r"cells \(11, 8, 8, 1, 1\) .*\(KWConv2d#0\): an optimizer made before"):
        KWConv2d(8, 16, 1, warehouse=wh)
    assert wh.cells is not old_cells and first.attention.fc2.weight is not old_fc2
    first.eval()(torch.randn(2, 8, 5, 5))
    cells = wh.cells
    with pytest.raises(kw_ops.PlanningError, match=r"warehouse 's' has run a forward: layer KWConv2d#2 \(weight "
                                                   r"\[8, 8, 1, 1\]\) cannot join it, because re-planning would "
                                                   r"re-initialise .*KWConv2d#0, KWConv2d#1.*a warehouse of its own"):
        KWConv2d(8, 8, 1, warehouse=wh)
    assert len(wh.members) == 2 and wh.cells is cells
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # layers joining inside planning_deferred(): one plan, no warning
        deferred = Warehouse("d")
        with deferred.planning_deferred():
            KWConv2d(8, 8, 3, warehouse=deferred), KWConv2d(8, 16, 1, warehouse=deferred)
    assert tuple(deferred.cells.shape) == (11, 8, 8, 1, 1)



def test_nested_planning_deferred_plans_once_when_the_outermost_block_ends():
    warehouse = Warehouse("n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one plan, so no re-plan warning
        with warehouse.planning_deferred():
            KWConv2d(8, 8, 3, warehouse=warehouse)
            with warehouse.planning_deferred():
                KWConv2d(8, 16, 1, warehouse=warehouse)
            assert warehouse.cells.numel() == 0  # the inner block's end does not plan
    assert tuple(warehouse.cells.shape) == (11, 8, 8, 1, 1)


def test_a_layer_joining_after_the_block_re_plans_at_once_with_a_warning():
    warehouse = Warehouse("a")
    with warehouse.planning_deferred():
        KWConv2d(8, 8, 3, warehouse=warehouse)
    with pytest.warns(UserWarning, match=r"layer KWConv2d#1 \(weight \[16, 8, 1, 1\]\) joined after its plan"):
        KWConv2d(8, 16, 1, warehouse=warehouse)
    assert tuple(warehouse.cells.shape) == (11, 8, 8, 1, 1)


def test_an_error_inside_the_block_still_ends_the_deferral():
    warehouse = Warehouse("e")
    with pytest.raises(RuntimeError, match="built half"):
        with warehouse.planning_deferred():
            KWConv2d(8, 8, 3, warehouse=warehouse)
            raise RuntimeError("built half")
    assert tuple(warehouse.cells.shape) == (9, 8, 8, 1, 1)
    with pytest.warns(UserWarning, match="joined after its plan"):  # planned at once: no deferral left open
        KWConv2d(8, 16, 1, warehouse=warehouse)
    assert tuple(warehouse.cells.shape) == (11, 8, 8, 1, 1)


def test_a_plan_that_fails_when_the_block_ends_drops_the_layers_that_joined_inside():
    """As after a failed join: the warehouse keeps its members, plan and cells, and takes later layers."""
    warehouse = Warehouse("f")
    first = KWConv2d(8, 8, 3, warehouse=warehouse)
    cells = warehouse.cells
    with pytest.raises(kw_ops.PlanningError, match=r"warehouse 'f': layers of different dimensionality cannot share"):
        with warehouse.planning_deferred():
            kw_ops.KWConv1d(8, 8, 3, warehouse=warehouse)
    assert warehouse.members == (first,) and warehouse.cells is cells and warehouse.plan.n == 9
    with pytest.warns(UserWarning, match="joined after its plan"):
        KWConv2d(8, 16, 1, warehouse=warehouse)
    assert tuple(warehouse.cells.shape) == (11, 8, 8, 1, 1)
    fresh = Warehouse("g")
    with pytest.raises(kw_ops.PlanningError, match="dimensionality"):
        with fresh.planning_deferred():
            KWConv2d(8, 8, 3, warehouse=fresh), kw_ops.KWConv1d(8, 8, 3, warehouse=fresh)
    assert fresh.members == ()
    KWConv2d(8, 8, 1, warehouse=fresh)
    assert tuple(fresh.cells.shape) == (1, 8, 8, 1, 1)


def test_planning_deferred_never_re_plans_a_warehouse_that_ran():
    warehouse = Warehouse("r")
    first = KWConv2d(8, 8, 3, warehouse=warehouse).eval()
    x = torch.randn(2, 8, 5, 5)
    y = first(x)
    cells = warehouse.cells
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with warehouse.planning_deferred():  # no layer joined: nothing to plan
            pass
    assert warehouse.cells is cells
    torch.testing.assert_close(first(x), y)
    with pytest.raises(kw_ops.PlanningError, match=r"warehouse 'r' has run a forward: layer KWConv2d#1 .* cannot join"):
        with warehouse.planning_deferred():
            KWConv2d(8, 8, 1, warehouse=warehouse)
    assert warehouse.members == (first,) and warehouse.cells is cells
    # a layer that joined before the warehouse ran inside the block: refused when the block ends
    fresh = Warehouse("s")
    first = KWConv2d(8, 8, 3, warehouse=fresh).eval()
    cells = fresh.cells
    with pytest.raises(kw_ops.PlanningError, match=r"warehouse 's' has run a forward: the layers that joined inside "
                                                   r"planning_deferred\(\) cannot join it"):
        with fresh.planning_deferred():
            KWConv2d(8, 8, 1, warehouse=fresh)
            y = first(x)
    assert fresh.members == (first,) and fresh.cells is cells
    torch.testing.assert_close(first(x), y)


def test_a_compiled_training_step_settles_the_warehouse_through_its_gradients():
    warehouse = Warehouse("c")
    layer = KWConv2d(8, 8, 3, warehouse=warehouse)
    torch.compile(layer, backend="eager", fullgraph=True)(torch.randn(2, 8, 5, 5)).sum().backward()
    assert warehouse._settled is None  # the compiled forward leaves no flag (it would force a recompile) ...
    with pytest.raises(kw_ops.PlanningError, match="warehouse 'c' has gradients from a backward: layer KWConv2d#1"):
        KWConv2d(8, 8, 1, warehouse=warehouse)  # ... but its gradients settle the plan


def test_a_warehouse_holding_loaded_weights_refuses_a_new_plan():
    make = lambda: kw_ops.convert(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)), sharing=lambda n, m: "s")
    model = make()
    model.load_state_dict(make().state_dict())
    warehouse = model[0].warehouse
    with pytest.raises(kw_ops.PlanningError, match="warehouse 's' holds loaded weights: layer KWConv2d#2"):
        KWConv2d(8, 8, 1, warehouse=warehouse)
    with pytest.raises(kw_ops.PlanningError, match="warehouse 's' holds loaded weights: its layers cannot be put in"):
        warehouse.reorder([model[1], model[0]])
    assert warehouse.members == (model[0], model[1])

def test_schedule_follows_the_paper_formula():
    schedule = kw_ops.TemperatureSchedule(iters_per_epoch=10, epochs=2)
    layer = KWConv2d(4, 4, 3)
    taus = [schedule.step(layer) for _ in range(22)]
    assert taus[0] == pytest.approx(19 / 20) and taus[9] == pytest.approx(0.5) and taus[19:] == [0.0] * 3
    assert kw_ops.get_temperature(layer) == 0.0
    with pytest.raises(ValueError, match="tau must be in"):
        kw_ops.set_temperature(layer, 1.5)


@pytest.mark.filterwarnings("ignore:convert. the KW layers. attention:UserWarning")  # small nets: attention-heavy
def test_training_a_small_kw_net_with_the_schedule_and_reload():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    for budget in (0.25, 0.5, 1, 2, 4):
        model = kw_ops.convert(copy.deepcopy(net), KWConfig(budget=budget, in_ratio=0.5, out_ratio=0.5)
                               if budget < 1 else KWConfig(budget=budget),
                               sharing=lambda n, m: "body" if n in ("2", "4") else None)
        x, target = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        schedule = kw_ops.TemperatureSchedule(iters_per_epoch=5, epochs=1)
        losses = []
        for _ in range(12):  # τ falls to 0 in 5 steps (it moves the loss too), then 7 steps at τ = 0
            schedule.step(model)
            loss = F.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (budget, losses)
        assert kw_ops.get_temperature(model) == 0.0
        model.eval()
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        fresh = kw_ops.convert(copy.deepcopy(net), model[2].warehouse.config,
                               sharing=lambda n, m: "body" if n in ("2", "4") else None)
        fresh.load_state_dict(torch.load(buffer))
        fresh.eval()
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# -- one registration per warehouse: functional calls, state_dict layout, older state_dicts ---------------------
LEGACY_STATE = Path(__file__).parent / "fixtures" / "shared_warehouse_state_dict_v1.pt"


def _tiny_model():
    """The tiny_kw1x preset: two warehouses of two 3x3 convs each (`1.0`/`1.3`, `2.0`/`2.3`)."""
    import kw_ops.train.tiny  # noqa: F401  (registers the tiny presets)

    return kw_ops.models.create("tiny_kw1x")


def _parameters_by_name(model):
    return {name: p for name, p in model.named_parameters()}


@pytest.mark.parametrize("keys", ["named_parameters", "state_dict"])
def test_functional_call_leaves_the_model_unchanged(keys):
    model = _tiny_model()
    before = _parameters_by_name(model)
    count = kw_ops.count_parameters(model)
    source = model.named_parameters() if keys == "named_parameters" else model.state_dict().items()
    params = {name: tensor.detach() for name, tensor in source}
    torch.func.functional_call(model, params, (torch.randn(2, 3, 16, 16),))
    assert kw_ops.count_parameters(model) == count == 45018
    after = _parameters_by_name(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    for warehouse in kw_ops.warehouses(model):
        assert isinstance(warehouse.cells, nn.Parameter)
        assert all(member.warehouse.cells is warehouse.cells for member in warehouse.members)


def test_functional_call_gradients_equal_autograd_over_shared_warehouses():
    model = _tiny_model().double().eval()  # eval: BatchNorm statistics are not mutated inside torch.func.grad
    x, target = torch.randn(4, 3, 16, 16, dtype=DT), torch.randint(0, 10, (4,))
    kw_ops.set_temperature(model, 0.5)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params):
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), target)

    grads = torch.func.grad(loss)(params)
    assert kw_ops.count_parameters(model) == 45018
    F.cross_entropy(model(x), target).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    cells = [w.cells for w in kw_ops.warehouses(model)]
    assert len(cells) == 2 and all(c.grad.abs().sum() > 0 for c in cells)


def test_each_warehouse_is_registered_once_under_its_first_member():
    model = _tiny_model()
    registered = [name for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, Warehouse)]
    assert registered == ["1.0.warehouse", "2.0.warehouse"]
    assert [k for k in model.state_dict() if k.endswith("warehouse.cells")] == ["1.0.warehouse.cells",
                                                                               "2.0.warehouse.cells"]
    assert model[1][3].warehouse is model[1][0].warehouse  # the other members reach it as an attribute
    cells = [p for p in model.parameters() if any(p is w.cells for w in kw_ops.warehouses(model))]
    assert len(cells) == 2
    # the owner follows the cell order: a layer joining first but registered second hands it over
    wh = Warehouse("direct")
    with wh.planning_deferred():
        late, early = KWConv2d(8, 8, 1, warehouse=wh), KWConv2d(8, 8, 3, warehouse=wh)
    net = kw_ops.assign_cells(nn.Sequential(early, late)) and nn.Sequential(early, late)
    assert [n for n, m in net.named_modules() if isinstance(m, Warehouse)] == ["0.warehouse"]
    assert list(early._modules) == ["warehouse", "attention"] and "warehouse" not in late._modules


def test_a_state_dict_saved_with_cells_under_every_member_still_loads():
    """The fixture was saved by kw_ops 7bb0a56, which listed the cells under every member ('3.' and '4.')."""
    saved = torch.load(LEGACY_STATE)
    assert {"3.warehouse.cells", "4.warehouse.cells"} <= set(saved["state_dict"])
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention outweighs these small cells
        model = kw_ops.convert(net, KWConfig(budget=1), sharing=lambda n, m: "s" if n != "0" else None)
    model.load_state_dict(saved["state_dict"])  # strict
    assert kw_ops.get_temperature(model) == pytest.approx(0.3)
    assert torch.equal(model[4].warehouse.cells, saved["state_dict"]["4.warehouse.cells"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(saved["input"]), saved["output"], rtol=1e-5, atol=1e-6)
    assert "4.warehouse.cells" not in model.state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for 4.warehouse.cells"):
        model.load_state_dict({**saved["state_dict"], "4.warehouse.cells": torch.zeros(3, 8, 8, 1, 1)})


def test_optimizer_ddp_check_and_casts_see_one_warehouse_tensor():
    model = _tiny_model()
    kw_ops.train.distributed.check_unique_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cells = model[1][3].warehouse.cells
    before = cells.detach().clone()
    F.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([1, 2])).backward()
    optimizer.step()
    assert not torch.equal(before, model[1][3].warehouse.cells) and model[1][3].warehouse.cells is cells
    half = copy.deepcopy(model).half()
    assert half[1][3].warehouse.cells.dtype == torch.float16 and half[1][3].warehouse is half[1][0].warehouse
    restored = pickle.loads(pickle.dumps(model))
    assert restored[1][3].warehouse is restored[1][0].warehouse
    assert kw_ops.count_parameters(restored) == 45018


def test_meta_device_build_then_reset_parameters_is_a_fresh_model():
    model, fresh = deferred_init(_tiny_model), _tiny_model()
    assert kw_ops.count_parameters(model) == kw_ops.count_parameters(fresh)
    built, expected = model.state_dict(), fresh.state_dict()
    assert built.keys() == expected.keys()
    buffers = {name for name, _ in model.named_buffers()}
    for key, value in built.items():
        assert torch.isfinite(value.float()).all(), key
        if key in buffers or ".attention." in key and key.endswith("bias"):  # β, τ, statistics: a new model's
            assert torch.equal(value, expected[key]), key
    for name in ("1.0.warehouse.cells", "2.3.attention.fc1.weight", "2.3.attention.fc2.weight"):  # kaiming-normal
        assert built[name].std().item() == pytest.approx(expected[name].std().item(), rel=0.2), name
    assert any(k.endswith("attention.beta") for k in built) and kw_ops.get_temperature(model) == 0.0
    x = torch.randn(2, 3, 16, 16)
    for mode in (True, False):
        assert torch.isfinite(model.train(mode)(x)).all()


def test_reset_parameters_restores_beta_and_temperature_of_a_layer():
    layer = KWConv2d(8, 8, 3, warehouse=KWConfig(budget=0.5))
    beta = layer.attention.beta.clone()
    kw_ops.set_temperature(layer, 0.7)
    with torch.no_grad():
        layer.attention.beta.zero_()
    layer.reset_parameters()
    assert torch.equal(layer.attention.beta, beta) and layer.attention.temperature.item() == 0.0


def test_autocast_casts_a_shared_warehouse_once_per_step():
    """Every member of a warehouse gets the same bf16 cells (one copy) until an optimizer step changes them; the
    gradients are exactly those of casting per call (each call's gradient cast back before they are summed)."""
    torch.manual_seed(0)
    model = kw_ops.models.create("tiny_kw1x", num_classes=10)
    warehouse = next(w for w in kw_ops.warehouses(model) if len(w.members) > 1)
    with torch.no_grad():
        first = warehouse.cells_as(torch.bfloat16)
        assert first.dtype == torch.bfloat16 and warehouse.cells_as(torch.bfloat16) is first
        assert warehouse.cells_as(torch.float32) is warehouse.cells
    x = torch.randn(2, 3, 16, 16)
    storages = []
    hook = lambda module, args, output: storages.append(  # noqa: E731
        module.warehouse.cells_as(torch.bfloat16).untyped_storage().data_ptr())
    handles = [m.register_forward_hook(hook) for m in warehouse.members]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().mean().backward()
    for handle in handles:
        handle.remove()
    assert len(storages) == len(warehouse.members) and set(storages) == {first.untyped_storage().data_ptr()}
    cached_grad = warehouse.cells.grad.clone()
    with torch.no_grad():
        warehouse.cells.add_(1e-3)                                   # an optimizer step: a new version
        moved = warehouse.cells_as(torch.bfloat16)
        assert moved is not first and torch.equal(moved, warehouse.cells.to(torch.bfloat16))
        warehouse.cells.sub_(1e-3)
    # the same step with a cast per call gives the same gradient, bit for bit
    model.zero_grad()
    original = type(warehouse).cells_as
    type(warehouse).cells_as = lambda self, dtype: self.cells.to(dtype)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().square().mean().backward()
    finally:
        type(warehouse).cells_as = original
    torch.testing.assert_close(warehouse.cells.grad, cached_grad, atol=0, rtol=0)
