"""The op benchmark's plumbing on tiny settings: it runs, every row has its fields, skips carry reasons,
measured times do not beat the roofline floor by more than noise."""
import csv
import subprocess
import sys
from pathlib import Path

from kw_ops.benchmarking import op_bench
from kw_ops.benchmarking.layer_shapes import kw_layer_shapes

ROOT = Path(__file__).resolve().parents[1]


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
        if row["provider"] == "triton":  # CPU: not timed (needs CUDA, or only the interpreter would run it)
            assert row["status"] == "skipped" and row["reason"], row
            continue
        assert row["status"] == "ok", row
        for field in ("median_ms", "tflops", "floor_ms", "ratio_to_floor"):
            assert float(row[field]) > 0, (field, row)
        assert float(row["ratio_to_floor"]) > 0.5, row  # cannot beat the floor by more than noise
    assert "nan" not in str(rows).lower()
    report = op_bench.markdown(rows, _tiny(), peaks, env)
    assert "| model | layer | shape |" in report and "measured peaks" in report and "skipped" in report


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
               "16", "--modes", "forward", "--providers", "static,torch,triton", "--out", str(tmp_path),
               "--markdown", str(tmp_path / "report.md")]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 0, result.stderr
    assert "| model | layer |" in result.stdout and "git " in result.stdout
    with (tmp_path / "bench_op_cpu.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 6 and len(rows) % 2 == 0  # two runs appended under one header
    assert {r["provider"] for r in rows} == {"static", "torch", "triton"}
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    assert (tmp_path / "report.md").read_text().startswith("# KW op per layer shape")
