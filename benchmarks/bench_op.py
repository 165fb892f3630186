"""The KW op per layer shape (static conv, released formulation, torch and Triton backends) against the roofline.

    python benchmarks/bench_op.py                          # quick: ~1-2 min on a 2-core CPU
    PYTHONPATH=. python benchmarks/bench_op.py --full      # on a GPU: batch 128 at 224x224, bf16, every mode
    python -m kw_ops bench-op --help                       # the same command, installed

Everything lives in kw_ops.benchmarking.op_bench (its docstring states the cost model); results are appended
to benchmarks/results/bench_op_<device>.csv and the markdown report is printed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kw_ops.benchmarking.op_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
