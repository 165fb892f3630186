"""Search the choices the paper leaves open for the models it trained without releasing a config, by the
parameter counts it prints; the presets take the choices found here (see their docstrings and the README).

    PYTHONPATH=. python benchmarks/search_paper_counts.py [convnext ...]

Counts are computed from the warehouse plans (`plan_warehouse`, exact) and the attention's parameter
formula (checked against `KWAttention` below), so a grid of hundreds of variants takes seconds. A line
ends with '<==' when a variant reproduces every printed count of its question, to two decimals of millions,
and with '(k of N)' when it reproduces some.
"""
from __future__ import annotations

import argparse
import itertools
import math

import torch.nn as nn

from kw_ops.config import KWConfig
from kw_ops.nn.attention import KWAttention
from kw_ops.nn.planning import WeightShape, plan_warehouse

NORMS = ("layer", "batch")


def attention_params(in_channels: int, m: int, n: int, reduction: float, min_hidden: int, norm: str) -> int:
    """fc1 (+ bias without BatchNorm) + norm affine + fc2 with bias: hidden -> m * (n + 1)."""
    hidden = max(int(in_channels * reduction), min_hidden)
    return in_channels * hidden + (hidden if norm != "batch" else 0) + 2 * hidden + (hidden + 1) * m * (n + 1)


def check_formula() -> None:
    for norm, (c, m, n) in itertools.product(NORMS, [(96, 49, 147), (384, 4, 24), (3, 16, 16)]):
        module = KWAttention(c, m, n, [0] * m, 0, KWConfig(norm=norm))
        assert sum(p.numel() for p in module.parameters()) == attention_params(c, m, n, 1 / 16, 16, norm), norm


def kw_count(static: nn.Module, sharing, config: KWConfig, overrides=None, min_hidden: int = 16) -> int:
    """Parameters of `static` KW-ified by (sharing, config, overrides): static weights swapped for warehouses,
    plus one attention per KW layer; biases stay."""
    overrides = overrides or {}
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in static.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            warehouse = sharing(name, module)
            if warehouse is not None:
                groups.setdefault(warehouse, []).append((name, module))
    total = sum(p.numel() for p in static.parameters())
    for warehouse, layers in groups.items():
        cfg = config.replace(**overrides.get(warehouse, {}))
        shapes = [WeightShape(m.weight.shape[0], m.weight.shape[1], tuple(m.weight.shape[2:]) or (1,), name)
                  for name, m in layers]
        plan = plan_warehouse(warehouse, shapes, cfg)
        total += plan.n * math.prod(plan.cell_shape) - sum(m.weight.numel() for _, m in layers)
        for (_, module), layer in zip(layers, plan.layers):
            total += attention_params(module.weight.shape[1] * getattr(module, "groups", 1), layer.m, plan.n,
                                      cfg.reduction, min_hidden, cfg.norm)
    return total


def report(label: str, counts: dict[str, int], printed: dict[str, float]) -> None:
    """One line per variant; '<==' when every printed count is reproduced, '(k of N)' when some are."""
    hits = sum(round(counts[key] / 1e6, 2) == printed[key] for key in printed)
    text = ", ".join(f"{key} {counts[key] / 1e6:.3f}M" for key in counts)
    mark = "  <==" if hits == len(printed) else f"  ({hits} of {len(printed)})" if hits else ""
    print(f"  {label}: {text}{mark}")


def search_convnext() -> None:
    """ConvNeXt-Tiny KW 1x (32.99M) and 3/4x (24.53M): the third stage split or not, attention reduction,
    minimum hidden width, norm. The released config (no split, 1/16, 16, LayerNorm) builds 39.37M."""
    from kw_ops.models import CONVNEXT_KW3D4X_OVERRIDES, convnext_split_stage_sharing, convnext_stage_sharing, create

    print("ConvNeXt-Tiny (Table 2: KW 1x 32.99M, KW 3/4x 24.53M)")
    static = create("convnext_tiny")
    printed = {"1x": 32.99, "3/4x": 24.53}
    sharings = {"released stages": convnext_stage_sharing, "third stage split": convnext_split_stage_sharing}
    for (label, sharing), reduction, min_hidden, norm in itertools.product(
            sharings.items(), (1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64), (1, 4, 8, 16, 32), NORMS):
        config = KWConfig(norm=norm, reduction=reduction)
        overrides = {k: v for k, v in CONVNEXT_KW3D4X_OVERRIDES.items() if sharing is convnext_split_stage_sharing}
        counts = {"1x": kw_count(static, sharing, config, min_hidden=min_hidden),
                  "3/4x": kw_count(static, sharing, config, overrides, min_hidden=min_hidden)}
        report(f"{label}, reduction 1/{round(1 / reduction)}, min hidden {min_hidden}, {norm}norm", counts, printed)


