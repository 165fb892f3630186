// CPU kernels of the KW op, forward and backward, on ATen (at::parallel_for with OpenMP, ATen GEMMs and
// convolutions).
//
// Algorithm (docs/design.md §1): the per-sample kernels W_b are never materialised for the whole batch.
// Work is cut into output-channel blocks whose mixed kernels fit a cache-sized thread-local buffer; each
// block is mixed and consumed at once, writing its rows of y in place. The backward recomputes the same
// blocks for dx, dattn and dE. Two formulations:
//
//  gemm (groups = 1; few output positions, mixing-heavy late layers): im2col of x once, rows in the order
//    (s, gi, q, ck) of the mixed tiles. Per block (go, rows p0:p1), one GEMM mixes the block for all samples
//    (M = B * S * GI, K = n), then per sample the tiles are copied into [rows, S*GI*inner] and one GEMM
//    against the sample's im2col writes y[b, rows]. Backward, per block: dcols += W^T dy, dW = dy cols^T
//    (regathered into tile order), dattn += dW E^T, dE[:, rows] += attn^T dW.
//  conv (any groups, depthwise included; many output positions): per sample and block of whole tiles (and
//    whole groups), mix into a buffer in the kernel layout, then at::convolution (backward:
//    at::convolution_backward) on that sample; dW is gathered back into tiles for dattn and dE.
//
// Parallelism: forward over blocks (gemm) or (sample, block) pairs (conv); backward over row blocks (gemm)
// or samples (conv), with per-thread partial sums where blocks share an output (dcols, dattn, dE).
// dtypes: whatever ATen's GEMM and convolution take (fp32, fp64, bf16); reduced-precision partial sums
// accumulate in fp32. Layout copies are byte moves, so no per-dtype code.
#include "../kw_conv.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstring>
#include <numeric>

namespace kw_ops {

// at::parallel_for over work items one at a time, with the calling thread's dispatch state in every worker
// thread: the op runs below autograd, and a worker thread without that state would dispatch its GEMMs to
// autograd kernels (which refuse out= arguments on tensors that require grad).
template <typename F>
void parallel_items(int64_t count, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    f(begin, end);
  });
}

// The conv path's blocks run in order on the calling thread, and ATen's convolutions use the intra-op threads
// themselves: oneDNN's weight-gradient kernels synchronise their threads with a barrier, and run inside our own
// parallel region (one thread each) they waited forever for threads that never came (seen with 2 threads on a
// 3 -> 32 3x3 stride-2 layer at 224x224).
template <typename F>
void serial_items(int64_t count, const F& f) {
  f(0, count);
}

Geometry make_geometry(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse,
                       int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK(dims >= 1 && dims <= 3, "kw_ops._C: x must have 1-3 spatial dims");
  TORCH_CHECK(static_cast<int64_t>(kernel_size.size()) == dims && warehouse.dim() == dims + 3 && attn.dim() == 3,
              "kw_ops._C: x, attn, warehouse and kernel_size disagree on the number of dims");
  Geometry g;
  g.batch = x.size(0);
  g.channels = x.size(1);
  g.groups = groups;
  g.in_per_group = g.channels / groups;
  g.out_channels = out_channels;
  g.out_per_group = out_channels / groups;
  g.n = warehouse.size(0);
  g.c_out = warehouse.size(1);
  g.c_in = warehouse.size(2);
  g.ck = 1;
  for (int64_t d = 0; d < dims; ++d) g.ck *= warehouse.size(3 + d);
  g.kernel_numel = 1;
  g.positions = 1;
  for (int64_t d = 0; d < dims; ++d) {
    g.size.push_back(x.size(2 + d));
    g.kernel.push_back(kernel_size[d]);
    g.stride.push_back(stride[d]);
    g.padding.push_back(padding[d]);
    g.dilation.push_back(dilation[d]);
    g.out.push_back((x.size(2 + d) + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) / stride[d] + 1);
    g.kernel_numel *= kernel_size[d];
    g.positions *= g.out.back();
  }
  g.spatial = g.kernel_numel / g.ck;
  g.go = out_channels / g.c_out;
  g.gi = g.in_per_group / g.c_in;
  g.inner = g.c_in * g.ck;
  g.tiles = g.spatial * g.gi;
  g.cell = g.c_out * g.inner;
  TORCH_CHECK(g.spatial * g.ck == g.kernel_numel && g.go * g.c_out == out_channels &&
                  g.gi * g.c_in == g.in_per_group && attn.size(1) == g.spatial * g.go * g.gi &&
                  attn.size(2) == g.n && attn.size(0) == g.batch,
              "kw_ops._C: attn, warehouse and the layer's geometry do not tile (docs/semantics.md §2)");
  return g;
}

