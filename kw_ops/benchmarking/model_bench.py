"""`python -m kw_ops bench`: images/s, training step time, memory and parameters of static, DY-Conv,
ODConv and KW networks (released formulation and kw_ops) on this device, side by side in one run: the
paper's Tables 12 and 16 on your machine.

Each method runs in a process of its own (kw_ops.benchmarking.worker); the methods of one model are
timed interleaved, round after round, so a burst of load hits them all, and each row reports the median
over its blocks, their spread (interquartile range) and the ratio of its median to the static network's
(its per-round ratios flag rounds that disagree). Cheap steps get more rounds than slow ones
(`Settings.max_repeat`); a step's first call (the memory measurement, also the warm-up) is never timed:
even for 2-10 s steps it measured 10-60 % slower than later calls. Rows that varied between rounds are
marked and named in one warning line, which says whether another process held the CPU (spread.py)."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import fractions
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import models
from .spread import busy_warning, summarise
from .worker import Worker, WorkerError

DEFAULT_MODELS = ("resnet18", "mobilenetv2_100")  # the quick default; --full adds FULL_ONLY_MODELS
#: what the quick default leaves out (its released KW 4x training step alone takes seconds on a CPU)
FULL_ONLY_MODELS = ("resnet50",)
#: the paper's KW budgets per backbone (Tables 1-4); the quick default runs 1x and 4x
PAPER_BUDGETS = {"resnet18": ("1d4x", "1d2x", "1x", "2x", "4x"), "resnet50": ("1d2x", "1x", "4x"),
                 "mobilenetv2_100": ("1d2x", "1x", "4x"), "mobilenetv2_050": ("1d2x", "1x", "4x"),
                 "convnext_tiny": ("1x",)}
QUICK_BUDGETS = ("1x", "4x")
BASELINES = (("DY-Conv (4x)", "dy4x"), ("ODConv (4x)", "od4x"))
#: second word of a method label: the released codes' formulation, or ours
RELEASED, FAST = "released", "kw_ops"
KINDS = ("infer", "train")
CSV_FIELDS = ("date", "git_sha", "device", "torch", "triton", "model", "method", "status", "reason", "params",
              "batch", "train_batch", "size", "amp", "channels_last", "threads",
              "infer_images_per_s", "infer_images_per_s_min", "infer_images_per_s_max", "infer_spread_pct",
              "infer_vs_static", "infer_ratio_spread_pct",
              "train_step_ms", "train_step_ms_min", "train_step_ms_max", "train_spread_pct",
              "train_vs_static", "train_ratio_spread_pct", "infer_vs_released", "train_vs_released",
              "cpu_wait_pct", "flags", "infer_blocks", "train_blocks",
              "wall_s",
              "infer_rss_mb", "infer_alloc_mb", "train_rss_mb", "train_alloc_mb", "memory_kind", "timer")


@dataclasses.dataclass
class Settings:
    device: str
    batch: int
    train_batch: int
    size: int
    repeat: int          # timed blocks per method and step kind, at least (interleaved rounds)
    min_time: float      # seconds a timed block lasts at least (whole steps; at least one)
    amp: str | None
    channels_last: bool
    max_repeat: int = 0          # blocks for a cheap step (a block under `cheap_block` seconds); 0: `repeat`
    cheap_block: float = 0.0
    threads: int = dataclasses.field(default_factory=torch.get_num_threads)

    def blocks_wanted(self, block_seconds: float) -> int:
        """Timed blocks for a step whose block takes `block_seconds`: more where they cost little."""
        return max(self.repeat, self.max_repeat) if block_seconds < self.cheap_block else self.repeat


def quick_settings(device: str) -> Settings:
    """The paper's resolution in about a minute on a 2-core CPU: 224x224, batch 2 (the smallest the attention's
    BatchNorm trains on) for inference and training; two blocks per slow step (the least that shows a spread),
    three where a block costs under 0.3 s."""
    if device == "cuda":
        return Settings(device, 32, 16, 224, 5, 0.05, "bf16", True)
    return Settings(device, 2, 2, 224, 2, 0.3, None, False, max_repeat=3, cheap_block=0.3)


def full_settings(device: str) -> Settings:
    if device == "cuda":  # Table 12: batch 100 at 224x224
        return Settings(device, 100, 64, 224, 7, 0.2, "bf16", True)
    return Settings(device, 8, 8, 224, 5, 0.5, None, False)


@dataclasses.dataclass
class Method:
    label: str
    model_name: str | None      # registry name; None: not available here
    released: bool = False       # run KW layers in the released formulation
    reason: str = ""


def methods_for(model: str, budgets) -> list[Method]:
    """The rows of one backbone: static, baselines, and each KW budget released vs kw_ops."""
    known = set(models.list_models())
    rows = [Method("static", model)]
    for label, suffix in BASELINES:
        name = f"{model}_{suffix}"
        for released in (True, False):
            full = f"{label} {RELEASED if released else FAST}"
            rows.append(Method(full, name, released) if name in known else
                        Method(full, None, released, reason=f"no preset {name!r}"))
    for budget in budgets:
        name = f"{model}_kw{budget}"
        label = f"KW ({budget.replace('d', '/')})"
        if name not in known:
            reason = f"the paper trains no {budget} {model}" if budget not in PAPER_BUDGETS.get(model, ()) else \
                f"no preset {name!r}"
            rows += [Method(f"{label} {RELEASED}", None, True, reason), Method(f"{label} {FAST}", None, False, reason)]
        else:
            rows += [Method(f"{label} {RELEASED}", name, True), Method(f"{label} {FAST}", name)]
    return rows


def _environment() -> dict:
    try:
        root = Path(__file__).resolve().parents[2]
        git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=root,
                                           timeout=10).stdout.strip()
        sha = git("rev-parse", "--short", "HEAD") or "unknown"
        if sha != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
            sha += "+dirty"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "git_sha": sha,
            "torch": torch.__version__, "triton": triton_version}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def memory_kind(device: str) -> str:
    if torch.device(device).type == "cuda":
        return ("alloc: CUDA allocator peak of the first step above what was allocated before "
                "(torch.cuda.max_memory_allocated); rss: not measured")
    return ("rss: peak resident-set growth of the first step in a fresh process (VmHWM - VmRSS, after "
            "malloc_trim); alloc: CPU allocator peak of that step (torch.profiler memory events; oneDNN "
            "scratch unseen)")


def timer_kind(device: str) -> str:
    return "CUDA events around each block" if torch.device(device).type == "cuda" else "perf_counter around each block"


def _summary_fields(kind: str, seconds, static_seconds, waits, batch: int,
                    static_median: float | None = None) -> tuple[dict, list[str]]:
    s = summarise(seconds, static_seconds, waits, static_median)
    if kind == "infer":
        fields = {"infer_images_per_s": batch / s["median"], "infer_images_per_s_min": batch / s["max"],
                  "infer_images_per_s_max": batch / s["min"], "infer_vs_static": 1 / s["ratio"] if "ratio" in s
                  else None}
    else:
        fields = {"train_step_ms": s["median"] * 1e3, "train_step_ms_min": s["min"] * 1e3,
                  "train_step_ms_max": s["max"] * 1e3, "train_vs_static": s.get("ratio")}
    fields[f"{kind}_spread_pct"] = 100 * s["spread"]
    fields[f"{kind}_ratio_spread_pct"] = 100 * s["ratio_spread"] if "ratio_spread" in s else None
    fields[f"{kind}_wait"] = s["wait"]
    return fields, [f"{kind} {flag}" for flag in s["flags"]]


def _nearest_seconds(blocks: list[dict], reference: list[dict]) -> list[float]:
    """For each block, the seconds of the reference block that started nearest to it in time (the same round:
    a burst of load hits both)."""
    return [min(reference, key=lambda r: abs(r["started"] - b["started"]))["seconds"] for b in blocks]


def measure_model(model_name: str, methods: list[Method], settings: Settings, base: dict, bar) -> list[dict]:
    """The rows of one model: start a worker per method (memory of its first steps, which warm it up), then
    time blocks of steps in interleaved rounds: every round runs, in order, each method and step kind still
    short of the blocks it wants (`Settings.blocks_wanted`)."""
    rows = [{**base, "model": model_name, "method": m.label, "status": "ok", "reason": ""} for m in methods]
    workers, ready, wall = {}, {}, {}
    for i, method in enumerate(methods):
        bar.set_description(f"{model_name} {method.label}: start")
        if method.model_name is None:
            rows[i].update(status="skipped", reason=method.reason)
            bar.update(1)
            continue
        started = time.perf_counter()
        worker = Worker(method.model_name, method.released, settings)
        try:
            ready[i] = worker.start()
            workers[i] = worker
        except WorkerError as error:
            worker.close()
            rows[i].update(status="skipped", reason=str(error))
        wall[i] = time.perf_counter() - started
        bar.update(1)
    order = list(workers)
    first = {(i, kind): ready[i][f"{kind}_first_s"] for i in order for kind in KINDS}
    iters = {key: max(1, math.ceil(settings.min_time / seconds)) for key, seconds in first.items()}
    wanted = {key: settings.blocks_wanted(iters[key] * seconds) for key, seconds in first.items()}
    blocks = {key: [] for key in first}
    bar.total += sum(wanted.values())
    try:
        while any(len(blocks[key]) < wanted[key] for key in wanted):
            for i in order:
                for kind in KINDS:
                    if len(blocks[i, kind]) < wanted[i, kind]:
                        bar.set_description(f"{model_name} {methods[i].label}")
                        started = time.perf_counter()
                        blocks[i, kind].append(workers[i].block(kind, iters[i, kind]))
                        wall[i] += time.perf_counter() - started
                        bar.update(1)
    finally:
        for worker in workers.values():
            worker.close()
    static = next((i for i in order if methods[i].label == "static"), None)
    for i in order:
        row = rows[i]
        # blocks: per kind, the timed blocks (start on the monotonic clock, seconds and wait per step)
        row.update(params=ready[i]["params"], blocks={k: blocks[i, k] for k in KINDS}, wall_s=wall[i])
        flags, waits = [], []
        for kind in KINDS:
            seconds = [b["seconds"] for b in blocks[i, kind]]
            static_seconds = static_median = None
            if static is not None:
                static_seconds = _nearest_seconds(blocks[i, kind], blocks[static, kind])
                static_median = statistics.median(b["seconds"] for b in blocks[static, kind])
            batch = settings.batch if kind == "infer" else settings.train_batch
            fields, kind_flags = _summary_fields(kind, seconds, static_seconds, [b["wait"] for b in blocks[i, kind]],
                                                 batch, static_median)
            waits.append(fields.pop(f"{kind}_wait"))
            row.update(fields)
            row[f"{kind}_blocks"] = len(seconds)
            flags += kind_flags
            row[f"{kind}_rss_mb"], row[f"{kind}_alloc_mb"] = ready[i][f"{kind}_rss_mb"], ready[i][f"{kind}_alloc_mb"]
        row.update(cpu_wait_pct=100 * max(waits), flags="; ".join(flags))
    add_vs_released(rows)
    return rows


def released_label(label: str) -> str | None:
    """The label of the released row a kw_ops row is measured against ('KW (1x) kw_ops' -> 'KW (1x) released')."""
    return label[: -len(FAST)] + RELEASED if label.endswith(" " + FAST) else None


def add_vs_released(rows: list[dict]) -> None:
    """Each measured kw_ops row gains its speed-up over the released row of the same method: images/s over
    images/s for inference, step time over step time for training (> 1: kw_ops faster)."""
    by_label = {r["method"]: r for r in rows if r["status"] == "ok"}
    for row in by_label.values():
        released = by_label.get(released_label(row["method"]) or "")
        if released is None:
            continue
        row["infer_vs_released"] = row["infer_images_per_s"] / released["infer_images_per_s"]
        row["train_vs_released"] = released["train_step_ms"] / row["train_step_ms"]


def speedup_summary(rows: list[dict]) -> list[str]:
    """One line per model: the geometric mean speed-up of kw_ops over released across its dynamic methods."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        paired = [r for r in rows if r["model"] == model and r.get("infer_vs_released")]
        if not paired:
            continue
        geo = lambda values: math.exp(statistics.fmean(math.log(v) for v in values))  # noqa: E731
        infer = [r["infer_vs_released"] for r in paired]
        train = [r["train_vs_released"] for r in paired]
        methods = ", ".join(r["method"][: -len(FAST) - 1] for r in paired)
        lines.append(f"{model}: kw_ops vs released, geometric mean over {methods}: inference {geo(infer):.2f}x, "
                     f"training {geo(train):.2f}x, both {geo(infer + train):.2f}x (slowest row "
                     f"{min(infer + train):.2f}x)")
    return lines