#: Which KW linears of a DeiT block share a warehouse: layer -> warehouse kind ('|' separates the kinds).
DEIT_GROUPINGS = {
    "v,fc1,fc2": {"v": "a", "fc1": "a", "fc2": "a"},
    "v|fc1,fc2": {"v": "a", "fc1": "b", "fc2": "b"},
    "v|fc1|fc2": {"v": "a", "fc1": "b", "fc2": "c"},
    "v,proj,fc1,fc2": {"v": "a", "proj": "a", "fc1": "a", "fc2": "a"},
    "v,proj|fc1,fc2": {"v": "a", "proj": "a", "fc1": "b", "fc2": "b"},
    "v,proj|fc1|fc2": {"v": "a", "proj": "a", "fc1": "b", "fc2": "c"},
    "v|proj|fc1,fc2": {"v": "a", "proj": "b", "fc1": "c", "fc2": "c"},
    "v|proj|fc1|fc2": {"v": "a", "proj": "b", "fc1": "c", "fc2": "d"},
}


def deit_sharing(kinds: dict[str, str], blocks_per_warehouse: int):
    """Warehouse of blocks.i.{attn.v, attn.proj, mlp.fc1, mlp.fc2}: its kind, one per `blocks_per_warehouse`."""
    def sharing(name: str, module: nn.Module) -> str | None:
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blocks" or parts[3] not in kinds:
            return None
        return f"{kinds[parts[3]]}{int(parts[1]) // blocks_per_warehouse}"
    return sharing


def search_deit() -> None:
    """DeiT (Table 11): Tiny KW 1x 6.39M and 4x 20.44M, Small KW 1x 24.36M and 3/4x 19.23M (b = 3/4 on every
    warehouse): which linears and how they group into warehouses, how many blocks share one, reduction,
    minimum hidden width, cell ratio. BatchNorm in the attention (LayerNorm adds ~1k parameters)."""
    from kw_ops.models import create

    tiny, small = create("deit_tiny"), create("deit_small")
    printed = {"tiny 1x": 6.39, "tiny 4x": 20.44, "small 1x": 24.36, "small 3/4x": 19.23}
    print(f"DeiT (Table 11: {printed})")
    for (grouping, kinds), blocks, reduction, min_hidden, ratio in itertools.product(
            DEIT_GROUPINGS.items(), (1, 2, 3, 4, 6, 12), (1 / 8, 1 / 16, 1 / 32), (1, 8, 16, 32), (1, 0.5)):
        sharing = deit_sharing(kinds, blocks)
        config = KWConfig(reduction=reduction, in_ratio=ratio, out_ratio=ratio)
        counts = {key: kw_count(tiny if key.startswith("tiny") else small, sharing,
                                config.replace(budget={"1x": 1, "4x": 4, "3/4x": 0.75}[key.split()[1]]),
                                min_hidden=min_hidden)
                  for key in printed}
        report(f"{grouping}, {blocks} blocks/warehouse, reduction 1/{round(1 / reduction)}, min hidden "
               f"{min_hidden}, cell ratio {ratio}", counts, printed)


