"""benchmarks/gpu_check.py without a GPU: the plan fits the window, deadlines stop inside a stage's loop, the CSV
grows a row at a time."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module          # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_check"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_deadline_stops_inside_the_loop_and_keeps_rows(gpu_check, tmp_path):
    clock = FakeClock()
    log = gpu_check.CsvLog(tmp_path / "gpu_check.csv", {"device": "fake", "git_sha": "abc"})
    seen = []

    def item(k):
        def run(deadline):
            seen.append(len(read_rows(tmp_path / "gpu_check.csv")))   # rows already on disk when this item starts
            clock.now += 1.0
            return [{"provider": "p", "mode": "m", "status": "ok", "value": str(k)}]
        return gpu_check.Item(f"item{k}", run)

    run = gpu_check.Deadline(100.0, clock)
    summary = gpu_check.run_stage("layers", [item(k) for k in range(10)], run.part(3.5), log)
    log.close()
    rows = read_rows(tmp_path / "gpu_check.csv")
    assert seen == [0, 1, 2, 3]                                    # flushed per row, read back mid-stage
    assert [r["value"] for r in rows[:4]] == ["0", "1", "2", "3"]
    assert rows[4]["status"] == "skipped" and "6 of 10 items not run" in rows[4]["note"]
    assert all(r["device"] == "fake" and r["git_sha"] == "abc" and r["stage"] == "layers" for r in rows)
    assert summary.startswith("layers: 4/10 items, 0 failed")
    assert run.left() == pytest.approx(96.0)                       # the run's deadline is the stage's upper bound
    assert run.part(1000).left() == pytest.approx(96.0)


def test_maxfail_and_errors_are_rows(gpu_check, tmp_path):
    log = gpu_check.CsvLog(tmp_path / "gpu_check.csv", {})

    def fails(deadline):
        raise RuntimeError("kernel exploded")

    items = [gpu_check.Item("bad", fails), gpu_check.Item("never", lambda d: [{"status": "ok"}])]
    gpu_check.run_stage("smoke", items, gpu_check.Deadline(60), log, maxfail=1)
    log.close()
    rows = read_rows(tmp_path / "gpu_check.csv")
    assert [r["status"] for r in rows] == ["error", "stopped"]
    assert "RuntimeError: kernel exploded" in rows[0]["note"]
    # a second run appends below the first: one header
    log = gpu_check.CsvLog(tmp_path / "gpu_check.csv", {})
    log.write({"stage": "peaks", "status": "ok"})
    log.close()
    assert [r["stage"] for r in read_rows(tmp_path / "gpu_check.csv")] == ["smoke", "smoke", "peaks"]


def test_smoke_cases_cover_every_kernel_path(gpu_check):
    from kw_ops.ops.triton import launch

    cases = gpu_check.SMOKE_SHAPES
    names = [c.name for c in cases]
    assert len(set(names)) == len(names)
    items = gpu_check.smoke_items(launch.MODES)
    other = gpu_check._other_dtype_cases()
    assert len(items) == len(launch.MODES) * (len(cases) + 3 * len(other)) and 15 <= len(cases) <= 30
    assert {i.case.split()[-1] for i in items} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee"}
    # fp16 and fp32 on a shape of each kernel path: NCHW, NHWC, stride-phase dx, depthwise, grouped, several chunks
    assert len(set(other)) == len(other) == 6 and any(c.groups == c.channels for c in other)
    assert any(1 < c.groups < c.channels for c in other) and any(c.channels_last for c in other)
    assert all(c.spec()["m"] * c.spec()["cell"][0] * c.spec()["cell"][1] * math.prod(c.spec()["cell"][2:])
               == c.out * c.channels // c.groups * math.prod(c.kernel) for c in cases)     # cells tile the weight
    # the grouped kernels: depthwise (one input channel per group) and wider groups, NHWC among them
    assert any(c.groups == c.channels for c in cases) and any(1 < c.groups < c.channels for c in cases)
    assert any(c.groups != 1 and c.channels_last for c in cases)
    # dx by stride phase: stride-2 3x3 layers with even and odd sizes, with dilation; channels_last for groups = 1
    strided = [c for c in cases if c.stride[0] == 2 and c.kernel[0] == 3 and c.groups == 1]
    assert {c.size[0] % 2 for c in strided} == {0, 1} and any(c.dilation == 2 for c in strided)
    assert any(c.channels_last and c.groups == 1 for c in cases) and any(len(c.size) == 1 for c in cases)
    # several chunks of per-sample kernels in one call
    assert any(c.batch * c.out * c.channels // c.groups * math.prod(c.kernel) * 2 > 2 * launch.KERNEL_CHUNK_BYTES
               for c in cases)


def test_pinned_configs_are_the_default_pick_even_when_autotuning_was_asked(gpu_check, monkeypatch):
    from kw_ops.ops.triton import tuning

    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    with gpu_check.pinned_configs():
        assert not tuning.autotuning()
    assert tuning.autotuning()


@pytest.mark.slow
def test_plan_fits_the_window():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, str(SCRIPT), "--plan"], capture_output=True, text=True, env=env,
                            timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert out.startswith("device: ") and "git sha: " in out and "versions: torch" in out
    # the baselines run in the parent before any stage that launches a Triton kernel; those run in child processes
    stages = re.findall(r"^([a-z_]+): \d+ items, \d+ compiles", out, re.MULTILINE)
    assert stages == ["compile", "peaks", "layers", "network", "smoke", "layers_triton", "premise", "network_kw_ops"]
    for stage in ("smoke", "layers_triton", "premise", "network_kw_ops"):
        assert re.search(rf"^{stage}: \d+ items, 0 compiles, in a child process", out, re.MULTILINE), stage
    compiles, launchers = re.search(r"^compile: 1 items, (\d+) compiles, (\d+) C launchers", out, re.MULTILINE).groups()
    assert int(compiles) > int(launchers) > 0
    total = float(re.search(r"^estimate: (\d+) s", out, re.MULTILINE).group(1))
    assert 0 < total <= 360 and "over their own budget" not in out


COMPILE_STAGE = r"""
import csv, json, pathlib, sys, importlib.util, torch
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
gc = importlib.util.module_from_spec(spec); sys.modules["gpu_check"] = gc; spec.loader.exec_module(gc)
from kw_ops.benchmarking import triton_capture as tc
layer = {"channels": 16, "out": 32, "size": (8, 8), "kernel": (1, 1), "stride": (1, 1), "padding": (0, 0),
         "dilation": (1, 1), "groups": 1, "n": 4, "m": 2, "cell": (16, 16, 1, 1), "bias": False, "layer": "toy"}
