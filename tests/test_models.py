"""The model zoo (kw_ops.models): the paper's presets against the authors' plans (docs/semantics.md §6, §7, §10),
static twins, the registry, and loading checkpoints in the authors' format (docs/semantics.md §8).

The fixtures (`<preset>.json`, dumped from the authors' models) are the oracle: warehouse shapes in
order of first reservation, every KW layer's path, m, [S, GO, GI] grid, β and attention size, the
convs left static, and the total parameter count.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kw_ops
import kw_ops.models as zoo
from kw_ops import KWLayer, KWLinear
from kw_ops.nn.planning import ZERO_CELL


def _fixture_dir() -> Path | None:
    candidates = [os.environ.get("KW_FIXTURES"), Path(__file__).parent / "fixtures"]
    for candidate in candidates:
        if candidate and Path(candidate, "kw1x_resnet18.json").exists():
            return Path(candidate)
    return None


FIXTURES = _fixture_dir()
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason="the authors' plan fixtures (tests/fixtures/*.json) "
                                                             "are not available")

#: docs/semantics.md §7: trainable parameters at 1000 classes (the released configurations).
PARAMS = {
    "resnet18": 11_689_512, "resnet18_kw1d4x": 4_031_768, "resnet18_kw1d2x": 7_431_044,
    "resnet18_kw1x": 11_932_148, "resnet18_kw2x": 23_242_127, "resnet18_kw4x": 45_862_085,
    "resnet50": 25_557_032, "resnet50_kw1d2x": 17_638_264, "resnet50_kw1x": 28_052_310,
    "resnet50_kw4x": 102_015_144,
    "mobilenetv2_100": 3_504_872, "mobilenetv2_100_kw1d2x": 2_654_396, "mobilenetv2_100_kw1x": 5_168_146,
    "mobilenetv2_100_kw4x": 11_379_382,
    "mobilenetv2_050": 1_968_680, "mobilenetv2_050_kw1d2x": 1_466_888, "mobilenetv2_050_kw1x": 2_854_522,
    "mobilenetv2_050_kw4x": 4_648_587,
    "convnext_tiny": 28_589_128, "convnext_tiny_kw1x": 39_370_674,
}
STATIC = [name for name in PARAMS if "_kw" not in name]
KW_PRESETS = [name for name in PARAMS if "_kw" in name]
#: Presets whose forward/backward on CPU takes seconds (big warehouses): still run, marked slow.
SLOW_FORWARD = {"resnet18_kw4x", "convnext_tiny_kw1x", "resnet50_kw1x", "resnet50_kw1d2x", "resnet50_kw4x"}


def fixture_name(preset: str) -> str:
    """'resnet18_kw1d4x' -> 'kw1d4x_resnet18' (the authors' naming)."""
    static, _, budget = preset.rpartition("_")
    return f"{budget}_{static}"


def static_of(preset: str) -> str:
    return preset.rpartition("_")[0]


@pytest.fixture(scope="module", params=KW_PRESETS)
def kw_model(request):
    """(preset name, model), built once per preset for the whole module."""
    torch.manual_seed(0)
    return request.param, zoo.create(request.param)


def kw_layers(model: nn.Module) -> list[tuple[str, KWLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KWLayer)]


# -- registry ---------------------------------------------------------------------------------------------------
def test_registry_lists_every_preset():
    assert set(PARAMS) <= set(zoo.list_models())
    assert zoo.list_models("resnet18_kw1d?x") + zoo.list_models("resnet18_kw?x") == [
        "resnet18_kw1d2x", "resnet18_kw1d4x", "resnet18_kw1x", "resnet18_kw2x", "resnet18_kw4x"]
    assert "resnet18_kw1x_no_partition" in zoo.list_models("resnet18_kw*")
    assert zoo.is_model("convnext_tiny_kw1x") and not zoo.is_model("resnet19")


def test_registry_refuses_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        zoo.create("resnet19")
    with pytest.raises(ValueError, match="already registered"):
        zoo.register("resnet18")(lambda: nn.Identity())
    with pytest.raises(ValueError, match="not a registered KW preset"):
        zoo.recipe("resnet18")


def test_register_decorator_adds_a_builder():
    @zoo.register("_test_tiny_net", overwrite=True)
    def tiny(num_classes=10):
        return nn.Linear(4, num_classes)

    assert "_test_tiny_net" in zoo.list_models("_test*")
    assert zoo.create("_test_tiny_net", num_classes=3).out_features == 3


# -- parameter counts and plans ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STATIC)
def test_static_parameter_count(name):
    assert kw_ops.count_parameters(zoo.create(name)) == PARAMS[name]


def test_kw_parameter_count(kw_model):
    name, model = kw_model
    assert kw_ops.count_parameters(model) == PARAMS[name]


def assert_plan_matches_fixture(name: str, model: nn.Module) -> None:
    """The model's warehouses, KW layers (geometry, m, grid, β, attention) and static convs equal the fixture's."""
    fixture = json.loads((FIXTURES / f"{fixture_name(name)}.json").read_text())
    assert kw_ops.count_parameters(model) == fixture["params"]

    shapes = [tuple(w.cells.shape) for w in kw_ops.warehouses(model)]
    assert shapes == [tuple(w["shape"]) for w in fixture["warehouses"]], "warehouses (order of first reservation)"

    index = {id(w): i for i, w in enumerate(kw_ops.warehouses(model))}
    layers = kw_layers(model)
    assert len(layers) == len(fixture["kw_layers"])
    for (path, layer), ref in zip(layers, fixture["kw_layers"]):
        ref_path = ref["path"][: -len(".conv")] if ref["path"].endswith(".conv") else ref["path"]
        assert path == ref_path
        where = f"{name}: {path}"
        assert (layer.in_channels, layer.out_channels, list(layer.kernel_size), list(layer.stride),
                list(layer.padding), list(layer.dilation), layer.groups, layer.bias is not None) == (
            ref["in"], ref["out"], ref["kernel"], ref["stride"], ref["padding"], ref["dilation"], ref["groups"],
            ref["bias"]), where
        assert isinstance(layer, KWLinear) == ref["path"].endswith(".conv"), where
        assert index[id(layer.warehouse)] == ref["warehouse"], where
        assert (layer.m, list(layer.grid)) == (ref["m"], ref["grid_spatial_out_in"]), where
        beta = list(layer.layer_plan.beta)
        assert beta == ref["beta"], where
        # β as the attention holds it: one-hot rows, the zero cell in column n
        columns = layer.attention.beta.argmax(dim=1).tolist()
        n = layer.warehouse.cells.shape[0]
        assert columns == [n if b == ZERO_CELL else b for b in ref["beta"]], where

        attention, ref_attention = layer.attention, ref["attention"]
        assert attention.fc1.out_features == ref_attention["hidden"], where
        assert type(attention.norm1).__name__ == ref_attention["norm"], where
        assert (attention.fc1.bias is not None) == ref_attention["fc1_bias"], where
        assert attention.num_basis == ref_attention["nonlocal_basis"], where
        assert sum(p.numel() for p in attention.parameters()) == ref_attention["params"], where

    static = [(n, list(m.weight.shape), list(m.stride), m.groups) for n, m in model.named_modules()
              if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)]
    assert static == [(s["path"], s["shape"], s["stride"], s["groups"]) for s in fixture["static_convs"]]