namespace {

// -- layout moves (byte copies, any dtype) --------------------------------------------------------------------
template <typename T>
void copy_rows(const T* src, T* dst, int64_t count) {
  std::memcpy(dst, src, count * sizeof(T));
}

// Tiles of one sample [tiles, rows, inner] <-> the kernel block's rows [rows, tiles, inner].
void tiles_to_rows(const at::Tensor& tiles, at::Tensor& rows_out, int64_t ntiles, int64_t rows, int64_t inner) {
  const auto* src = static_cast<const char*>(tiles.data_ptr());
  auto* dst = static_cast<char*>(rows_out.data_ptr());
  const int64_t bytes = inner * tiles.element_size();
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t t = 0; t < ntiles; ++t) std::memcpy(dst + (p * ntiles + t) * bytes, src + (t * rows + p) * bytes, bytes);
}

void rows_to_tiles(const at::Tensor& rows_in, at::Tensor& tiles, int64_t ntiles, int64_t rows, int64_t inner) {
  const auto* src = static_cast<const char*>(rows_in.data_ptr());
  auto* dst = static_cast<char*>(tiles.data_ptr());
  const int64_t bytes = inner * rows_in.element_size();
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t t = 0; t < ntiles; ++t) std::memcpy(dst + (t * rows + p) * bytes, src + (p * ntiles + t) * bytes, bytes);
}

// Mixed tiles [S, ngo, GI, c_out, c_in, CK] <-> kernel block [ngo * c_out, GI * c_in, S * CK].
template <typename T, bool ToKernel>
void scatter_tiles_impl(T* tiles, T* kernel, const Geometry& g, int64_t ngo) {
  const int64_t in = g.in_per_group, k = g.kernel_numel;
  for (int64_t s = 0; s < g.spatial; ++s)
    for (int64_t go = 0; go < ngo; ++go)
      for (int64_t gi = 0; gi < g.gi; ++gi) {
        T* tile = tiles + ((s * ngo + go) * g.gi + gi) * g.cell;
        for (int64_t p = 0; p < g.c_out; ++p)
          for (int64_t q = 0; q < g.c_in; ++q) {
            T* a = tile + (p * g.c_in + q) * g.ck;
            T* w = kernel + ((go * g.c_out + p) * in + gi * g.c_in + q) * k + s * g.ck;
            for (int64_t c = 0; c < g.ck; ++c) {
              if (ToKernel) w[c] = a[c]; else a[c] = w[c];
            }
          }
      }
}

template <bool ToKernel>
void scatter_tiles(at::Tensor& tiles, at::Tensor& kernel, const Geometry& g, int64_t ngo) {
  switch (tiles.element_size()) {
    case 2: return scatter_tiles_impl<uint16_t, ToKernel>(static_cast<uint16_t*>(tiles.data_ptr()), static_cast<uint16_t*>(kernel.data_ptr()), g, ngo);
    case 4: return scatter_tiles_impl<uint32_t, ToKernel>(static_cast<uint32_t*>(tiles.data_ptr()), static_cast<uint32_t*>(kernel.data_ptr()), g, ngo);
    case 8: return scatter_tiles_impl<uint64_t, ToKernel>(static_cast<uint64_t*>(tiles.data_ptr()), static_cast<uint64_t*>(kernel.data_ptr()), g, ngo);
    default: TORCH_CHECK(false, "kw_ops._C: unsupported element size ", tiles.element_size());
  }
}

// -- accumulation helpers ------------------------------------------------------------------------------------
at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

// acc += a @ b (acc may be fp32 while a, b are bf16)
void add_mm(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type()) acc.addmm_(a, b);
  else acc.add_(at::mm(a, b));
}

