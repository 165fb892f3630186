"""The command line as a user runs it."""
import subprocess
import sys


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


def test_describe_prints_the_papers_count_beside_the_measured_one():
    code, out = _run("describe", "resnet18_kw1x_layer_sharing")
    assert code == 0, out
    assert "paper: 11.81M (Table 6), measured 11.81M (11,805,134), difference +0.00M" in out
