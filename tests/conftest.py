"""Test setup: without CUDA, the Triton interpreter (set before any `import triton`); GPU tests
skipped without CUDA; one OpenMP thread."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the dispatcher's decisions from default rates, not from this machine's calibration cache (tests that calibrate
# point KW_OPS_CALIBRATION at a file of their own)
os.environ.setdefault("KW_OPS_CALIBRATION", os.path.join(os.path.dirname(__file__), ".no-calibration.json"))

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