@needs_fixtures
def test_plan_matches_authors_fixture(kw_model):
    assert_plan_matches_fixture(*kw_model)


@pytest.mark.parametrize("name, sizes", [("resnet18_kw1x", [56, 47, 47, 27]), ("resnet50_kw1x", [87, 104, 138, 47])])
def test_table14_stage_sizes(name, sizes):
    """Paper Table 14: cells per stage warehouse at b = 1 (= Σm)."""
    model = zoo.create(name)
    assert [w.cells.shape[0] for w in kw_ops.warehouses(model)] == sizes
    assert [w.plan.total_mixtures for w in kw_ops.warehouses(model)] == sizes


@needs_fixtures
def test_converting_the_static_twin_gives_the_preset(kw_model):
    """convert(static twin, the recipe's config, sharing rule and overrides) builds the authors' plan."""
    name, _ = kw_model
    kw_recipe = zoo.recipe(name)
    assert kw_recipe.static == static_of(name)
    twin = kw_ops.convert(zoo.create(static_of(name)), kw_recipe.config, sharing=kw_recipe.sharing,
                          overrides=kw_recipe.overrides)
    assert_plan_matches_fixture(name, twin)


def test_num_classes_and_in_chans_reach_the_kw_preset():
    model = zoo.create("mobilenetv2_050_kw1d2x", num_classes=10, in_chans=1)
    assert model.classifier[1].out_features == 10 and isinstance(model.classifier[1], KWLinear)
    assert model.features[0][0].in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# -- sharing rules ------------------------------------------------------------------------------------------------
