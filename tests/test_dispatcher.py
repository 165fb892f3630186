"""The dispatcher (kw_ops.ops.dispatch): every candidate against the float64 oracle, the choice on hand-set costs
(released cheapest, a margin, the memory budget), forced backends and transforms honoured, the CPU cost
composition on owned constants, calibration and its cache, Triton's verification on first use and its arch gate."""
import dataclasses
import json
import math
import warnings

import pytest
import torch
from oracle import kw_conv_loop

import kw_ops
from kw_ops.deploy import export_mode
from kw_ops.ops import cpu_costs, dispatch, use_backend, verify
from kw_ops.ops.backends import BackendUnavailableError

CPP = pytest.importorskip("kw_ops.ops.cpp").available()


def _tensors(batch=3, channels=8, out_channels=12, size=(7, 6), cell=(4, 4, 1, 1), n=5, dtype=torch.float64,
             grad=True, groups=1):
    torch.manual_seed(1)
    kernel = (3, 3)
    m = out_channels * (channels // groups) * math.prod(kernel) // math.prod(cell)
    x = torch.randn(batch, channels, *size, dtype=dtype, requires_grad=grad)
    attn = torch.randn(batch, m, n, dtype=dtype, requires_grad=grad)
    warehouse = torch.randn(n, *cell, dtype=dtype, requires_grad=grad)
    bias = torch.randn(out_channels, dtype=dtype, requires_grad=grad)
    geometry = {"out_channels": out_channels, "kernel_size": kernel, "stride": (2, 1), "padding": (1, 1),
                "dilation": (1, 1), "groups": groups}
    return x, attn, warehouse, bias, geometry


def _runnable(formulation):
    return not (formulation.startswith("op:cpp") and not CPP) and formulation != "op:triton"


@pytest.mark.parametrize("formulation, groups", [(f, g) for f in dispatch.FORMULATIONS if _runnable(f)
                                                   for g in (1, 2) if g == 1 or not f.endswith(":gemm")])
def test_every_candidate_gives_the_oracles_outputs_and_gradients(formulation, groups):
    """(the gemm formulations run groups = 1 only; the dispatcher never offers them otherwise)"""
    x, attn, warehouse, bias, geometry = _tensors(groups=groups)
    args = (geometry["out_channels"], geometry["kernel_size"], geometry["stride"], geometry["padding"],
            geometry["dilation"], geometry["groups"])
    y = dispatch.run_formulation(formulation, x, attn, warehouse, bias, *args)
    expected = kw_conv_loop(x, attn, warehouse, bias, *args)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-9)
    weight = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # not a plain sum: every position counts
    got = torch.autograd.grad((y * weight).sum(), (x, attn, warehouse, bias))
    want = torch.autograd.grad((expected * weight).sum(), (x, attn, warehouse, bias))
    for name, g, w in zip(("x", "attn", "warehouse", "bias"), got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-8, msg=f"{formulation} d{name}")


# -- the choice on hand-set costs ---------------------------------------------------------------
def _call(**changes):
    base = dispatch.Call("cpu", "float32", 8, 64, (14, 14), 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, 16,
                         (64, 64, 1, 1), backward=True)
    return dataclasses.replace(base, **changes)


@pytest.fixture
def costs(monkeypatch):
    """Hand-set estimates: {formulation: (seconds, calibrated)}; formulations not listed cost 1 s."""
    table = {}

    def fake(formulation, call, rates=None):
        seconds, calibrated = table.get(formulation, (1.0, True))
        return dispatch.Estimate(formulation, seconds, calibrated)

    monkeypatch.setattr(dispatch, "estimate", fake)
    monkeypatch.delenv("KW_OPS_BACKEND", raising=False)
    monkeypatch.delenv(dispatch.KEEP_BYTES_ENV, raising=False)
    dispatch.clear_decisions()
    yield table
    dispatch.clear_decisions()


def test_released_is_chosen_where_it_is_cheapest(costs):
    costs.update({"released": (0.010, True), "op:torch:grouped": (0.012, True), "op:cpp:gemm": (0.011, True)})
    decision = dispatch.decide(_call())
    assert decision.formulation == "released" and "cheapest" in decision.reason


