"""The model benchmark: interleaved rounds, the spread and busy-row logic on synthetic timings, a run on tiny
networks while another process loads the CPU, and the command line's outputs (table, CSV columns, PNG)."""
import contextlib
import csv
import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from kw_ops.benchmarking import measure, model_bench, worker
from kw_ops.benchmarking.model_bench import CSV_FIELDS, Method, Settings
from kw_ops.benchmarking.spread import SPREAD_LIMIT, WAIT_LIMIT, busy_warning, spread, summarise

# a competing process: full-speed bursts of 0.1 s with 0.1 s pauses, the load that fools sequential timing
BURSTS = "import time\nwhile True:\n    end = time.time() + 0.1\n    while time.time() < end: pass\n    time.sleep(0.1)"


def test_spread_is_the_interquartile_range_over_the_median():
    assert spread([2.0]) == 0
    assert spread([1.0, 3.0]) == pytest.approx(1.0 / 2.0)             # quartiles 1.5 and 2.5
    assert spread([1.0, 1.0, 1.0, 1.0, 9.0]) == 0                     # one outlying block of five
    assert spread([4.0, 1.0, 3.0, 2.0, 5.0]) == pytest.approx(2.0 / 3.0)  # quartiles 2 and 4, median 3


def test_cheap_steps_get_more_blocks_than_slow_ones():
    settings = Settings("cpu", 2, 2, 32, 2, 0.03, None, False, max_repeat=5, cheap_block=0.15)
    assert settings.blocks_wanted(0.149) == 5 and settings.blocks_wanted(0.15) == 2
    assert Settings("cpu", 2, 2, 32, 3, 0.03, None, False).blocks_wanted(0.01) == 3
    assert Settings("cpu", 2, 2, 32, 7, 0.03, None, False, max_repeat=5, cheap_block=1).blocks_wanted(0.01) == 7


@pytest.mark.parametrize("seconds, static, waits, flags", [
    ([2.0, 2.02, 1.98], [1.0, 1.0, 1.0], [0, 0, 0], []),                   # steady
    ([2.0, 3.0, 2.0], [1.0, 1.5, 1.0], [0, 0, 0], ["spread 25%"]),         # a burst hit the whole round
    ([2.3, 2.0, 2.3], [1.0, 1.5, 1.0], [0, 0, 0], ["rounds disagree by 21%"]),  # spread 7%, ratios not
    ([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], [0.3, 0.3, 0.3], ["waited 15% for a CPU"]),
], ids=["steady", "busy-round", "rounds-disagree", "run-queue-wait"])
def test_summarise_flags_rows_to_distrust(seconds, static, waits, flags):
    out = summarise(seconds, static, waits)
    assert out["flags"] == flags
    assert out["median"] == sorted(seconds)[1] and out["min"] == min(seconds) and out["max"] == max(seconds)
    assert out["ratio"] == pytest.approx(sorted(seconds)[1] / sorted(static)[1])  # the ratio of the medians
    assert summarise(seconds, static, waits, static_median=0.5)["ratio"] == pytest.approx(sorted(seconds)[1] / 0.5)
    assert (out["spread"] > SPREAD_LIMIT) == any(f.startswith("spread") for f in flags)


def test_a_row_exactly_at_the_limits_is_not_flagged():
    """Flags are for spread, ratio spread and wait *over* their limits (owned here: 20 %, 20 %, 10 %): blocks 8 and
    12 s (quartiles 9 and 11, spread 2 / 10), paired with static blocks of 1 s (the same ratio spread) and waiting
    2 of 20 s."""
    assert (SPREAD_LIMIT, WAIT_LIMIT) == (0.20, 0.10)
    out = summarise([8.0, 12.0], [1.0, 1.0], [1.0, 1.0])
    assert (out["spread"], out["ratio_spread"], out["wait"]) == (SPREAD_LIMIT, SPREAD_LIMIT, WAIT_LIMIT)
    assert out["flags"] == []
    over = summarise([8.0, 12.5], [1.0, 1.0], [1.0, 1.5])
    assert over["flags"] == ["spread 22%", "rounds disagree by 22%", "waited 12% for a CPU"]


