"""Command line: `python -m kw_ops {bench, bench-op, train, attention-map, calibrate, info, demo, describe MODEL}`."""
from __future__ import annotations

import argparse
import sys

from . import info


def _describe(args) -> int:
    try:
        from . import models
    except ImportError as error:
        print(f"kw_ops describe {args.model}: the model presets are not available ({error})", file=sys.stderr)
        return 2
    if args.model not in models.list_models():
        print(f"kw_ops describe: unknown model {args.model!r}; known: {', '.join(models.list_models())}",
              file=sys.stderr)
        return 2
    from .models.paper import paper_note
    from .nn import count_parameters, describe

    model = models.create(args.model)
    if args.dispatch:
        return _describe_dispatch(args, model)
    print(describe(model))
    note = paper_note(args.model, count_parameters(model))
    if note:
        print(note)
    return 0


def _describe_dispatch(args, model) -> int:
    from .dispatch_report import dispatch_table

    checks = [("--batch", args.batch, 1), ("--size", args.size, 1)]
    for option, value, least in checks:
        if value < least:
            print(f"kw_ops describe: {option} must be at least {least}, got {value}", file=sys.stderr)
            return 2
    if args.train and args.batch < 2:
        print("kw_ops describe: --train needs --batch of at least 2 (the attention's BatchNorm cannot train on one "
              "sample)", file=sys.stderr)
        return 2
    if args.device not in ("cpu", "cuda"):
        print(f"kw_ops describe: --device must be cpu or cuda, got {args.device!r}", file=sys.stderr)
        return 2
    from .ops.backends import requested_backend
    from .ops.triton.cost_model import forced_mode

    try:   # the environment's choices (KW_OPS_BACKEND, KW_OPS_TRITON_MODE), checked before any layer is decided
        requested_backend()
        forced_mode()
    except ValueError as error:
        print(f"kw_ops describe: {error}", file=sys.stderr)
        return 2
    print(f"{args.model}: " + dispatch_table(model, args.batch, args.size, args.train, args.device, args.dtype))
    return 0


def _demo(args) -> int:
    from .demo import check_demo_options, run_demo

    try:
        check_demo_options(args.batch, args.size, args.steps)
    except ValueError as error:
        print(f"kw_ops demo: {error}", file=sys.stderr)
        return 2
    run_demo(batch=args.batch, size=args.size, steps=args.steps)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .benchmarking.model_bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["bench-op"]:
        from .benchmarking.op_bench import main as bench_op_main

        return bench_op_main(argv[1:])
    if argv[:1] == ["train"]:
        from .train.__main__ import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["calibrate"]:
        from .calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    if argv[:1] == ["attention-map"]:
        from .attention_map import main as attention_map_main

        return attention_map_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kw_ops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bench", help="images/s, training step and memory of static/DY-Conv/ODConv/KW networks "
                        "(python -m kw_ops bench --help)")
    commands.add_parser("bench-op", help="the KW op per layer shape vs static conv and the released formulation, "
                        "against the measured roofline (python -m kw_ops bench-op --help)")
    commands.add_parser("train", help="train a registered model on an ImageFolder with the paper's recipes "
                        "(python -m kw_ops train --help)")
    commands.add_parser("attention-map", help="mean attentions per warehouse over a dataset as a PNG "
                        "(python -m kw_ops attention-map --help)")
    commands.add_parser("calibrate", help="time the KW formulations on this CPU for the dispatcher's cost estimates "
                        "(python -m kw_ops calibrate --help)")
    commands.add_parser("info", help="versions and which op backends can run here")
    demo = commands.add_parser("demo", help="KW-ify a small ConvNet at every budget, train a few steps, print it")
    demo.add_argument("--batch", type=int, default=8, help="training batch, at least 2")
    demo.add_argument("--size", type=int, default=32, help="input resolution")
    demo.add_argument("--steps", type=int, default=10, help="training steps per budget")
    describe = commands.add_parser("describe", help="warehouse table of a registered model preset, or with "
                                   "--dispatch what runs for each of its KW layers and why")
    describe.add_argument("model")
    describe.add_argument("--dispatch", action="store_true", help="each KW layer's formulation, the estimated time "
                          "of every candidate and the reason (kw_ops.ops.dispatch)")
    describe.add_argument("--batch", type=int, default=2, help="batch of the call (--dispatch; default 2)")
    describe.add_argument("--size", type=int, default=224, help="input resolution (--dispatch; default 224)")
    describe.add_argument("--device", default="cpu", help="cpu or cuda: on a machine without CUDA, cuda is "
                          "decided from the GPU cost model alone (--dispatch)")
    describe.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                          help="(--dispatch) default float32 on cpu, bfloat16 on cuda")
    describe.add_argument("--train", action="store_true", help="decide for a training step (--dispatch; default: "
                          "inference)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info.report())
        return 0
    if args.command == "demo":
        return _demo(args)
    return _describe(args)


if __name__ == "__main__":
    sys.exit(main())
