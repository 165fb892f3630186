"""The cost model (kw_ops/ops/triton/cost_model.py) on hand-computed cases.

One small layer and round peaks; each case makes a different term the largest (DRAM, L2 bandwidth, tensor
cores, CUDA cores, L2 capacity), so a missing term or a wrong constant changes at least one expected time.

The layer: batch 2, 4 -> 8 channels, 1x1 kernel on 8x8 (64 positions), n = 4, m = 2, 2-byte elements.
    P = 8*4 = 32 weights, cell = P/m = 16, E = n*cell*2 = 128 B, one kernel W_b = 64 B, both = 128 B
    x = 2*4*64*2 = 1024 B, y = 2*8*64*2 = 2048 B, attn = 2*2*4*2 = 32 B
    conv FLOPs = 2*B*HW'*P = 8192, mixing FLOPs = 2*B*n*P = 512
NHWC is the same layer with channels_last inputs (no boundary conversion in two_phase).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kw_ops.ops.triton import cost_model
from kw_ops.ops.triton.cost_model import ConvShape, Peaks, predict

PEAKS = Peaks(source="test", dram_bytes_per_s=1e12, l2_bytes_per_s=2e12, l2_bytes=1e6, tensor_flops=100e12,
              cuda_core_flops=10e12, smem_per_block=1e5)
SHAPE = ConvShape(batch=2, channels=4, out_channels=8, size=(8, 8), out_size=(8, 8), kernel=(1, 1), groups=1, n=4,
                  m=2, element_size=2)
NHWC = replace(SHAPE, channels_last=True)


def seconds(mode, direction="forward", peaks=PEAKS, shape=SHAPE):
    return predict(shape, mode, direction, peaks).seconds


def test_shape_quantities():
    assert (SHAPE.weight_numel, SHAPE.warehouse_bytes, SHAPE.kernel_bytes) == (32, 128, 64)
    assert (SHAPE.x_bytes, SHAPE.y_bytes, SHAPE.attn_bytes) == (1024, 2048, 32)
    assert (SHAPE.conv_flops, SHAPE.mix_flops) == (8192, 512)


def test_static_dram_bound():
    # DRAM x + y + W = 3136 B at 1e12 B/s; L2: (3136 + 64 B of weight re-read by the second 64-row tile) / 2e12
    assert seconds("static") == pytest.approx(3136 / 1e12)
    assert predict(SHAPE, "static", "forward", PEAKS).bound == "dram"


def test_static_l2_bound():
    slow_l2 = replace(PEAKS, l2_bytes_per_s=1e11)
    assert seconds("static", peaks=slow_l2) == pytest.approx((3136 + 64) / 1e11)


def test_static_tensor_bound():
    slow_tc = replace(PEAKS, tensor_flops=1e9)
    assert seconds("static", peaks=slow_tc) == pytest.approx(8192 / 1e9)
    # fp32 runs as tf32 at half the rate
    assert seconds("static", peaks=slow_tc, shape=replace(SHAPE, element_size=4)) == pytest.approx(8192 / 0.5e9)


def test_fused_adds_cuda_core_remixing():
    # one 64-position tile per sample: 2 re-mixes of 2*n*P = 256 FLOPs on CUDA cores, added to the conv's time
    slow_cc = replace(PEAKS, cuda_core_flops=1e6)
    assert seconds("fused", peaks=slow_cc) == pytest.approx(8192 / 100e12 + 512 / 1e6)
    # DRAM x + y + E + attn = 3232 B; L2 re-reads the warehouse slice per re-mix: 2 * n*P*2 = 512 B
    assert seconds("fused") == pytest.approx(3232 / 1e12)
    assert seconds("fused", peaks=replace(PEAKS, l2_bytes_per_s=1e11)) == pytest.approx((3232 + 512) / 1e11)


def test_two_phase_kernels_in_l2():
    # one chunk (2 * 64 B << KERNEL_CHUNK_BYTES): mix reads E + attn (160 B) and writes 128 B of kernels (to DRAM
    # once: L2 is write-back); the conv reads x, writes y (3072 B DRAM) and reads the kernels from L2 (128 B)
    mix = max(512 / 100e12, 288 / 1e12, 288 / 2e12)
    conv = max(8192 / 100e12, 3072 / 1e12, (3072 + 128) / 2e12)
    assert seconds("two_phase", shape=NHWC) == pytest.approx(mix + conv)
    # NCHW 2-byte input: x converted to NHWC first (1024 B read + written)
    assert seconds("two_phase") == pytest.approx(2048 / 1e12 + mix + conv)
    # fp32 runs in the caller's layout: no conversion, every byte doubled (DRAM-bound phases: twice the time)
    assert seconds("two_phase", shape=replace(SHAPE, element_size=4)) == pytest.approx(2 * (mix + conv))


def test_two_phase_kernels_beyond_l2():
    # L2 of 100 B holds no chunk of kernels (128 B): the conv reads them from DRAM (3072 + 128 B)
    small_l2 = replace(PEAKS, l2_bytes=100)
    assert seconds("two_phase", peaks=small_l2, shape=NHWC) == pytest.approx(288 / 1e12 + 3200 / 1e12)


def test_two_phase_chunks_of_kernel_chunk_bytes(monkeypatch):
    # chunks of one 64-B kernel: two chunks, E read from DRAM per chunk: mix 2 * 128 + 32 + 128 B; conv unchanged
    monkeypatch.setattr(cost_model, "KERNEL_CHUNK_BYTES", 64)
    mix, conv = predict(NHWC, "two_phase", "forward", PEAKS).phases
    assert (mix.dram_bytes, mix.l2_bytes, conv.dram_bytes, conv.l2_bytes) == (416, 0, 3072, 128)
    assert seconds("two_phase", shape=NHWC) == pytest.approx((416 + 3072) / 1e12)


def test_two_phase_weight_gradient_in_one_slice():
    # one slice (unknown cell rows: 1): wgrad kernel: x + dy read, 128 B of dW written (3200 B DRAM); one channel
    # tile: no re-read. dattn: dW from L2 (128 B), E (128 B), fp32 partial [1 split, 16] written and read (128 B),
    # attn (32 B). dE: dW from L2, attn (32 B), fp32 partial [1, 4, 16] = 256 B written and read, dE written once
    # in the op's dtype (128 B).
    wgrad, dattn, dwarehouse = predict(NHWC, "two_phase", "wgrad", PEAKS).phases
    assert (wgrad.tensor_flops, wgrad.dram_bytes, wgrad.l2_bytes) == (8192, 3200, 0)
    assert (dattn.tensor_flops, dattn.dram_bytes, dattn.l2_bytes) == (512, 288, 128)
    assert (dwarehouse.dram_bytes, dwarehouse.l2_bytes) == (32 + 640, 128)
    expected = 3200 / 1e12 + 288 / 1e12 + 672 / 1e12
    assert seconds("two_phase", "wgrad", shape=NHWC) == pytest.approx(expected)
    # NCHW: x converted first
    assert seconds("two_phase", "wgrad") == pytest.approx(2048 / 1e12 + expected)


def test_weight_gradient_slices_of_cell_rows():
    # cells of 4 rows (GO = 2, c_in = 4), slices of 2 rows: slice = 8 elements, its dW 2*2*8*2 = 64 B.
    # wgrad: x read by one o tile per slice: once from DRAM, once more from L2 (1024 B); DRAM x + dy + dW = 3200 B.
    # dattn: per slice an fp32 partial [1, 4*4] written and read (2 * 2 * 64 B), the second slice added into the
    # fp32 dattn (3 * 64 B); E (128 B) and attn (32 B) once. dE: per slice [1, 4, 8] fp32 = 128 B written and read,
    # dE written once (128 B), attn once from DRAM (32 B) and once from L2.
    shape = replace(NHWC, cell_rows=4)
    wgrad, dattn, dwarehouse = cost_model._sliced_wgrad(shape, PEAKS, 2)
    assert (wgrad.tensor_flops, wgrad.dram_bytes, wgrad.l2_bytes) == (8192, 3200, 1024)
    assert (dattn.dram_bytes, dattn.l2_bytes) == (128 + 32 + 256 + 192, 128)
    assert (dwarehouse.dram_bytes, dwarehouse.l2_bytes) == (32 + 2 * 256 + 128, 128 + 32)
    # rows that fit a budget of 2 rows' dW; at least one row
    assert cost_model.wgrad_slice_rows(shape, PEAKS, budget=64) == 2
    assert cost_model.wgrad_slice_rows(shape, PEAKS, budget=1) == 1


def test_weight_gradient_slice_rows_align_to_whole_tiles(monkeypatch):
    # 64 cell rows of 4 elements (a row's dW 2*2*4*2 = 32 B): 40 rows fit 1280 B, aligned down to 32; without a
    # budget, the cheaper of those and a whole channel tile of 64 rows
    shape = replace(NHWC, out_channels=128, m=2, cell_rows=64)
    assert cost_model.wgrad_slice_rows(shape, PEAKS, budget=1280) == 32
    monkeypatch.setattr(cost_model, "KERNEL_CHUNK_BYTES", 1280)
    best = min((32, 64), key=lambda rows: sum(w.seconds(PEAKS, 2) for w in cost_model._sliced_wgrad(shape, PEAKS, rows)))
    assert cost_model.wgrad_slice_rows(shape, PEAKS) == best


def test_split_k_len():
    # launch._matmul's split: 1 tile of 64 x 64 -> up to 264 splits of at least 512, aligned to 128
    assert cost_model.split_k_len(4, 4, 16) == 128
    assert cost_model.split_k_len(54, 47, 262144) == 1024          # 256 splits
    assert cost_model.split_k_len(47, 262144, 54) == 128           # 4096 tiles: one split


def test_grouped_layers_run_on_cuda_cores():
    # depthwise 8 channels 3x3 pad 1 on 8x8, n = 4, m = 9: P = 72 (144 B), cell 8, E = 64 B, attn = 144 B,
    # x = y = 2048 B; conv 2*2*64*72 = 18432 FLOPs on CUDA cores, mixing 1152 FLOPs on tensor cores.
    # mix: E + attn + 288 B kernels = 496 B DRAM; conv: 4096 B DRAM, L2: kernels (288 B) + x re-read for the
    # two further kernel rows (2 * 2048 B)
    dw = ConvShape(2, 8, 8, (8, 8), (8, 8), (3, 3), 8, 4, 9, 2, channels_last=True)
    mix, conv = predict(dw, "two_phase", "forward", PEAKS).phases
    assert (mix.tensor_flops, mix.dram_bytes) == (1152, 496)
    assert (conv.tensor_flops, conv.cuda_flops, conv.dram_bytes, conv.l2_bytes) == (0, 18432, 4096, 4384)
    slow_cc = replace(PEAKS, cuda_core_flops=1e6)
    assert seconds("two_phase", peaks=slow_cc, shape=dw) == pytest.approx(496 / 1e12 + 18432 / 1e6)
    slow_l2 = replace(PEAKS, l2_bytes_per_s=1e11)
    assert seconds("two_phase", peaks=slow_l2, shape=dw) == pytest.approx(496 / 1e11 + (4096 + 4384) / 1e11)
    # weight gradient: dy and x read once per (tap, channel of the group) program: 9 times, 8 from L2
    wgrad = predict(dw, "two_phase", "wgrad", PEAKS).phases[0]
    assert (wgrad.tensor_flops, wgrad.cuda_flops, wgrad.l2_bytes) == (0, 18432, 8 * 2048 + 8 * 2048)


def test_released_moves_every_kernel_three_times():
    # mm: E + attn + kernels written (288 B); permuted copy: 2 * 128 B; grouped conv: x + y + kernels (3200 B)
    # with 64 B of per-sample kernels read again from L2 by nobody (one position tile per sample)
    expected = max(512 / 100e12, 288 / 1e12) + 256 / 1e12 + max(8192 / 100e12, 3200 / 1e12, 3200 / 2e12)
    assert seconds("released") == pytest.approx(expected)


def test_backward_passes():
    # static dx and weight gradient: the same bytes as the forward (dy, dx, W / x, dy, dW)
    assert seconds("static", "dx") == pytest.approx(3136 / 1e12)
    assert seconds("static", "wgrad") == pytest.approx(3136 / 1e12)
    # fused (per-sample dW in DRAM): conv writes 128 B of dW, the contractions read it twice
    assert seconds("fused", "wgrad") == pytest.approx((3072 + 128) / 1e12 + (256 + 128 + 64) / 1e12)


def test_dx_over_every_tap_costs_stride_squared():
    strided = replace(SHAPE, size=(16, 16), out_size=(8, 8))       # stride 2: 4x the input positions
    slow_tc = replace(PEAKS, tensor_flops=1e9)
    assert predict(strided, "fused", "dx", slow_tc).phases[0].tensor_flops == 4 * 8192
    assert predict(strided, "two_phase", "dx", slow_tc).phases[-1].tensor_flops == 8192   # by stride phase


def test_mix_once_needs_its_tile_in_shared_memory():
    big = ConvShape(128, 1024, 1024, (14, 14), (14, 14), (3, 3), 1, 100, 9, 2)   # 16 * 1024 * 9 * 2 B > 227 KB
    assert predict(big, "mix_once", "forward", cost_model.H100_SXM_DATASHEET) is None
    assert cost_model.choose_mode(big, ("mix_once", "two_phase"), "forward", cost_model.H100_SXM_DATASHEET) == \
        "two_phase"


def test_choose_mode_takes_the_mode_set():
    # ResNet18 KW1x layer4 (512 -> 512 3x3 on 7x7, n = 27, m = 9) at batch 128 on the H100 datasheet peaks:
    # re-mixing per position tile loses to mixing once on tensor cores
    layer4 = ConvShape(128, 512, 512, (9, 9), (7, 7), (3, 3), 1, 27, 9, 2)
    peaks = cost_model.H100_SXM_DATASHEET
    assert cost_model.choose_mode(layer4, ("fused", "two_phase"), "forward", peaks) == "two_phase"
    assert cost_model.choose_mode(layer4, ("fused",), "forward", peaks) == "fused"
    found = cost_model.predict_all(layer4, cost_model.MODES, "forward", peaks)
    assert found["static"].seconds < found["two_phase"].seconds < found["fused"].seconds
    with pytest.raises(ValueError, match="mode must be one of"):
        predict(layer4, "bogus", "forward", peaks)
    with pytest.raises(ValueError, match="direction"):
        predict(layer4, "static", "sideways", peaks)


def test_measured_peaks_replace_the_datasheet(tmp_path, monkeypatch):
    path = tmp_path / "peaks.json"
    cost_model.save_peaks(PEAKS, path)
    assert json.loads(path.read_text())["dram_bytes_per_s"] == 1e12
    monkeypatch.setenv(cost_model.PEAKS_ENV, str(path))
    assert cost_model.default_peaks() == PEAKS
    monkeypatch.delenv(cost_model.PEAKS_ENV)
    assert cost_model.default_peaks() == cost_model.H100_SXM_DATASHEET


def test_built_modes_are_the_launchers():
    pytest.importorskip("triton")
    from kw_ops.ops.triton import launch

    assert launch.MODES == cost_model.KERNEL_MODES and launch.KERNEL_CHUNK_BYTES == cost_model.KERNEL_CHUNK_BYTES
    assert not set(cost_model.MODELLED_ONLY) & set(launch.MODES)


def test_channel_and_position_tiles_reread_from_l2():
    # 4 -> 128 channels: P = 512 (1024 B), y = 32768 B; two 64-channel tiles read x (1024 B) once more, and the
    # second of the two 64-row tiles reads the weight once more (1024 B)
    wide = replace(SHAPE, out_channels=128)
    slow_l2 = replace(PEAKS, l2_bytes_per_s=1e11)
    assert seconds("static", peaks=slow_l2, shape=wide) == pytest.approx((1024 + 32768 + 1024 + 1024 + 1024) / 1e11)


def test_mix_once_mixes_on_tensor_cores_and_streams_the_warehouse():
    # conv + mixing FLOPs on tensor cores (8704); DRAM x + y + E + attn (3232 B); L2: E slice per sample
    # (B * n*P*2 = 512 B); 16-channel tiles: 8 channels are one tile, no input re-read
    assert seconds("mix_once", peaks=replace(PEAKS, tensor_flops=1e9)) == pytest.approx(8704 / 1e9)
    assert seconds("mix_once", peaks=replace(PEAKS, l2_bytes_per_s=1e11)) == pytest.approx((3232 + 512) / 1e11)


def test_per_sample_kernels_are_reread_per_position_tile_of_each_sample():
    # 16x16 (256 positions a sample, four 64-row tiles): each of the 2 samples reads its 64 B kernel 3 times
    # more (384 B of L2). x = 4096 B, y = 8192 B, kernels 128 B; mm 288 B, permuted copy 256 B; at an L2 of
    # 1e9 B/s every phase is L2-bound: (288 + 256 + 4096 + 8192 + 128 + 384) / 1e9
    big = replace(SHAPE, size=(16, 16), out_size=(16, 16))
    assert seconds("released", peaks=replace(PEAKS, l2_bytes_per_s=1e9), shape=big) == pytest.approx(13344 / 1e9)


# The blocked mode on the test layer with cells of 4 x 4 (GO = 2, GI = 1): a cell row (column) of one sample's
# kernel holds P / 4 = 8 weights (16 B), 32 B for both samples.
BLOCKED = replace(NHWC, cell_rows=4, cell_cols=4)


def test_blocked_plan_fits_the_budget():
    assert cost_model._fit_block(BLOCKED, "forward", 64) == (2, 2)      # 2 rows x 32 B
    assert cost_model._fit_block(BLOCKED, "dx", 1 << 20) == (4, 2)      # every column: one block
    assert cost_model._fit_block(BLOCKED, "forward", 16) == (1, 1)      # one row of one sample
    assert cost_model.blocked_plan(BLOCKED, "forward", budget=40) == (1, 2)


@pytest.mark.parametrize("direction", ["forward", "dx"])
def test_blocked_two_blocks_in_l2(direction):
    # plan (2 units, both samples): 2 blocks, each 64 B of kernels (in L2: never in DRAM)
    mix, conv = cost_model._blocked_phases(BLOCKED, direction, PEAKS, (2, 2))
    # mixing: E once and attn once per block from DRAM (128 + 2*32), the 128 B of kernels written into L2
    assert (mix.tensor_flops, mix.dram_bytes, mix.l2_bytes, mix.launches) == (512, 192, 128, 2)
    # conv: input and output once (1024 + 2048); L2: the kernels read, the input again for the second block
    read = 1024 if direction == "forward" else 2048
    assert (conv.tensor_flops, conv.dram_bytes, conv.l2_bytes, conv.launches) == (8192, 3072, 128 + read, 2)
    assert sum(w.seconds(PEAKS, 2) for w in (mix, conv)) == pytest.approx((192 + 3072) / 1e12)


def test_blocked_plan_chooses_larger_blocks_where_the_input_leaves_l2(monkeypatch):
    # L2 of 192 B: 64 B blocks stay in L2 but x (1024 B) is read from DRAM once per block; one 128 B block
    # sends the kernels through DRAM once: (128 + 32 + 128) + (1024 + 2048 + 128) < 192 + (2*1024 + 2048)
    small_l2 = replace(PEAKS, l2_bytes=192)
    assert cost_model.block_budget(small_l2) == 64
    assert cost_model.blocked_plan(BLOCKED, "forward", small_l2) == (4, 2)
    assert seconds("blocked", shape=BLOCKED, peaks=small_l2) == pytest.approx((288 + 3200) / 1e12)
    monkeypatch.setattr(cost_model, "BLOCK_MAX_BYTES", 64)      # larger blocks are not held
    assert cost_model.blocked_plan(BLOCKED, "forward", small_l2) == (2, 2)


def test_blocked_mode_scope():
    assert predict(replace(BLOCKED, groups=2, channels=8), "blocked", "forward", PEAKS) is None
    assert seconds("blocked", "wgrad", shape=BLOCKED) == seconds("two_phase", "wgrad", shape=BLOCKED)


def test_launches_bound_a_pass_from_the_host():
    # two_phase forward: one chunk, two Triton launches; released: three eager ops
    launches = replace(PEAKS, launch_s=1e-9, op_launch_s=5e-10)
    two_phase = predict(NHWC, "two_phase", "forward", launches)
    assert (two_phase.launches, two_phase.host_seconds) == (2, pytest.approx(2e-9))
    assert two_phase.gpu_seconds == pytest.approx(seconds("two_phase", shape=NHWC))
    released = predict(NHWC, "released", "forward", launches)
    assert (released.launches, released.host_seconds) == (3, pytest.approx(1.5e-9))
    slow_host = replace(launches, launch_s=1e-8)
    host_bound = predict(NHWC, "two_phase", "forward", slow_host)
    assert (host_bound.seconds, host_bound.bound) == (pytest.approx(2e-8), "host")


def test_peaks_files_without_launch_times_take_the_assumed_ones(tmp_path):
    path = tmp_path / "old.json"
    fields = {k: v for k, v in cost_model.asdict(PEAKS).items() if k not in ("launch_s", "op_launch_s")}
    path.write_text(json.dumps(fields))
    loaded = cost_model.load_peaks(str(path))
    assert (loaded.launch_s, loaded.op_launch_s) == (cost_model.ASSUMED_TRITON_LAUNCH_S, cost_model.ASSUMED_OP_LAUNCH_S)


def test_blocks_are_sized_from_the_devices_l2(monkeypatch):
    """On a CUDA device the default peaks take its L2 size (here a 40 MiB one): block_budget is a third of it."""
    import types

    import torch

    monkeypatch.delenv(cost_model.PEAKS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(L2_cache_size=40 << 20, name="a 40 MiB-L2 GPU"))
    cost_model._peaks_for.cache_clear()
    try:
        peaks = cost_model.default_peaks()
        assert peaks.l2_bytes == 40 << 20 and "a 40 MiB-L2 GPU" in peaks.source
        assert cost_model.block_budget(peaks) == (40 << 20) // 3
        assert peaks.dram_bytes_per_s == cost_model.H100_SXM_DATASHEET.dram_bytes_per_s
    finally:
        cost_model._peaks_for.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cost_model.default_peaks() == cost_model.H100_SXM_DATASHEET


def test_a_launch_of_few_programs_runs_at_their_share_of_the_sms():
    # two_phase forward of the test layer: mixing 1 program (4 rows x 16 columns), conv 2 (one 64-position tile and
    # one channel tile per sample); on 4 SMs they run at 1/4 and 2/4 of every rate, on 2 SMs at 1/2 and in full
    mix, conv = predict(NHWC, "two_phase", "forward", PEAKS).phases
    assert (mix.programs, conv.programs) == (1, 2)
    mix_s, conv_s = mix.seconds(PEAKS, 2), conv.seconds(PEAKS, 2)
    assert seconds("two_phase", shape=NHWC, peaks=replace(PEAKS, multiprocessors=4)) == pytest.approx(
        4 * mix_s + 2 * conv_s)
    assert seconds("two_phase", shape=NHWC, peaks=replace(PEAKS, multiprocessors=2)) == pytest.approx(
        2 * mix_s + conv_s)
    # the blocked mode's conv runs every sample in one launch: 2 blocks of 4 channels, 2 programs each
    assert cost_model._blocked_phases(BLOCKED, "forward", PEAKS, (2, 2))[-1].programs == 2


def test_block_widths_round_down_to_whole_tiles():
    # 64 output channels, cells of 32 rows (GO = 2): a row is 8 weights, 16 B for the one sample; 20 rows fit a
    # 320 B budget and round down to 16 (BLOCK_ALIGN); fewer than 16 stay as they are
    shape = ConvShape(batch=1, channels=4, out_channels=64, size=(8, 8), out_size=(8, 8), kernel=(1, 1), groups=1,
                      n=4, m=2, element_size=2, cell_rows=32, cell_cols=4)
    assert cost_model._fit_block(shape, "forward", 20 * 16) == (16, 1)
    assert cost_model._fit_block(shape, "forward", 15 * 16) == (15, 1)
    assert cost_model._fit_block(shape, "forward", 40 * 16) == (32, 1)


def test_blocked_launches_count_chunks_too():
    # plan (1 row, 1 of the 2 samples): 4 rows x 2 chunks = 8 blocks, each launch one sample's block
    mix, conv = cost_model._blocked_phases(BLOCKED, "forward", PEAKS, (1, 1))
    assert (mix.launches, conv.launches) == (8, 8)
    assert (mix.programs, conv.programs) == (1, 1)
