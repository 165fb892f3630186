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
# kernels imported under TRITON_INTERPRET=1.
PROGRAM = r"""
import json, torch
from kw_ops.benchmarking import triton_capture as tc
spec = {"channels": 16, "out": 32, "size": (8, 8), "kernel": (3, 3), "stride": (2, 2), "padding": (1, 1),
        "dilation": (1, 1), "groups": 1, "n": 4, "m": 18, "cell": (16, 16, 1, 1), "bias": True, "layer": "toy"}
grouped = {**spec, "groups": 16, "out": 16, "cell": (16, 1, 1, 1), "m": 9}
calls = tc.layer_calls([("toy", spec), ("dw", grouped)], [2], [torch.bfloat16], (False, True))
found, skipped = tc.capture(calls)
out = []
for launch, labels in found.items():
    out.append({"kernel": launch.kernel, "signature": dict(launch.signature), "constexprs": {k: str(v) for k, v in
                launch.constexprs}, "divisible": [k for k, pairs in launch.attrs if ["tt.divisibility", 16] in
                [list(p) for p in pairs]], "options": dict(launch.options), "labels": labels,
                "text": launch.specialisation(), "key_matches": launch.launch_key == tc.compile_key(launch)})
print(json.dumps({"launches": out, "skipped": skipped}))
"""


@pytest.fixture(scope="module")
def captured():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_forward_launch_specialisation(captured):
    fwd = [x for x in captured["launches"] if x["kernel"] == "kw_conv_fwd_kernel" and "NHWC" not in x["labels"][0]]
    assert fwd, [x["kernel"] for x in captured["launches"]]
    launch = fwd[0]
    sig, const = launch["signature"], launch["constexprs"]
    # x [2, 16, 8, 8] NCHW bf16: strides (1024, 64, 8, 1); output 4x4
    assert sig["x_ptr"] == "*bf16" and "x_ptr" in launch["divisible"]
    assert const["sxw"] == "1" and sig["sxw"] == "constexpr"              # unit stride: a constant
    assert sig["sxc"] == "i32" and "sxc" in launch["divisible"]           # 64: divisible by 16
    assert sig["sxh"] == "i32" and "sxh" not in launch["divisible"]       # 8: not
    assert "OH" not in launch["divisible"] and const["HAS_BIAS"] == "True"
    assert sig["stride_h"] == "i32" and sig["pad_h"] == "constexpr"           # 2: a plain i32; 1: a constant
    assert "sxw=1" in launch["text"] and "sxc:16" in launch["text"]
    # one launch per autotune config, each with its own warps / stages
    configs = {tuple(x["constexprs"][b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (x["options"]["num_warps"],
               x["options"]["num_stages"]) for x in fwd}
    assert len(configs) == len(fwd) > 1


def test_channels_last_and_backward_launches(captured):
    kernels = {x["kernel"] for x in captured["launches"]}
    assert {"kw_conv_fwd_kernel", "kw_conv_dx_kernel", "kw_conv_wgrad_kernel", "kw_matmul_kernel"} <= kernels
    nhwc = [x for x in captured["launches"] if x["kernel"] == "kw_conv_fwd_kernel" and "NHWC" in x["labels"][0]]
    assert nhwc and all(x["constexprs"]["sxc"] == "1" for x in nhwc)      # channels_last: unit channel stride


def test_calls_the_backend_does_not_take_are_listed(captured):
    reasons = [r for label, rs in captured["skipped"].items() if label.startswith("toy/") is False for r in rs]
    assert any("groups=16" in r for r in reasons)
    assert not any(label.startswith("toy/") for label in captured["skipped"])


def test_compiling_a_capture_fills_the_cache_the_launch_reads(captured):
    # gpu_check's compile stage compiles captured launches ahead: Triton's cache key must be the launch's own
    assert captured["launches"] and all(x["key_matches"] for x in captured["launches"])
