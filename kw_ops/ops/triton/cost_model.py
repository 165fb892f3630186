"""The cost model of the KW convolution on a GPU: predicted time per layer, pass and mode, and `choose_mode`.

Import-safe (no Triton, no CUDA). A mode is a way to run one pass of the op ("forward", "dx", "wgrad");
it turns a layer into phases (kernel launches), each a `Work`: tensor-core FLOPs, CUDA-core FLOPs, bytes
that go to DRAM and bytes served by L2 without reaching DRAM. A phase takes

    max(tensor FLOPs / tensor rate + CUDA-core FLOPs / CUDA-core rate,
        DRAM bytes / DRAM bandwidth,
        (DRAM bytes + L2-only bytes) / L2 bandwidth)

(the two compute units share issue slots inside one kernel, so their times add; every DRAM byte also
passes through L2), divided by the share of the SMs one launch's programs fill (`Work.fill`), and a mode the sum
of its phases. The peaks are a parameter (`Peaks`): datasheet
figures by default, replaced by those benchmarks/gpu_check.py measures (`KW_OPS_PEAKS=peaks.json`).

Modes (`MODES`; `choose_mode` picks among any subset). Built (`KERNEL_MODES`, = launch.MODES):
- two_phase   per chunk of samples whose per-sample kernels fit KERNEL_CHUNK_BYTES: the
              mixing GEMM on tensor cores (K = n) writes the chunk's kernels, the conv kernels read them from L2
              (from DRAM when the chunk's kernels exceed the L2 capacity); L2 is write-back, so every kernel is
              written to DRAM once. groups = 1: implicit GEMMs on tensor cores, dx by stride phase (only the
              taps that reach a phase: the forward's FLOPs). groups != 1: the grouped kernels on CUDA cores.
              2-byte NCHW activations are converted to NHWC at the boundary (x in the forward and the weight
              gradient, dy in dx). Weight gradient, groups = 1: by slices of the cell's rows
              (`wgrad_slice_rows`): per slice the dW of every sample and mixture (op dtype, cell order) written
              to L2 and read back by dE[:, slice] = attnᵀ·dW (complete in one GEMM, written once) and
              dattn += dW·E[:, slice]ᵀ (fp32); x re-read once per output-channel tile of every slice.
              groups != 1: per chunk of samples, the per-sample dW contracted into dattn (split-K GEMM) and dE
              (fp32 partials added to an fp32 dE in DRAM once per chunk).
- blocked     groups = 1, forward and dx (its weight gradient is two_phase's): per block of cell rows (forward) or
              columns (dx), the block's kernels for all samples mixed into one reused buffer and consumed at once;
              the warehouse moves once per pass; block size by `blocked_plan` (L2-sized blocks keep the kernels
              out of DRAM, larger ones save launches).
Launches: a phase run once per chunk or block counts that many launches; a pass takes the longer of its phases'
sum and its launches' host time (Peaks.launch_s per Triton launch, op_launch_s per eager op; the small eager ops
between Triton launches, sums of split-K partials and the weight gradient's per-slice adds and copies, are not
counted).
Modelled, NOT built (`MODELLED_ONLY`; comparison points that say why the built modes are what they are):
- fused       the former re-mixing kernel: each weight tile mixed on CUDA cores (2·n FLOPs per element, warehouse
              slice read from L2) once per position tile; dx over every tap of every input position;
              weight gradient per sample written to DRAM and read twice.
- mix_once    one kernel per (sample, output-channel tile) mixes its weight tile once on tensor cores
              (K = n) into shared memory and runs every position tile against it; the warehouse is
              streamed from L2 once per sample; infeasible where a 16-row tile of the kernel does not
              fit in shared memory. Weight gradient as two_phase.
Comparison points of the baselines: static (cuDNN with the layer's static weight: the speed a KW layer is held
against) and released (the released code's formulation: mixing mm for all samples into B·P kernels in DRAM, a
permuted copy, a conv with groups = B; backward through autograd, per-sample dW in DRAM). torch_op: the
registered op on its torch backend (released's kernels, mixed again in the backward), which the dispatcher
runs where keeping the kernels would exceed its memory budget and Triton cannot run.

Shapes: P = the layer's static weight count, HW' output positions, E the warehouse slice of the layer
(n × cell), all bytes in the op's dtype except fp32 partial sums.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

__all__ = ["Peaks", "ConvShape", "Work", "Prediction", "MODES", "KERNEL_MODES", "MODELLED_ONLY", "DIRECTIONS",
           "H100_SXM_DATASHEET", "H200_SXM_DATASHEET", "PEAKS_ENV", "KERNEL_CHUNK_BYTES", "default_peaks", "load_peaks",
           "save_peaks", "predict", "predict_all", "choose_mode", "triton_prediction", "forced_mode", "split_k_len",
           "wgrad_slice_rows", "blocked_plan", "block_budget", "block_units"]

DIRECTIONS = ("forward", "dx", "wgrad")
PEAKS_ENV = "KW_OPS_PEAKS"
MODE_ENV = "KW_OPS_TRITON_MODE"
FP32_PARTIAL_BYTES = 4


@dataclass(frozen=True)
class Peaks:
    """The rates the model divides by, and where they come from (`source`)."""
    source: str
    dram_bytes_per_s: float      # device memory bandwidth (a large copy: bytes read + written)
    l2_bytes_per_s: float        # L2 bandwidth for data resident in L2
    l2_bytes: float              # L2 capacity
    tensor_flops: float          # dense bf16/fp16 tensor-core rate (tf32: half of it)
    cuda_core_flops: float       # fp32 FMA rate of the CUDA cores
    smem_per_block: float        # shared memory one program may hold
    launch_s: float = 0.0        # host time of one Triton launch (JIT dispatch); 0: launches not counted
    op_launch_s: float = 0.0     # host time of one eager PyTorch CUDA op
    multiprocessors: int = 0     # SMs; a launch of fewer programs runs at that fraction of every rate (0: not counted)

    def tensor_rate(self, element_size: int) -> float:
        """Tensor-core FLOP/s for operands of `element_size` bytes (fp32 runs as tf32 at half the 16-bit rate)."""
        return self.tensor_flops if element_size <= 2 else self.tensor_flops / 2


# L2 bandwidth is on no datasheet: ASSUMED_L2_OVER_DRAM times the datasheet DRAM bandwidth is an assumption
# of this model, replaced by the L2 copy rate gpu_check.py measures.
ASSUMED_L2_OVER_DRAM = 2.5
# Host time per launch is on no datasheet either. Triton's JIT dispatch (JITFunction.run: argument binding,
# specialization key, cache lookup, C launcher) was measured at 11-12.5 us for a 19-argument kernel on GB200
# (tritonbench's launch-latency benchmark, 2026); the KW kernels take 30-45 arguments. An eager PyTorch op
# is assumed at 5 us. Both are replaced by what gpu_check.py measures.
ASSUMED_TRITON_LAUNCH_S = 12e-6
ASSUMED_OP_LAUNCH_S = 5e-6
H100_SXM_DATASHEET = Peaks(
    source=f"H100 SXM datasheet (HBM3 3.35 TB/s, dense bf16 989 TFLOP/s, fp32 67 TFLOP/s, 50 MB L2, "
           f"227 KB shared memory per block); L2 bandwidth assumed {ASSUMED_L2_OVER_DRAM}x DRAM; host time per "
           f"launch assumed {ASSUMED_TRITON_LAUNCH_S * 1e6:.0f} us (Triton), {ASSUMED_OP_LAUNCH_S * 1e6:.0f} us "
           f"(PyTorch op)",
    dram_bytes_per_s=3.35e12, l2_bytes_per_s=ASSUMED_L2_OVER_DRAM * 3.35e12, l2_bytes=50e6, tensor_flops=989e12,
    cuda_core_flops=67e12, smem_per_block=227 * 1024, launch_s=ASSUMED_TRITON_LAUNCH_S,
    op_launch_s=ASSUMED_OP_LAUNCH_S, multiprocessors=132)
H200_SXM_DATASHEET = replace(
    H100_SXM_DATASHEET,
    source=f"H200 SXM datasheet (HBM3e 4.8 TB/s; rates and L2 as the H100 SXM); L2 bandwidth assumed "
           f"{ASSUMED_L2_OVER_DRAM}x DRAM; launch host times as the H100's",
    dram_bytes_per_s=4.8e12, l2_bytes_per_s=ASSUMED_L2_OVER_DRAM * 4.8e12)


@functools.lru_cache(maxsize=8)
def load_peaks(path) -> Peaks:
    """Peaks from a JSON file with the fields of `Peaks` (benchmarks/gpu_check.py writes one); read once per path.
    A file without the launch host times (written before they were measured) takes the assumed ones."""
    with open(path) as f:
        fields = json.load(f)
    fields.setdefault("launch_s", ASSUMED_TRITON_LAUNCH_S)
    fields.setdefault("op_launch_s", ASSUMED_OP_LAUNCH_S)
    fields.setdefault("multiprocessors", H100_SXM_DATASHEET.multiprocessors)
    return Peaks(**fields)


def save_peaks(peaks: Peaks, path) -> None:
    with open(path, "w") as f:
        json.dump(asdict(peaks), f, indent=1)


def default_peaks() -> Peaks:
    """Measured peaks from the file named by KW_OPS_PEAKS when set, else the H100 SXM datasheet; where a CUDA
    device is present, with the L2 size of the current device (the blocks and chunks are sized from it)."""
    import torch   # here, so that importing this module stays free of torch

    path = os.environ.get(PEAKS_ENV)
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    return _peaks_for(path, device)


@functools.lru_cache(maxsize=16)
def _peaks_for(path: str | None, device: int | None) -> Peaks:
    peaks = load_peaks(path) if path else H100_SXM_DATASHEET
    if device is None:
        return peaks
    import torch

    properties = torch.cuda.get_device_properties(device)
    l2 = getattr(properties, "L2_cache_size", 0) or peaks.l2_bytes
    sms = getattr(properties, "multi_processor_count", 0) or peaks.multiprocessors
    if (l2, sms) == (peaks.l2_bytes, peaks.multiprocessors):
        return peaks
    return replace(peaks, l2_bytes=float(l2), multiprocessors=sms,
                   source=f"{peaks.source}; L2 size {l2 / 1e6:.0f} MB and {sms} SMs of {properties.name}")


@dataclass(frozen=True)
class ConvShape:
    """One KW layer call: batch, channels, spatial sizes (input as the op sees it), kernel, groups, n, m, dtype size."""
    batch: int
    channels: int
    out_channels: int
    size: tuple[int, int]
    out_size: tuple[int, int]
    kernel: tuple[int, int]
    groups: int
    n: int
    m: int
    element_size: int
    channels_last: bool = False          # the caller's activation layout (2-byte NCHW is converted at the boundary)
    cell_rows: int | None = None         # c_out of the cell, the weight gradient's slicing unit (None: unknown, 1)
    cell_cols: int | None = None         # c_in of the cell, the unit of dx's channel blocks (None: unknown, 1)

    @classmethod
    def from_spec(cls, spec: dict, batch: int, element_size: int, out_size) -> ConvShape:
        """From a kw_ops.benchmarking.layer_shapes spec and its output size."""
        return cls(batch, spec["channels"], spec["out"], tuple(spec["size"]), tuple(out_size), tuple(spec["kernel"]),
                   spec["groups"], spec["n"], spec["m"], element_size, cell_rows=spec["cell"][0],
                   cell_cols=spec["cell"][1])

    @property
    def rows(self) -> int:                               # c_out
        return 1 if self.cell_rows is None else self.cell_rows

    @property
    def cols(self) -> int:                               # c_in
        return 1 if self.cell_cols is None else self.cell_cols

    @property
    def cell_numel(self) -> int:                         # P / m
        return self.weight_numel // self.m

    @property
    def weight_numel(self) -> int:                       # P
        return self.out_channels * self.channels // self.groups * math.prod(self.kernel)

    @property
    def positions(self) -> int:                          # HW'
        return math.prod(self.out_size)

    @property
    def in_positions(self) -> int:
        return math.prod(self.size)

    def bytes_of(self, numel: int) -> int:
        return numel * self.element_size

    @property
    def x_bytes(self) -> int:
        return self.bytes_of(self.batch * self.channels * self.in_positions)

    @property
    def y_bytes(self) -> int:
        return self.bytes_of(self.batch * self.out_channels * self.positions)

    @property
    def warehouse_bytes(self) -> int:                    # E: n cells of P / m elements
        return self.bytes_of(self.n * self.weight_numel // self.m)

    @property
    def attn_bytes(self) -> int:
        return self.bytes_of(self.batch * self.m * self.n)

    @property
    def kernel_bytes(self) -> int:                       # one sample's kernel W_b
        return self.bytes_of(self.weight_numel)

    @property
    def conv_flops(self) -> int:                         # 2·B·HW'·P
        return 2 * self.batch * self.positions * self.weight_numel

    @property
    def mix_flops(self) -> int:                          # 2·B·n·P
        return 2 * self.batch * self.n * self.weight_numel


@dataclass(frozen=True)
class Work:
    """What one phase does: one kernel, launched `launches` times (once per chunk or block) in all."""
    tensor_flops: float = 0.0
    cuda_flops: float = 0.0
    dram_bytes: float = 0.0
    l2_bytes: float = 0.0      # served by L2 without reaching DRAM
    launches: int = 1
    eager: bool = False        # launched by an eager PyTorch op (else a Triton kernel)
    programs: int = 0          # programs of one launch (0: enough to fill the GPU)

    def fill(self, peaks: Peaks) -> float:
        """The fraction of the SMs one launch keeps busy (1 where programs or SMs are not counted)."""
        if not self.programs or not peaks.multiprocessors:
            return 1.0
        return min(1.0, self.programs / peaks.multiprocessors)

    def host_seconds(self, peaks: Peaks) -> float:
        """Host time of this phase's launches."""
        return self.launches * (peaks.op_launch_s if self.eager else peaks.launch_s)

    def seconds(self, peaks: Peaks, element_size: int) -> float:
        compute = self.tensor_flops / peaks.tensor_rate(element_size) + self.cuda_flops / peaks.cuda_core_flops
        return max(compute, self.dram_bytes / peaks.dram_bytes_per_s,
                   (self.dram_bytes + self.l2_bytes) / peaks.l2_bytes_per_s) / self.fill(peaks)

    def bound(self, peaks: Peaks, element_size: int) -> str:
        """Which term sets the time: 'tensor', 'cuda', 'dram' or 'l2'."""
        terms = {"tensor": self.tensor_flops / peaks.tensor_rate(element_size),
                 "cuda": self.cuda_flops / peaks.cuda_core_flops,
                 "dram": self.dram_bytes / peaks.dram_bytes_per_s,
                 "l2": (self.dram_bytes + self.l2_bytes) / peaks.l2_bytes_per_s}
        compute = terms["tensor"] + terms["cuda"]
        if compute >= max(terms["dram"], terms["l2"]):
            return "tensor" if terms["tensor"] >= terms["cuda"] else "cuda"
        return "dram" if terms["dram"] >= terms["l2"] else "l2"