// acc = a @ b where `first`, else acc += a @ b: a sum's first product writes its buffer, which is therefore
// never zero-filled only to be added to (a warehouse-sized fill per layer and thread).
void put_mm(at::Tensor acc, const at::Tensor& a, const at::Tensor& b, bool first) {
  if (!first) return add_mm(acc, a, b);
  if (acc.scalar_type() == a.scalar_type()) at::mm_out(acc, a, b);
  else acc.copy_(at::mm(a, b));
}

// Per-thread sums of products, each thread's buffer written by its first product; sum() folds them into one.
struct ProductSums {
  std::vector<at::Tensor> parts;
  std::vector<int64_t> shape;
  at::TensorOptions options;
  ProductSums(std::vector<int64_t> s, at::TensorOptions o)
      : parts(at::get_num_threads()), shape(std::move(s)), options(o) {}
  void add_mm(const at::Tensor& a, const at::Tensor& b) {
    at::Tensor& part = parts[at::get_thread_num()];
    const bool first = !part.defined();
    if (first) part = at::empty(shape, options);
    put_mm(part, a, b, first);
  }
  at::Tensor sum() {
    at::Tensor total;
    for (at::Tensor& part : parts) {
      if (!part.defined()) continue;
      if (total.defined()) total.add_(part);
      else total = part;
    }
    return total.defined() ? total : at::zeros(shape, options);
  }
};

// Per-thread partial sums of a tensor shared by parallel work items; the first one is `total`.
struct Partials {
  std::vector<at::Tensor> parts;
  at::Tensor total;
  explicit Partials(at::Tensor t) : parts(at::get_num_threads()), total(std::move(t)) {}
  at::Tensor& mine() {
    const int tid = at::get_thread_num();
    if (!parts[tid].defined()) parts[tid] = tid == 0 ? total : at::zeros_like(total);
    return parts[tid];
  }
  at::Tensor sum() {
    for (size_t i = 1; i < parts.size(); ++i)
      if (parts[i].defined()) total.add_(parts[i]);
    return total;
  }
};

// -- im2col / col2im in tile-row order (s, gi, q, ck) ----------------------------------------------------------
// kernel_major (S > 1, CK = 1): rows (kernel position, channel); else rows (channel, kernel position).
at::Tensor im2col(const at::Tensor& x, const Geometry& g) {
  const bool kernel_major = g.spatial > 1;
  const int64_t dims = static_cast<int64_t>(g.size.size());
  std::vector<int64_t> pads;
  bool any_pad = false;
  for (int64_t d = dims - 1; d >= 0; --d) {
    pads.push_back(g.padding[d]);
    pads.push_back(g.padding[d]);
    any_pad |= g.padding[d] != 0;
  }
  at::Tensor xp = any_pad ? at::constant_pad_nd(x, pads, 0) : x;
  xp = xp.contiguous();
  std::vector<int64_t> shape{g.batch}, strides{xp.stride(0)};
  if (!kernel_major) { shape.push_back(g.channels); strides.push_back(xp.stride(1)); }
  for (int64_t d = 0; d < dims; ++d) { shape.push_back(g.kernel[d]); strides.push_back(xp.stride(2 + d) * g.dilation[d]); }
  if (kernel_major) { shape.push_back(g.channels); strides.push_back(xp.stride(1)); }
  for (int64_t d = 0; d < dims; ++d) { shape.push_back(g.out[d]); strides.push_back(xp.stride(2 + d) * g.stride[d]); }
  at::Tensor cols = at::empty({g.batch, g.channels * g.kernel_numel, g.positions}, x.options());
  cols.view(shape).copy_(xp.as_strided(shape, strides));
  return cols;
}

