"""The benchmark's plumbing on tiny settings: it runs, every row has its fields, skipped rows say why."""
import csv
import subprocess
import sys

from kw_ops.benchmarking import model_bench
from kw_ops.benchmarking.model_bench import Settings


def test_rows_have_fields_and_skips_have_reasons():
    settings = Settings("cpu", batch=2, train_batch=2, size=32, iters=1, warmup=0, amp=None, channels_last=False,
                        memory=False)
    rows = model_bench.run(["resnet18"], lambda m: ("1x", "3x"), settings)
    by_method = {r["method"]: r for r in rows}
    for method in ("static", "KW (1x) released", "KW (1x) kw_ops", "ODConv (4x) released", "DY-Conv (4x) kw_ops"):
        row = by_method[method]
        assert row["status"] == "ok", row
        assert row["infer_images_per_s"] > 0 and row["train_step_ms"] > 0 and row["params"] > 0
    assert by_method["KW (3x) kw_ops"]["status"] == "skipped"
    assert "the paper trains no 3x" in by_method["KW (3x) kw_ops"]["reason"]
    assert all(r["reason"] for r in rows if r["status"] == "skipped")
    table = model_bench.markdown_table(rows)
    assert "| resnet18 | static | 11.69 |" in table


def test_cli_writes_csv_with_memory(tmp_path):
    command = [sys.executable, "-m", "kw_ops", "bench", "--models", "resnet18", "--budgets", "1x", "--batch", "2",
               "--size", "32", "--iters", "1", "--channels-last", "on", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| model | method |" in result.stdout and "git " in result.stdout
    with (tmp_path / "bench_models_cpu.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    measured = [r for r in rows if r["status"] == "ok"]
    assert {r["method"] for r in measured} >= {"static", "KW (1x) released", "KW (1x) kw_ops"}
    assert all(float(r["train_peak_mb"]) > 0 and r["device"] and r["torch"] for r in measured)
    assert all(r["channels_last"] == "True" for r in measured)