def search_kw_star() -> None:
    """KW* (4x) on MobileNetV2 1.0 (Table 17: 12.51M): mobilenetv2_100_kw4x plus ODConv's input-channel,
    output-channel and spatial sigmoid heads (hidden + 1 weights per output each); which layers get them
    (ODConv itself skips channel and output heads on depthwise convs, the spatial head on 1x1 convs)."""
    import kw_ops
    from kw_ops.models import create

    model = create("mobilenetv2_100_kw4x")
    base = kw_ops.count_parameters(model)
    print("KW* (Table 17: MobileNetV2 1.0 KW*(4x) 12.51M)")
    for skip_depthwise, skip_pointwise in itertools.product((True, False), repeat=2):
        extra = 0
        for layer in (m for m in model.modules() if isinstance(m, kw_ops.KWLayer)):
            hidden = layer.attention.fc1.out_features
            depthwise = layer.groups == layer.in_channels == layer.out_channels
            if not (skip_depthwise and depthwise):
                extra += (hidden + 1) * (layer.in_channels + layer.out_channels)
            if not (skip_pointwise and math.prod(layer.kernel_size) == 1):
                extra += (hidden + 1) * math.prod(layer.kernel_size)
        report(f"channel/output heads on depthwise {not skip_depthwise}, spatial head on 1x1 {not skip_pointwise}",
               {"4x": base + extra}, {"4x": 12.51})


def search_ablations() -> None:
    """Tables 5-7: ResNet18 KW 1x without kernel partition (11.78M), sharing within each layer (11.81M) or
    without sharing (11.78M); ResNet50 KW 1x sharing across same-dimensioned kernels only (26.95M).
    Sharing per stage (the 1x preset's), per stage and kernel size, per stage and weight shape, per layer;
    cells partitioned or whole kernels; for Table 7 also the original stages and the stage's cell shape."""
    from kw_ops.models import create, resnet_stage_sharing
    from kw_ops.models.ablations import resnet_layer_sharing, resnet_shape_sharing

    def kernel_sharing(name, module):
        stage = resnet_stage_sharing(name, module)
        return None if stage is None else f"{stage}_{module.kernel_size}"

    def original_stage_shape_sharing(name, module):
        if resnet_stage_sharing(name, module) is None:
            return None
        return f"{name.split('.')[0]}_{'x'.join(map(str, module.weight.shape))}"

    rules = {"stage": resnet_stage_sharing, "stage+kernel size": kernel_sharing, "stage+shape": resnet_shape_sharing,
             "original stage+shape": original_stage_shape_sharing, "layer": resnet_layer_sharing}
    for static_name, printed in (("resnet18", {"1x": (11.78, 11.81)}), ("resnet50", {"1x": (26.95,)})):
        static = create(static_name)
        print(f"{static_name} KW 1x ablations (printed: {printed['1x']})")
        for (label, rule), partition in itertools.product(rules.items(), (True, False)):
            try:
                count = kw_count(static, rule, KWConfig(spatial_partition=partition))
            except ValueError as error:  # without partition, kernels of a warehouse must agree
                print(f"  {label}, partition {partition}: not plannable ({str(error)[:60]}...)")
                continue
            hit = any(round(count / 1e6, 2) == value for value in printed["1x"])
            print(f"  {label}, partition {partition}: {count / 1e6:.3f}M{'  <==' if hit else ''}")
        if static_name == "resnet50":  # stage cells (the 1x preset's gcds) in warehouses split by shape
            groups: dict[str, list[nn.Module]] = {}
            for name, module in static.named_modules():
                if resnet_stage_sharing(name, module) is not None:
                    groups.setdefault(resnet_stage_sharing(name, module), []).append(module)
            overrides = {}
            for name, module in static.named_modules():
                stage = resnet_stage_sharing(name, module)
                if stage is not None:
                    out_gcd = math.gcd(*(m.out_channels for m in groups[stage]))
                    in_gcd = math.gcd(*(m.in_channels for m in groups[stage]))
                    overrides[resnet_shape_sharing(name, module)] = {"out_ratio": out_gcd / module.out_channels,
                                                                    "in_ratio": in_gcd / module.in_channels}
            count = kw_count(static, resnet_shape_sharing, KWConfig(), overrides)
            print(f"  stage+shape with the stage's cell shape: {count / 1e6:.3f}M")


SEARCHES = {"convnext": search_convnext, "deit": search_deit, "kw_star": search_kw_star,
            "ablations": search_ablations}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("questions", nargs="*", help=f"some of {', '.join(SEARCHES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.questions) - set(SEARCHES)
    if unknown:
        parser.error(f"unknown questions {sorted(unknown)}; known: {', '.join(SEARCHES)}")
    check_formula()
    for question in args.questions or SEARCHES:
        SEARCHES[question]()


if __name__ == "__main__":
    main()