def _conv(k=3, stride=1, groups=1, cin=64, cout=64):
    return nn.Conv2d(cin, cout, k, stride, groups=groups)


@pytest.mark.parametrize("path, module, expected", [
    ("conv1", _conv(7), None),
    ("fc", nn.Linear(512, 10), None),
    ("layer1.0.conv1", _conv(3), "stage0"),             # ResNet18: clamped to stage 0
    ("layer1.0.conv1", _conv(1), None),                 # ResNet50: nothing before stage 0
    ("layer1.0.downsample.0", _conv(1), None),          # ResNet50: stride-1 downsample
    ("layer2.0.conv1", _conv(3, 2), "stage0"),          # hand-over
    ("layer2.0.conv2", _conv(3), "stage1"),
    ("layer2.0.downsample.0", _conv(1, 2), "stage0"),
    ("layer3.1.conv1", _conv(1), "stage2"),
])
def test_resnet_stage_sharing(path, module, expected):
    assert zoo.resnet_stage_sharing(path, module) == expected


def test_mobilenetv2_sharing_hands_first_blocks_back():
    rule = zoo.mobilenetv2_stage_sharing(split_pointwise=True)
    dw, pw = _conv(3, groups=96, cin=96, cout=96), _conv(1, cin=16, cout=96)
    assert rule("features.0.0", _conv(3, 2, cin=3, cout=32)) == "stem"
    assert rule("features.2.conv.1.0", dw) == "stage1_dw"          # first block of group 2 -> stage 1
    assert rule("features.3.conv.0.0", pw) == "stage2_pw_expand"
    assert rule("features.14.conv.2", pw) == "stage5_pw_project"   # first block of group 6 -> stage 5
    assert rule("features.17.conv.2", pw) == "stage6_pw_project"   # group 7 continues stage 6
    assert rule("features.18.0", pw) == "stage6_pw_project"
    assert rule("classifier.1", nn.Linear(1280, 10)) is None
    shared = zoo.mobilenetv2_stage_sharing()
    assert shared("features.3.conv.0.0", pw) == shared("features.3.conv.2", pw) == "stage2_pw"


# -- forward / backward --------------------------------------------------------------------------------------------
def _forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=10)
    kw_ops.set_temperature(model, 0.5)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for wh in kw_ops.warehouses(model):
        assert wh.cells.grad is not None and torch.isfinite(wh.cells.grad).all() and wh.cells.grad.abs().sum() > 0, \
            wh.name
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)


@pytest.mark.parametrize("name", [n for n in PARAMS if n not in SLOW_FORWARD])
def test_forward_backward(name):
    _forward_backward(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_FORWARD))
