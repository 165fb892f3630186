"""The op benchmark's plumbing on tiny settings: it runs, every row has its fields, skips carry reasons,
measured times do not beat the roofline floor by more than noise."""
import csv
import subprocess
import sys
from pathlib import Path

import torch

from kw_ops.benchmarking import op_bench
from kw_ops.benchmarking.layer_shapes import kw_layer_shapes
from kw_ops.ops import cpp, dispatch

ROOT = Path(__file__).resolve().parents[1]
#: peaks given to runs that are not about the roofline (measuring them costs seconds)
PEAKS = {"tflops": 1.0, "bandwidth_gbs": 10.0, "copy_mib": 256.0, "matmul": 2048}


def _tiny(**overrides):
    settings = op_bench.Settings("cpu", ("resnet18_kw1x",), batch=2, size=32, dtype="fp32",
                                 modes=("forward", "backward", "both"), providers=op_bench.PROVIDERS)
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


def test_rows_have_fields_and_skips_have_reasons(monkeypatch):
    shapes = kw_layer_shapes("resnet18_kw1x", 32)
    monkeypatch.setattr(op_bench, "kw_layer_shapes", lambda model, size: [shapes[0], shapes[-1]])
    monkeypatch.setattr(op_bench, "CPU_MIN_RUN_S", 0.01)
    rows, peaks, env = op_bench.run(_tiny())  # peaks measured here, as in a real run
    assert len(rows) == 2 * len(op_bench.MODES) * len(op_bench.PROVIDERS)
    for row in rows:
        assert set(row) >= set(op_bench.CSV_FIELDS) - {"reason", "median_ms", "tflops", "gflop", "mbytes",
                                                       "floor_ms", "ratio_to_floor"}
        assert row["device"] and row["torch"] and row["git_sha"] and row["model"] == "resnet18_kw1x"
        if row["provider"] == "triton" or (row["provider"] == "cpp" and not cpp.available()):
            assert row["status"] == "skipped" and row["reason"], row  # triton on CPU: only the interpreter runs
            continue
        assert row["status"] == "ok", row
        for field in ("median_ms", "tflops", "floor_ms", "ratio_to_floor"):
            assert float(row[field]) > 0, (field, row)
        assert float(row["ratio_to_floor"]) > 0.5, row  # cannot beat the floor by more than noise
    assert "nan" not in str(rows).lower()
    report = op_bench.markdown(rows, _tiny(), peaks, env)
    assert "| model | layer | shape |" in report and "measured peaks" in report and "skipped" in report


def _two_shapes(monkeypatch):
    """resnet18_kw1x's first 3x3 layer (the automatic choice: cpp where built) and first 1x1 layer (torch)."""
    shapes = kw_layer_shapes("resnet18_kw1x", 32)
    assert shapes[0]["kernel"] == (3, 3) and shapes[1]["kernel"] == (1, 1)
    monkeypatch.setattr(op_bench, "kw_layer_shapes", lambda model, size: shapes[:2])
    monkeypatch.setattr(op_bench, "CPU_MIN_RUN_S", 0.01)
    return _tiny(modes=("forward", "backward"), providers=("torch", "cpp", "auto"))


def test_cpp_and_the_automatic_choice_are_timed_and_auto_names_its_pick(monkeypatch):
    settings = _two_shapes(monkeypatch)
    rows, peaks, env = op_bench.run(settings, peaks=PEAKS)
    providers = lambda layer: [r["provider"] for r in rows if r["layer"] == layer]
    for layer, spec in zip(("layer1.0.conv1", "layer2.0.downsample.0"), op_bench.kw_layer_shapes(None, 0)):
        picks = [op_bench.automatic_choice(spec, settings.batch, torch.float32, "cpu", grad) for grad in (False, True)]
        assert all(p in dispatch.FORMULATIONS for p in picks)
        assert providers(layer) == ["torch", "cpp", f"auto ({picks[0]})", "torch", "cpp", f"auto ({picks[1]})"]
    for row in rows:
        if row["provider"] == "cpp" and not cpp.available():
            assert row["status"] == "skipped" and "kw_ops._C" in row["reason"], row
        else:
            assert row["status"] == "ok" and float(row["median_ms"]) > 0, row
    report = op_bench.markdown(rows, _two_shapes(monkeypatch), peaks, env)
    table_header = next(line for line in report.splitlines() if line.startswith("| model | layer |"))
    assert table_header.endswith("| torch | cpp | auto |")
    assert "| layer1.0.conv1 | " in report and f"({picks[1]}) " in report


def test_cpp_is_skipped_with_its_reason_where_the_extension_is_not_built(monkeypatch):
    reason = "the compiled extension kw_ops._C is not importable (No module named 'kw_ops._C'; pip install ...)"
    monkeypatch.setattr(cpp, "unavailable_reasons", lambda: [reason])
    dispatch.clear_decisions()  # decisions made while the extension was there
    rows, _, _ = op_bench.run(_two_shapes(monkeypatch), peaks=PEAKS)
    assert {(r["provider"], r["status"], r["reason"]) for r in rows if r["provider"] == "cpp"} == {
        ("cpp", "skipped", reason)}
    assert not any("cpp" in r["provider"] for r in rows if r["provider"].startswith("auto"))
    assert all(r["status"] == "ok" for r in rows if r["provider"] != "cpp")
    assert {"cpp", "auto"} <= set(op_bench.PROVIDERS)


def test_cost_model_counts_mixing_and_backward():
    spec = {"channels": 8, "out": 16, "size": (6, 6), "kernel": (3, 3), "stride": (1, 1), "padding": (1, 1),
            "dilation": (1, 1), "groups": 1, "n": 5, "cell": (8, 8, 1, 1), "m": 18}
    weight, positions, batch = 16 * 8 * 9, 36, 2
    conv, mix = 2 * batch * positions * weight, 2 * batch * 5 * weight
    assert op_bench.cost(spec, batch, 4, False, "forward")[0] == conv
    assert op_bench.cost(spec, batch, 4, True, "forward") == (conv + mix, 4 * (2 * 8 * 36 + 2 * 16 * 36 + 5 * 64
                                                                                 + 2 * 18 * 5))
    assert op_bench.cost(spec, batch, 4, True, "backward")[0] == 2 * conv + 3 * mix
    both = op_bench.cost(spec, batch, 4, True, "both")
    assert both[0] == conv + mix + 2 * conv + 3 * mix


def test_cli_appends_csv(tmp_path):
    command = [sys.executable, "-m", "kw_ops", "bench-op", "--models", "resnet18_kw1x", "--batch", "1", "--size",
               "16", "--modes", "forward", "--providers", "static,torch,triton,cpp,auto", "--out", str(tmp_path),
               "--markdown", str(tmp_path / "report.md")]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 0, result.stderr
    assert "| model | layer |" in result.stdout and "git " in result.stdout
    with (tmp_path / "bench_op_cpu.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 6 and len(rows) % 2 == 0  # two runs appended under one header
    providers = {r["provider"] for r in rows}
    picked = {p for p in providers if p.startswith("auto (")}
    assert providers - picked == {"static", "torch", "triton", "cpp"}
    assert picked and all(p[len("auto ("):-1] in dispatch.FORMULATIONS for p in picked)
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    assert (tmp_path / "report.md").read_text().startswith("# KW op per layer shape")