at::Tensor col2im(const at::Tensor& cols, const Geometry& g, at::ScalarType dtype) {
  const bool kernel_major = g.spatial > 1;
  const int64_t dims = static_cast<int64_t>(g.size.size());
  std::vector<int64_t> padded{g.batch, g.channels}, piece_shape{g.batch, g.channels};
  for (int64_t d = 0; d < dims; ++d) { padded.push_back(g.size[d] + 2 * g.padding[d]); piece_shape.push_back(g.out[d]); }
  at::Tensor dxp = at::zeros(padded, cols.options());
  at::Tensor view = kernel_major ? cols.view({g.batch, g.kernel_numel, g.channels, g.positions})
                                 : cols.view({g.batch, g.channels, g.kernel_numel, g.positions});
  for (int64_t t = 0; t < g.kernel_numel; ++t) {
    at::Tensor region = dxp;
    int64_t rest = t;
    for (int64_t d = dims - 1; d >= 0; --d) {  // row-major kernel offsets, last dim fastest
      const int64_t offset = rest % g.kernel[d];
      rest /= g.kernel[d];
      const int64_t start = offset * g.dilation[d];
      region = region.slice(2 + d, start, start + g.stride[d] * (g.out[d] - 1) + 1, g.stride[d]);
    }
    at::Tensor piece = kernel_major ? view.select(1, t) : view.select(2, t);
    region.add_(piece.view(piece_shape));
  }
  at::Tensor dx = dxp;
  for (int64_t d = 0; d < dims; ++d) dx = dx.narrow(2 + d, g.padding[d], g.size[d]);
  return dx.to(dtype).contiguous();
}

int64_t rows_per_block(int64_t block_bytes, int64_t bytes_per_row, int64_t unit, int64_t total) {
  int64_t rows = std::max<int64_t>(1, block_bytes / std::max<int64_t>(1, bytes_per_row)) / unit * unit;
  return std::min(std::max(rows, unit), total);
}

// attn [B, S, GO, GI, n] -> [GO, B * S * GI, n]: the mixing GEMM's rows for one output block go.
at::Tensor attn_by_block(const at::Tensor& attn, const Geometry& g) {
  return attn.view({g.batch, g.spatial, g.go, g.gi, g.n}).permute({2, 0, 1, 3, 4}).contiguous()
      .view({g.go, g.batch * g.tiles, g.n});
}

