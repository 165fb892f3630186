"""DY-Conv and ODConv baselines against a brute-force float64 per-sample oracle (W_b built explicitly)."""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from deferred_init import deferred_init

import kw_ops.models as zoo
from kw_ops.baselines import (
    BaselineTemperatureSchedule,
    DYConv2d,
    ODConv2d,
    get_baseline_temperature,
    mobilenetv2_dyconv_rule,
    resnet_dyconv_rule,
    resnet_odconv_rule,
    set_baseline_formulation,
    set_baseline_temperature,
    to_dyconv,
    to_odconv,
)

#: (atol, rtol) of a layer in this dtype against the float64 oracle; float64 differs only by summation order.
TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4)}


@dataclass(frozen=True)
class Case:
    batch: int
    c_in: int
    c_out: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] | str = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    size: tuple[int, int] = (7, 6)
    K: int = 4
    padding_mode: str = "zeros"

    def __str__(self) -> str:
        text = f"B{self.batch}-C{self.c_in}x{self.c_out}-k{self.kernel}-K{self.K}".replace(" ", "")
        for name, value, default in (("s", self.stride, 1), ("p", self.padding, 0), ("d", self.dilation, 1),
                                     ("g", self.groups, 1), ("bias", self.bias, False),
                                     ("mode", self.padding_mode, "zeros")):
            if value != default:
                text += f"-{name}{value}".replace(" ", "")
        return text + f"-{self.size[0]}x{self.size[1]}"

    def kwargs(self) -> dict:
        return {"kernel_size": self.kernel, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "groups": self.groups, "bias": self.bias,
                "padding_mode": self.padding_mode, "num_kernels": self.K}


CASES = [
    Case(2, 4, 6, 3, padding=1, bias=True),                          # plain 3x3 (ODConv folds α into W_b)
    Case(3, 6, 9, 3, stride=2, padding=2, dilation=2, groups=3, K=3, size=(9, 8)),
    Case(2, 5, 5, 3, padding=1, groups=5, size=(6, 6)),               # depthwise: no ODConv filter attention
    Case(2, 8, 8, 3, padding=1, size=(3, 3)),                         # ODConv: weight > activations, no fold
    Case(2, 5, 7, 1, stride=2, padding=1, bias=True),                 # 1x1 strided + padded: bmm
    Case(2, 16, 16, 1, size=(2, 2), K=2),                             # ODConv bmm without folding
    Case(2, 6, 4, 1, groups=2, K=2, size=(5, 5)),                     # grouped 1x1
    Case(2, 5, 7, 1, K=1, size=(4, 4)),                               # ODConv pointwise fast path
    Case(2, 4, 4, 3, padding=1, K=1),                                 # K = 1: no kernel attention
    Case(1, 3, 4, 3, padding=1, size=(5, 5)),                         # batch 1
    Case(2, 4, 6, (3, 1), padding=(1, 0), K=2, size=(5, 4)),          # non-square kernel
    Case(2, 4, 6, 3, size=(3, 3), K=3),                               # L = 1: DY-Conv fast = output mixing
    Case(2, 4, 6, 2, padding="same", padding_mode="reflect", bias=True, size=(5, 6)),
]