def test_forward_backward_big(name):
    _forward_backward(name)


def test_tau_one_is_the_static_net_tiled_from_beta():
    """At τ = 1 the KW ResNet18 1/2x is an ordinary conv net: same output as its kernels written into a static twin."""
    torch.manual_seed(0)
    model = zoo.create("resnet18_kw1d2x", num_classes=10).eval()
    kw_ops.set_temperature(model, 1.0)
    static = zoo.create("resnet18", num_classes=10).eval()
    kw_state = model.state_dict()
    merged = {}
    for key, value in static.state_dict().items():
        path = key.rpartition(".")[0]
        layer = model.get_submodule(path)
        if isinstance(layer, KWLayer) and key.endswith("weight"):
            cells = layer.warehouse.cells.detach()
            c_out, c_in = cells.shape[1:3]
            s, go, gi = layer.grid
            weight = torch.zeros_like(value)
            for j, cell in enumerate(layer.layer_plan.beta):
                if cell == ZERO_CELL:
                    continue
                sp, rest = divmod(j, go * gi)
                o, i = divmod(rest, gi)
                kh, kw = divmod(sp, value.shape[3])
                weight[o * c_out:(o + 1) * c_out, i * c_in:(i + 1) * c_in, kh, kw] = cells[cell, :, :, 0, 0]
            merged[key] = weight
        else:
            merged[key] = kw_state[key]
    static.load_state_dict(merged)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), static(x), rtol=1e-4, atol=1e-5)


# -- the authors' checkpoint format (docs/semantics.md §8) ----------------------------------------------------------
ROUND_TRIP = ["resnet18_kw1x", "resnet50_kw1d2x", "mobilenetv2_100_kw1d2x", "mobilenetv2_050_kw4x",
              pytest.param("convnext_tiny_kw1x", marks=pytest.mark.slow)]


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BatchNorm statistic random, so a wrong mapping cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not name.endswith(("attention.beta", "attention.temperature")):
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if name.endswith("running_var") else (noise - 0.5) * 0.1)
    return model


def _is_their_format(state: dict) -> bool:
    return (any(k.startswith("warehouse_manager.weights.") for k in state)
            and not any(k.endswith((".warehouse.cells", "attention.beta", "attention.temperature")) for k in state))


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_load_pretrained_round_trip(name):
    source = _randomize(zoo.create(name, num_classes=1000), seed=1).eval()
    state = zoo.reference_state_dict(source)
    assert _is_their_format(state)
    n_warehouses = len(kw_ops.warehouses(source))
    assert [k for k in state if k.startswith("warehouse_manager")] == [
        f"warehouse_manager.weights.{i}" for i in range(n_warehouses)]
    if any(isinstance(m, KWLinear) for m in source.modules()):
        assert "classifier.1.conv.attention.fc1.weight" in state and "classifier.1.conv.bias" in state

    target = zoo.create(name, num_classes=1000)
    kw_ops.set_temperature(target, 0.7)
    with pytest.warns(UserWarning, match="τ .* set to 0"):
        zoo.load_pretrained(target, state)
    assert kw_ops.get_temperature(target) == 0.0
    target.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@needs_fixtures
@pytest.mark.parametrize("name", ["resnet50_kw1d2x", "mobilenetv2_100_kw4x", "mobilenetv2_050_kw1d2x"])
def test_reference_warehouse_keys_follow_the_fixture(name):
    """warehouse_manager.weights.<i>: i is the authors' order of first reservation (the fixture's 'index')."""
    state = zoo.reference_state_dict(zoo.create(name))
    fixture = json.loads((FIXTURES / f"{fixture_name(name)}.json").read_text())
    for warehouse in fixture["warehouses"]:
        assert tuple(state[f"warehouse_manager.weights.{warehouse['index']}"].shape) == tuple(warehouse["shape"])