@dataclass(frozen=True)
class Prediction:
    """seconds = max(gpu_seconds, host_seconds): launches are asynchronous, so a pass takes the longer of the
    GPU's work and the host's launching (a pass whose launches outlast its kernels is 'host' bound)."""
    mode: str
    direction: str
    seconds: float
    phases: tuple[Work, ...]
    bound: str                 # 'host', or the bound of the longest phase
    gpu_seconds: float = 0.0
    host_seconds: float = 0.0

    @property
    def launches(self) -> int:
        return sum(w.launches for w in self.phases)

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


# Per-sample kernels (or per-sample weight gradients) of one chunk of samples (launch.py's chunking): small enough
# to stay in L2 (50 MB on H100) beside the chunk's activations.
KERNEL_CHUNK_BYTES = 32 << 20
# Tiles of the Triton kernels the model counts re-reads with (kernel parameters, not peaks): the first
# (pinned) config of each kernel.
POSITION_TILE = 64        # output (input for dx) positions per program of the conv kernels
CHANNEL_TILE = 64         # output (input for dx) channels per program of the conv kernels; o and c of the wgrad
MIX_ROW_TILE = 64         # rows (sample, mixture) per program of the mixing GEMM
MATMUL_TILE = 64          # rows and columns per program of the contraction GEMMs
MIX_ONCE_CHANNEL_TILE = 16  # output channels per program of the mix-once kernel (its tile lives in shared memory)
# Split-K of the dattn / dE contractions (launch._matmul): enough programs to fill the GPU.
SPLIT_K_TARGET_PROGRAMS = 264
SPLIT_K_MIN_LEN = 512
SPLIT_K_ALIGN = 128       # a multiple of every BLOCK_K of the matmul configs
# Cell rows of one slice of the weight gradient: a multiple of this (the smallest BLOCK_N) when that many fit.
WGRAD_ROW_ALIGN = 16
# The blocked mode: the kernels of one block of channels for all samples, at most this many bytes, or a third of
# the L2 where that is less (15.9 MiB with the datasheet's 50 MB; 16 MiB on an H100, which reports 50 MiB), so
# that they stay in L2 beside the activations;
# blocked_plan may choose larger blocks (doubling, up to BLOCK_MAX_BYTES: the op's bound on the kernels it
# holds at once) where fewer launches win. Block widths (cell rows or columns) are a multiple of BLOCK_ALIGN when
# that many fit.
BLOCK_BYTES = 16 << 20
BLOCK_MAX_BYTES = 128 << 20
BLOCK_ALIGN = 16


