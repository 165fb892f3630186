"""Deployment: the export formulation, ONNX with a dynamic batch, torch.export, tracing, detection setup."""
import threading

import pytest
import torch
import torch.nn as nn
from oracle import kw_conv_loop

import kw_ops
from kw_ops.deploy import FrozenBatchNorm1d, export_onnx, prepare_for_detection
from kw_ops.ops.export_impl import export_conv, export_mode, exporting

DT = torch.float64


@pytest.mark.parametrize("dims, groups, cell", [(2, 1, 1), (2, 2, 3), (1, 3, 1), (3, 1, 1), (2, 6, 1)])
def test_export_formulation_matches_loop(dims, groups, cell):
    kernel = (3,) * dims
    x = torch.randn(2, 6, *([7] * dims), dtype=DT)
    c_in = 1 if groups >= 3 else 3
    warehouse = torch.randn(4, 2, c_in, *([cell] * dims), dtype=DT)
    m = (3 ** dims if cell == 1 else 1) * 3 * (6 // groups // c_in)
    attn = torch.randn(2, m, 4, dtype=DT)
    bias = torch.randn(6, dtype=DT)
    stride, padding, dilation = (2,) + (1,) * (dims - 1), (1,) * dims, (1,) * (dims - 1) + (2,)
    y = export_conv(x, attn, warehouse, bias, 6, kernel, stride, padding, dilation, groups)
    torch.testing.assert_close(y, kw_conv_loop(x, attn, warehouse, bias, 6, kernel, stride, padding, dilation, groups))


def _small_kw_net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 16, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    model = kw_ops.convert(net, kw_ops.KWConfig(budget=2), sharing=lambda n, m: {"3": "a", "5": "b", "8": "c"}.get(n))
    kw_ops.set_temperature(model, 0.3)
    return model.eval()


def test_layers_use_the_export_formulation_when_exporting():
    model = _small_kw_net()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad(), export_mode():
        exported = model(x)
    torch.testing.assert_close(exported, model(x), rtol=1e-5, atol=1e-5)


def test_export_mode_holds_only_in_the_thread_that_entered_it():
    entered, checked = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)
    seen = {}

    def exporting_thread():
        with export_mode():
            with export_mode():
                entered.wait()
                checked.wait()
            seen["nested"] = exporting()
        seen["left"] = exporting()

    thread = threading.Thread(target=exporting_thread)
    thread.start()
    entered.wait()
    try:
        seen["other thread"] = exporting()
    finally:
        checked.wait()
        thread.join()
    assert seen == {"other thread": False, "nested": True, "left": False}


def test_onnx_export_from_a_batch_1_example_has_a_dynamic_batch_and_keeps_train_mode(tmp_path):
    """A batch-1 example (the one torch.export would specialise) still gives a graph for any batch, run
    in onnxruntime; a model in training mode is back in training mode afterwards."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _small_kw_net().train()
    path = export_onnx(model, torch.randn(1, 3, 12, 12), str(tmp_path / "kw.onnx"))
    assert model.training
    model.eval()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 12, 12]
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-4)


def _record_modes_then(outcome):
    """A stand-in for torch.onnx.export: records every module's training flag during the export, then
    raises `outcome` (an exception) or returns it."""
    seen = []

    def export(model, *args, **kwargs):
        seen.append({name: module.training for name, module in model.named_modules()})
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return export, seen


@pytest.mark.parametrize("modes", ["train", "eval", "mixed"])
@pytest.mark.parametrize("fails", [False, True], ids=["exported", "export-raises"])
def test_onnx_export_restores_each_module_mode(tmp_path, monkeypatch, modes, fails):
    """The export runs in eval mode; afterwards (also when the exporter raises) every module has its own flag
    back: a training model with a frozen BatchNorm keeps that BatchNorm in eval mode."""
    model = _small_kw_net().train(modes != "eval")
    if modes == "mixed":
        model[1].eval()
        model[3].attention.eval()
    before = {name: module.training for name, module in model.named_modules()}
    export, seen = _record_modes_then(RuntimeError("exporter failed") if fails else None)
    monkeypatch.setattr(torch.onnx, "export", export)
    if fails:
        with pytest.raises(RuntimeError, match="exporter failed"):
            export_onnx(model, torch.randn(1, 3, 12, 12), str(tmp_path / "kw.onnx"))
    else:
        export_onnx(model, torch.randn(1, 3, 12, 12), str(tmp_path / "kw.onnx"))
    assert len(seen) == 1 and not any(seen[0].values())  # exported in eval mode
    assert {name: module.training for name, module in model.named_modules()} == before
    assert (modes == "mixed") == (len(set(before.values())) == 2)


def test_onnx_export_refuses_an_empty_example(tmp_path):
    with pytest.raises(ValueError, match=r"\[B >= 1, C, \*size\], got shape \(0, 3, 12, 12\)"):
        export_onnx(_small_kw_net(), torch.randn(0, 3, 12, 12), str(tmp_path / "kw.onnx"))
    assert not (tmp_path / "kw.onnx").exists()


def test_torch_export_and_tracing_keep_the_batch_dynamic():
    model = _small_kw_net()
    with torch.no_grad(), export_mode():
        program = torch.export.export(model, (torch.randn(2, 3, 12, 12),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
        traced = torch.jit.trace(model, torch.randn(2, 3, 12, 12), check_trace=False)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)


def test_exporting_is_seen_while_tracing_exporting_and_in_nested_export_modes():
    """KW layers take the export formulation under torch.jit.trace and torch.export without export_mode() too;
    an inner export_mode() block leaves the outer one in force."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(exporting())
            return x * 2

    assert not exporting()
    torch.jit.trace(Probe(), torch.randn(2, 3), check_trace=False)  # the check reruns it eagerly
    torch.export.export(Probe(), (torch.randn(2, 3),))
    assert seen == [True, True] and not exporting()
    with export_mode():
        with export_mode():
            assert exporting()
        assert exporting()
    assert not exporting()


def test_prepare_for_detection_freezes_norm_and_drops_beta():
    model = _small_kw_net()
    x = torch.randn(4, 3, 12, 12)
    prepare_for_detection(model)
    attention = model[3].attention
    assert isinstance(attention.norm1, FrozenBatchNorm1d)
    assert float(attention.temperature) == 0 and not attention.beta.any()
    model.train()
    before = attention.norm1.running_mean.clone()
    model(x).sum().backward()
    assert torch.equal(before, attention.norm1.running_mean)  # statistics stay frozen in train mode
    model.train()(x[:1])  # a frozen norm trains on one sample too
    state = model.state_dict()
    fresh = prepare_for_detection(_small_kw_net())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