@pytest.fixture(scope="module")
def mobilenet_pair():
    source = _randomize(zoo.create("mobilenetv2_050_kw1d2x"), seed=2)
    return source, zoo.reference_state_dict(source)


def _assert_refused(model, state, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        zoo.load_pretrained(model, state)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint must not be partly loaded"


def test_load_pretrained_refuses_a_wrong_shape(mobilenet_pair):
    _, state = mobilenet_pair
    state = dict(state)
    state["warehouse_manager.weights.3"] = torch.zeros(5, 192, 1, 1, 1)
    state["features.18.1.weight"] = torch.zeros(7)
    _assert_refused(zoo.create("mobilenetv2_050_kw1d2x"), state,
                    r"key 'warehouse_manager.weights.3' has shape \(5, 192, 1, 1, 1\).*\(and 1 more problems\)")


def test_load_pretrained_refuses_missing_and_unexpected_keys(mobilenet_pair):
    _, state = mobilenet_pair
    missing = {k: v for k, v in state.items() if k != "classifier.1.conv.attention.fc2.bias"}
    _assert_refused(zoo.create("mobilenetv2_050_kw1d2x"), missing, "missing key 'classifier.1.conv.attention.fc2.bias'")
    extra = dict(state, **{"features.1.conv.0.0.attention.fc9.weight": torch.zeros(1)})
    _assert_refused(zoo.create("mobilenetv2_050_kw1d2x"), extra, "unexpected key 'features.1.conv.0.0.attention.fc9")
    # a checkpoint of another preset (different warehouse shapes) is refused as a whole
    _assert_refused(zoo.create("mobilenetv2_050_kw1x"), state, "does not match MobileNetV2")


def test_load_pretrained_accepts_their_mobilenet_head_and_wrappers():
    """Their 1x/4x MobileNetV2 head is a bare Linear `classifier`; checkpoints may be wrapped / DDP-prefixed."""
    source = _randomize(zoo.create("mobilenetv2_050_kw1x"), seed=3).eval()
    state = zoo.reference_state_dict(source)
    state = {("classifier." + k.split(".", 2)[2] if k.startswith("classifier.1.") else k): v for k, v in state.items()}
    assert "classifier.weight" in state
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    target = zoo.create("mobilenetv2_050_kw1x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zoo.load_pretrained(target, wrapped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source(x), rtol=0, atol=0)


def test_load_pretrained_takes_our_own_state_dict_as_is():
    source = zoo.create("resnet18_kw1d4x", num_classes=10)
    kw_ops.set_temperature(source, 0.25)
    target = zoo.create("resnet18_kw1d4x", num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.load_pretrained(target, source.state_dict())
    assert kw_ops.get_temperature(target) == 0.25


def test_load_pretrained_takes_our_state_dict_with_cells_under_every_member():
    """kw_ops state_dicts listed a shared warehouse under every member; each warehouse now has one key."""
    source = _randomize(zoo.create("resnet18_kw1d4x", num_classes=10), seed=4).eval()
    kw_ops.set_temperature(source, 0.25)
    state = source.state_dict()
    members = {name: m for name, m in source.named_modules() if isinstance(m, KWLayer)}
    owners = [name for name, m in members.items() if "warehouse" in m._modules]
    assert [f"{name}.warehouse.cells" for name in owners] == [k for k in state if k.endswith("warehouse.cells")]
    assert len(owners) == len(kw_ops.warehouses(source)) < len(members)
    old = dict(state, **{f"{name}.warehouse.cells": m.warehouse.cells.detach() for name, m in members.items()})
    target = zoo.create("resnet18_kw1d4x", num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.load_pretrained(target, old)
    assert kw_ops.get_temperature(target) == 0.25
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source(x), rtol=0, atol=0)
    old["layer1.1.conv1.warehouse.cells"] = torch.zeros(1)
    _assert_refused(target, old, r"key 'layer1.1.conv1.warehouse.cells' has shape \(1,\)")