# -- the oracle -------------------------------------------------------------------------------------
def _static_conv(case_layer, weight, bias):
    """An nn.Conv2d with the layer's geometry and the given weight (torch's own padding semantics)."""
    conv = nn.Conv2d(case_layer.in_channels, case_layer.out_channels, case_layer.kernel_size, case_layer.stride,
                     case_layer.padding, case_layer.dilation, case_layer.groups, bias is not None,
                     case_layer.padding_mode, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def dy_reference(layer: DYConv2d, x: torch.Tensor) -> torch.Tensor:
    """Per-sample loop in float64: π_b from the attention MLP, W_b = Σ_k π_bk W_k, one conv per sample."""
    p = {name: value.detach().double() for name, value in layer.named_parameters()}
    T = float(layer.temperature)
    outputs = []
    for xb in x.double():
        hidden = torch.relu(p["attention.fc1.weight"] @ xb.mean(dim=(1, 2)))
        pi = torch.softmax((p["attention.fc2.weight"] @ hidden + p["attention.fc2.bias"]) / T, dim=0)
        weight = sum(pi[k] * p["weight"][k] for k in range(layer.num_kernels))
        bias = sum(pi[k] * p["bias"][k] for k in range(layer.num_kernels)) if layer.bias is not None else None
        outputs.append(_static_conv(layer, weight, bias)(xb[None])[0])
    return torch.stack(outputs)


def od_reference(layer: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    """Per-sample loop in float64 (the BN of the trunk uses batch statistics in train mode, running ones in eval)."""
    p = {name: value.detach().double() for name, value in layer.named_parameters()}
    bn = layer.attention.bn
    T = float(layer.temperature)
    x = x.double()
    h = x.mean(dim=(2, 3)) @ p["attention.fc.weight"].T
    h = torch.relu(F.batch_norm(h, bn.running_mean.double().clone(), bn.running_var.double().clone(),
                                p["attention.bn.weight"], p["attention.bn.bias"], layer.training, 0.0, bn.eps))
    kh, kw = layer.kernel_size
    outputs = []
    for b, xb in enumerate(x):
        def head(name, fn=torch.sigmoid, hb=h[b]):
            key = f"attention.{name}_fc"
            if key + ".weight" not in p:
                return None
            return fn((p[key + ".weight"] @ hb + p[key + ".bias"]) / T)
        a_c, a_f = head("channel"), head("filter")
        a_s, a_w = head("spatial"), head("kernel", lambda z: torch.softmax(z, dim=0))
        a_s = torch.ones(kh * kw, dtype=torch.float64) if a_s is None else a_s
        a_w = torch.ones(1, dtype=torch.float64) if a_w is None else a_w
        weight = sum(a_w[k] * a_s.view(kh, kw) * p["weight"][k] for k in range(layer.num_kernels))
        y = _static_conv(layer, weight, None)((xb * a_c[:, None, None])[None])[0]
        if a_f is not None:
            y = y * a_f[:, None, None]
        if layer.bias is not None:
            y = y + p["bias"][:, None, None]
        outputs.append(y)
    return torch.stack(outputs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected).abs()
    excess = diff - (atol + rtol * expected.abs())
    if excess.numel() and excess.max() > 0:
        worst = int(excess.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(f"{what}: worst element {index}: {actual.double().flatten()[worst]:.6g} vs "
                             f"{expected.flatten()[worst]:.6g} (|diff| {diff.flatten()[worst]:.3g}, atol {atol}, "
                             f"rtol {rtol})")


def _randomise_od_attention(layer: ODConv2d) -> None:
    """Non-trivial BN statistics/affine and head biases, so eval-mode and bias paths are exercised."""
    bn = layer.attention.bn
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
        for head in (layer.attention.channel_fc, layer.attention.filter_fc, layer.attention.spatial_fc,
                     layer.attention.kernel_fc):
            if head is not None:
                head.bias.uniform_(-0.5, 0.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)


# -- forward against the oracle ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("formulation", ["released", "fast", "mix"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_dyconv_matches_oracle(case: Case, formulation: str, dtype: torch.dtype):
    layer = DYConv2d(case.c_in, case.c_out, **case.kwargs(), formulation=formulation, dtype=dtype)
    set_baseline_temperature(layer, 3.0)
    x = torch.randn(case.batch, case.c_in, *case.size, dtype=dtype)
    assert_close(layer(x), dy_reference(layer, x), dtype, f"DYConv2d {case} {formulation} "
                 f"(path {layer.path(*case.size)})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("formulation", ["released", "fast"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_odconv_matches_oracle(case: Case, formulation: str, mode: str, dtype: torch.dtype):
    layer = ODConv2d(case.c_in, case.c_out, **case.kwargs(), formulation=formulation, dtype=dtype)
    _randomise_od_attention(layer)
    layer.train(mode == "train")
    set_baseline_temperature(layer, 2.0)
    x = torch.randn(case.batch, case.c_in, *case.size, dtype=dtype)
    if mode == "train" and case.batch == 1:  # BatchNorm in the attention cannot train on one sample
        with pytest.raises(ValueError, match="batch of 1|one sample|1 sample"):
            layer(x)
        return
    expected = od_reference(layer, x)
    assert_close(layer(x), expected, dtype, f"ODConv2d {case} {formulation} {mode} (path {layer.path(*case.size)})")


def test_paths_are_the_documented_ones():
    """Which computation each formulation runs (benchmarks report these names)."""
    assert DYConv2d(4, 6, 3, padding=1).path(7, 6) == "grouped"
    assert DYConv2d(4, 6, 3).path(3, 3) == "grouped"                       # one output position: measured slower mixed
    assert DYConv2d(4, 6, 3, padding=1, num_kernels=1).path(7, 6) == "mix"
    assert DYConv2d(4, 6, 1).path(7, 6) == "bmm"
    assert DYConv2d(4, 6, 1, formulation="released").path(7, 6) == "grouped"
    assert DYConv2d(4, 6, 3, formulation="mix").path(7, 6) == "mix"
    assert ODConv2d(4, 6, 1, num_kernels=1).path(7, 6) == "pointwise"
    assert ODConv2d(4, 6, 1, num_kernels=1, formulation="released").path(7, 6) == "pointwise"
    assert ODConv2d(4, 6, 3, formulation="released").path(7, 6) == "released"
    assert ODConv2d(4, 6, 3, padding=1).path(7, 6) == "grouped+fold"       # 216 weights <= 4·42 + 6·42
    assert ODConv2d(8, 8, 3, padding=1).path(3, 3) == "grouped"            # 576 weights > 8·9 + 8·9
    assert ODConv2d(4, 6, 1).path(7, 6) == "bmm+fold"
    assert ODConv2d(64, 64, 1).path(2, 2) == "bmm"


@pytest.mark.parametrize("cls", [DYConv2d, ODConv2d])
def test_batch_zero_and_unbatched(cls):
    layer = cls(4, 6, 3, stride=2, padding=1, dtype=torch.float64).eval()
    empty = layer(torch.randn(0, 4, 9, 7, dtype=torch.float64))
    static = nn.Conv2d(4, 6, 3, stride=2, padding=1)(torch.randn(0, 4, 9, 7))
    assert empty.shape == static.shape == (0, 6, 5, 4)
    x = torch.randn(4, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer(x[None])[0])


def test_non_contiguous_and_channels_last_input():
    x = torch.randn(2, 6, 8, 10, dtype=torch.float64)[:, ::2, :, ::2]
    for layer in (DYConv2d(3, 5, 3, padding=1, dtype=torch.float64), ODConv2d(3, 5, 3, padding=1, dtype=torch.float64)):
        expected = layer(x.contiguous())
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), expected)


# -- gradients ----------------------------------------------------------------------------------------
def _gradcheck_layer(layer: nn.Module, x: torch.Tensor) -> None:
    names = ["weight", "attention." + ("fc1" if isinstance(layer, DYConv2d) else "fc") + ".weight"]
    params = {n: p for n, p in layer.named_parameters()}
    inputs = (x.requires_grad_(),) + tuple(params[n].detach().clone().requires_grad_() for n in names)

    def fn(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("formulation", ["released", "fast", "mix"])
@pytest.mark.parametrize("kernel", [3, 1])
def test_dyconv_gradcheck(formulation: str, kernel: int):
    layer = DYConv2d(4, 4, kernel, padding=kernel // 2, groups=2, num_kernels=3, formulation=formulation,
                     dtype=torch.float64)
    set_baseline_temperature(layer, 2.0)
    _gradcheck_layer(layer, torch.randn(2, 4, 4, 3, dtype=torch.float64))


#: (C_in, C_out, kernel, K, size, the 'fast' path it takes)
OD_GRAD_CASES = [(4, 4, 3, 2, (5, 4), "grouped+fold"), (2, 4, 3, 2, (1, 2), "grouped"),
                 (4, 4, 1, 2, (4, 3), "bmm+fold"), (8, 8, 1, 2, (1, 2), "bmm"), (4, 4, 1, 1, (4, 3), "pointwise")]


@pytest.mark.parametrize("formulation", ["released", "fast"])
@pytest.mark.parametrize("c_in,c_out,kernel,K,size,path", OD_GRAD_CASES, ids=[c[-1] for c in OD_GRAD_CASES])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_odconv_gradcheck(formulation: str, c_in, c_out, kernel: int, K: int, size, path: str, mode: str):
    layer = ODConv2d(c_in, c_out, kernel, padding=kernel // 2, num_kernels=K, formulation="fast", bias=True,
                     dtype=torch.float64)
    assert layer.path(*size) == path
    layer.formulation = formulation
    _randomise_od_attention(layer)
    layer.train(mode == "train")
    layer.attention.bn.momentum = 0.0   # gradcheck calls forward many times; keep the running stats fixed
    _gradcheck_layer(layer, torch.randn(2, c_in, *size, dtype=torch.float64))


@pytest.mark.parametrize("cls,formulations",
                         [(DYConv2d, ("released", "fast", "mix")), (ODConv2d, ("released", "fast"))])
def test_formulations_have_equal_gradients(cls, formulations):
    torch.manual_seed(1)
    layer = cls(6, 8, 3, stride=2, padding=1, groups=2, bias=True, num_kernels=3, dtype=torch.float64)
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    grads = []
    for formulation in formulations:
        layer.formulation = formulation
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    for other in grads[1:]:
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], msg=lambda m, n=name: f"{n}: {m}")


# -- attention structure, initialisation, parameter counts ---------------------------------------------
def dy_params(c_in, c_out, k, groups=1, K=4, bias=False) -> int:
    hidden = c_in // 4 + 1
    return K * c_out * c_in // groups * k * k + (K * c_out if bias else 0) + c_in * hidden + hidden * K + K


def od_params(c_in, c_out, k, groups=1, K=4, bias=False) -> int:
    a = max(c_in // 16, 16)
    count = K * c_out * c_in // groups * k * k + (c_out if bias else 0) + c_in * a + 2 * a + a * c_in + c_in
    count += 0 if c_in == c_out == groups else a * c_out + c_out
    count += 0 if k == 1 else a * k * k + k * k
    return count + (0 if K == 1 else a * K + K)


@pytest.mark.parametrize("c_in,c_out,k,groups,K,bias", [
    (64, 64, 3, 1, 4, False), (3, 16, 7, 1, 4, True), (96, 96, 3, 96, 4, False), (320, 1280, 1, 1, 1, False),
    (40, 80, 1, 4, 4, True), (512, 512, 3, 1, 1, False), (24, 144, 1, 1, 4, False)])
def test_parameter_counts_by_formula(c_in, c_out, k, groups, K, bias):
    dy = DYConv2d(c_in, c_out, k, groups=groups, num_kernels=K, bias=bias)
    od = ODConv2d(c_in, c_out, k, groups=groups, num_kernels=K, bias=bias)
    assert sum(p.numel() for p in dy.parameters()) == dy_params(c_in, c_out, k, groups, K, bias)
    assert sum(p.numel() for p in od.parameters()) == od_params(c_in, c_out, k, groups, K, bias)


def test_odconv_skips_attentions():
    depthwise = ODConv2d(32, 32, 3, groups=32, num_kernels=4).attention
    assert depthwise.filter_fc is None and depthwise.spatial_fc is not None and depthwise.kernel_fc is not None
    pointwise = ODConv2d(32, 64, 1, num_kernels=1).attention
    assert pointwise.spatial_fc is None and pointwise.kernel_fc is None and pointwise.filter_fc is not None
    assert ODConv2d(8, 16, 3).attention.hidden == 16 and ODConv2d(512, 16, 3).attention.hidden == 32


@torch.no_grad()
def test_initialisation():
    od = ODConv2d(64, 256, 3, num_kernels=4)
    fan_out_std = (2 / (256 * 9)) ** 0.5                              # kaiming-normal, fan_out, relu
    for k in range(4):
        assert abs(od.weight[k].std().item() / fan_out_std - 1) < 0.05
    assert all(float(m.bias.abs().max()) == 0 for m in (od.attention.channel_fc, od.attention.kernel_fc))
    assert float(od.attention.bn.weight.min()) == 1 and float(od.attention.bn.bias.abs().max()) == 0
    dy = DYConv2d(64, 256, 3, num_kernels=4, bias=True)
    bound = 1 / (64 * 9) ** 0.5                                       # nn.Conv2d: kaiming-uniform(a=√5)
    for k in range(4):
        assert float(dy.weight[k].abs().max()) <= bound and float(dy.weight[k].abs().max()) > 0.95 * bound
        assert float(dy.bias[k].abs().max()) <= bound
    assert not torch.equal(dy.weight[0], dy.weight[1])
    assert float(dy.attention.fc2.bias.abs().max()) == 0


# -- temperature, formulation, state ---------------------------------------------------------------
def test_temperature_is_a_buffer_and_round_trips():
    layer = DYConv2d(4, 6, 3, padding=1)
    od = ODConv2d(6, 6, 3, padding=1)
    model = nn.Sequential(layer, od).eval()
    assert get_baseline_temperature(model) == 1.0 and layer.temperature.dim() == 0
    assert set_baseline_temperature(model, 7.5) == 2
    state = model.state_dict()
    assert "0.temperature" in state and "1.temperature" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    clone = nn.Sequential(DYConv2d(4, 6, 3, padding=1), ODConv2d(6, 6, 3, padding=1)).eval()
    clone.load_state_dict(torch.load(buffer))
    assert get_baseline_temperature(clone) == 7.5
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(clone(x), model(x))
    torch.testing.assert_close(copy.deepcopy(model)(x), model(x))
    double = copy.deepcopy(model).double()
    assert double[0].temperature.dtype == torch.float64
    torch.testing.assert_close(double(x.double()).float(), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mobilenetv2_050_dy4x", "mobilenetv2_050_od4x"])
def test_meta_device_build_then_reset_parameters_is_a_fresh_model(name):
    model, fresh = deferred_init(lambda: zoo.create(name, num_classes=10)), zoo.create(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(model.eval()(x)).all() and get_baseline_temperature(model) == 1.0
    built, expected = model.state_dict(), fresh.state_dict()
    for key in (k for k, _ in model.named_buffers()):  # T and BatchNorm statistics: exactly a new model's
        assert torch.equal(built[key], expected[key]), key
    attention = next(m.attention for m in model.modules() if isinstance(m, (DYConv2d, ODConv2d)))
    twin = next(m.attention for m in fresh.modules() if isinstance(m, (DYConv2d, ODConv2d)))
    for (key, value), reference in zip(attention.state_dict().items(), twin.state_dict().values()):
        if key.endswith("weight") and value.dim() == 2:  # kaiming-normal (fan_out), as in a new model
            assert value.std().item() == pytest.approx(reference.std().item(), rel=0.25), key
        elif key.endswith("bias"):
            assert torch.equal(value, reference), key


@pytest.mark.parametrize("name", ["mobilenetv2_050_dy4x", "mobilenetv2_050_od4x"])
def test_functional_call_leaves_a_baseline_model_unchanged(name):
    model = zoo.create(name, num_classes=10)
    before = dict(model.named_parameters())
    params = {key: p.detach() for key, p in before.items()}
    torch.func.functional_call(model, params, (torch.randn(2, 3, 32, 32),))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_temperature_changes_the_attention():
    layer = DYConv2d(8, 8, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    set_baseline_temperature(layer, 1e6)            # T -> ∞: uniform π, the mean kernel
    mean_conv = _static_conv(layer, layer.weight.detach().mean(0), layer.bias.detach().mean(0))
    torch.testing.assert_close(layer(x), mean_conv(x), atol=1e-5, rtol=1e-5)


def test_temperature_schedules():
    od = BaselineTemperatureSchedule.odconv(iters_per_epoch=10)
    assert [od.value(t) for t in (0, 50, 100, 1000)] == [30.0, 15.5, 1.0, 1.0]
    dy = BaselineTemperatureSchedule.dyconv(iters_per_epoch=10)
    assert dy.value(0) == dy.value(9) == 30.0 and dy.value(10) == pytest.approx(27.1) and dy.value(100) == 1.0
    model = nn.Sequential(DYConv2d(4, 4, 3))
    assert [od.step(model) for _ in range(2)] == [30.0, pytest.approx(29.71)]
    assert get_baseline_temperature(model) == pytest.approx(29.71)
    resumed = BaselineTemperatureSchedule(iters_per_epoch=1)
    resumed.load_state_dict(od.state_dict())
    assert resumed.step(model) == od.step(model)
    with pytest.raises(ValueError, match="t_start >= t_end > 0"):
        BaselineTemperatureSchedule(10, t_end=0)


def test_set_baseline_formulation_and_repr():
    model = nn.Sequential(DYConv2d(4, 4, 3), ODConv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
    assert set_baseline_formulation(model, "released") == 2
    assert model[0].formulation == model[1].formulation == "released"
    assert "formulation='released'" in repr(model[0]) and "num_kernels=4" in repr(model[1])
    set_baseline_formulation(model, "mix")
    assert model[0].formulation == "mix" and model[1].formulation == "fast"
    assert "formulation" not in repr(model[1])
    with pytest.raises(ValueError, match="formulation must be one of"):
        set_baseline_formulation(model, "triton")


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DYConv2d, ODConv2d])
def test_errors(cls):
    layer = cls(4, 6, 3).eval()
    name = cls.__name__
    with pytest.raises(ValueError, match=f"{name}: expected 4 input channels, got 5"):
        layer(torch.randn(2, 5, 6, 6))
    with pytest.raises(TypeError, match=f"{name}: input must be floating point"):
        layer(torch.ones(2, 4, 6, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="input dtype torch.float64 differs"):
        layer(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected input \[B, 4, H, W\]"):
        layer(torch.randn(4, 6))
    with pytest.raises(ValueError, match="divisible by groups=4"):
        cls(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="num_kernels must be a positive int"):
        cls(4, 6, 3, num_kernels=0)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        cls(4, 6, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="formulation must be one of"):
        cls(4, 6, 3, formulation="cuda")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        set_baseline_temperature(layer, 0.0)


def test_odconv_errors():
    with pytest.raises(ValueError, match="formulation must be one of"):
        ODConv2d(4, 6, 3, formulation="mix")
    with pytest.raises(ValueError, match="cannot train on a batch of 1"):
        ODConv2d(4, 6, 3).train()(torch.randn(1, 4, 5, 5))


# -- converters and the papers' layer choices --------------------------------------------------------
def _tiny_resnet() -> nn.Module:
    """Two torchvision-named ResNet blocks (a stem, a block with downsample, a plain block) and an fc."""
    def block(c_in, c_out, stride):
        b = nn.Module()
        b.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        b.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        if stride != 1 or c_in != c_out:
            b.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        return b
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    net.layer1 = nn.Sequential(block(8, 8, 1))
    net.layer2 = nn.Sequential(block(8, 16, 2), block(16, 16, 1))
    net.fc = nn.Linear(16, 10)
    return net


def test_resnet_rules_on_tiny_net():
    dy = to_dyconv(_tiny_resnet(), K=4, rule="resnet")
    od = to_odconv(_tiny_resnet(), K=1, rule="resnet")
    dynamic = {n for n, m in dy.named_modules() if isinstance(m, DYConv2d)}
    assert dynamic == {"layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                       "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2"}
    assert {n for n, m in od.named_modules() if isinstance(m, ODConv2d)} == dynamic - {"layer2.0.downsample.0"}
    assert type(dy.conv1) is nn.Conv2d and type(od.layer2[0].downsample[0]) is nn.Conv2d
    static = sum(p.numel() for p in _tiny_resnet().parameters())
    convs = {n: m for n, m in _tiny_resnet().named_modules() if isinstance(m, nn.Conv2d)}
    expected = static + sum(dy_params(m.in_channels, m.out_channels, m.kernel_size[0], K=4) - m.weight.numel()
                            for n, m in convs.items() if n in dynamic)
    assert sum(p.numel() for p in dy.parameters()) == expected
    expected = static + sum(od_params(m.in_channels, m.out_channels, m.kernel_size[0], K=1) - m.weight.numel()
                            for n, m in convs.items() if n in dynamic and "downsample" not in n)
    assert sum(p.numel() for p in od.parameters()) == expected


def test_mobilenetv2_rule_names():
    assert not mobilenetv2_dyconv_rule("features.0.0", nn.Conv2d(3, 32, 3))
    for name in ("features.1.conv.0.0", "features.1.conv.1", "features.2.conv.1.0", "features.18.0"):
        assert mobilenetv2_dyconv_rule(name, nn.Conv2d(8, 8, 1))
    assert not mobilenetv2_dyconv_rule("classifier.1", nn.Linear(8, 8))
    assert resnet_dyconv_rule("layer3.0.downsample.0", nn.Conv2d(8, 8, 1))
    assert not resnet_odconv_rule("layer3.0.downsample.0", nn.Conv2d(8, 8, 1))
    assert not resnet_dyconv_rule("conv1", nn.Conv2d(3, 8, 7))


def test_converters_keep_geometry_dtype_and_run():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1, bias=True, padding_mode="reflect"), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False)).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    shape = net(x).shape
    converted = to_odconv(net, K=4, formulation="released")
    first = converted[0]
    assert isinstance(first, ODConv2d) and first.stride == (2, 2) and first.padding_mode == "reflect"
    assert first.bias is not None and first.weight.dtype == torch.float64 and first.formulation == "released"
    assert converted[2].attention.filter_fc is None                 # depthwise
    assert converted.eval()(x).shape == shape
    lone = to_dyconv(nn.Conv2d(4, 8, 1), K=2)
    assert isinstance(lone, DYConv2d) and lone.num_kernels == 2
    with pytest.raises(ValueError, match="unknown rule 'vgg'"):
        to_dyconv(net, rule="vgg")
    with pytest.raises(TypeError, match="rule must be a callable"):
        to_dyconv(nn.Sequential(nn.Conv2d(4, 8, 1)), rule=3)



@pytest.mark.parametrize("convert, layer", [(to_dyconv, DYConv2d), (to_odconv, ODConv2d)])
def test_converters_keep_each_conv_train_or_eval_mode(convert, layer):
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    net[1].train()
    converted = convert(net, K=2)
    assert all(isinstance(m, layer) for m in converted)
    assert not any(m.training for m in converted[0].modules())
    assert converted[1].training and converted[1].attention.training
    assert not convert(nn.Conv2d(4, 8, 1).eval(), K=2).training  # a lone conv comes back replaced

# -- the papers' networks (kw_ops.models: static twins with torchvision names) -------------------------
models = pytest.importorskip("kw_ops.models")

#: (model, converter, K, rule, published parameters in millions, docs/baselines.md §6).
PUBLISHED = [
    ("resnet18", "dy", 4, "resnet", 45.475), ("resnet18", "od", 1, "resnet", 11.94),
    ("resnet18", "od", 4, "resnet", 44.90), ("resnet50", "od", 1, "resnet", 28.64),
    ("resnet50", "od", 4, "resnet", 90.67), ("mobilenetv2_100", "od", 1, "mobilenetv2", 4.94),
    ("mobilenetv2_100", "od", 4, "mobilenetv2", 11.51),
]
#: MobileNetV2 + DY-Conv (4x): published 12.40M; hidden = int(C_in/4) + 1 (docs/baselines.md §2) gives 12,416,576
#: (+0.13%), hidden = int(C_in/4) gives 12,400,596 — the published count was made with the latter.
MOBILENETV2_DY = {1: 12_416_576, 0: 12_400_596}


@pytest.mark.parametrize("name,baseline,K,rule,published", PUBLISHED,
                         ids=[f"{m}-{b}conv{k}x" for m, b, k, _, _ in PUBLISHED])
def test_published_parameter_counts(name, baseline, K, rule, published):
    convert = to_dyconv if baseline == "dy" else to_odconv
    model = convert(models.create(name), K=K, rule=rule)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(published * 1e6, rel=1e-3), f"{name} {baseline}conv{K}x: {count}"


@pytest.mark.parametrize("hidden_offset", [1, 0])
def test_mobilenetv2_dyconv_parameter_count(hidden_offset):
    model = to_dyconv(models.create("mobilenetv2_100"), K=4, rule="mobilenetv2", hidden_offset=hidden_offset)
    assert sum(isinstance(m, DYConv2d) for m in model.modules()) == 51
    count = sum(p.numel() for p in model.parameters())
    assert count == MOBILENETV2_DY[hidden_offset]
    if hidden_offset == 0:
        assert count == pytest.approx(12.40e6, rel=1e-3)


def test_resnet18_baselines_run():
    x = torch.randn(2, 3, 32, 32)
    for convert in (to_dyconv, to_odconv):
        model = convert(models.create("resnet18", num_classes=10), K=4, rule="resnet").eval()
        with torch.no_grad():
            released = set_baseline_formulation(model, "released") and model(x)
            fast = set_baseline_formulation(model, "fast") and model(x)
        assert released.shape == (2, 10)
        torch.testing.assert_close(fast, released, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, published", [
    ("resnet18_dy4x", 45.47e6), ("resnet18_od4x", 44.90e6), ("resnet50_dy4x", 100.88e6), ("resnet50_od4x", 90.67e6),
    ("mobilenetv2_100_od4x", 11.51e6),
])
def test_registered_baseline_presets_have_the_published_sizes(name, published):
    import kw_ops

    params = kw_ops.count_parameters(kw_ops.models.create(name))
    assert abs(params - published) / published < 1e-3, (name, params)