with gc.pinned_configs():
    found, _ = tc.capture(tc.layer_calls([("toy", layer)], [2], [torch.float16]))
launches = sorted(found, key=str)[:2]
for run in ("first", "second"):
    path = pathlib.Path(sys.argv[2]) / f"{run}.csv"
    log = gc.CsvLog(path, {})
    gc.run_stage("compile", [gc.compile_item(lambda: launches, 0, len(launches))], gc.Deadline(300), log)
    log.close()
    print(json.dumps([(r["status"], float(r["value"])) for r in csv.DictReader(open(path))]))
"""


@pytest.mark.slow
def test_compile_stage_fills_the_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", COMPILE_STAGE, str(SCRIPT), str(tmp_path)], capture_output=True,
                            text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert [s for s, _ in first] == [s for s, _ in second] == ["ok", "ok"]
    assert max(t for _, t in second) < min(t for _, t in first)   # the second run loads what the workers compiled


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_a_triton_layer_result_is_compared_with_released_before_it_is_timed(gpu_check, mode, monkeypatch):
    """Under the interpreter (CPU tensors, float32): the kernels agree with released; a planted wrong result (a
    skipped first output row, or a gradient off by 10 %) is named instead."""
    pytest.importorskip("triton")
    from kw_ops.ops import verify
    from kw_ops.ops.triton import interpreting, launch

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it where CUDA is absent)")
    monkeypatch.setenv(verify.VERIFY_ENV, "0")   # the comparison under test, not the op's own verification
    spec = {"channels": 8, "out": 16, "size": (6, 6), "kernel": (3, 3), "stride": (1, 1), "padding": (1, 1),
            "dilation": (1, 1), "groups": 1, "n": 5, "m": 18, "cell": (8, 8, 1, 1), "bias": True, "layer": "t"}
    check = lambda: gpu_check.disagreement_with_released(spec, mode, batch=3, dtype=torch.float32, device="cpu")
    assert check() == ""
    if mode == "forward":
        real = launch.kw_conv_triton_forward
        monkeypatch.setattr(launch, "kw_conv_triton_forward",
                            lambda *a, **k: real(*a, **k).index_fill_(2, torch.tensor([0]), 0.0))
        assert check().startswith("y: rel")
    else:
        real = launch.kw_conv_triton_backward
        monkeypatch.setattr(launch, "kw_conv_triton_backward",
                            lambda *a, **k: tuple(g * 1.1 if i == 2 else g for i, g in enumerate(real(*a, **k))))
        assert check().startswith("dwarehouse: rel")


def test_a_crash_or_a_hang_in_an_isolated_stage_costs_one_named_case(gpu_check, tmp_path, monkeypatch):
    """The isolation check's five cases in child processes: the crash (exit code 3) and the hang (killed at the
    case timeout) are error rows naming their case; the cases after each run in a new child."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the spawned children import gpu_check by name
    log = gpu_check.CsvLog(tmp_path / "gpu_check.csv", {})
    items = gpu_check.isolation_check_items()
    summary = gpu_check.run_isolated_stage("isolation_check", items, gpu_check.Deadline(120), log, {}, None,
                                           case_timeout_s=gpu_check.ISOLATION_CHECK_TIMEOUT_S)
    log.close()
    rows = read_rows(tmp_path / "gpu_check.csv")
    assert [(r["case"], r["status"]) for r in rows] == [
        ("case 0 fine", "ok"), ("case 1 crash", "error"), ("case 2 fine", "ok"), ("case 3 hang", "error"),
        ("case 4 fine", "ok")]
    assert "died (exit code 3)" in rows[1]["note"] and "no result within 5 s" in rows[3]["note"]
    assert summary.startswith("isolation_check: 5/5 items, 2 failed") and "in 3 child process(es)" in summary