def run(plan: list[tuple[str, list[Method]]], settings: Settings, on_model=None) -> list[dict]:
    """Measure every (model, methods) of `plan`; returns CSV rows (skipped rows carry their reason).
    `on_model(rows)` is called with each model's rows as soon as they exist."""
    env = {**_environment(), "device": device_name(settings.device)}
    base = {**env, "batch": settings.batch, "train_batch": settings.train_batch, "size": settings.size,
            "amp": settings.amp or "fp32", "channels_last": settings.channels_last, "threads": settings.threads,
            "memory_kind": memory_kind(settings.device), "timer": timer_kind(settings.device)}
    rows = []  # the bar counts worker starts and timed blocks; each model adds its blocks once it knows them
    total = sum(len(methods) for _, methods in plan)
    with tqdm(total=total, file=sys.stderr, unit="block", dynamic_ncols=True, leave=False) as bar:
        for model_name, methods in plan:
            model_rows = measure_model(model_name, methods, settings, base, bar)
            rows += model_rows
            if on_model is not None:
                on_model(model_rows)
    return rows


def _number(value, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None or value == "" else f"{float(value):.{digits}f}{suffix}"


TABLE_HEADER = ("| model | method | params (M) | infer img/s | spread | vs static | vs released | train step ms | spread "
                "| vs static | vs released | infer RSS MB | infer alloc MB | train RSS MB | train alloc MB | ! |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_rows(rows: list[dict]) -> list[str]:
    """Markdown lines of `rows`; spread: interquartile range of the timed blocks in % of the median; vs static:
    the ratio of the medians; vs released: a kw_ops row's speed-up over the released row of its method (ratio of
    the medians, > 1: faster); !: a row to distrust (spread.busy_warning says why)."""
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['method']} | skipped: {r['reason']} |||||||||||||| ")
            continue
        lines.append(" | ".join((
            f"| {r['model']}", r["method"], f"{r['params'] / 1e6:.2f}", _number(r["infer_images_per_s"]),
            _number(r["infer_spread_pct"], 0, "%"), _number(r["infer_vs_static"], 2, "x"),
            _number(r.get("infer_vs_released"), 2, "x"), _number(r["train_step_ms"]),
            _number(r["train_spread_pct"], 0, "%"), _number(r["train_vs_static"], 2, "x"),
            _number(r.get("train_vs_released"), 2, "x"), _number(r["infer_rss_mb"], 0), _number(r["infer_alloc_mb"], 0),
            _number(r["train_rss_mb"], 0), _number(r["train_alloc_mb"], 0), "!" if r["flags"] else "")) + " |")
    return lines


def markdown_table(rows: list[dict]) -> str:
    return "\n".join([TABLE_HEADER, *table_rows(rows), "", *speedup_summary(rows)])


def write_csv(rows: list[dict], path: Path) -> str:
    """Append `rows` to the CSV at `path`; a file with other columns (an older version) is moved aside first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    note = ""
    if path.exists():
        with path.open() as handle:
            header = next(csv.reader(handle), [])
        if tuple(header) != CSV_FIELDS:
            aside = path.with_name(f"{path.stem}.old-columns{path.suffix}")
            number = 1
            while aside.exists():  # never over an earlier move
                number += 1
                aside = path.with_name(f"{path.stem}.old-columns-{number}{path.suffix}")
            path.replace(aside)
            note = f" (its older rows, with other columns, moved to {aside})"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return note


def plot(csv_path: Path, png_path: Path, git_sha: str) -> str:
    """A PNG of images/s, training step time (bars: medians; whiskers: min-max over the rounds) and training
    memory per method from the CSV rows of the latest run at `git_sha`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    with csv_path.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["git_sha"] == git_sha and r["status"] == "ok"]
    if not rows:
        return "no plot: no measured rows"
    run_date = max(r["date"] for r in rows)
    rows = [r for r in rows if r["date"] == run_date]
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(3, len(model_names), figsize=(5 * len(model_names), 10), squeeze=False)
    for col, model_name in enumerate(model_names):
        sub = [r for r in rows if r["model"] == model_name]
        labels = [r["method"] + (" !" if r["flags"] else "") for r in sub]
        for ax, key, title, color in ((axes[0][col], "infer_images_per_s", f"{model_name}: inference images/s",
                                       "tab:blue"),
                                      (axes[1][col], "train_step_ms", "training step ms", "tab:green")):
            median = [float(r[key]) for r in sub]
            low = [m - float(r[f"{key}_min"]) for m, r in zip(median, sub)]
            high = [float(r[f"{key}_max"]) - m for m, r in zip(median, sub)]
            ax.barh(labels, median, xerr=[low, high], color=color, capsize=2)
            ax.set_title(title)
        memory = axes[2][col]
        ys = range(len(sub))
        memory.barh([y - 0.2 for y in ys], [float(r["train_rss_mb"] or 0) for r in sub], height=0.4,
                    color="tab:orange", label="RSS growth")
        memory.barh([y + 0.2 for y in ys], [float(r["train_alloc_mb"] or 0) for r in sub], height=0.4,
                    color="tab:red", label="allocator peak")
        memory.set_yticks(list(ys), labels)
        memory.set_title("training step memory (MB)")
        memory.legend(fontsize=7)
        for ax in axes[:, col]:
            ax.invert_yaxis()
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{rows[0]['device']} · torch {rows[0]['torch']} · {git_sha} · {run_date} UTC · "
                 "medians of interleaved blocks, whiskers min-max", fontsize=9)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return f"plot: {png_path}"


