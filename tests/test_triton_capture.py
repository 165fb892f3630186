"""The compile report's capture (kw_ops.benchmarking.triton_capture): a launch of a small layer records the
specialisation Triton would compile, without a GPU and without running a kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: the capture needs Triton's JIT functions, and this test process has the
# kernels imported under TRITON_INTERPRET=1. Calls: a stride-2 3x3 layer with bias, its depthwise twin
# (groups = channels), both in bf16 and fp32, NCHW and channels_last; a 3-D layer (NCHW only) the backend does not take.
PROGRAM = r"""
import json, torch
from kw_ops.benchmarking import triton_capture as tc
spec = {"channels": 16, "out": 32, "size": (8, 8), "kernel": (3, 3), "stride": (2, 2), "padding": (1, 1),
        "dilation": (1, 1), "groups": 1, "n": 4, "m": 18, "cell": (16, 16, 1, 1), "bias": True, "layer": "toy"}
depthwise = {**spec, "groups": 16, "out": 16, "cell": (16, 1, 1, 1), "m": 9}
cube = {**spec, "size": (4, 4, 4), "kernel": (1, 1, 1), "stride": (1, 1, 1), "padding": (0, 0, 0),
        "dilation": (1, 1, 1), "m": 2, "cell": (16, 16, 1, 1, 1)}
calls = tc.layer_calls([("toy", spec), ("dw", depthwise), ("3d", cube)], [2], [torch.bfloat16, torch.float32],
                       (False, True))
found, skipped = tc.capture(calls)
out = []
for launch, labels in found.items():
    out.append({"kernel": launch.kernel, "dtype": launch.dtype, "signature": dict(launch.signature),
                "constexprs": {k: str(v) for k, v in launch.constexprs}, "divisible": [k for k, pairs in launch.attrs
                if ["tt.divisibility", 16] in [list(p) for p in pairs]], "options": dict(launch.options),
                "labels": labels, "text": launch.specialisation(),
                "key_matches": launch.launch_key == tc.compile_key(launch)})
