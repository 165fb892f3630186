"""The command line as a user runs it."""
import re
import subprocess
import sys

import pytest

from kw_ops.__main__ import main


def _run(*args):
    result = subprocess.run([sys.executable, "-m", "kw_ops", *args], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_info_lists_versions():
    code, out = _run("info")
    assert code == 0 and "torch" in out and "kw_ops" in out


def test_demo_trains_every_budget_and_reloads_exactly():
    code, out = _run("demo", "--batch", "4", "--size", "16", "--steps", "3")
    assert code == 0, out
    for preset in ("static", "kw1d4x", "kw1d2x", "kw1x", "kw2x", "kw4x"):
        line = next(line for line in out.splitlines() if line.startswith(preset + " "))
        assert line.rstrip().endswith("exact"), line
    assert "warehouse 0 'stage1'" in out


def test_describe_unknown_model_is_a_clear_error():
    code, out = _run("describe", "no_such_model")
    assert code == 2 and "no_such_model" in out


@pytest.mark.parametrize("variable, value", [("KW_OPS_BACKEND", "bogus"), ("KW_OPS_TRITON_MODE", "fused")])
def test_describe_dispatch_with_a_bad_environment_setting_is_one_line(monkeypatch, capsys, variable, value):
    monkeypatch.setenv(variable, value)
    assert main(["describe", "resnet18_kw1x", "--dispatch", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kw_ops describe: ") and variable in err and repr(value) in err and "\n" not in err


def test_describe_prints_the_papers_count_beside_the_measured_one():
    code, out = _run("describe", "resnet18_kw1x_layer_sharing")
    assert code == 0, out
    assert "paper: 11.81M (Table 6), measured 11.81M (11,805,134), difference +0.00M" in out


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps (--steps) must be an integer >= 1 (training steps per budget), got 0"),
    (["--steps", "-2"], "steps (--steps) must be an integer >= 1 (training steps per budget), got -2"),
    (["--batch", "1"], "batch (--batch) must be an integer >= 2 (the attention's BatchNorm cannot train on one "
                       "sample), got 1"),
    (["--batch", "0"], "batch (--batch) must be an integer >= 2"),
    (["--size", "-5"], "size (--size) must be an integer >= 1 (the input resolution), got -5"),
    (["--size", "0"], "size (--size) must be an integer >= 1 (the input resolution), got 0"),
], ids=["steps-0", "steps-negative", "batch-1", "batch-0", "size-negative", "size-0"])
def test_demo_bad_options_are_one_line_and_exit_2(capsys, args, message):
    code = main(["demo", "--steps", "1", "--size", "8", *args])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kw_ops demo: " + message), err
    assert not captured.out


def test_demo_runs_at_the_smallest_accepted_size_and_batch(capsys):
    code = main(["demo", "--batch", "2", "--size", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(batch 2, 1x1 random data, 1 SGD steps" in out and "nan" not in out.lower()


def test_describe_says_zero_cell_only_for_layers_without_cells(capsys):
    """deit_small_kw3d4x gives some MLP layers no cell of their warehouse (b < 1): their mixtures all take the
    zero cell; the others keep their range of cells."""
    assert main(["describe", "deit_small_kw3d4x"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "zero cell only" in lines["blocks.2.mlp.fc1"] and "zero cell only" in lines["blocks.2.mlp.fc2"]
    assert "cells 0..0 " in lines["blocks.0.attn.v"] and "cells 2..5 " in lines["blocks.0.mlp.fc1"]
    for line in lines.values():  # a range of cells, first <= last, or the zero cell only
        cells = re.search(r"cells (\d+)\.\.(\d+) ", line)
        assert (cells is None) == ("zero cell only" in line) and (cells is None or int(cells[1]) <= int(cells[2])), line