def _blocks_text(settings: Settings) -> str:
    text = f"median of {settings.repeat} timed blocks per step kind in interleaved rounds"
    if settings.max_repeat > settings.repeat:
        text += f" ({settings.max_repeat} where a block costs under {settings.cheap_block} s)"
    return text


BUDGET_SPELLINGS = "1x, 4x, 4, kw4x, 1/2x, 0.5x, 1d2x or kw1d2x (the paper's: 1/4x, 1/2x, 1x, 2x, 4x)"


def parse_budget(text: str) -> str:
    """A KW budget as the presets name it ('1d2x', '4x', '3d4x') from the spellings users write: 1/2x, 0.5x,
    0.5, 1d2x, kw1d2x, 4, 4x, kw4x (any case); ValueError naming --budgets and the accepted spellings."""
    core = text.strip().lower().removeprefix("kw").removesuffix("x").replace("d", "/")
    try:
        budget = fractions.Fraction(core)
    except (ValueError, ZeroDivisionError):
        budget = None
    if budget is None or budget <= 0:
        raise ValueError(f"--budgets: cannot read {text!r}; write a KW budget as {BUDGET_SPELLINGS}")
    return f"{budget.numerator}x" if budget.denominator == 1 else f"{budget.numerator}d{budget.denominator}x"