def test_warning_names_the_flagged_rows_only():
    rows = [{"model": "m", "method": "static", "status": "ok", "flags": ""},
            {"model": "m", "method": "KW (1x) kw_ops", "status": "ok", "flags": ""},
            {"model": "m", "method": "KW (3x) kw_ops", "status": "skipped"}]
    assert busy_warning(rows) is None
    rows[1].update(flags="train spread 40%", cpu_wait_pct=2.0)
    warning = busy_warning(rows)
    assert warning.startswith("warning: 1 row(s) marked !") and warning.endswith("distrust m KW (1x) kw_ops")
    assert "1 varied with no other process on the CPU" in warning and "busy" not in warning
    assert "m static" not in warning
    rows[0].update(flags="infer waited 30% for a CPU", cpu_wait_pct=30.0)
    warning = busy_warning(rows)
    assert "the machine was busy: other processes held the CPU while 1 of them ran" in warning
    assert "1 varied with no other process" in warning and warning.endswith("distrust every row")
    rows[1]["cpu_wait_pct"] = 12.0
    assert "varied with no other process" not in busy_warning(rows)


def test_csv_with_older_columns_is_moved_aside(tmp_path):
    path = tmp_path / "bench_models_cpu.csv"
    path.write_text("date,model,infer_peak_mb\n2026-11-22,resnet18,9\n")
    note = model_bench.write_csv([{"model": "resnet18", "status": "ok"}], path)
    assert "older rows" in note and (tmp_path / "bench_models_cpu.old-columns.csv").exists()
    with path.open() as handle:
        assert tuple(next(csv.reader(handle))) == CSV_FIELDS
    path.write_text("date,model,rounds\n2026-11-29,resnet50,2\n")  # a second change of columns keeps the first
    assert "old-columns-2.csv" in model_bench.write_csv([{"model": "resnet18", "status": "ok"}], path)
    assert "infer_peak_mb" in (tmp_path / "bench_models_cpu.old-columns.csv").read_text()
    assert "rounds" in (tmp_path / "bench_models_cpu.old-columns-2.csv").read_text()


def test_interleaved_run_under_load_warns_or_keeps_the_ratio():
    """The same network twice: its true ratio is 1. With bursts of competing load, either the bench warns or
    the ratio it reports stays within the spread limit of 1."""
    settings = Settings("cpu", batch=2, train_batch=2, size=16, repeat=3, min_time=0.05, amp=None,
                        channels_last=False, threads=1)
    methods = [Method("static", "tiny_convnet"), Method("static again", "tiny_convnet"),
               Method("KW (1x) kw_ops", "tiny_kw1x")]
    load = [subprocess.Popen([sys.executable, "-c", BURSTS]) for _ in range(2)]
    try:
        rows = model_bench.run([("tiny_convnet", methods)], settings)
    finally:
        for process in load:
            process.kill()
            process.wait()
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    starts = [[b["started"] for b in r["blocks"]["infer"]] for r in rows]  # [method][round]
    order = sorted((start, m, r) for m, per_round in enumerate(starts) for r, start in enumerate(per_round))
    assert [(r, m) for _, m, r in order] == [(r, m) for r in range(settings.repeat) for m in range(len(methods))]
    again = rows[1]
    within = all(abs(again[f"{k}_vs_static"] - 1) <= SPREAD_LIMIT for k in ("infer", "train"))
    assert busy_warning(rows) is not None or within, again
    for row in rows:
        assert row["train_alloc_mb"] > 0 and row["train_rss_mb"] >= 0 and row["infer_alloc_mb"] > 0
        assert row["infer_images_per_s_min"] <= row["infer_images_per_s"] <= row["infer_images_per_s_max"]


