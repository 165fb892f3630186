// kw_ops._C: registers the compiled kernels as torch.ops.kw_ops_C.* (TORCH_LIBRARY, no pybind11) and gives
// Python a module to import. The public op stays torch.ops.kw_ops.kw_conv (kw_ops/ops/op.py); these are the
// `cpp` backend's implementations behind it (kw_ops/ops/cpp.py).
#include <Python.h>
#include <torch/library.h>

#include "kw_conv.h"

extern "C" {
// `import kw_ops._C` loads the library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kw_ops compiled kernels (csrc/)", -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(kw_ops_C, m) {
  m.def("kw_conv_forward(Tensor x, Tensor attn, Tensor warehouse, int out_channels, int[] kernel_size, "
        "int[] stride, int[] padding, int[] dilation, int groups, int path, int block_bytes, int conv_samples) -> Tensor");
  m.def("kw_conv_backward(Tensor grad, Tensor x, Tensor attn, Tensor warehouse, int out_channels, "
        "int[] kernel_size, int[] stride, int[] padding, int[] dilation, int groups, int[] output_mask, int path, "
        "int block_bytes, int conv_samples) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kw_ops_C, CPU, m) {
  m.impl("kw_conv_forward", &kw_ops::kw_conv_forward_cpu);
  m.impl("kw_conv_backward", &kw_ops::kw_conv_backward_cpu);
}