def _interpreted_premise(gpu_check, buffer_bytes: int, blocked: bool):
    """premise_phases on a small layer (8 -> 16 channels 3x3 on 5x5, cells 8 x 8, GO = 2, batch 5) in float32 on
    CPU under the interpreter: (phases, y they write, the torch path's output)."""
    pytest.importorskip("triton")
    from kw_ops.ops.torch_impl import kw_conv_torch
    from kw_ops.ops.triton import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it where CUDA is absent)")
    spec = {"channels": 8, "out": 16, "size": (5, 5), "kernel": (3, 3), "stride": (1, 1), "padding": (1, 1),
            "dilation": (1, 1), "groups": 1, "n": 5, "m": 18, "cell": (8, 8, 1, 1), "bias": False, "layer": "t"}
    phases, y, (x, attn, warehouse, geometry) = gpu_check.premise_phases(spec, 5, buffer_bytes, torch.float32, "cpu",
                                                                         blocked=blocked)
    return phases, y, kw_conv_torch(x, attn, warehouse, None, *geometry)


def test_the_premise_phases_compute_the_layer_through_one_reused_buffer(gpu_check):
    """Under the interpreter (CPU, float32): mixing then convolving chunk by chunk through one buffer smaller than
    the batch's kernels (three chunks, the last ragged) gives the op's output; mix-all then conv-all does not
    (the buffer holds only the last chunk's kernels), which is why `both` interleaves them."""
    kernel_bytes = 16 * 8 * 9 * 4
    phases, y, expected = _interpreted_premise(gpu_check, 2 * kernel_bytes, blocked=False)
    phases["both"]()
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    y.zero_()
    phases["mix"]()
    phases["conv"]()
    torch.testing.assert_close(y[4:], expected[4:], atol=1e-4, rtol=1e-4)   # the last chunk's kernels remain
    assert not torch.allclose(y[:4], expected[:4], atol=1e-3)


def test_the_blocked_premise_phases_compute_the_layer_block_by_block(gpu_check):
    """Under the interpreter: the blocked mode's phases through one buffer of two cell rows for all samples (four
    blocks of the 8 cell rows, GO = 2) give the op's output when interleaved; mix-all then conv-all leaves only the
    last block's kernels (cell rows 6 and 7: channels 6, 7, 14, 15) right."""
    row_bytes = 5 * (16 * 8 * 9 // 8) * 4     # one cell row of every sample's kernel, float32
    phases, y, expected = _interpreted_premise(gpu_check, 2 * row_bytes, blocked=True)
    phases["both"]()
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    y.zero_()
    phases["mix"]()
    phases["conv"]()
    last = [6, 7, 14, 15]
    torch.testing.assert_close(y[:, last], expected[:, last], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y[:, :6], expected[:, :6], atol=1e-3)


def test_rates_a_child_measures_reach_the_peaks_not_the_csv(gpu_check, tmp_path):
    """The smoke child's Triton launch time travels in its row (MEASURED_KEY) to the parent's measured rates."""
    log = gpu_check.CsvLog(tmp_path / "gpu_check.csv", gpu_check.environment())
    measured = {"dram_bytes_per_s": 3e12}
    rows = [{"provider": "triton", "mode": "launch host time", "status": "ok", "value": "7.50", "unit": "us",
             gpu_check.MEASURED_KEY: {"launch_s": 7.5e-6}}, {"provider": "none", "mode": "check", "status": "ok"}]
    gpu_check.log_rows(log, "smoke", "triton launch", rows, measured)
    log.close()
    assert measured == {"dram_bytes_per_s": 3e12, "launch_s": 7.5e-6}
    text = (tmp_path / "gpu_check.csv").read_text()
    assert "launch host time" in text and "launch_s" not in text and gpu_check.MEASURED_KEY + "'" not in text
    peaks = gpu_check.cost_model.H100_SXM_DATASHEET.__class__(**{**gpu_check.cost_model.asdict(
        gpu_check.cost_model.H100_SXM_DATASHEET), **measured})
    assert peaks.launch_s == 7.5e-6