def test_another_formulation_replaces_released_only_beyond_the_margin(costs):
    assert dispatch.MARGIN == 0.10 and dispatch.DEFAULT_MARGIN == 0.5
    costs.update({"released": (0.010, True), "op:cpp:gemm": (0.0085, True)})    # 15 % faster, calibrated
    assert dispatch.decide(_call()).formulation == ("op:cpp:gemm" if CPP else "released")
    dispatch.clear_decisions()
    costs.update({"op:cpp:gemm": (0.0092, True), "op:torch:gemm": (0.0092, True)})  # 8 %: within the margin
    decision = dispatch.decide(_call())
    assert decision.formulation == "released" and "below the 10% margin" in decision.reason
    dispatch.clear_decisions()
    costs.update({"op:torch:gemm": (0.0055, False)})                            # 45 % on default rates
    decision = dispatch.decide(_call())
    assert decision.formulation == "released" and "below the 50% margin" in decision.reason
    dispatch.clear_decisions()
    costs.update({"op:torch:gemm": (0.0045, False)})                            # 55 % on default rates
    assert dispatch.decide(_call()).formulation == "op:torch:gemm"


def test_the_memory_budget_refuses_keeping_in_training_only(costs, monkeypatch):
    costs.update({"released": (0.001, True), "op:torch:grouped": (0.002, True)})
    call = _call()
    kept = 8 * 64 * 64 * 9 * 4
    assert call.kept_bytes == kept
    monkeypatch.setenv(dispatch.KEEP_BYTES_ENV, str(kept))      # at the budget: kept
    assert dispatch.decide(call).formulation == "released"
    monkeypatch.setenv(dispatch.KEEP_BYTES_ENV, str(kept - 1))  # one byte under: refused, the op runs
    decision = dispatch.decide(call)
    assert decision.formulation != "released"
    assert "KW_OPS_KEEP_BYTES" in next(e.why_not for e in decision.estimates if e.formulation == "released")
    assert dispatch.decide(_call(backward=False)).formulation == "released"  # inference keeps nothing
    monkeypatch.setenv(dispatch.KEEP_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match="KW_OPS_KEEP_BYTES"):
        dispatch.decide(call)


def test_forced_backends_and_formulations_win_over_cost(costs):
    costs.update({"released": (0.001, True), "op:torch:gemm": (0.5, True), "op:torch:grouped": (0.4, True)})
    assert dispatch.decide(_call(), backend="torch").formulation == "op:torch:grouped"
    with use_backend("torch"):
        decision = dispatch.decide(_call())
    assert decision.formulation == "op:torch:grouped" and "use_backend()" in decision.reason
    assert dispatch.decide(_call(), backend="torch", formulation="gemm").formulation == "op:torch:gemm"
    assert dispatch.decide(_call(), formulation="gemm").formulation.endswith(":gemm")
    if CPP:
        assert dispatch.decide(_call(), backend="cpp").formulation.startswith("op:cpp:")


def test_transforms_restrict_the_candidates(costs):
    costs.update({"released": (0.001, True)})
    assert dispatch.decide(_call(transform="export")).formulation == "export"
    decision = dispatch.decide(_call(transform="func"))
    assert decision.formulation.startswith("op:")
    assert "torch.func" in next(e.why_not for e in decision.estimates if e.formulation == "released")


def test_layers_run_what_was_decided_under_transforms_and_grad_modes(monkeypatch):
    monkeypatch.delenv("KW_OPS_BACKEND", raising=False)
    layer = kw_ops.KWConv2d(8, 8, 3, padding=1, warehouse=kw_ops.KWConfig(norm="layer")).train()
    layer._name = "probe"
    x = torch.randn(2, 8, 6, 6)
    with dispatch.recording() as log:
        layer(x).sum().backward()
        with torch.no_grad():
            layer(x)
        torch.func.grad(lambda t: layer(t).sum())(x)
        with export_mode(), torch.no_grad():
            layer(x)
    names = [name for name, _, _ in log]
    calls = [call for _, call, _ in log]
    decisions = [d.formulation for _, _, d in log]
    assert names == ["probe"] * 4
    assert [c.backward for c in calls] == [True, False, True, False]
    assert [c.transform for c in calls] == ["", "", "func", "export"]
    assert decisions[2].startswith("op:") and decisions[3] == "export"