// -- gemm formulation ----------------------------------------------------------------------------------------
at::Tensor gemm_forward(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse, const Geometry& g,
                        int64_t block_bytes) {
  const at::Tensor cols = im2col(x, g);  // [B, tiles * inner, L]
  const at::Tensor attn_go = attn_by_block(attn, g);
  const at::Tensor cells = warehouse.view({g.n, g.c_out, g.inner});
  const int64_t rows = rows_per_block(block_bytes, g.batch * g.tiles * g.inner * x.element_size(), 1, g.c_out);
  const int64_t per_go = (g.c_out + rows - 1) / rows;
  at::Tensor y = at::empty({g.batch, g.out_channels, g.positions}, x.options());
  parallel_items(g.go * per_go, [&](int64_t begin, int64_t end) {
    at::Tensor mixed = at::empty({g.batch * g.tiles * rows * g.inner}, x.options());  // thread-local buffers
    at::Tensor kernel = at::empty({rows * g.tiles * g.inner}, x.options());
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t go = blk / per_go, p0 = (blk % per_go) * rows, nr = std::min(rows, g.c_out - p0);
      // Step 1: mix this block's tiles for every sample: [B * tiles, n] @ [n, nr * inner].
      at::Tensor mixed_blk = mixed.narrow(0, 0, g.batch * g.tiles * nr * g.inner).view({g.batch * g.tiles, nr * g.inner});
      at::mm_out(mixed_blk, attn_go[go], cells.narrow(1, p0, nr).reshape({g.n, nr * g.inner}));
      at::Tensor kernel_blk = kernel.narrow(0, 0, nr * g.tiles * g.inner).view({nr, g.tiles * g.inner});
      for (int64_t b = 0; b < g.batch; ++b) {
        // Step 2: the sample's tiles into kernel rows, consumed at once against its im2col.
        tiles_to_rows(mixed_blk.narrow(0, b * g.tiles, g.tiles), kernel_blk, g.tiles, nr, g.inner);
        at::Tensor out = y[b].narrow(0, go * g.c_out + p0, nr);
        at::mm_out(out, kernel_blk, cols[b]);
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& attn, const at::Tensor& warehouse,
                                                             const Geometry& g, bool need_x, bool need_attn,
                                                             bool need_warehouse, int64_t block_bytes) {
  const bool need_weight = need_attn || need_warehouse;
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  const at::Tensor cols = need_weight ? im2col(x, g) : at::Tensor();
  const at::Tensor attn_go = attn_by_block(attn, g);
  const at::Tensor cells = warehouse.view({g.n, g.c_out, g.inner});
  const at::Tensor dy = grad.reshape({g.batch, g.out_channels, g.positions});
  const int64_t rows = rows_per_block(block_bytes, g.batch * g.tiles * g.inner * x.element_size(), 1, g.c_out);
  const int64_t blocks = (g.c_out + rows - 1) / rows;
  const int64_t col_rows = g.tiles * g.inner;
  Partials dcols(need_x ? at::zeros({g.batch, col_rows, g.positions}, acc) : at::Tensor());
  Partials dattn(need_attn ? at::zeros({g.go, g.batch * g.tiles, g.n}, acc) : at::Tensor());
  at::Tensor dcells = need_warehouse ? at::empty({g.n, g.c_out, g.inner}, acc) : at::Tensor();
  // Row blocks in parallel (each owns dE[:, rows]); output blocks go in turn inside.
  parallel_items(blocks, [&](int64_t begin, int64_t end) {
    at::Tensor mixed = at::empty({g.batch * g.tiles * rows * g.inner}, x.options());
    at::Tensor kernel = at::empty({rows * col_rows}, x.options());
    at::Tensor dmixed = at::empty({g.batch * g.tiles * rows * g.inner}, x.options());
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * rows, nr = std::min(rows, g.c_out - p0);
      const at::Tensor cells_blk = cells.narrow(1, p0, nr).reshape({g.n, nr * g.inner});
      at::Tensor mixed_blk = mixed.narrow(0, 0, g.batch * g.tiles * nr * g.inner).view({g.batch * g.tiles, nr * g.inner});
      at::Tensor dmixed_blk = dmixed.narrow(0, 0, g.batch * g.tiles * nr * g.inner).view({g.batch * g.tiles, nr * g.inner});
      at::Tensor kernel_blk = kernel.narrow(0, 0, nr * col_rows).view({nr, col_rows});
      for (int64_t go = 0; go < g.go; ++go) {
        if (need_x) at::mm_out(mixed_blk, attn_go[go], cells_blk);  // recompute the block's kernels
        for (int64_t b = 0; b < g.batch; ++b) {
          const at::Tensor dy_blk = dy[b].narrow(0, go * g.c_out + p0, nr);  // [nr, L]
          if (need_x) {  // dcols_b += W_blk^T dy_blk
            tiles_to_rows(mixed_blk.narrow(0, b * g.tiles, g.tiles), kernel_blk, g.tiles, nr, g.inner);
            add_mm(dcols.mine()[b], kernel_blk.t(), dy_blk);
          }
          if (need_weight) {  // dW_blk = dy_blk cols_b^T, back in tile order
            at::mm_out(kernel_blk, dy_blk, cols[b].t());
            at::Tensor dtiles = dmixed_blk.narrow(0, b * g.tiles, g.tiles);
            rows_to_tiles(kernel_blk, dtiles, g.tiles, nr, g.inner);
          }
        }
        if (need_attn) add_mm(dattn.mine()[go], dmixed_blk, cells_blk.t());
        if (need_warehouse) {
          at::Tensor dcells_blk = dcells.narrow(1, p0, nr).view({g.n, nr * g.inner});
          put_mm(dcells_blk, attn_go[go].t(), dmixed_blk, go == 0);  // the block's rows: written, then summed
        }
      }
    }
  });
  at::Tensor dx, da, dw;
  if (need_x) dx = col2im(dcols.sum(), g, x.scalar_type());
  if (need_attn)
    da = dattn.sum().view({g.go, g.batch, g.spatial, g.gi, g.n}).permute({1, 2, 0, 3, 4}).to(x.scalar_type())
             .contiguous().view({g.batch, g.spatial * g.go * g.gi, g.n});
  if (need_warehouse) dw = dcells.to(x.scalar_type()).view(warehouse.sizes());
  return {dx, da, dw};
}

// -- conv formulation ----------------------------------------------------------------------------------------
// Blocks of output rows made of whole tiles (c_out rows) and, with groups, whole groups.
// Where one block holds the whole kernel, up to `samples` samples share one call (groups = samples * groups).
struct ConvBlocks {
  int64_t rows, count, samples, chunks;
};

ConvBlocks conv_blocks(const Geometry& g, int64_t element_size, int64_t block_bytes, int64_t max_samples) {
  int64_t unit = g.c_out;
  if (g.groups > 1) unit = std::lcm(g.c_out, g.out_per_group);
  const int64_t row_bytes = g.in_per_group * g.kernel_numel * element_size;
  const int64_t rows = rows_per_block(block_bytes, row_bytes, unit, g.out_channels);
  int64_t samples = 1;
  if (rows == g.out_channels)
    samples = std::max<int64_t>(1, std::min<int64_t>(block_bytes / std::max<int64_t>(1, rows * row_bytes), g.batch));
  if (max_samples > 0) samples = std::min(samples, max_samples);
  return {rows, (g.out_channels + rows - 1) / rows, samples, (g.batch + samples - 1) / samples};
}

// Mixes the kernel rows o0:o0+nr of sample b into `kernel` [nr, I, *k]; `tiles` receives the mixed tiles and
// `attn_rows` the attention rows used ([S * ngo * GI, n]).
void mix_conv_block(const at::Tensor& attn_b, const at::Tensor& cells, const Geometry& g, int64_t o0, int64_t nr,
                    at::Tensor& attn_rows, at::Tensor& tiles, at::Tensor& kernel) {
  const int64_t go0 = o0 / g.c_out, ngo = nr / g.c_out;
  attn_rows.view({g.spatial, ngo * g.gi, g.n}).copy_(
      attn_b.view({g.spatial, g.go * g.gi, g.n}).narrow(1, go0 * g.gi, ngo * g.gi));
  at::mm_out(tiles, attn_rows, cells);
  scatter_tiles<true>(tiles, kernel, g, ngo);
}

std::vector<int64_t> kernel_shape(const Geometry& g, int64_t nr) {
  std::vector<int64_t> shape{nr, g.in_per_group};
  shape.insert(shape.end(), g.kernel.begin(), g.kernel.end());
  return shape;
}

// x rows of samples b0:b0+bs for output rows o0:o0+nr, as one convolution input [1, bs * channels', *size].
at::Tensor conv_input(const at::Tensor& x, const Geometry& g, int64_t b0, int64_t bs, int64_t o0, int64_t nr) {
  std::vector<int64_t> shape{1, bs * g.channels};
  shape.insert(shape.end(), g.size.begin(), g.size.end());
  if (g.groups == 1 || nr == g.out_channels) return x.narrow(0, b0, bs).view(shape);
  shape[1] = nr / g.out_per_group * g.in_per_group;
  return x[b0].narrow(0, o0 / g.out_per_group * g.in_per_group, shape[1]).view(shape);
}

int64_t conv_groups(const Geometry& g, int64_t bs, int64_t nr) {
  return g.groups == 1 ? bs : bs * (nr / g.out_per_group);
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse, const Geometry& g,
                        int64_t block_bytes, int64_t max_samples) {
  const ConvBlocks blocks = conv_blocks(g, x.element_size(), block_bytes, max_samples);
  const at::Tensor cells = warehouse.view({g.n, g.cell});
  const std::vector<int64_t> zeros(g.size.size(), 0);
  const int64_t kernel_rows = g.in_per_group * g.kernel_numel;
  at::Tensor y = at::empty({g.batch, g.out_channels, g.positions}, x.options());
  serial_items(blocks.chunks * blocks.count, [&](int64_t begin, int64_t end) {
    const int64_t max_tiles = g.spatial * (blocks.rows / g.c_out) * g.gi;
    at::Tensor attn_buf = at::empty({max_tiles * g.n}, x.options());  // thread-local buffers
    at::Tensor tile_buf = at::empty({max_tiles * g.cell}, x.options());
    at::Tensor kernel_buf = at::empty({blocks.samples * blocks.rows * kernel_rows}, x.options());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b0 = item / blocks.count * blocks.samples, bs = std::min(blocks.samples, g.batch - b0);
      const int64_t o0 = (item % blocks.count) * blocks.rows;
      const int64_t nr = std::min(blocks.rows, g.out_channels - o0), tiles = g.spatial * (nr / g.c_out) * g.gi;
      at::Tensor attn_rows = attn_buf.narrow(0, 0, tiles * g.n).view({tiles, g.n});
      at::Tensor tile_blk = tile_buf.narrow(0, 0, tiles * g.cell).view({tiles, g.cell});
      for (int64_t i = 0; i < bs; ++i) {  // Step 1: each sample's kernel rows into the buffer
        at::Tensor kernel = kernel_buf.narrow(0, i * nr * kernel_rows, nr * kernel_rows);
        mix_conv_block(attn[b0 + i], cells, g, o0, nr, attn_rows, tile_blk, kernel);
      }
      // Step 2: one convolution for these samples (groups = samples * groups), written into y
      at::Tensor out = at::convolution(conv_input(x, g, b0, bs, o0, nr),
                                       kernel_buf.narrow(0, 0, bs * nr * kernel_rows).view(kernel_shape(g, bs * nr)),
                                       {}, g.stride, g.padding, g.dilation, false, zeros, conv_groups(g, bs, nr));
      y.narrow(0, b0, bs).narrow(1, o0, nr).copy_(out.view({bs, nr, g.positions}));
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& attn, const at::Tensor& warehouse,
                                                             const Geometry& g, bool need_x, bool need_attn,
                                                             bool need_warehouse, int64_t block_bytes,
                                                             int64_t max_samples) {
  const bool need_weight = need_attn || need_warehouse;
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  const ConvBlocks blocks = conv_blocks(g, x.element_size(), block_bytes, max_samples);
  const at::Tensor cells = warehouse.view({g.n, g.cell});
  const std::vector<int64_t> zeros(g.size.size(), 0);
  const int64_t kernel_rows = g.in_per_group * g.kernel_numel;
  at::Tensor dx = need_x ? at::zeros(x.sizes(), acc) : at::Tensor();
  at::Tensor dattn = need_attn ? at::empty(attn.sizes(), attn.options()) : at::Tensor();
  ProductSums dcells({g.n, g.cell}, acc);
  // Sample chunks in order (see serial_items); dE in partial sums.
  serial_items(blocks.chunks, [&](int64_t begin, int64_t end) {
    const int64_t max_tiles = g.spatial * (blocks.rows / g.c_out) * g.gi;
    at::Tensor attn_buf = at::empty({blocks.samples * max_tiles * g.n}, x.options());
    at::Tensor tile_buf = at::empty({blocks.samples * max_tiles * g.cell}, x.options());
    at::Tensor kernel_buf = at::empty({blocks.samples * blocks.rows * kernel_rows}, x.options());
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t b0 = chunk * blocks.samples, bs = std::min(blocks.samples, g.batch - b0);
      for (int64_t blk = 0; blk < blocks.count; ++blk) {
        const int64_t o0 = blk * blocks.rows, nr = std::min(blocks.rows, g.out_channels - o0);
        const int64_t ngo = nr / g.c_out, tiles = g.spatial * ngo * g.gi;
        for (int64_t i = 0; i < bs; ++i) {  // recompute the kernels (needed for dx)
          at::Tensor attn_rows = attn_buf.narrow(0, i * tiles * g.n, tiles * g.n).view({tiles, g.n});
          at::Tensor tile_blk = tile_buf.narrow(0, i * tiles * g.cell, tiles * g.cell).view({tiles, g.cell});
          at::Tensor kernel = kernel_buf.narrow(0, i * nr * kernel_rows, nr * kernel_rows);
          mix_conv_block(attn[b0 + i], cells, g, o0, nr, attn_rows, tile_blk, kernel);
        }
        std::vector<int64_t> dy_shape{1, bs * nr};
        dy_shape.insert(dy_shape.end(), g.out.begin(), g.out.end());
        const at::Tensor dy = (nr == g.out_channels ? grad.narrow(0, b0, bs) : grad[b0].narrow(0, o0, nr)).reshape(dy_shape);
        const at::Tensor xs = conv_input(x, g, b0, bs, o0, nr);
        auto grads = at::convolution_backward(
            dy, xs, kernel_buf.narrow(0, 0, bs * nr * kernel_rows).view(kernel_shape(g, bs * nr)), c10::nullopt,
            g.stride, g.padding, g.dilation, false, zeros, conv_groups(g, bs, nr), {need_x, need_weight, false});
        if (need_x) {
          at::Tensor target = nr == g.out_channels ? dx.narrow(0, b0, bs)
                                                   : g.groups == 1 ? dx[b0]
                                                   : dx[b0].narrow(0, o0 / g.out_per_group * g.in_per_group, xs.size(1));
          target.add_(std::get<0>(grads).view(target.sizes()));
        }
        if (need_weight) {
          at::Tensor dkernel = std::get<1>(grads).contiguous();
          for (int64_t i = 0; i < bs; ++i) {
            at::Tensor attn_rows = attn_buf.narrow(0, i * tiles * g.n, tiles * g.n).view({tiles, g.n});
            at::Tensor tile_blk = tile_buf.narrow(0, i * tiles * g.cell, tiles * g.cell).view({tiles, g.cell});
            at::Tensor dk = dkernel.narrow(0, i * nr, nr);
            scatter_tiles<false>(tile_blk, dk, g, ngo);  // dW back into tiles [tiles, cell]
            if (need_attn) {
              const int64_t go0 = o0 / g.c_out;
              dattn[b0 + i].view({g.spatial, g.go * g.gi, g.n}).narrow(1, go0 * g.gi, ngo * g.gi)
                  .copy_(at::mm(tile_blk, cells.t()).view({g.spatial, ngo * g.gi, g.n}));
            }
            if (need_warehouse) dcells.add_mm(attn_rows.t(), tile_blk);
          }
        }
      }
    }
  });
  at::Tensor dw;
  if (need_x) dx = dx.to(x.scalar_type());
  if (need_warehouse) dw = dcells.sum().to(x.scalar_type()).view(warehouse.sizes());
  return {dx, dattn, dw};
}

void check_inputs(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse) {
  for (const at::Tensor* t : {&x, &attn, &warehouse}) {
    TORCH_CHECK(t->device().is_cpu(), "kw_ops._C: the CPU kernel needs CPU tensors");
    TORCH_CHECK(t->is_contiguous(), "kw_ops._C: inputs must be contiguous");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "kw_ops._C: x, attn and warehouse must share a dtype");
  }
}

}  // namespace

at::Tensor kw_conv_forward_cpu(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse,
                               int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t path,
                               int64_t block_bytes, int64_t conv_samples) {
  check_inputs(x, attn, warehouse);
  const Geometry g = make_geometry(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups);
  std::vector<int64_t> shape{g.batch, g.out_channels};
  shape.insert(shape.end(), g.out.begin(), g.out.end());
  if (g.batch == 0) return at::zeros(shape, x.options());
  if (static_cast<CpuPath>(path) == CpuPath::kGemm) {
    TORCH_CHECK(groups == 1, "kw_ops._C: the gemm formulation needs groups = 1");
    return gemm_forward(x, attn, warehouse, g, block_bytes).view(shape);
  }
  return conv_forward(x, attn, warehouse, g, block_bytes, conv_samples).view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kw_conv_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse,
    int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, at::IntArrayRef output_mask, int64_t path, int64_t block_bytes,
    int64_t conv_samples) {
  check_inputs(x, attn, warehouse);
  TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == x.scalar_type(), "kw_ops._C: grad must be contiguous");
  TORCH_CHECK(output_mask.size() == 3, "kw_ops._C: output_mask has one flag per x, attn, warehouse");
  const Geometry g = make_geometry(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups);
  const bool need_x = output_mask[0], need_attn = output_mask[1], need_warehouse = output_mask[2];
  if (g.batch == 0)
    return {need_x ? at::zeros_like(x) : at::Tensor(), need_attn ? at::zeros_like(attn) : at::Tensor(),
            need_warehouse ? at::zeros_like(warehouse) : at::Tensor()};
  if (static_cast<CpuPath>(path) == CpuPath::kGemm) {
    TORCH_CHECK(groups == 1, "kw_ops._C: the gemm formulation needs groups = 1");
    return gemm_backward(grad, x, attn, warehouse, g, need_x, need_attn, need_warehouse, block_bytes);
  }
  return conv_backward(grad, x, attn, warehouse, g, need_x, need_attn, need_warehouse, block_bytes, conv_samples);
}

}  // namespace kw_ops
