// kw_ops._C: the KW op's geometry, shared by every device's kernels (csrc/<device>/kw_conv_<device>.cpp).
//
//   x          [B, C, *size]              contiguous
//   attn       [B, m, n]                  mixture j = (s * GO + go) * GI + gi (docs/semantics.md §2)
//   warehouse  [n, c_out, c_in, *cell_k]  cell_k all ones (spatial partition) or the whole kernel
//   y          [B, O, *out]
//
// Kernel position of cell s, cell element ck: s * CK + ck (one of S, CK is 1), so one cell row
// (q, ck) of `inner` = c_in * CK elements is contiguous both in the warehouse and in the kernel.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace kw_ops {

// Which formulation the CPU kernel runs (the Python side picks by shape, kw_ops/ops/cpp.py).
enum class CpuPath : int64_t {
  kGemm = 1,  // groups = 1: im2col once; per output block, mix all samples, consume per sample by one GEMM
  kConv = 2,  // any groups: per sample (or chunk of samples) and output block, mix, then ATen's convolution
};

struct Geometry {
  int64_t batch, channels, groups, in_per_group, out_channels, out_per_group;
  int64_t n, c_out, c_in, ck;       // warehouse: n cells of [c_out, c_in, CK]
  int64_t spatial, go, gi;          // S, GO, GI
  int64_t kernel_numel, positions;  // K = prod(kernel), L = prod(out)
  int64_t inner, tiles, cell;       // c_in * CK, S * GI, c_out * inner
  std::vector<int64_t> size, kernel, stride, padding, dilation, out;
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse,
                       int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

at::Tensor kw_conv_forward_cpu(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse,
                               int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t path,
                               int64_t block_bytes, int64_t conv_samples);

std::tuple<at::Tensor, at::Tensor, at::Tensor> kw_conv_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& attn, const at::Tensor& warehouse,
    int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, at::IntArrayRef output_mask, int64_t path, int64_t block_bytes,
    int64_t conv_samples);

}  // namespace kw_ops
