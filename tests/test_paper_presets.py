"""The models the paper trained beyond the released configs (issue 15): each preset builds, runs forward and
backward at a small size, has the paper's printed parameter count (or the measured count named here, the
README says why) and, where Table 14 has a row, its plan."""
from __future__ import annotations

import pytest
import torch

import kw_ops
import kw_ops.models as zoo
from kw_ops.models.paper import PAPER_PARAMS, TABLE14, paper_note

#: Trainable parameters at 1000 classes, measured; each rounds to the paper's figure unless in DIFFERENT.
MEASURED = {
    "convnext_tiny_kw1x_paper": 32_992_964,
    "convnext_tiny_kw3d4x_paper": 24_531_380,
}
#: Presets whose measured count differs from the paper's printed one (the README explains each).
DIFFERENT = {"convnext_tiny_kw1x"}
#: (batch, input size) small enough for CPU; ConvNeXt needs 32 (three /2 and a /4 stride).
INPUT = {"convnext": (2, 32)}
#: Presets that take seconds to build and run on CPU: still run, marked slow.
SLOW = {"convnext_tiny_kw1x_paper", "convnext_tiny_kw3d4x_paper"}


def _input(name: str) -> torch.Tensor:
    batch, size = next((v for k, v in INPUT.items() if name.startswith(k)), (2, 32))
    return torch.randn(batch, 3, size, size)


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
                                        for name in sorted(MEASURED)])
def built(request):
    return request.param, zoo.create(request.param)


def test_parameter_count_is_the_papers(built):
    name, model = built
    count = kw_ops.count_parameters(model)
    assert count == MEASURED[name]
    assert round(count / 1e6, 2) == PAPER_PARAMS[name][0], paper_note(name, count)


def test_plan_is_table14(built):
    name, model = built
    if name not in TABLE14:
        pytest.skip(f"{name} has no Table 14 row")
    warehouses = kw_ops.warehouses(model)
    assert tuple(w.plan.total_mixtures for w in warehouses) == TABLE14[name][0]
    assert tuple(w.plan.n for w in warehouses) == TABLE14[name][1]


def test_forward_backward(built):
    name, model = built
    kw_ops.set_temperature(model, 0.5)
    out = model(_input(name))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_every_paper_figure_is_measured_or_explained():
    assert set(PAPER_PARAMS) == set(MEASURED) | DIFFERENT
    assert set(TABLE14) <= set(MEASURED)
