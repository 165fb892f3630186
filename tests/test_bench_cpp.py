"""benchmarks/bench_cpp.py's plumbing on one tiny layer: every provider runs in both modes, the roofline is
positive and the markdown table has a row per layer and a sum."""
import importlib.util
from pathlib import Path

import pytest

from kw_ops.ops import cpp

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpp.py"
SPEC = dict(channels=8, out=8, size=(6, 6), kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
            groups=1, bias=False, n=3, cell=(4, 4, 1, 1), m=36, count=2)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not cpp.available(), reason="kw_ops._C is not built")
def test_layer_rows_and_table(bench, monkeypatch):
    monkeypatch.setattr(bench, "MIN_SECONDS", 0.0)
    peaks = {"gemm_gflops": 10.0, "copy_gbs": 5.0}
    rows = []
    for train in (False, True):
        for provider in bench.PROVIDERS:
            cpu_ms, wall_ms = bench.timed(bench.layer_step(SPEC, provider, train))
            roof = bench.roofline_ms(SPEC, provider, train, peaks)
            assert cpu_ms >= 0 and wall_ms > 0 and roof > 0
            rows.append({"preset": "tiny", "layer": "8->8 3x3", "count": 2, "mode": "train" if train else "inference",
                         "provider": provider, "cpp_path": "gemm", "cpu_ms": cpu_ms + 1, "cpu_ms_min": cpu_ms + 1,
                         "cpu_ms_max": cpu_ms + 1, "roofline_ms": roof})
    table = bench.layers_markdown(rows, {"git": "x"}, peaks, 1.0)
    assert table.count("| 8->8 3x3 | 2 | gemm |") == 2 and table.count("**sum (x count)**") == 2