def test_torch_compile_fullgraph_runs_the_decided_formulation(monkeypatch):
    import torch._dynamo

    monkeypatch.delenv("KW_OPS_BACKEND", raising=False)
    torch._dynamo.reset()
    layer = kw_ops.KWConv2d(4, 8, 3, padding=1, warehouse=kw_ops.KWConfig()).train()
    x = torch.randn(3, 4, 6, 6)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.square().mean().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    expected = layer(x)
    expected.square().mean().backward()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    for g, p in zip(got, layer.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


# -- the CPU cost composition -------------------------------------------------------------------
def test_cpu_kernels_of_released_and_the_op_on_owned_constants():
    call = _call()          # B 8, 64 -> 64 3x3 @14x14, n 16, cells 64x64: m = 9, cell 4096, P = 36,864
    assert (call.m, call.weights, call.out_size) == (9, 36864, (14, 14))
    mix = next(k for k in dispatch.cpu_kernels("released", call) if k.kind == "gemm")  # listed first: the mixing
    assert mix.dims == (8 * 9, 4096, 16) and mix.work == 2 * 72 * 4096 * 16
    forward = next(k for k in dispatch.cpu_kernels("released", call) if k.kind == "conv")
    assert forward.dims[:4] == (0, 8, 64, 64) and forward.work == 2 * 8 * 64 * 64 * 9 * 196
    passes = sorted(k.dims[0] for k in dispatch.cpu_kernels("released", call) if k.kind == "conv")
    assert passes == [0, 1, 2]
    assert sorted(k.dims[0] for k in dispatch.cpu_kernels("released", _call(input_grad=False))
                  if k.kind == "conv") == [0, 2]          # no dx for a first layer
    op = dispatch.cpu_kernels("op:torch:grouped", call)
    assert sum(k.kind == "gemm" and k.dims == (72, 4096, 16) for k in op) == 2  # the op mixes again
    inference = dispatch.cpu_kernels("released", _call(backward=False))
    assert [k.kind for k in inference] == ["call", "gemm", "copy", "conv"]
    table = cpu_costs.RateTable(defaults={**cpu_costs.DEFAULT_RATES, "call:released_forward": 0.0})
    rates = cpu_costs.DEFAULT_RATES
    half = cpu_costs._HALF_RATE_FLOPS
    expected = ((2 * 72 * 4096 * 16 + half) / rates["gemm"] + 2 * 8 * 36864 * 4 / rates["copy"]
                + (2 * 8 * 64 * 64 * 9 * 196 + half) / rates["conv"])
    assert table.seconds(inference[0]) == 0.0
    assert sum(table.seconds(k) for k in inference) == pytest.approx(expected)


def test_buckets_round_in_log_scale_and_keep_taps_and_strides_exact():
    assert [cpu_costs.bucket(v) for v in (1, 3, 5, 6, 49, 196, 784, 3136)] == [1, 4, 4, 8, 64, 256, 1024, 4096]
    a = cpu_costs.conv(0, 2, 64, 64, (3, 3), (14, 14), (1, 1), (1, 1), (1, 1), "float32")
    b = cpu_costs.conv(0, 2, 60, 70, (3, 3), (15, 13), (1, 1), (1, 1), (1, 1), "float32")
    c = cpu_costs.conv(0, 2, 64, 64, (1, 1), (14, 14), (1, 1), (0, 0), (1, 1), "float32")
    d = cpu_costs.conv(0, 2, 64, 64, (3, 3), (28, 28), (2, 2), (1, 1), (1, 1), "float32")
    assert a.key == b.key and a.key != c.key and a.key != d.key


def test_calibration_measures_saves_and_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_costs.CACHE_ENV, str(tmp_path / "rates.json"))
    cpu_costs._cached_table.cache_clear()
    call = _call(batch=2, channels=8, out_channels=8, size=(6, 6), n=3, cell=(4, 4, 1, 1))
    assert not dispatch.estimate("released", call).calibrated
    table = dispatch.calibrate_calls([call])
    assert table.rates and all(rate > 0 for rate in table.rates.values())
    saved = json.loads((tmp_path / "rates.json").read_text())
    assert saved["machine"] == cpu_costs.machine_key() and saved["rates"] == table.rates
    assert dispatch.estimate("released", call).calibrated
    # another machine's (or torch's, or thread count's) file is ignored
    saved["machine"] = "another machine"
    (tmp_path / "rates.json").write_text(json.dumps(saved))
    cpu_costs._cached_table.cache_clear()
    assert not dispatch.estimate("released", call).calibrated
    cpu_costs._cached_table.cache_clear()