print(json.dumps({"launches": out, "skipped": skipped}))
"""
CONV = ("kw_conv_fwd_kernel", "kw_conv_dx_kernel", "kw_conv_wgrad_kernel")
GROUPED = ("kw_grouped_fwd_kernel", "kw_grouped_dx_kernel", "kw_grouped_wgrad_kernel")
GEMM = ("kw_mix_kernel", "kw_matmul_kernel", "kw_bias_grad_kernel")


@pytest.fixture(scope="module")
def captured():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "KW_OPS_TRITON_AUTOTUNE": "1"}  # all configs
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def launches_of(captured, kernel, dtype, label):
    """The launches of `kernel` in `dtype` that the call labelled exactly `label` requests."""
    return [x for x in captured["launches"] if x["kernel"] == kernel and x["dtype"] == dtype and label in x["labels"]]


def test_bf16_forward_runs_channels_last(captured):
    fwd = launches_of(captured, "kw_conv_fwd_kernel", "bf16", "toy/toy B2 bfloat16")
    assert fwd, [x["kernel"] for x in captured["launches"]]
    launch = fwd[0]
    sig, const = launch["signature"], launch["constexprs"]
    # x [2, 16, 8, 8] comes NCHW and reaches the kernel channels_last: strides (1024, 1, 128, 16); y 4x4 NCHW
    assert sig["x_ptr"] == "*bf16" and "x_ptr" in launch["divisible"]
    assert const["sxc"] == "1" and sig["sxc"] == "constexpr"               # unit channel stride: a constant
    assert sig["sxw"] == "i32" and "sxw" in launch["divisible"]            # 16: divisible by 16
    assert const["syw"] == "1" and "sxh" in launch["divisible"]
    assert "OH" not in launch["divisible"] and const["HAS_BIAS"] == "True"
    assert sig["stride_h"] == "i32" and sig["pad_h"] == "constexpr"       # 2: a plain i32; 1: a constant
    assert "sxc=1" in launch["text"] and "sxw:16" in launch["text"]
    # one launch per config that fits the shape (autotuning asked for), each with its own warps / stages: with 16
    # output positions none fits, and the first of the smallest tiles is kept
    configs = {tuple(x["constexprs"][b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (x["options"]["num_warps"],
               x["options"]["num_stages"]) for x in fwd}
    assert len(configs) == len(fwd) == 1 and next(iter(configs))[:3] == ("64", "16", "32")
    # the same launches for the channels_last input: the conversion happens before the kernel
    assert all("toy/toy B2 bfloat16 NHWC" in x["labels"] for x in fwd)


def test_fp32_keeps_the_callers_layout(captured):
    nchw = launches_of(captured, "kw_conv_fwd_kernel", "fp32", "toy/toy B2 float32")
    nhwc = launches_of(captured, "kw_conv_fwd_kernel", "fp32", "toy/toy B2 float32 NHWC")
    assert nchw and nhwc and not any("toy/toy B2 float32 NHWC" in x["labels"] for x in nchw)
    assert all(x["constexprs"].get("sxw") == "1" and "sxc" not in x["constexprs"] for x in nchw)
    assert all(x["constexprs"].get("sxc") == "1" and "sxw" not in x["constexprs"] for x in nhwc)


def test_every_kernel_is_launched_and_grouped_calls_take_the_grouped_kernels(captured):
    for dtype in ("bf16", "fp32"):
        kernels = {x["kernel"] for x in captured["launches"] if x["dtype"] == dtype}
        assert set(CONV + GROUPED + GEMM) <= kernels, dtype
    for x in captured["launches"]:
        calls = {label.split("/")[0] for label in x["labels"]}
        if x["kernel"] in GROUPED:
            assert calls == {"dw"}, x["kernel"]
            assert x["constexprs"]["Ig"] == x["constexprs"]["Og"] == "1"     # depthwise: one channel per group
        elif x["kernel"] in CONV:
            assert calls == {"toy"}, x["kernel"]
    # the depthwise call mixes its per-sample kernels with the same GEMM and contracts its gradients likewise
    for kernel in ("kw_mix_kernel", "kw_matmul_kernel"):
        assert any(label.startswith("dw/") for x in captured["launches"] if x["kernel"] == kernel
                   for label in x["labels"]), kernel


def test_calls_the_backend_does_not_take_are_listed(captured):
    assert sorted(captured["skipped"]) == ["3d/toy B2 bfloat16", "3d/toy B2 float32"]
    assert all(any("3-D convolution" in r for r in rs) for rs in captured["skipped"].values())


def test_compiling_a_capture_fills_the_cache_the_launch_reads(captured):
    # gpu_check's compile stage compiles captured launches ahead: Triton's cache key must be the launch's own
    assert captured["launches"] and all(x["key_matches"] for x in captured["launches"])


COUNT = r"""
import torch
from kw_ops.benchmarking import triton_capture as tc
print(*tc.first_step_compiles("resnet18_kw1x", 32))
"""


@pytest.mark.parametrize("autotune", ["", "1"])
def test_a_first_step_compiles_one_config_per_shape_class_unless_autotuning(autotune):
    """Without KW_OPS_TRITON_AUTOTUNE every launch keeps one config (a bounded, stated number of compiles: one per
    launch specialisation); with it, every config that fits the shape is compiled."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "KW_OPS_TRITON_AUTOTUNE": autotune}
    result = subprocess.run([sys.executable, "-c", COUNT], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    compiles, launches = map(int, result.stdout.split())
    if autotune:
        assert compiles > 2 * 24
    else:
        assert compiles == launches == 24   # resnet18_kw1x at batch 32, bf16, forward and backward


def test_the_pick_is_the_first_config_that_fits():
    from kw_ops.ops.triton import tuning

    class Config:
        def __init__(self, bm, bn, bk):
            self.kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}

    configs = [Config(128, 64, 32), Config(64, 64, 32), Config(64, 16, 16)]
    prune = tuning._prune_for(("PB", "OC", "C"))
    import torch

    named = {"PB": 64, "OC": 512, "C": 512, "x": torch.empty(1, dtype=torch.bfloat16)}
    assert prune(configs, named, INPUT_PRECISION="ieee") == [configs[1]]        # 64 positions: BLOCK_M 128 dropped
    os.environ[tuning.AUTOTUNE_ENV] = "1"
    try:
        assert prune(configs, named, INPUT_PRECISION="ieee") == configs[1:]
    finally:
        del os.environ[tuning.AUTOTUNE_ENV]
