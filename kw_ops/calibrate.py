"""`python -m kw_ops calibrate`: time this CPU's formulations for the KW layers of some models, for the dispatcher.

The dispatcher (kw_ops.ops.dispatch) estimates each formulation of a KW convolution from its time measured as a
whole on a call of the same bucket, else as a sum of kernels at default rates (kw_ops.ops.cpu_costs); this
command runs each model's forward and training step once at the given batch and size, collects every KW call,
times every candidate formulation of each call whose bucket the cache lacks (`--redo`: all of them) and writes
the rates to this machine's cache (kw_ops.ops.cpu_costs.cache_path(): one file per processor, torch version and
thread count). Without a cache the dispatcher uses default rates and a wider margin before it leaves the
released formulation.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["calibrate_models", "main"]

DEFAULT_MODELS = ("resnet18_kw1x", "resnet18_kw4x", "mobilenetv2_100_kw1x", "mobilenetv2_100_kw4x")


def calibrate_models(names, batches=(2,), size: int = 224, train: bool = True, infer: bool = True,
                     redo: bool = False, min_time: float = 0.05, progress=None):
    """Calibrate the formulations of these registered models' KW layers; returns (rate table, buckets timed)."""
    from . import models
    from .dispatch_report import collect_calls
    from .ops import dispatch

    calls = []
    for name in names:
        model = models.create(name)
        for batch in batches:
            if infer:
                calls += [call for _, call in collect_calls(model, batch, size, train=False)]
            if train and batch > 1:
                calls += [call for _, call in collect_calls(model, batch, size, train=True)]
    timed = []
    table = dispatch.calibrate_calls(dict.fromkeys(calls), min_time=min_time, redo=redo,
                                     progress=lambda key: (timed.append(key), progress and progress(key)))
    return table, timed


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def main(argv=None) -> int:
    from . import models
    from .ops import cpu_costs

    parser = argparse.ArgumentParser(prog="python -m kw_ops calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="registered KW models")
    parser.add_argument("--batch", type=_positive_int, nargs="+", default=[2], help="batch sizes (default 2)")
    parser.add_argument("--size", type=_positive_int, default=224, help="input resolution (default 224)")
    parser.add_argument("--redo", action="store_true", help="time every kernel again, dropping the cached rates")
    parser.add_argument("--show", action="store_true", help="print the cache's path and contents, run nothing")
    args = parser.parse_args(argv)
    if args.show:
        table = cpu_costs.load_rates()
        print(f"{cpu_costs.cache_path()}: {table.source}, {len(table.rates)} kernel buckets")
        for key, rate in sorted(table.rates.items()):
            unit = "s" if key.startswith("call:") else ("B/s" if key.startswith("copy:") else "FLOP/s")
            print(f"  {key}: {rate:.4g} {unit}")
        return 0
    unknown = [m for m in args.models if m not in models.list_models()]
    if unknown:
        kw = [m for m in models.list_models() if "_kw" in m]
        print(f"kw_ops calibrate: --models: unknown model(s) {', '.join(unknown)}; KW models: {', '.join(kw)}",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    table, timed = calibrate_models(args.models, tuple(args.batch), args.size, redo=args.redo)
    print(f"kw_ops calibrate: timed {len(timed)} kernel buckets in {time.perf_counter() - started:.1f} s "
          f"({len(table.rates)} in the cache) for {', '.join(args.models)} at batch {args.batch}, {args.size}x"
          f"{args.size}, {torch.get_num_threads()} threads -> {cpu_costs.cache_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