def split_k_len(rows: int, cols: int, depth: int) -> int:
    """Length of one K split of an [rows, depth] @ [depth, cols] contraction (a multiple of SPLIT_K_ALIGN, at
    least SPLIT_K_MIN_LEN): launch._matmul's split."""
    tiles = -(-rows // MATMUL_TILE) * -(-cols // MATMUL_TILE)
    splits = max(1, min(-(-SPLIT_K_TARGET_PROGRAMS // tiles), -(-depth // SPLIT_K_MIN_LEN)))
    return -(-(-(-depth // splits)) // SPLIT_K_ALIGN) * SPLIT_K_ALIGN


def _io(shape: ConvShape, direction: str) -> tuple[int, int, int, int]:
    """(bytes read, bytes written, positions a program tiles over, channels it tiles) of a conv pass."""
    if direction == "forward":
        return shape.x_bytes, shape.y_bytes, shape.positions, shape.out_channels
    return shape.y_bytes, shape.x_bytes, shape.in_positions, shape.channels   # dx: dy in, dx out


def _conv_flops(shape: ConvShape, direction: str, all_taps: bool) -> float:
    """Tensor-core FLOPs of the conv of a pass; dx over every tap of every input position when `all_taps`."""
    if direction == "dx" and all_taps:
        return 2 * shape.batch * shape.in_positions * shape.weight_numel
    return shape.conv_flops


def _input_rereads(shape: ConvShape, direction: str, channel_tile: int) -> float:
    """L2 bytes of reading a conv pass's input once more per extra channel tile of its output (per group);
    a strided forward gathers only the input positions its taps touch."""
    read, _, _, channels = _io(shape, direction)
    if direction == "forward":
        read *= min(1.0, shape.positions * math.prod(shape.kernel) / shape.in_positions)
    return read * (math.ceil(channels // shape.groups / channel_tile) - 1)


def _weight_rereads(shape: ConvShape, direction: str, per_sample_kernels: bool) -> float:
    """L2 bytes of reading a conv pass's weights once more per extra position tile: an implicit GEMM reads its
    weight operand once per tile of POSITION_TILE rows; rows run over the batch for one shared weight, over one
    sample for per-sample kernels."""
    _, _, positions, _ = _io(shape, direction)
    if per_sample_kernels:
        return shape.batch * (math.ceil(positions / POSITION_TILE) - 1) * shape.kernel_bytes
    return (math.ceil(shape.batch * positions / POSITION_TILE) - 1) * shape.kernel_bytes


def _rereads(shape: ConvShape, direction: str, per_sample_kernels: bool) -> float:
    return _input_rereads(shape, direction, CHANNEL_TILE) + _weight_rereads(shape, direction, per_sample_kernels)


def _static(shape: ConvShape, direction: str, peaks: Peaks):
    # x and y (dy) once, the weight read (or its gradient written) once
    return [Work(tensor_flops=shape.conv_flops, dram_bytes=shape.x_bytes + shape.y_bytes + shape.kernel_bytes,
                 l2_bytes=0 if direction == "wgrad" else _rereads(shape, direction, False), eager=True)]


def _released(shape: ConvShape, direction: str, peaks: Peaks):
    kernels = shape.batch * shape.kernel_bytes
    if direction == "forward":
        return [Work(tensor_flops=shape.mix_flops, dram_bytes=shape.warehouse_bytes + shape.attn_bytes + kernels,
                     eager=True),
                Work(dram_bytes=2 * kernels, eager=True),                           # permuted copy
                Work(tensor_flops=shape.conv_flops, dram_bytes=shape.x_bytes + shape.y_bytes + kernels,
                     l2_bytes=_rereads(shape, direction, True), eager=True)]
    if direction == "dx":   # grouped conv backward on the kernels autograd saved
        return [Work(tensor_flops=shape.conv_flops, dram_bytes=shape.y_bytes + shape.x_bytes + kernels,
                     l2_bytes=_rereads(shape, direction, True), eager=True)]
    # grouped weight gradient (B·P written), permuted copy back, then dattn = dW·Eᵀ and dE = attnᵀ·dW: dW read
    # twice, E and attn read, dattn and dE written
    return [Work(tensor_flops=shape.conv_flops, dram_bytes=shape.x_bytes + shape.y_bytes + kernels, eager=True),
            Work(dram_bytes=2 * kernels, eager=True),
            Work(tensor_flops=2 * shape.mix_flops,
                 dram_bytes=2 * kernels + 2 * shape.warehouse_bytes + 2 * shape.attn_bytes, launches=2, eager=True)]


def _torch_op(shape: ConvShape, direction: str, peaks: Peaks):
    """The registered op on its torch backend: the released computation in chunks of samples, with the kernels
    mixed again in the backward (the weight-gradient pass carries the re-mix: one per chunk serves dx and dW)."""
    phases = _released(shape, direction, peaks)
    if direction == "wgrad":
        kernels = shape.batch * shape.kernel_bytes
        phases = [Work(tensor_flops=shape.mix_flops, dram_bytes=shape.warehouse_bytes + shape.attn_bytes + kernels,
                       eager=True),
                  Work(dram_bytes=2 * kernels, eager=True), *phases]
    chunks = _chunks(shape)[1]   # its chunks of samples: CHUNK_BYTES = KERNEL_CHUNK_BYTES
    return [replace(w, launches=w.launches * chunks) for w in phases]


def _fused(shape: ConvShape, direction: str, peaks: Peaks):
    if direction == "wgrad":   # per-sample dW written, read back for dattn and for dE
        kernels = shape.batch * shape.kernel_bytes
        return [Work(tensor_flops=shape.conv_flops, dram_bytes=shape.x_bytes + shape.y_bytes + kernels),
                Work(tensor_flops=2 * shape.mix_flops,
                     dram_bytes=2 * kernels + shape.warehouse_bytes + 2 * shape.attn_bytes)]
    read, written, positions, _ = _io(shape, direction)
    remixes = shape.batch * math.ceil(positions / POSITION_TILE)   # each weight element mixed once per tile
    return [Work(tensor_flops=_conv_flops(shape, direction, all_taps=True),
                 cuda_flops=remixes * 2 * shape.n * shape.weight_numel,
                 dram_bytes=read + written + shape.warehouse_bytes + shape.attn_bytes,
                 l2_bytes=remixes * shape.bytes_of(shape.n * shape.weight_numel)
                 + _input_rereads(shape, direction, CHANNEL_TILE))]


def _chunks(shape: ConvShape) -> tuple[int, int]:
    """(samples per chunk, chunks): launch._chunk with KERNEL_CHUNK_BYTES."""
    chunk = max(1, min(shape.batch, KERNEL_CHUNK_BYTES // shape.kernel_bytes))
    return chunk, math.ceil(shape.batch / chunk)


def _to_nhwc(shape: ConvShape, tensor_bytes: int) -> list[Work]:
    """The boundary conversion of a 2-byte NCHW activation to channels_last: read and written once."""
    if shape.element_size != 2 or shape.channels_last:
        return []
    return [Work(dram_bytes=2 * tensor_bytes, eager=True)]


def _kernels_in_l2(shape: ConvShape, peaks: Peaks) -> bool:
    """Whether one chunk's per-sample kernels (or weight gradients) fit in L2."""
    return _chunks(shape)[0] * shape.kernel_bytes <= peaks.l2_bytes


def _conv_programs(shape: ConvShape, direction: str, channels: int, samples: int) -> int:
    """Programs of one conv launch: tiles of the pass's output positions x tiles of its channels x samples (a
    strided dx tiles each stride phase apart: a few programs more than counted here)."""
    positions = shape.positions if direction == "forward" else shape.in_positions
    return math.ceil(positions / POSITION_TILE) * math.ceil(channels / CHANNEL_TILE) * samples


def _mix_programs(samples: int, m: int, columns: int) -> int:
    """Programs of one mixing launch: row tiles of the (sample, mixture) rows x column tiles."""
    return math.ceil(samples * m / MIX_ROW_TILE) * math.ceil(columns / CHANNEL_TILE)


def _mix_phase(shape: ConvShape) -> Work:
    """The mixing GEMM over every chunk: E from DRAM once per chunk and from L2 for the chunk's other row tiles,
    attn read, the per-sample kernels written (to DRAM once: L2 is write-back)."""
    chunk, chunks = _chunks(shape)
    row_tiles = chunks * math.ceil(chunk * shape.m / MIX_ROW_TILE)
    return Work(tensor_flops=shape.mix_flops,
                dram_bytes=chunks * shape.warehouse_bytes + shape.attn_bytes + shape.batch * shape.kernel_bytes,
                l2_bytes=(row_tiles - chunks) * shape.warehouse_bytes, launches=chunks,
                programs=_mix_programs(chunk, shape.m, shape.cell_numel))


def _contractions(shape: ConvShape, dw_in_l2: bool) -> list[Work]:
    """Per chunk of samples (groups != 1): dattn = dW·Eᵀ and dE = attnᵀ·dW per chunk on tensor cores (launch._matmul,
    fp32 split-K partials): each reads the chunk's per-sample dW once (from L2 when a chunk's dW fits), E read by
    every row tile of dattn; dE's fp32 partials [splits, n, cell] are written, summed when split, and added into
    the fp32 dE in DRAM."""
    chunk, chunks = _chunks(shape)
    cell = shape.cell_numel
    dw = shape.batch * shape.kernel_bytes
    rows, dattn_numel = chunk * shape.m, shape.batch * shape.m * shape.n
    dattn_splits = math.ceil(cell / split_k_len(rows, shape.n, cell))
    de_splits = math.ceil(rows / split_k_len(shape.n, cell, rows))
    de = shape.n * cell * FP32_PARTIAL_BYTES
    de_traffic = chunks * (de_splits * de + (de_splits * de + de if de_splits > 1 else 0) + 3 * de)
    e_reads = chunks * math.ceil(rows / MATMUL_TILE)
    dattn = Work(tensor_flops=shape.mix_flops,
                 dram_bytes=(0 if dw_in_l2 else dw) + chunks * shape.warehouse_bytes
                 + 2 * dattn_splits * dattn_numel * FP32_PARTIAL_BYTES + shape.attn_bytes,
                 l2_bytes=(dw if dw_in_l2 else 0) + (e_reads - chunks) * shape.warehouse_bytes, launches=chunks)
    dwarehouse = Work(tensor_flops=shape.mix_flops, dram_bytes=(0 if dw_in_l2 else dw) + shape.attn_bytes + de_traffic,
                      l2_bytes=dw if dw_in_l2 else 0, launches=chunks)
    return [dattn, dwarehouse]


def _fit_rows(shape: ConvShape, budget: int) -> int:
    """Cell rows whose dW of every sample and mixture (B·m·rows·(cell / c_out) elements) fits `budget` bytes;
    a multiple of WGRAD_ROW_ALIGN when at least that many fit; at least 1, at most c_out."""
    rows = budget // max(1, shape.batch * shape.m * shape.bytes_of(shape.cell_numel // shape.rows))
    if rows >= WGRAD_ROW_ALIGN:
        rows -= rows % WGRAD_ROW_ALIGN
    return max(1, min(shape.rows, rows))


def wgrad_slice_rows(shape: ConvShape, peaks: Peaks | None = None, budget: int | None = None) -> int:
    """Cell rows per slice of the weight gradient (groups = 1; launch._wgrad_sliced). An explicit `budget`
    (launch's chunk_bytes) caps one slice's dW: the rows that fit it. Without one, of the rows that fit
    KERNEL_CHUNK_BYTES and those rounded up to whole channel tiles (CHANNEL_TILE; a slice's dW may then pass
    through DRAM, but x is re-read by fewer tiles), the one with the least predicted time."""
    if budget is not None:
        return _fit_rows(shape, budget)
    return _least_time_slice_rows(shape, peaks or default_peaks(), _sizing())


@functools.lru_cache(maxsize=4096)
def _least_time_slice_rows(shape: ConvShape, peaks: Peaks, sizing: tuple) -> int:
    fit = _fit_rows(shape, KERNEL_CHUNK_BYTES)
    tiled = min(shape.rows, -(-fit // CHANNEL_TILE) * CHANNEL_TILE)

    def seconds(rows):
        return sum(w.seconds(peaks, shape.element_size) for w in _sliced_wgrad(shape, peaks, rows))
    return min((fit, tiled), key=seconds)


def _sizing() -> tuple:
    """The module's sizing constants: part of the key of every memoised choice (wgrad_slice_rows, blocked_plan,
    triton_prediction: each runs on every Triton call), so a changed constant is a new key, never a stale answer."""
    return (KERNEL_CHUNK_BYTES, BLOCK_BYTES, BLOCK_MAX_BYTES, BLOCK_ALIGN, WGRAD_ROW_ALIGN, POSITION_TILE, CHANNEL_TILE,
            MIX_ROW_TILE, MATMUL_TILE, MIX_ONCE_CHANNEL_TILE, SPLIT_K_TARGET_PROGRAMS, SPLIT_K_MIN_LEN, SPLIT_K_ALIGN)


def _sliced_wgrad(shape: ConvShape, peaks: Peaks, rows: int) -> list[Work]:
    """Weight gradient by slices of `rows` rows of the cell (groups = 1): per slice, dW of all samples and mixtures for
    those rows (the output channels go·c_out + rows of every cell row go), then dE[:, slice] = attnᵀ·dW complete
    in one GEMM (fp32 split-K partials summed, written once into dE in the op's dtype) and dattn += dW·E[:, slice]ᵀ
    (fp32 partials [splits, B·m, n] added into an fp32 dattn). x is read from DRAM once while it and one slice of
    dW fit L2, else once per slice; dy, E and attn move once from DRAM; dW goes to DRAM once (write-back). A
    ragged last slice is counted as a whole one."""
    slices = math.ceil(shape.rows / rows)
    slice_numel = rows * (shape.cell_numel // shape.rows)
    slice_dw = shape.bytes_of(shape.batch * shape.m * slice_numel)
    kk = math.prod(shape.kernel)
    gather = min(1.0, shape.positions * kk / shape.in_positions)
    o_tiles = math.ceil(shape.out_channels // shape.rows * rows / CHANNEL_TILE)   # per slice
    x_from_dram = 1 if shape.x_bytes + slice_dw <= peaks.l2_bytes else slices
    dy_reads = kk * math.ceil(shape.channels / CHANNEL_TILE)
    x_reads = kk * slices * o_tiles * gather
    dw = shape.batch * shape.kernel_bytes
    wgrad = Work(tensor_flops=shape.conv_flops,
                 dram_bytes=x_from_dram * shape.x_bytes + shape.y_bytes + dw,
                 l2_bytes=(dy_reads - 1) * shape.y_bytes + max(0.0, x_reads - x_from_dram) * shape.x_bytes,
                 launches=slices)
    in_l2 = slice_dw <= peaks.l2_bytes
    bm, dattn_numel = shape.batch * shape.m, shape.batch * shape.m * shape.n
    dattn_splits = math.ceil(slice_numel / split_k_len(bm, shape.n, slice_numel))
    de_splits = math.ceil(bm / split_k_len(shape.n, slice_numel, bm))
    de = shape.n * slice_numel * FP32_PARTIAL_BYTES
    de_traffic = slices * (de_splits * de + (de_splits * de + de if de_splits > 1 else 0) + de) \
        + shape.warehouse_bytes
    dattn_sum = (slices - 1) * 3 * dattn_numel * FP32_PARTIAL_BYTES   # dattn += the next slice's sum
    e_tiles = math.ceil(bm / MATMUL_TILE)
    dattn = Work(tensor_flops=shape.mix_flops,
                 dram_bytes=(0 if in_l2 else dw) + shape.warehouse_bytes + shape.attn_bytes
                 + slices * 2 * dattn_splits * dattn_numel * FP32_PARTIAL_BYTES + dattn_sum,
                 l2_bytes=(dw if in_l2 else 0) + (e_tiles - 1) * shape.warehouse_bytes, launches=slices)
    dwarehouse = Work(tensor_flops=shape.mix_flops, dram_bytes=(0 if in_l2 else dw) + shape.attn_bytes + de_traffic,
                      l2_bytes=(dw if in_l2 else 0) + (slices - 1) * shape.attn_bytes, launches=slices)
    return [wgrad, dattn, dwarehouse]


def _grouped_wgrad_kernel(shape: ConvShape) -> Work:
    """Per-sample dW of every chunk (groups != 1): x and dy from DRAM once; the grouped kernel reduces on CUDA
    cores over programs (o tile, (tap, channel of the group), sample), reading its dy and x tiles once per tap and
    channel of the group, the re-reads from L2; dW written (to DRAM once)."""
    kk = math.prod(shape.kernel)
    gather = min(1.0, shape.positions * kk / shape.in_positions)
    reads = kk * (shape.channels // shape.groups)
    return Work(cuda_flops=shape.conv_flops, dram_bytes=shape.x_bytes + shape.y_bytes + shape.batch * shape.kernel_bytes,
                l2_bytes=(reads - 1) * shape.y_bytes + max(0.0, reads * gather - 1) * shape.x_bytes,
                launches=_chunks(shape)[1])


def _two_phase(shape: ConvShape, direction: str, peaks: Peaks):
    in_l2 = _kernels_in_l2(shape, peaks)
    kernels = shape.batch * shape.kernel_bytes
    if direction == "wgrad":
        if shape.groups == 1:
            return [*_to_nhwc(shape, shape.x_bytes), *_sliced_wgrad(shape, peaks, wgrad_slice_rows(shape, peaks))]
        return [*_to_nhwc(shape, shape.x_bytes), _grouped_wgrad_kernel(shape), *_contractions(shape, in_l2)]
    read, written, _, _ = _io(shape, direction)
    l2 = (kernels if in_l2 else 0) + _weight_rereads(shape, direction, True)
    programs = _conv_programs(shape, direction, shape.out_channels if direction == "forward" else shape.channels,
                              _chunks(shape)[0])
    if shape.groups == 1:
        conv = Work(tensor_flops=shape.conv_flops, dram_bytes=read + written + (0 if in_l2 else kernels),
                    l2_bytes=l2 + _input_rereads(shape, direction, CHANNEL_TILE), launches=_chunks(shape)[1],
                    programs=programs)
    else:   # CUDA cores; column taps served by L1, the input read again from L2 for each further kernel row
        gathered = read * (min(1.0, shape.positions * math.prod(shape.kernel) / shape.in_positions)
                           if direction == "forward" else 1.0)
        conv = Work(cuda_flops=shape.conv_flops, dram_bytes=read + written + (0 if in_l2 else kernels),
                    l2_bytes=l2 + (shape.kernel[0] - 1) * gathered, launches=_chunks(shape)[1], programs=programs)
    return [*_to_nhwc(shape, shape.x_bytes if direction == "forward" else shape.y_bytes), _mix_phase(shape), conv]


def block_budget(peaks: Peaks) -> int:
    """Bytes of one block's kernels that stay in L2: BLOCK_BYTES, or a third of the L2 where that is less."""
    return int(min(BLOCK_BYTES, peaks.l2_bytes // 3))


def block_units(shape: ConvShape, direction: str) -> tuple[int, int]:
    """(units, elements of one sample's kernel per unit) of a blocked pass: the forward blocks cell rows (each
    P / c_out weights of a sample's kernel: GO output channels), dx cell columns (P / c_in: GI input channels)."""
    units = shape.rows if direction == "forward" else shape.cols
    return units, shape.weight_numel // units


def _fit_block(shape: ConvShape, direction: str, budget: int) -> tuple[int, int]:
    """(width, samples per chunk): the widest block of units whose kernels for every sample fit `budget` (a multiple
    of BLOCK_ALIGN when at least that many fit, at most all units); one unit per block and the samples that fit
    where not even one unit fits for every sample (at least 1)."""
    units, per_unit = block_units(shape, direction)
    unit_bytes = shape.bytes_of(per_unit)
    width = budget // max(1, shape.batch * unit_bytes)
    if width >= 1:
        if width >= BLOCK_ALIGN:
            width -= width % BLOCK_ALIGN
        return min(units, width), shape.batch
    return 1, max(1, min(shape.batch, budget // max(1, unit_bytes)))


def blocked_plan(shape: ConvShape, direction: str, peaks: Peaks | None = None,
                 budget: int | None = None) -> tuple[int, int]:
    """(block width in cell rows (forward) or columns (dx), samples per chunk) of the blocked mode (launch.py).

    An explicit `budget` (launch's chunk_bytes) caps one block's kernels. Without one, of the blocks that fit
    block_budget(peaks) and those of twice, four times ... that budget up to BLOCK_MAX_BYTES (or one block for the
    whole layer where that is less), the one with the least predicted time: L2-sized blocks keep the kernels out
    of DRAM, larger ones cost fewer launches (two per block) and fewer re-reads of the input."""
    if budget is not None:
        return _fit_block(shape, direction, budget)
    return _least_time_plan(shape, direction, peaks or default_peaks(), _sizing())


@functools.lru_cache(maxsize=4096)
def _least_time_plan(shape: ConvShape, direction: str, peaks: Peaks, sizing: tuple) -> tuple[int, int]:
    units, _ = block_units(shape, direction)
    plans, grow = [], block_budget(peaks)
    while grow <= max(BLOCK_MAX_BYTES, block_budget(peaks)) and (not plans or plans[-1] != (units, shape.batch)):
        plan = _fit_block(shape, direction, grow)
        if plan not in plans:
            plans.append(plan)
        grow *= 2
    return min(plans, key=lambda plan: _prediction("blocked", direction, _blocked_phases(shape, direction, peaks, plan),
                                                   peaks, shape.element_size).seconds)


def _blocked_phases(shape: ConvShape, direction: str, peaks: Peaks, plan: tuple[int, int]) -> list[Work]:
    """Forward or dx of the blocked mode for a plan (width, samples per chunk): per block (units outer, chunks of
    samples inner) the mixing GEMM writes the block's kernels into one reused buffer and the conv consumes them.
    The warehouse moves from DRAM once (a block's slice of it stays in L2 across the chunks), attn once per slice
    of units; the kernels stay in L2 (written and read there, never in DRAM: the buffer is overwritten while
    resident) when one block's kernels fit half the L2, else they go through DRAM once. The conv's input is read
    from DRAM once when it fits L2 beside one block, else once per slice, and from L2 again by every further
    channel tile of every slice."""
    width, chunk = plan
    units, per_unit = block_units(shape, direction)
    slices, chunks = math.ceil(units / width), math.ceil(shape.batch / chunk)
    blocks = slices * chunks
    kernels = shape.batch * shape.kernel_bytes
    block_bytes = shape.bytes_of(chunk * width * per_unit)
    in_l2 = block_bytes <= peaks.l2_bytes / 2
    row_tiles = slices * chunks * math.ceil(chunk * shape.m / MIX_ROW_TILE)
    mix = Work(tensor_flops=shape.mix_flops,
               dram_bytes=shape.warehouse_bytes + slices * shape.attn_bytes + (0 if in_l2 else kernels),
               l2_bytes=(row_tiles / slices - 1) * shape.warehouse_bytes + (kernels if in_l2 else 0), launches=blocks,
               programs=_mix_programs(chunk, shape.m, shape.cell_numel * width // units))
    read, written, _, _ = _io(shape, direction)
    gather = min(1.0, shape.positions * math.prod(shape.kernel) / shape.in_positions) if direction == "forward" else 1.0
    block_channels = (shape.out_channels if direction == "forward" else shape.channels) // units * width
    tile_reads = slices * math.ceil(block_channels / CHANNEL_TILE)
    from_dram = 1 if read + block_bytes <= peaks.l2_bytes else slices
    conv = Work(tensor_flops=shape.conv_flops,
                dram_bytes=from_dram * read + written + (0 if in_l2 else kernels),
                l2_bytes=(kernels if in_l2 else 0) + _weight_rereads(shape, direction, True)
                + max(0.0, tile_reads * gather - from_dram) * read, launches=blocks,
                programs=_conv_programs(shape, direction, block_channels, chunk))
    return [*_to_nhwc(shape, shape.x_bytes if direction == "forward" else shape.y_bytes), mix, conv]


def _blocked(shape: ConvShape, direction: str, peaks: Peaks):
    if shape.groups != 1:
        return None   # groups != 1 runs two_phase's grouped kernels
    if direction == "wgrad":
        return _two_phase(shape, direction, peaks)   # the weight gradient is blocked by cell rows already
    return _blocked_phases(shape, direction, peaks, blocked_plan(shape, direction, peaks))


def _mix_once(shape: ConvShape, direction: str, peaks: Peaks):
    if direction == "wgrad":
        return _two_phase(shape, direction, peaks)
    channels_in = shape.channels // shape.groups if direction == "forward" else shape.out_channels // shape.groups
    if shape.bytes_of(MIX_ONCE_CHANNEL_TILE * channels_in * math.prod(shape.kernel)) > peaks.smem_per_block:
        return None   # the smallest weight tile does not fit in shared memory
    read, written, _, _ = _io(shape, direction)
    return [Work(tensor_flops=_conv_flops(shape, direction, all_taps=False) + shape.mix_flops,
                 dram_bytes=read + written + shape.warehouse_bytes + shape.attn_bytes,
                 l2_bytes=shape.batch * shape.bytes_of(shape.n * shape.weight_numel)
                 + _input_rereads(shape, direction, MIX_ONCE_CHANNEL_TILE))]


#: mode name -> phases(shape, direction, peaks) (None: the mode cannot run this shape)
MODES: dict[str, Callable[[ConvShape, str, Peaks], list[Work] | None]] = {
    "static": _static, "released": _released, "torch_op": _torch_op, "fused": _fused, "two_phase": _two_phase,
    "blocked": _blocked, "mix_once": _mix_once}
#: the modes the Triton kernels build (launch.MODES)
KERNEL_MODES = ("two_phase", "blocked")
#: KW kernel modes modelled for comparison and NOT built (no kernel runs them)
MODELLED_ONLY = ("fused", "mix_once")


def predict(shape: ConvShape, mode: str, direction: str = "forward", peaks: Peaks | None = None) -> Prediction | None:
    """Predicted time of one pass of one layer in `mode`; None when the mode cannot run the shape."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    peaks = peaks or default_peaks()
    phases = MODES[mode](shape, direction, peaks)
    if phases is None:
        return None
    return _prediction(mode, direction, phases, peaks, shape.element_size)


def _prediction(mode: str, direction: str, phases: list[Work], peaks: Peaks, element_size: int) -> Prediction:
    times = [w.seconds(peaks, element_size) for w in phases]
    gpu, host = sum(times), sum(w.host_seconds(peaks) for w in phases)
    bound = "host" if host > gpu else phases[times.index(max(times))].bound(peaks, element_size)
    return Prediction(mode, direction, max(gpu, host), tuple(phases), bound, gpu, host)


def predict_all(shape: ConvShape, modes: Iterable[str], direction: str = "forward",
                peaks: Peaks | None = None) -> dict[str, Prediction]:
    """Predictions of the modes that can run the shape, by name."""
    found = {mode: predict(shape, mode, direction, peaks) for mode in modes}
    return {mode: p for mode, p in found.items() if p is not None}


def forced_mode() -> str | None:
    """The Triton mode KW_OPS_TRITON_MODE forces (None: the cost model picks); refused outside KERNEL_MODES. The
    launcher and the dispatcher's estimate both read it here."""
    forced = os.environ.get(MODE_ENV)
    if forced and forced not in KERNEL_MODES:
        raise ValueError(f"{MODE_ENV} must be one of {KERNEL_MODES}, got {forced!r}")
    return forced or None


def triton_prediction(shape: ConvShape, direction: str = "forward", peaks: Peaks | None = None) -> Prediction:
    """The pass in the mode the Triton launcher runs (launch.choose_mode, and the dispatcher's op:triton estimate):
    KW_OPS_TRITON_MODE's, else the cheapest of KERNEL_MODES; where that mode cannot run the shape (blocked on a
    grouped layer), two_phase. Memoised: the launcher asks on every call."""
    return _triton_prediction(shape, direction, peaks or default_peaks(), forced_mode(), _sizing())


@functools.lru_cache(maxsize=4096)
def _triton_prediction(shape: ConvShape, direction: str, peaks: Peaks, forced: str | None,
                       sizing: tuple) -> Prediction:
    found = predict_all(shape, (forced,) if forced else KERNEL_MODES, direction, peaks)
    found = found or predict_all(shape, ("two_phase",), direction, peaks)
    return min(found.values(), key=lambda p: p.seconds)


def choose_mode(shape: ConvShape, modes: Iterable[str], direction: str = "forward", peaks: Peaks | None = None) -> str:
    """The mode of `modes` with the least predicted time for this pass (ties: the first listed)."""
    found = predict_all(shape, modes, direction, peaks)
    if not found:
        raise ValueError(f"none of the modes {tuple(modes)} can run {shape}")
    return min(found.values(), key=lambda p: p.seconds).mode
