"""`python -m kw_ops bench`: images/s, training step time, peak memory and parameters of static,
DY-Conv, ODConv and KW networks (released formulation and kw_ops) on this device, side by side in
one run: the paper's Tables 12 and 16 on your machine."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .. import models
from ..baselines import set_baseline_formulation
from ..nn.describe import count_parameters
from .measure import inference_seconds, make_inputs, step_peak_mb, train_step_seconds
from .released import released_formulation

DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenetv2_100")
#: the paper's KW budgets per backbone (Tables 1-4); the quick default runs 1x and 4x
PAPER_BUDGETS = {"resnet18": ("1d4x", "1d2x", "1x", "2x", "4x"), "resnet50": ("1d2x", "1x", "4x"),
                 "mobilenetv2_100": ("1d2x", "1x", "4x"), "mobilenetv2_050": ("1d2x", "1x", "4x"),
                 "convnext_tiny": ("1x",)}
QUICK_BUDGETS = ("1x", "4x")
BASELINES = (("DY-Conv (4x)", "dy4x"), ("ODConv (4x)", "od4x"))
#: second word of a method label: the released codes' formulation, or ours
RELEASED, FAST = "released", "kw_ops"
CSV_FIELDS = ("date", "git_sha", "device", "torch", "triton", "model", "method", "status", "reason", "params",
              "batch", "train_batch", "size", "amp", "channels_last", "threads", "infer_images_per_s",
              "train_step_ms", "infer_peak_mb", "train_peak_mb", "memory_kind")


@dataclasses.dataclass
class Settings:
    device: str
    batch: int
    train_batch: int
    size: int
    iters: int
    warmup: int
    amp: str | None
    channels_last: bool
    memory: bool


def quick_settings(device: str) -> Settings:
    if device == "cuda":
        return Settings(device, 32, 16, 224, 10, 3, "bf16", True, True)
    return Settings(device, 4, 2, 64, 5, 2, None, False, True)


def full_settings(device: str) -> Settings:
    if device == "cuda":  # Table 12: batch 100 at 224x224
        return Settings(device, 100, 64, 224, 30, 5, "bf16", True, True)
    return Settings(device, 8, 8, 224, 5, 2, None, False, True)


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
        label = f"KW ({budget.replace('1d', '1/')})"
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


def _build(name: str, settings: Settings):
    model = models.create(name).to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def formulation(model, released: bool):
    """Inside the block, KW, DY-Conv and ODConv layers run as the released codes compute them."""
    if not released:
        yield model
        return
    set_baseline_formulation(model, "released")
    try:
        with released_formulation(model):
            yield model
    finally:
        set_baseline_formulation(model, "fast")


def _measure(method: Method, model, settings: Settings, xs, ys, train_xs, train_ys) -> dict:
    device, amp = settings.device, settings.amp
    with formulation(model, method.released):
        infer = inference_seconds(model, xs, device, amp, settings.warmup, settings.iters)
        row = {"infer_images_per_s": settings.batch / infer}
        if settings.memory:
            row["infer_peak_mb"] = step_peak_mb(lambda: inference_seconds(model, xs[:1], device, amp, 0, 1), device)
        train = train_step_seconds(model, train_xs, train_ys, device, amp, settings.warmup, settings.iters)
        row["train_step_ms"] = train * 1e3
        if settings.memory:
            row["train_peak_mb"] = step_peak_mb(
                lambda: train_step_seconds(model, train_xs[:1], train_ys[:1], device, amp, 0, 1), device)
    row["memory_kind"] = memory_kind(device) if settings.memory else "not measured"
    return row


def memory_kind(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "CUDA allocator peak of one step above what was allocated before"
    return "CPU allocator peak of one step above the start (torch.profiler memory events; oneDNN scratch unseen)"


def _progress(done: int, total: int, label: str) -> None:
    width = 24
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}", end="", file=sys.stderr,
          flush=True)


def run(model_names, budgets_for, settings: Settings) -> list[dict]:
    """Measure every method of every model; returns CSV rows (skipped rows carry their reason)."""
    env = {**_environment(), "device": device_name(settings.device)}
    plan = [(m, method) for m in model_names for method in methods_for(m, budgets_for(m))]
    rows, built = [], {}
    xs, ys = make_inputs(settings.batch, settings.size, settings.device, settings.channels_last)
    train_xs, train_ys = make_inputs(settings.train_batch, settings.size, settings.device, settings.channels_last)
    for index, (model_name, method) in enumerate(plan):
        _progress(index, len(plan), f"{model_name} {method.label}")
        row = {**env, "model": model_name, "method": method.label, "batch": settings.batch,
               "train_batch": settings.train_batch, "size": settings.size, "amp": settings.amp or "fp32",
               "channels_last": settings.channels_last, "threads": torch.get_num_threads()}
        if method.model_name is None:
            rows.append({**row, "status": "skipped", "reason": method.reason})
            continue
        try:
            if method.model_name not in built:
                built.clear()  # keep one model alive at a time
                built[method.model_name] = _build(method.model_name, settings)
            model = built[method.model_name]
            row["params"] = count_parameters(model)
            row.update(_measure(method, model, settings, xs, ys, train_xs, train_ys))
            rows.append({**row, "status": "ok", "reason": ""})
        except (RuntimeError, NotImplementedError, ValueError) as error:
            rows.append({**row, "status": "skipped", "reason": f"{type(error).__name__}: {error}"})
    _progress(len(plan), len(plan), "done")
    print(file=sys.stderr)
    return rows


def _ratio(row: dict, base: dict, key: str) -> str:
    return f"{row[key] / base[key]:.2f}x" if row.get(key) and base.get(key) else "–"


def _megabytes(row: dict, key: str) -> str:
    return f"{row[key]:.0f}" if row.get(key) is not None else "–"


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table with ratios to the static network of the same model."""
    static = {r["model"]: r for r in rows if r["method"] == "static" and r["status"] == "ok"}
    lines = ["| model | method | params (M) | infer img/s | vs static | train step ms | vs static | "
             "infer peak MB | train peak MB | train mem vs static |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['method']} | skipped: {r['reason']} |||||||| ")
            continue
        base = static.get(r["model"], {})
        lines.append(f"| {r['model']} | {r['method']} | {r['params'] / 1e6:.2f} | {r['infer_images_per_s']:.1f} | "
                     f"{_ratio(r, base, 'infer_images_per_s')} | {r['train_step_ms']:.1f} | "
                     f"{_ratio(r, base, 'train_step_ms')} | {_megabytes(r, 'infer_peak_mb')} | "
                     f"{_megabytes(r, 'train_peak_mb')} | {_ratio(r, base, 'train_peak_mb')} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def plot(csv_path: Path, png_path: Path, git_sha: str) -> str:
    """A PNG of images/s and training memory per method from the CSV rows of one run (git sha)."""
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
    fig, axes = plt.subplots(2, len(model_names), figsize=(5 * len(model_names), 7), squeeze=False)
    for col, model_name in enumerate(model_names):
        sub = [r for r in rows if r["model"] == model_name]
        labels = [r["method"] for r in sub]
        axes[0][col].barh(labels, [float(r["infer_images_per_s"]) for r in sub], color="tab:blue")
        axes[0][col].set_title(f"{model_name}: inference images/s")
        axes[1][col].barh(labels, [float(r["train_peak_mb"] or 0) for r in sub], color="tab:orange")
        axes[1][col].set_title("training peak memory (MB)")
        for ax in axes[:, col]:
            ax.invert_yaxis()
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{rows[0]['device']} · torch {rows[0]['torch']} · {git_sha} · {run_date} UTC", fontsize=9)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return f"plot: {png_path}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kw_ops bench", description=__doc__)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated backbones")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated KW budgets (default: 1x,4x; --full: the paper's)")
    parser.add_argument("--full", action="store_true", help="the paper's settings (224x224, batch 100 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--amp", choices=("bf16", "fp16", "none"))
    parser.add_argument("--channels-last", choices=("on", "off"), help="default: on for CUDA, off for CPU")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV and the PNG")
    args = parser.parse_args(argv)
    settings = full_settings(args.device) if args.full else quick_settings(args.device)
    for field in ("batch", "size", "iters"):
        if getattr(args, field):
            setattr(settings, field, getattr(args, field))
    if args.batch:
        settings.train_batch = max(2, min(settings.train_batch, args.batch))
    if args.amp:
        settings.amp = None if args.amp == "none" else args.amp
    settings.memory = not args.no_memory
    if args.channels_last:
        settings.channels_last = args.channels_last == "on"
    model_names = [m for m in args.models.split(",") if m]
    unknown = [m for m in model_names if m not in models.list_models()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(models.list_models())}")
    if args.budgets:
        budgets_for = lambda m: tuple(args.budgets.split(","))
    elif args.full:
        budgets_for = lambda m: PAPER_BUDGETS.get(m, ("1x",))
    else:
        budgets_for = lambda m: QUICK_BUDGETS
    rows = run(model_names, budgets_for, settings)
    out = Path(args.out)
    csv_path = out / f"bench_models_{settings.device}.csv"
    write_csv(rows, csv_path)
    note = plot(csv_path, out / f"bench_models_{settings.device}.png", rows[0]["git_sha"])
    print(f"\n{device_name(settings.device)} · torch {rows[0]['torch']} · triton {rows[0]['triton']} · "
          f"git {rows[0]['git_sha']} · {rows[0]['date']} UTC")
    memory_kind = next((r["memory_kind"] for r in rows if r.get("memory_kind")), "not measured")
    print(f"settings: inference batch {settings.batch}, training batch {settings.train_batch}, "
          f"{settings.size}x{settings.size}, {settings.amp or 'fp32'}, channels_last={settings.channels_last}, "
          f"median of {settings.iters} after {settings.warmup} warm-up; memory: {memory_kind}"
          + ("" if args.full else " (quick settings; --full for the paper's)"))
    print(f"csv: {csv_path}; {note}\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