# -- Triton: verification on first use, arch gate, precision ------------------------------------
def _interpreter():
    pytest.importorskip("triton")
    from kw_ops.ops.triton import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it where CUDA is absent)")


@pytest.fixture
def fresh_verification(monkeypatch):
    monkeypatch.delenv(verify.VERIFY_ENV, raising=False)
    verify.reset()
    dispatch.clear_decisions()
    yield
    verify.reset()
    dispatch.clear_decisions()


def test_a_wrong_triton_forward_is_caught_warned_once_and_falls_back(monkeypatch, fresh_verification):
    _interpreter()
    from kw_ops.ops.triton import launch

    real = launch.kw_conv_triton_forward
    calls = []

    def wrong(*args, **kwargs):
        calls.append(1)
        y = real(*args, **kwargs)
        y[:, :, 0] = 0             # a skipped first row: a phase or chunk border bug
        return y

    monkeypatch.setattr(launch, "kw_conv_triton_forward", wrong)
    x, attn, warehouse, bias, geometry = _tensors(grad=False, dtype=torch.float32)
    expected = kw_ops.ops.kw_conv(x, attn, warehouse, bias, backend="torch", **geometry)
    with pytest.warns(RuntimeWarning, match=r"Triton forward of conv9 .*disagrees with the torch path"):
        y = kw_ops.ops.kw_conv(x, attn, warehouse, bias, backend="triton", name="conv9", **geometry)
    torch.testing.assert_close(y, expected)
    assert calls == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = kw_ops.ops.kw_conv(x, attn, warehouse, bias, backend="triton", name="conv9", **geometry)
    torch.testing.assert_close(y, expected)
    assert calls == [1]            # the key runs the torch path from now on
    call = dispatch.Call.of(x, attn, warehouse, **geometry)
    assert verify.failed(call)


def test_a_wrong_triton_gradient_is_caught(monkeypatch, fresh_verification):
    _interpreter()
    from kw_ops.ops.triton import launch

    real = launch.kw_conv_triton_backward

    def wrong(*args, **kwargs):
        dx, dattn, dwarehouse, dbias = real(*args, **kwargs)
        return dx, dattn, dwarehouse * 1.05, dbias  # one slice of rows lost in 20 would do the same

    monkeypatch.setattr(launch, "kw_conv_triton_backward", wrong)
    x, attn, warehouse, bias, geometry = _tensors(dtype=torch.float32)
    y = kw_ops.ops.kw_conv(x, attn, warehouse, bias, backend="triton", **geometry)
    with pytest.warns(RuntimeWarning, match=r"Triton backward .* dwarehouse: max abs error"):
        grads = torch.autograd.grad(y.square().sum(), (x, attn, warehouse, bias))
    reference = kw_ops.ops.kw_conv(x, attn, warehouse, bias, backend="torch", **geometry)
    for got, want in zip(grads, torch.autograd.grad(reference.square().sum(), (x, attn, warehouse, bias))):
        # fp32 through a Triton forward: within fp32 rounding of the largest gradient, far below the planted 5 %
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_verification_can_be_turned_off_or_kept_on(monkeypatch, fresh_verification):
    _interpreter()
    from kw_ops.ops.triton import launch

    real = launch.kw_conv_triton_forward
    monkeypatch.setattr(launch, "kw_conv_triton_forward", lambda *a, **k: real(*a, **k) + 1.0)
    x, attn, warehouse, bias, geometry = _tensors(grad=False, dtype=torch.float32)
    expected = kw_ops.ops.kw_conv(x, attn, warehouse, bias, backend="torch", **geometry)
    monkeypatch.setenv(verify.VERIFY_ENV, "0")
    y = kw_ops.ops.kw_conv(x, attn, warehouse, bias, backend="triton", **geometry)
    torch.testing.assert_close(y, expected + 1.0)      # off: nothing compared
    monkeypatch.setenv(verify.VERIFY_ENV, "sometimes")
    with pytest.raises(ValueError, match="KW_OPS_VERIFY must be 0, 1 or always"):
        kw_ops.ops.kw_conv(x, attn, warehouse, bias, backend="triton", **geometry)


