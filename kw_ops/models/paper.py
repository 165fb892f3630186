"""The paper's printed figures for the presets kw_ops builds: parameter counts and Table 14's plans.

`PAPER_PARAMS[preset]` = (millions as printed, where); `TABLE14[preset]` = (Σm per warehouse, n per
warehouse) in warehouse order, for the presets with a Table 14 row. `python -m kw_ops describe NAME`
and the README's preset table print the measured count beside the paper's.
"""
from __future__ import annotations

__all__ = ["PAPER_PARAMS", "TABLE14", "paper_note"]

PAPER_PARAMS: dict[str, tuple[float, str]] = {
    "convnext_tiny_kw1x": (32.99, "Table 2 (the released config builds 39.37M)"),
    "convnext_tiny_kw1x_paper": (32.99, "Table 2"),
    "convnext_tiny_kw3d4x_paper": (24.53, "Table 2"),
    "deit_tiny": (5.72, "Table 11"),
    "deit_tiny_kw1x": (6.39, "Table 11"),
    "deit_tiny_kw4x": (20.44, "Table 11"),
    "deit_small": (22.06, "Table 11"),
    "deit_small_kw3d4x": (19.23, "Table 11"),
    "deit_small_kw1x": (24.36, "Table 11"),
    "mobilenetv2_100_kwstar4x": (12.51, "Table 17"),
    "resnet18_kw1x_no_partition": (11.78, "Table 5"),
    "resnet18_kw1x_layer_sharing": (11.81, "Table 6"),
    "resnet18_kw1x_no_sharing": (11.78, "Table 6"),
    "resnet50_kw1x_same_dims": (26.95, "Table 7"),
    "resnet18_kw1x_softmax": (11.93, "Table 8"),
    "resnet18_kw1x_sigmoid": (11.93, "Table 8"),
    "resnet18_kw1x_relu_l1": (11.93, "Table 8"),
    "resnet18_kw4x_softmax": (45.86, "Table 10"),
    "resnet18_dy4x_caf": (45.47, "Table 10 (DY-Conv 4x itself builds 45.48M here, see the README)"),
    "resnet18_od4x_caf": (44.90, "Table 10"),
    "resnet18_kw1x_init_all_to_one": (11.93, "Table 13"),
    "resnet18_kw1x_init_none": (11.93, "Tables 9, 13"),
    "resnet18_kw4x_init_many_to_one": (45.86, "Table 13"),
    "resnet18_kw1d2x_init_one_to_many": (7.43, "Table 13"),
}

_CONVNEXT_1X = (16, 4, 4, 4) + (147, 24) * 6
TABLE14: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # Table 14 prints seven (147, 24) pairs; ConvNeXt-Tiny's 18 blocks in stages of 3 make six.
    "convnext_tiny_kw1x_paper": (_CONVNEXT_1X, _CONVNEXT_1X),
    "convnext_tiny_kw3d4x_paper": ((16, 4, 4, 4) + (147, 24) * 4 + (147, 96) * 2,
                                   (16, 4, 4, 4) + (147, 24) * 4 + (147, 48) * 2),
}


def paper_note(name: str, params: int) -> str | None:
    """'paper: 32.99M (Table 2), measured 32.99M, difference +0.00M' for a preset the paper prints, else None."""
    if name not in PAPER_PARAMS:
        return None
    millions, where = PAPER_PARAMS[name]
    difference = round(round(params / 1e6, 2) - millions, 2) + 0.0  # + 0.0: no "-0.00"
    return (f"paper: {millions:.2f}M ({where}), measured {params / 1e6:.2f}M ({params:,}), "
            f"difference {difference:+.2f}M")
