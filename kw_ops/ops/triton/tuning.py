"""Configs of the Triton KW kernels: a fixed pick per shape class by default, autotuning when asked.

By default (no KW_OPS_TRITON_AUTOTUNE) each launch runs ONE config: the first of the kernel's `tiles` that
survives the per-shape pruning below. The tile lists are ordered by preference (the largest spill-free tile
first, then smaller ones for small channel counts and position counts), so the pick depends only on the shape
class (bucketed sizes, dtype, fp32 precision): the first step compiles one kernel per class and benchmarks
none. Unpinned autotuning of a ResNet50 KW1x training step at batch 128 would see ~97 keys, ~586 config
benchmarks and ~243 compiles before the first step ends; KW_OPS_TRITON_AUTOTUNE=1 asks for that (the
benchmarked winner is then cached on disk where Triton allows).

Every tiled kernel is decorated with `autotune(tiles, key, sizes)`:
- `tiles`: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) candidates; under the interpreter a single 16x16x16
  config (the interpreter cannot autotune several configs, and small tiles keep it fast);
- configs are pruned per call before any benchmark (`_prune_for`): tiles larger than the next power of two of
  the dimension they cover are dropped (small cells and channel counts keep their BLOCK 16 configs only,
  7x7 layers their 64-position tiles),
  and 4-byte operands other than plain tf32 (ieee on CUDA cores, tf32x3 with three dots) keep only the
  small tiles (compiled for sm_90, tf32 is spill-free in every config, ieee spills in the large ones);
- `key`: the launchers pass bucketed sizes (powers of two: `bucket`) for the batch and the spatial sizes,
  so a short last batch or a new resolution within a bucket reuses the tuned config; Triton adds the
  operand dtypes to the key;
- results are cached on disk where Triton's autotune takes `cache_results`, so a new process does not re-tune.
"""
from __future__ import annotations

import inspect
import os

import triton

from .capability import interpreting

__all__ = ["autotune", "bucket", "autotuning", "INTERPRETER_BLOCK", "AUTOTUNE_ENV"]

AUTOTUNE_ENV = "KW_OPS_TRITON_AUTOTUNE"

INTERPRETER_BLOCK = 16
# 4-byte operands other than tf32 (ieee, tf32x3): the most operand elements of one pipeline stage
# ((BLOCK_M + BLOCK_N) * BLOCK_K) and the largest accumulator tile (BLOCK_M * BLOCK_N) kept. Compiled for
# sm_90 (Triton 3.6) with ieee, larger tiles spill (128x128x32, 64x128x32, 64x64x64: 8-16 bytes of stack).
FP32_STAGE_ELEMENTS = 128 * 32
FP32_ACC_ELEMENTS = 64 * 64
_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def bucket(value: int) -> int:
    """The next power of two (0 stays 0): the autotune key of a size that varies between calls."""
    return 0 if value <= 0 else 1 << (int(value) - 1).bit_length()


def autotuning() -> bool:
    """Whether launches benchmark every surviving config (KW_OPS_TRITON_AUTOTUNE=1) instead of taking the first."""
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def _prune_for(sizes):
    """An early_config_prune for a kernel whose BLOCK_M/N/K cover the named arguments `sizes` (None: unbounded):
    the configs that fit the shape, or (without autotuning) the first of them: the pick for the shape class."""
    def prune(configs, named_args, **kwargs):
        element_size = next((arg.element_size() for arg in named_args.values() if hasattr(arg, "element_size")), 2)
        small_fp32_tiles = element_size >= 4 and kwargs.get("INPUT_PRECISION", "ieee") != "tf32"
        kept = []
        for config in configs:
            blocks = [config.kwargs[f"BLOCK_{d}"] for d in "MNK"]
            if any(size is not None and block > max(INTERPRETER_BLOCK, bucket(named_args[size]))
                   for block, size in zip(blocks, sizes)):
                continue
            bm, bn, bk = blocks
            if small_fp32_tiles and ((bm + bn) * bk > FP32_STAGE_ELEMENTS or bm * bn > FP32_ACC_ELEMENTS):
                continue
            kept.append(config)
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return kept if autotuning() else kept[:1]
    return prune


def autotune(tiles, key, sizes=(None, None, None)):
    """@triton.autotune over `tiles` (see the module docstring); `sizes` names the arguments BLOCK_M/N/K cover."""
    if interpreting():
        block = INTERPRETER_BLOCK
        configs = [triton.Config({"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": block}, num_warps=4, num_stages=1)]
        return triton.autotune(configs=configs, key=key)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in tiles]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_for(sizes)},
                           **_CACHE)
