"""Asking for a backend: per-call argument, context manager, KW_OPS_BACKEND, forced-backend errors, the report.
(What runs when nothing is forced: tests/test_dispatcher.py.)"""
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import kw_ops
from kw_ops.ops import BackendUnavailableError, backend_report, backends, kw_conv, not_supported_reasons, use_backend


def _inputs():
    x, attn, warehouse = torch.randn(2, 8, 5, 5), torch.randn(2, 9, 4), torch.randn(4, 8, 8, 1, 1)
    return x, attn, warehouse


def _call(**kwargs):
    x, attn, warehouse = _inputs()
    return kw_conv(x, attn, warehouse, out_channels=8, kernel_size=3, padding=1, **kwargs)


def test_torch_backend_runs_everywhere():
    assert not_supported_reasons("torch", *_inputs()) == []
    assert _call(backend="torch").shape == (2, 8, 5, 5)


def test_forced_backend_that_cannot_run_raises_with_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled Triton, as on a user's machine
    with pytest.raises(BackendUnavailableError) as info:
        _call(backend="triton")
    message = str(info.value)
    assert "need CUDA tensors, got cpu" in message and "'triton'" in message
    with pytest.raises(BackendUnavailableError, match=r"float16"):
        x, attn, warehouse = (t.half() for t in _inputs())
        kw_conv(x, attn, warehouse, out_channels=8, kernel_size=3, padding=1, backend="cpp")


def test_a_backend_with_no_code_behind_it_is_not_listed():
    assert set(backends.BACKENDS) == {"torch", "triton", "cpp"}
    with pytest.raises(ValueError, match="unknown KW backend 'cuda'"):
        _call(backend="cuda")


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="KW_OPS_BACKEND=triton"):
        _call()
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert _call().shape == (2, 8, 5, 5)


def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown KW backend 'nope'"):
        _call(backend="nope")
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="KW_OPS_BACKEND"):
        _call()
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("nope"):
            pass


def test_context_manager_overrides_env_and_call_overrides_context(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    with use_backend("triton"):
        with pytest.raises(BackendUnavailableError, match=r"use_backend\(\)"):
            _call()
        assert _call(backend="torch").shape == (2, 8, 5, 5)
        with use_backend("auto"):
            assert _call().shape == (2, 8, 5, 5)
    assert _call().shape == (2, 8, 5, 5)


def test_use_backend_holds_only_in_the_thread_that_entered_it():
    """One thread inside use_backend('triton') (which cannot run CPU tensors), the other outside it at the same
    time: the other still chooses automatically and runs."""
    entered, checked = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)
    seen = {}

    def forcing():
        with use_backend("torch"):
            with use_backend("triton"):
                seen["nested"] = backends.requested_backend()[0]
                entered.wait()
                checked.wait()
                seen["after"] = backends.requested_backend()[0]
            seen["outer"] = backends.requested_backend()[0]
        seen["left"] = backends.requested_backend()[0]

    thread = threading.Thread(target=forcing)
    thread.start()
    entered.wait()
    try:
        seen["other thread"] = backends.requested_backend()
        assert _call().shape == (2, 8, 5, 5)
    finally:
        checked.wait()
        thread.join()
    assert seen == {"nested": "triton", "other thread": ("auto", "automatic"), "after": "triton", "outer": "torch",
                    "left": "auto"}


def test_kw_ops_no_ext_at_run_time_leaves_the_extension_unloaded_and_full_graph_compiles():
    """KW_OPS_NO_EXT=1: kw_ops._C is not loaded (as on a machine without a compiler), the cpp backend says why,
    and the automatic choice inside a full-graph torch.compile looks at no file."""
    script = textwrap.dedent("""
        import sys, torch, kw_ops
        from kw_ops.ops import cpp
        assert not cpp.available() and "kw_ops._C" not in sys.modules, sys.modules.get("kw_ops._C")
        assert "KW_OPS_NO_EXT=1 is set" in cpp.unavailable_reasons()[0], cpp.unavailable_reasons()
        layer = kw_ops.KWConv2d(8, 8, 3, padding=1).eval()
        x = torch.randn(2, 8, 6, 6)
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x))
    """)
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, KW_OPS_NO_EXT="1"), text=True,
                            capture_output=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-4000:]


def test_layer_backend_attribute_is_passed_to_the_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = kw_ops.KWConv2d(8, 8, 3, padding=1, warehouse=kw_ops.KWConfig())
    layer.backend = "triton"
    with pytest.raises(BackendUnavailableError):
        layer(torch.randn(2, 8, 5, 5))
    layer.backend = "torch"
    assert layer(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5)


def test_backend_report_lists_every_backend():
    lines = backend_report()
    assert lines[0].startswith("backend choice:")
    for name in backends.BACKENDS:
        assert any(line.startswith(name) for line in lines[1:])
    assert any(line.startswith("torch") and "available" in line and "unavailable" not in line for line in lines)


def test_triton_backend_runs_the_op_under_the_interpreter():
    """The Triton kernels wired behind the registered op (CPU tensors under TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from kw_ops.ops.triton import interpreting

    if not interpreting():
        pytest.skip("this CPU test needs TRITON_INTERPRET=1 (conftest sets it where CUDA is absent)")
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    attn = torch.randn(2, 9 * 2, 5, dtype=torch.float64, requires_grad=True)
    warehouse = torch.randn(5, 8, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    outputs = {}
    for backend in ("torch", "triton"):
        y = kw_ops.ops.kw_conv(x, attn, warehouse, bias, out_channels=8, kernel_size=3, stride=(2, 1), padding=1,
                               backend=backend)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                    (x, attn, warehouse, bias))
        outputs[backend] = (y, *grads)
    for torch_out, triton_out in zip(outputs["torch"], outputs["triton"]):
        torch.testing.assert_close(triton_out, torch_out, rtol=1e-9, atol=1e-9)


def test_forcing_triton_on_a_3d_conv_says_why():
    pytest.importorskip("triton")
    x, attn, warehouse = torch.randn(2, 4, 5, 5, 5), torch.randn(2, 27, 3), torch.randn(3, 4, 4, 1, 1, 1)
    with pytest.raises(BackendUnavailableError, match="3-D"):
        kw_ops.ops.kw_conv(x, attn, warehouse, out_channels=4, kernel_size=3, backend="triton")


def test_info_reports_an_unknown_env_backend_instead_of_failing(monkeypatch, capsys):
    from kw_ops.__main__ import main

    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    assert main(["info"]) == 0
    choice = next(line for line in capsys.readouterr().out.splitlines() if "backend choice" in line)
    assert "KW_OPS_BACKEND" in choice and "'bogus'" in choice and "auto, torch, triton, cpp" in choice
    with pytest.raises(ValueError, match=r"KW_OPS_BACKEND: unknown KW backend 'bogus'; choose one of auto, torch, "
                                         r"triton, cpp"):
        _call()