def backbones() -> list[str]:
    """Registered networks with DY-Conv, ODConv or KW presets: what `bench --models` measures."""
    names = models.list_models()
    return [m for m in names if any(n.startswith(f"{m}_{kind}") for n in names for kind in ("kw", "dy", "od"))]


def _defaults(field: str) -> str:
    """The default of a Settings field per device and --full, for the help text."""
    quick, full = (", ".join(f"{getattr(make(d), field)} on {d.upper() if d == 'cpu' else 'GPU'}"
                             for d in ("cpu", "cuda")) for make in (quick_settings, full_settings))
    return f"default: {quick}; --full: {full}"


#: the numeric options: field -> (test of a given value, what it must be)
LIMITS = {"batch": (lambda v: v >= 1, "an integer >= 1 (the inference batch)"),
          "train_batch": (lambda v: v >= 2, "an integer >= 2 (the attention's BatchNorm cannot train on one sample)"),
          "size": (lambda v: v >= 1, "an integer >= 1 (the input resolution)"),
          "repeat": (lambda v: v >= 2, "an integer >= 2 (one block has no spread)"),
          "min_time": (lambda v: math.isfinite(v) and v > 0, "a finite number of seconds > 0")}


def settings_from_options(args) -> tuple[Settings, list[tuple[str, list[Method]]]]:
    """The settings and the plan [(backbone, methods)] of the command line `args`; ValueError, one line naming
    the option, for a value the bench cannot run (before anything runs or is written)."""
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device cuda: no CUDA device here (torch {torch.__version__}, {build}); use --device cpu")
    for field, (test, expected) in LIMITS.items():
        value = getattr(args, field)
        if value is not None and not test(value):
            raise ValueError(f"--{field.replace('_', '-')} must be {expected}, got {value}")
    known = backbones()
    given = args.models if args.models is not None else ",".join(DEFAULT_MODELS)
    model_names = list(dict.fromkeys(m.strip() for m in given.split(",") if m.strip()))
    unknown = [m for m in model_names if m not in known]
    if not model_names or unknown:
        problem = f"unknown backbone(s) {', '.join(map(repr, unknown))}" if unknown else "no backbone given"
        raise ValueError(f"--models: {problem}; known: {', '.join(known)}")
    if args.budgets is not None:
        budgets = tuple(dict.fromkeys(parse_budget(b) for b in args.budgets.split(",") if b.strip()))
        if not budgets:
            raise ValueError(f"--budgets: no budget given; write {BUDGET_SPELLINGS}, comma-separated")
    settings = full_settings(args.device) if args.full else quick_settings(args.device)
    for field in LIMITS:
        if getattr(args, field) is not None:
            setattr(settings, field, getattr(args, field))
    if args.amp:
        settings.amp = None if args.amp == "none" else args.amp
    if args.channels_last:
        settings.channels_last = args.channels_last == "on"
    if args.models is None:
        model_names = list(DEFAULT_MODELS) + (list(FULL_ONLY_MODELS) if args.full else [])
    if args.budgets is None:
        return settings, [(m, methods_for(m, PAPER_BUDGETS.get(m, ("1x",)) if args.full else QUICK_BUDGETS))
                          for m in model_names]
    return settings, [(m, methods_for(m, budgets)) for m in model_names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kw_ops bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated backbones (default: {','.join(DEFAULT_MODELS)}; --full adds "
                        f"{','.join(FULL_ONLY_MODELS)})")
    parser.add_argument("--budgets", default=None,
                        help=f"comma-separated KW budgets (default: {','.join(QUICK_BUDGETS)}; --full: the "
                        f"paper's per backbone), each written {BUDGET_SPELLINGS}")
    parser.add_argument("--full", action="store_true", help="the paper's settings (224x224, batch 100 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--batch", type=int, help=f"inference batch ({_defaults('batch')})")
    parser.add_argument("--train-batch", type=int, help="training batch, at least 2: the attention's BatchNorm "
                        f"cannot train on one sample ({_defaults('train_batch')})")
    parser.add_argument("--size", type=int, help=f"input resolution ({_defaults('size')})")
    parser.add_argument("--repeat", type=int,
                        help="timed blocks per method and step kind, in interleaved rounds, at least 2 (default: "
                        "2, and 5 for steps whose block costs under 0.15 s, on CPU; 5 on GPU; --full: 5, 7 on GPU)")
    parser.add_argument("--min-time", type=float,
                        help=f"seconds each timed block lasts at least, in whole steps ({_defaults('min_time')})")
    parser.add_argument("--amp", choices=("bf16", "fp16", "none"))
    parser.add_argument("--channels-last", choices=("on", "off"), help="default: on for CUDA, off for CPU")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV and the PNG")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        settings, plan = settings_from_options(args)
    except ValueError as error:
        print(f"kw_ops bench: {error}", file=sys.stderr)
        return 2
    header = [TABLE_HEADER]

    def show(model_rows):  # each model's rows as soon as they exist, above the progress bar
        tqdm.write("\n".join(header + table_rows(model_rows) + speedup_summary(model_rows)), file=sys.stderr)
        header.clear()

    print(f"kw_ops bench: {', '.join(m for m, _ in plan)} at {settings.size}x{settings.size}, inference batch "
          f"{settings.batch}, training batch {settings.train_batch}"
          + ("" if args.full or args.models is not None else f"; the quick default leaves out {', '.join(FULL_ONLY_MODELS)} "
             f"(--full, or --models {','.join(DEFAULT_MODELS + FULL_ONLY_MODELS)})"), file=sys.stderr)
    rows = run(plan, settings, on_model=show)
    out = Path(args.out)
    csv_path = out / f"bench_models_{settings.device}.csv"
    moved = write_csv(rows, csv_path)
    note = plot(csv_path, out / f"bench_models_{settings.device}.png", rows[0]["git_sha"])
    print(f"\n{device_name(settings.device)} · torch {rows[0]['torch']} · triton {rows[0]['triton']} · "
          f"git {rows[0]['git_sha']} · {rows[0]['date']} UTC · {time.perf_counter() - started:.0f} s")
    print(f"settings: inference batch {settings.batch}, training batch {settings.train_batch}, "
          f"{settings.size}x{settings.size}, {settings.amp or 'fp32'}, channels_last={settings.channels_last}; "
          f"{_blocks_text(settings)}, blocks of at least {settings.min_time} s ({timer_kind(settings.device)}); "
          f"spread: interquartile range of the blocks in % of the median; vs static: ratio of the medians (rows "
          f"are flagged when the ratios to the static blocks of the same rounds disagree); memory: "
          f"{memory_kind(settings.device)}"
          + ("" if args.full else f" (quick settings: {', '.join(DEFAULT_MODELS)}; ResNet50 and the paper's "
             f"other budgets with --full, or --models {','.join(DEFAULT_MODELS + FULL_ONLY_MODELS)})"))
    print(f"csv: {csv_path}{moved}; {note}\n")
    print(markdown_table(rows))
    warning = busy_warning(rows)
    if warning:
        print(f"\n{warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