def test_cli_prints_rows_early_and_writes_table_csv_and_png(tmp_path):
    command = [sys.executable, "-m", "kw_ops", "bench", "--models", "mobilenetv2_050", "--budgets", "1x,3x",
               "--batch", "3", "--train-batch", "2", "--size", "32", "--repeat", "2", "--min-time", "0.001",
               "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| model | method |" in result.stdout and "git " in result.stdout
    assert "settings: inference batch 3, training batch 2, 32x32" in result.stdout
    assert "| mobilenetv2_050 | static |" in result.stderr  # the model's rows as soon as they exist
    for noise in ("Memory block", "STAGE:", "[W"):  # profiler and C++ warnings stay out of the output
        assert noise not in result.stdout + result.stderr
    with (tmp_path / "bench_models_cpu.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        rows = {r["method"]: r for r in reader}
    for method in ("static", "DY-Conv (4x) released", "ODConv (4x) kw_ops", "KW (1x) released", "KW (1x) kw_ops"):
        row = rows[method]
        assert row["status"] == "ok", row
        assert (row["batch"], row["train_batch"]) == ("3", "2")
        assert float(row["infer_spread_pct"]) >= 0 and float(row["train_step_ms_max"]) >= float(row["train_step_ms"])
        assert float(row["train_rss_mb"]) >= 0 and float(row["train_alloc_mb"]) > 0
        assert 2 <= int(row["infer_blocks"]) <= 5 and 2 <= int(row["train_blocks"]) <= 5 and float(row["wall_s"]) > 0
    assert rows["KW (3x) kw_ops"]["status"] == "skipped"
    assert "the paper trains no 3x" in rows["KW (3x) kw_ops"]["reason"]
    assert (tmp_path / "bench_models_cpu.png").stat().st_size > 0


class FakeWorker:
    """A method's worker with fixed first-step and per-step times; records the blocks asked of it. Blocks start
    one second apart, in the order they run."""
    calls, first, step, clock = [], {}, {}, None

    def __init__(self, model_name, released, settings):
        self.label = model_name

    def start(self):
        first = {f"{kind}_first_s": seconds for kind, seconds in self.first[self.label].items()}
        return {"params": 7, "infer_rss_mb": 1.0, "infer_alloc_mb": 1.0, "train_rss_mb": 1.0, "train_alloc_mb": 1.0,
                **first}

    def block(self, kind, iters):
        self.calls.append((self.label, kind, iters))
        return {"started": next(self.clock), "seconds": self.step[self.label], "wait": 0.0}

    def close(self):
        pass


class Bar:
    total = 0

    def set_description(self, text):
        pass

    def update(self, steps):
        pass


def _fake_run(monkeypatch, settings, first, step):
    monkeypatch.setattr(model_bench, "Worker", FakeWorker)
    monkeypatch.setattr(FakeWorker, "calls", [])
    monkeypatch.setattr(FakeWorker, "first", first)
    monkeypatch.setattr(FakeWorker, "step", step)
    monkeypatch.setattr(FakeWorker, "clock", itertools.count())
    rows = model_bench.measure_model("net", [Method("static", "static"), Method("kw", "kw")], settings, {}, Bar())
    return rows, FakeWorker.calls


def test_measure_model_interleaves_methods_and_times_whole_steps_of_at_least_min_time(monkeypatch):
    """Blocks run static, kw, static, kw (each infer then train) and a block lasts ceil(min_time / first step)
    steps, at least one: 1.0 s / 0.3 s -> 4 steps, 1.0 s / 2.0 s -> 1 step."""
    settings = Settings("cpu", 4, 2, 32, 2, 1.0, None, False)
    rows, calls = _fake_run(monkeypatch, settings, {"static": {"infer": 0.3, "train": 2.0},
                                                    "kw": {"infer": 0.25, "train": 0.6}},
                            {"static": 0.1, "kw": 0.2})
    one_round = [("static", "infer", 4), ("static", "train", 1), ("kw", "infer", 4), ("kw", "train", 2)]
    assert calls == one_round * 2
    assert [row["params"] for row in rows] == [7, 7]
    assert rows[1]["infer_images_per_s"] == pytest.approx(4 / 0.2) and rows[1]["infer_vs_static"] == pytest.approx(0.5)
    assert rows[1]["train_step_ms"] == pytest.approx(200) and rows[1]["train_vs_static"] == pytest.approx(2)
    assert [(row["infer_blocks"], row["train_blocks"]) for row in rows] == [(2, 2), (2, 2)]


def test_cheap_steps_run_extra_rounds_and_first_calls_are_never_timed(monkeypatch):
    """static infer: 0.05 s steps, blocks of 2 (0.1 s, cheap) -> 4 blocks; static train: a 2.0 s first call,
    blocks of one step (1.0 s) -> 2 blocks; kw: 0.6 s steps -> 2 blocks each. Rounds stay interleaved: a
    method drops out once it has its blocks."""
    settings = Settings("cpu", 4, 2, 32, 2, 0.1, None, False, max_repeat=4, cheap_block=0.5)
    rows, calls = _fake_run(monkeypatch, settings, {"static": {"infer": 0.05, "train": 2.0},
                                                    "kw": {"infer": 0.6, "train": 0.6}},
                            {"static": 1.0, "kw": 0.6})
    one_round = [("static", "infer", 2), ("static", "train", 1), ("kw", "infer", 1), ("kw", "train", 1)]
    assert calls == one_round * 2 + [("static", "infer", 2)] * 2
    static, kw = rows
    assert (static["infer_blocks"], static["train_blocks"], kw["infer_blocks"], kw["train_blocks"]) == (4, 2, 2, 2)
    assert static["train_step_ms"] == pytest.approx(1000) and static["train_step_ms_max"] == pytest.approx(1000)
    assert kw["train_vs_static"] == pytest.approx(0.6)


def test_vs_static_is_the_ratio_of_medians_robust_to_one_static_outlier(monkeypatch):
    """static's infer blocks: 0.1 s except an outlier of 1.0 s in round 2, which is also kw's second and last
    round (0.6 s blocks: not cheap, two rounds). kw's vs static is 0.1 / 0.6 from the medians, where the median
    of its two per-round ratios (6 and 0.6) would say 0.3; those disagreeing ratios flag the row."""
    steps = {"static": iter([0.1, 1.0, 0.1, 0.1, 0.1] + [1.0] * 20), "kw": iter([0.6] * 20)}
    monkeypatch.setattr(FakeWorker, "block", lambda self, kind, iters: (
        self.calls.append((self.label, kind, iters)),
        {"started": next(self.clock), "seconds": next(steps[self.label]) if kind == "infer" else 1.0,
         "wait": 0.0})[1])
    settings = Settings("cpu", 4, 2, 32, 2, 0.1, None, False, max_repeat=5, cheap_block=0.5)
    rows, _ = _fake_run(monkeypatch, settings, {"static": {"infer": 0.1, "train": 2.0},
                                                "kw": {"infer": 0.6, "train": 2.0}}, {})
    static, kw = rows
    assert (static["infer_blocks"], kw["infer_blocks"]) == (5, 2)
    assert kw["infer_vs_static"] == pytest.approx(0.1 / 0.6) and "infer rounds disagree" in kw["flags"]
    assert static["infer_spread_pct"] == 0 and static["infer_images_per_s_min"] == pytest.approx(4 / 1.0)


def test_row_fields_from_blocks_that_differ(monkeypatch):
    """static: infer blocks 0.1 then 0.2 s a step, train 1.0 s; kw: infer 0.2 then 0.4 s (twice static's in each
    round: ratio spread 0, spread 33 %), train 1.0 then 3.0 s waiting 0.5 s a step for a CPU. Steps of 0.3 s
    timed in blocks of ceil(1.0 / 0.3) = 4 steps (1.2 s) are not cheap (cheap_block 0.5 s) though a step is."""
    blocks = {("static", "infer"): iter([(0.1, 0.0), (0.2, 0.0)]), ("static", "train"): iter([(1.0, 0.0)] * 2),
              ("kw", "infer"): iter([(0.2, 0.0), (0.4, 0.0)]), ("kw", "train"): iter([(1.0, 0.5), (3.0, 0.5)])}

    def block(self, kind, iters):
        self.calls.append((self.label, kind, iters))
        seconds, wait = next(blocks[self.label, kind])
        return {"started": next(self.clock), "seconds": seconds, "wait": wait}

    monkeypatch.setattr(FakeWorker, "block", block)
    settings = Settings("cpu", 4, 2, 32, 2, 1.0, None, False, max_repeat=4, cheap_block=0.5)
    rows, calls = _fake_run(monkeypatch, settings, {"static": {"infer": 0.3, "train": 2.0},
                                                    "kw": {"infer": 0.3, "train": 2.0}}, {})
    assert calls == [("static", "infer", 4), ("static", "train", 1), ("kw", "infer", 4), ("kw", "train", 1)] * 2
    kw = rows[1]
    assert (kw["infer_images_per_s"], kw["infer_images_per_s_min"], kw["infer_images_per_s_max"]) == pytest.approx(
        (4 / 0.3, 4 / 0.4, 4 / 0.2))
    assert kw["infer_vs_static"] == pytest.approx(0.15 / 0.3)
    assert kw["infer_spread_pct"] == pytest.approx(100 / 3) and kw["infer_ratio_spread_pct"] == pytest.approx(0)
    assert (kw["train_step_ms"], kw["train_step_ms_min"], kw["train_step_ms_max"]) == pytest.approx((2000, 1000, 3000))
    assert kw["cpu_wait_pct"] == pytest.approx(100 * 1.0 / 4.0)  # the kind that waited most: train, 1 s of 4
    assert rows[0]["cpu_wait_pct"] == 0


def test_each_block_is_paired_with_the_static_block_nearest_in_time():
    blocks = [{"started": 10.0}, {"started": 31.0}]
    static = [{"started": 0.0, "seconds": 1.0}, {"started": 9.0, "seconds": 2.0}, {"started": 20.0, "seconds": 3.0},
              {"started": 30.0, "seconds": 4.0}]
    assert model_bench._nearest_seconds(blocks, static) == [2.0, 4.0]  # not the first two (1.0, 2.0)


def _bench_main(monkeypatch, capsys, tmp_path, *args):
    """`python -m kw_ops bench ARGS --out tmp_path` in this process with the measuring replaced: (exit code,
    stderr lines, the settings it would have measured with, the plan); a CSV from an earlier run is there."""
    seen = {}

    def fake_run(plan, settings, on_model=None):
        seen.update(plan=plan, settings=settings)
        return [{"git_sha": "abc", "torch": "t", "triton": "t", "date": "d", "model": model, "method": method.label,
                 "status": "skipped", "reason": "fake"} for model, methods in plan for method in methods]

    monkeypatch.setattr(model_bench, "run", fake_run)
    monkeypatch.setattr(model_bench, "plot", lambda *a: "no plot")
    try:
        code = model_bench.main([*args, "--out", str(tmp_path)])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err.strip().splitlines(), seen.get("settings"), seen.get("plan")


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be an integer >= 1 (the inference batch), got 0"),
    (["--train-batch", "1"], "--train-batch must be an integer >= 2 (the attention's BatchNorm cannot train on "
                             "one sample), got 1"),
    (["--size", "0"], "--size must be an integer >= 1 (the input resolution), got 0"),
    (["--size", "-5"], "--size must be an integer >= 1 (the input resolution), got -5"),
    (["--min-time", "nan"], "--min-time must be a finite number of seconds > 0, got nan"),
    (["--min-time", "inf"], "--min-time must be a finite number of seconds > 0, got inf"),
    (["--min-time", "0"], "--min-time must be a finite number of seconds > 0, got 0.0"),
    (["--min-time", "-1"], "--min-time must be a finite number of seconds > 0, got -1.0"),
    (["--repeat", "1"], "--repeat must be an integer >= 2 (one block has no spread), got 1"),
    (["--repeat", "-3"], "--repeat must be an integer >= 2 (one block has no spread), got -3"),
    (["--models", ""], "--models: no backbone given; known: convnext_tiny, deit_small, deit_tiny, mobilenetv2_050, "
                       "mobilenetv2_100, resnet18, resnet50"),
    (["--models", "resnet18,resnet99"], "--models: unknown backbone(s) 'resnet99'; known: convnext_tiny, "),
    (["--models", "resnet18_kw1x"], "--models: unknown backbone(s) 'resnet18_kw1x'; known: "),
    (["--budgets", ""], "--budgets: no budget given; write"),
    (["--budgets", "1x,half"], "--budgets: cannot read 'half'; write a KW budget as 1x, 4x, 4, kw4x, 1/2x, 0.5x, "
                               "1d2x or kw1d2x (the paper's: 1/4x, 1/2x, 1x, 2x, 4x)"),
    (["--budgets", "0x"], "--budgets: cannot read '0x'; write a KW budget as"),
    (["--budgets=-1x"], "--budgets: cannot read '-1x'; write a KW budget as"),
    (["--device", "foo"], "--device: expected cpu or cuda, got 'foo'"),
    (["--device", "cuda"], "--device cuda: no CUDA device here (torch "),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_options_are_one_line_and_exit_2_and_the_csv_is_unchanged(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.setattr(model_bench.torch.cuda, "is_available", lambda: False)  # --device cuda: a CPU-only machine
    earlier = "an,earlier,run\n1,2,3\n"
    for device in ("cpu", "cuda"):
        (tmp_path / f"bench_models_{device}.csv").write_text(earlier)
    code, err, settings, _ = _bench_main(monkeypatch, capsys, tmp_path, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("kw_ops bench: " + message), err
    assert settings is None  # nothing measured
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_models_cpu.csv", "bench_models_cuda.csv"]
    assert all((tmp_path / f"bench_models_{d}.csv").read_text() == earlier for d in ("cpu", "cuda"))


@pytest.mark.parametrize("spellings, budgets", [
    ("1/2x,0.5x,1d2x,kw1d2x,0.5,KW1/2X", ["1d2x"]),
    ("kw1x,1x,1,1.0x", ["1x"]),
    ("4,kw4x,4x", ["4x"]),
    ("1/4x,0.75x,kw3d4x,2", ["1d4x", "3d4x", "2x"]),
])
def test_budgets_accept_the_spellings_users_write(monkeypatch, capsys, tmp_path, spellings, budgets):
    code, err, _, plan = _bench_main(monkeypatch, capsys, tmp_path, "--models", "resnet18", "--budgets", spellings)
    assert code == 0, err
    kw_rows = [m for m in plan[0][1] if m.label.startswith("KW")]
    assert [m.label for m in kw_rows[::2]] == [f"KW ({b.replace('d', '/')}) released" for b in budgets]
    names = [m.model_name for m in kw_rows]
    assert all(name is None or name == f"resnet18_kw{b}" for name, b in zip(names, [b for b in budgets
                                                                                   for _ in range(2)]))
    if budgets == ["1d2x"]:
        assert names == ["resnet18_kw1d2x"] * 2


def test_batch_is_the_inference_batch_and_train_batch_the_training_batch(monkeypatch, capsys, tmp_path):
    code, _, settings, _ = _bench_main(monkeypatch, capsys, tmp_path, "--device", "cpu", "--models", "resnet18",
                                       "--batch", "6", "--train-batch", "3")
    assert code == 0 and (settings.batch, settings.train_batch) == (6, 3)
    defaults = model_bench.quick_settings("cpu")
    code, _, settings, _ = _bench_main(monkeypatch, capsys, tmp_path, "--device", "cpu", "--models", "resnet18",
                                       "--batch", "1")
    assert code == 0 and (settings.batch, settings.train_batch) == (1, defaults.train_batch)
    full = model_bench.full_settings("cpu")
    code, _, settings, _ = _bench_main(monkeypatch, capsys, tmp_path, "--device", "cpu", "--models", "resnet18",
                                       "--full", "--train-batch", "4")
    assert code == 0 and (settings.batch, settings.train_batch) == (full.batch, 4)


# -- the timing and memory primitives (kw_ops.benchmarking.measure), and the worker's formulation switch --------
def test_block_seconds_is_per_call_wall_and_wait(monkeypatch):
    """A fake clock that a step moves by 0.5 s, with 0.2 s of run-queue wait: a block of 4 calls gives 0.5 s
    and 0.2 s per call."""
    clock = {"now": 100.0, "wait": 7.0, "calls": 0}

    def step():
        clock["now"] += 0.5
        clock["wait"] += 0.2
        clock["calls"] += 1

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(measure, "run_queue_wait_s", lambda: clock["wait"])
    seconds, wait = measure.block_seconds(step, 4, "cpu")
    assert clock["calls"] == 4 and (seconds, wait) == pytest.approx((0.5, 0.2))


def test_steps_rotate_the_inputs_in_their_mode():
    """Inference: eval mode, no autograd, batches 0, 1, 2, 0, ...; training: train mode, a step that changes the
    weights and frees the gradients."""
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            seen.append((x[0, 0, 0, 0].item(), self.training, torch.is_grad_enabled()))
            return self.fc(x.mean(dim=(2, 3)))

    model = Probe().train()
    xs, ys = measure.make_inputs(2, 4, "cpu", False, 4)
    infer = measure.inference_step(model, xs, "cpu")
    for _ in range(4):
        infer()
    first = [x[0, 0, 0, 0].item() for x in xs]
    assert seen == [(first[i], False, False) for i in (0, 1, 2, 0)]
    seen.clear()
    weight = model.fc.weight.detach().clone()
    train = measure.train_step(model, xs, ys, "cpu")
    for _ in range(2):
        train()
    assert seen == [(first[i], True, True) for i in (0, 1)]
    assert not torch.equal(model.fc.weight, weight) and model.fc.weight.grad is None
    assert len(xs) == len(ys) == measure.ROTATE and len({x.data_ptr() for x in xs}) == measure.ROTATE


def test_memory_of_a_step_sees_a_64_mib_tensor():
    """A step that allocates and fills 64 MiB (16 Mi floats): the allocator's peak is that, in MiB, and the
    resident set grows by about that, not by the 384 MiB peak of an earlier, freed tensor."""
    torch.ones(96 << 20).sum()  # 384 MiB resident, then freed: a high-water mark from before the step

    def step():
        torch.ones(16 << 20).sum()

    memory = measure.step_memory_mb(step, "cpu")
    assert 64 <= memory["alloc"] < 64.01
    assert memory["rss"] is None or 56 <= memory["rss"] < 128


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_worker_formulation_switches_the_baselines_back_to_fast(fails):
    from kw_ops.baselines import DYConv2d

    model = nn.Sequential(DYConv2d(4, 4, 3, padding=1, num_kernels=2))
    with pytest.raises(RuntimeError, match="step failed") if fails else contextlib.nullcontext():
        with worker.formulation(model, released=True):
            assert model[0].formulation == "released"
            if fails:
                raise RuntimeError("step failed")
    assert model[0].formulation == "fast"
    with worker.formulation(model, released=False):
        assert model[0].formulation == "fast"