def test_arch_gate(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "sm_75 has no tensor cores for bfloat16" in verify.arch_reasons(cuda, torch.bfloat16)[0]
    assert verify.arch_reasons(cuda, torch.float32)            # TF32 needs sm_80
    assert verify.arch_reasons(cuda, torch.float16) == []      # fp16 tensor cores since sm_70
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert verify.arch_reasons(cuda, torch.bfloat16) == []
    monkeypatch.setattr(torch.version, "hip", "6.2")
    properties = type("P", (), {"gcnArchName": "gfx1100"})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    assert "ROCm gfx1100" in verify.arch_reasons(cuda, torch.bfloat16)[0]
    properties.gcnArchName = "gfx942:sramecc+:xnack-"
    assert verify.arch_reasons(cuda, torch.bfloat16) == []
    assert verify.arch_reasons(torch.device("cpu"), torch.float64) == []  # the interpreter


def test_sixteen_bit_dots_ask_for_no_tf32():
    """ROCm compiles input_precision='tf32' only on gfx942; 16-bit operands never need it."""
    pytest.importorskip("triton")
    from kw_ops.ops.triton import launch

    assert launch._input_precision(torch.bfloat16, None) == "ieee"
    assert launch._input_precision(torch.float16, None) == "ieee"
    assert launch._input_precision(torch.float32, None) == "tf32"
    assert launch._input_precision(torch.float32, "ieee") == "ieee"


def test_the_automatic_choice_leaves_out_triton_for_a_key_that_failed(monkeypatch, fresh_verification):
    x, attn, warehouse, bias, geometry = _tensors(grad=False, dtype=torch.float32)
    call = dataclasses.replace(dispatch.Call.of(x, attn, warehouse, **geometry), device="cuda")
    monkeypatch.setattr(dispatch, "_backend_reasons", lambda backend, c, tensors: [])
    monkeypatch.setattr(verify, "failed", lambda c: True)
    decision = dispatch.decide(call)
    assert decision.formulation != "op:triton"
    why = next(e.why_not for e in decision.estimates if e.formulation == "op:triton")
    assert "disagreed with the torch path" in why
    dispatch.clear_decisions()
    monkeypatch.setattr(verify, "failed", lambda c: False)
    assert "op:triton" in {e.formulation for e in dispatch.decide(call).estimates if e.seconds is not None}


def test_a_call_under_autocast_is_priced_in_the_autocast_dtype(monkeypatch):
    """The op runs floating inputs in the autocast dtype, so the dispatcher prices (and keys) the call in it; an
    invalid KW_OPS_TRITON_MODE is refused by the estimate as by the launcher."""
    x, attn, warehouse, bias, geometry = _tensors(grad=False, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.Call.of(x, attn, warehouse, **geometry).dtype == "bfloat16"
    assert dispatch.Call.of(x, attn, warehouse, **geometry).dtype == "float32"
    monkeypatch.setenv("KW_OPS_TRITON_MODE", "fused")
    call = dataclasses.replace(dispatch.Call.of(x, attn, warehouse, **geometry), device="cuda")
    with pytest.raises(ValueError, match="KW_OPS_TRITON_MODE"):
        dispatch.estimate("op:triton", call)


def test_the_triton_estimate_is_the_mode_the_launcher_runs(monkeypatch):
    """op:triton is priced per pass by the cheapest built Triton mode (launch.choose_mode's pick), or by the mode
    KW_OPS_TRITON_MODE forces; blocked cannot run a depthwise layer, which is priced as two_phase."""
    from kw_ops.ops.triton import cost_model

    monkeypatch.delenv("KW_OPS_TRITON_MODE", raising=False)
    monkeypatch.delenv(cost_model.PEAKS_ENV, raising=False)
    # ResNet50 KW1x layer4.1.conv2 at batch 128 in bf16, a training step
    call = dispatch.Call("cuda", "bfloat16", 128, 512, (7, 7), 512, (3, 3), (1, 1), (1, 1), (1, 1), 1, 47,
                         (512, 512, 1, 1), backward=True, input_grad=True)
    shape = cost_model.ConvShape(128, 512, 512, (7, 7), (7, 7), (3, 3), 1, 47, 9, 2, cell_rows=512, cell_cols=512)
    best = {d: min(cost_model.predict(shape, mode, d).seconds for mode in cost_model.KERNEL_MODES)
            for d in ("forward", "dx", "wgrad")}
    assert best["forward"] < cost_model.predict(shape, "two_phase", "forward").seconds   # blocked wins here
    assert dispatch.estimate("op:triton", call).seconds == pytest.approx(sum(best.values()))
    monkeypatch.setenv("KW_OPS_TRITON_MODE", "two_phase")
    forced = sum(cost_model.predict(shape, "two_phase", d).seconds for d in ("forward", "dx", "wgrad"))
    assert dispatch.estimate("op:triton", call).seconds == pytest.approx(forced)
    monkeypatch.setenv("KW_OPS_TRITON_MODE", "blocked")
    depthwise = dataclasses.replace(call, channels=512, groups=512, cell=(512, 1, 1, 1))
    dw_shape = dataclasses.replace(shape, groups=512, cell_cols=1)
    assert dispatch.estimate("op:triton", depthwise).seconds == pytest.approx(
        sum(cost_model.predict(dw_shape, "two_phase", d).seconds for d in ("forward", "dx", "wgrad")))


# -- the command line -----------------------------------------------------------------------------
def test_describe_dispatch_prints_every_kw_layer_its_pick_and_the_estimates(capsys, tmp_path, monkeypatch):
    from kw_ops.__main__ import main

    monkeypatch.setenv(cpu_costs.CACHE_ENV, str(tmp_path / "none.json"))
    cpu_costs._cached_table.cache_clear()
    dispatch.clear_decisions()
    assert main(["describe", "tiny_kw1x", "--dispatch", "--size", "16", "--train"]) == 0
    out = capsys.readouterr().out.splitlines()
    model = kw_ops.models.create("tiny_kw1x")
    names = [n for n, m in model.named_modules() if isinstance(m, kw_ops.nn.layers.KWLayer)]
    assert "batch 2, 16x16, training step" in out[0] and "defaults" in out[0]
    rows = [line for line in out if line.split(" ")[0] in names]
    assert [r.split()[0] for r in rows] == names
    assert all(any(f in r for f in dispatch.FORMULATIONS) for r in rows)
    assert any(line.startswith("sum of the estimates (ms)") for line in out)
    cpu_costs._cached_table.cache_clear()
    for bad in (["--batch", "0"], ["--size", "0"], ["--device", "tpu"], ["--train", "--batch", "1"]):
        assert main(["describe", "tiny_kw1x", "--dispatch", *bad]) == 2
        assert capsys.readouterr().err.startswith("kw_ops describe: ")


def test_calibrate_command_times_a_models_calls_into_the_cache(capsys, tmp_path, monkeypatch):
    from kw_ops.__main__ import main

    cache = tmp_path / "rates.json"
    monkeypatch.setenv(cpu_costs.CACHE_ENV, str(cache))
    cpu_costs._cached_table.cache_clear()
    assert main(["calibrate", "--models", "tiny_kw1x", "--size", "16", "--batch", "2"]) == 0
    assert "kernel buckets" in capsys.readouterr().out
    rates = json.loads(cache.read_text())["rates"]
    assert rates and all(key.startswith("formulation:") for key in rates)
    assert any(key.startswith("formulation:released:") for key in rates)
    assert main(["calibrate", "--models", "nope_kw1x"]) == 2
    assert "--models: unknown model(s) nope_kw1x" in capsys.readouterr().err
    cpu_costs._cached_table.cache_clear()
    dispatch.clear_decisions()
