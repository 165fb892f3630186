"""Brute-force float64 references: explicit loops over samples, mixtures and cells (docs/semantics.md §2-§3).

The oracle owns its constants, written from docs/semantics.md, so a changed constant in kw_ops fails a test.
"""
import itertools
import math

import torch
import torch.nn.functional as F

#: ε of the contrasting-driven attention function z / (Σ|z| + ε) (docs/semantics.md §3).
CAF_EPS = 1e-3

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def kernels_loop(attn, warehouse, out_channels, in_per_group, kernel_size):
    """W [B, O, I, *k] built cell by cell: mixture j = (s*GO + go)*GI + gi, s row-major over the kernel grid."""
    attn, warehouse = attn.double(), warehouse.double()
    batch, m, n = attn.shape
    _, c_out, c_in, *cell_k = warehouse.shape
    grid_sizes = [k // c for k, c in zip(kernel_size, cell_k)]
    go_count, gi_count = out_channels // c_out, in_per_group // c_in
    weight = torch.zeros(batch, out_channels, in_per_group, *kernel_size, dtype=torch.float64)
    for b in range(batch):
        for s, cell_pos in enumerate(itertools.product(*map(range, grid_sizes))):
            for go in range(go_count):
                for gi in range(gi_count):
                    j = (s * go_count + go) * gi_count + gi
                    mixed = sum(attn[b, j, k] * warehouse[k] for k in range(n))
                    spatial = tuple(slice(p * c, (p + 1) * c) for p, c in zip(cell_pos, cell_k))
                    rows, cols = slice(go * c_out, (go + 1) * c_out), slice(gi * c_in, (gi + 1) * c_in)
                    weight[(b, rows, cols, *spatial)] = mixed
    assert m == math.prod(grid_sizes) * go_count * gi_count
    return weight


def kw_conv_loop(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups):
    """y [B, O, *out] from one float64 convolution per sample with the looped kernels."""
    weight = kernels_loop(attn, warehouse, out_channels, x.shape[1] // groups, kernel_size)
    conv = CONV[x.dim() - 2]
    rows = [conv(x[b : b + 1].double(), weight[b], None if bias is None else bias.double(), stride, padding, dilation,
                 groups) for b in range(x.shape[0])]
    return torch.cat(rows)


def caf(z):
    """Contrasting-driven attention over the last dim, written out."""
    return z / (z.abs().sum(dim=-1, keepdim=True) + CAF_EPS)


def relu_l1(z):
    """The paper's max(z, 0) / Σ|z| alternative (Table 8), with CAF's ε, written out."""
    return z.clamp_min(0) / (z.abs().sum(dim=-1, keepdim=True) + CAF_EPS)


def kernel_grads_loop(dweight, attn, warehouse):
    """The adjoint of kernels_loop, cell by cell: dL/dW [B, O, I, *k] -> (dL/dattn [B, m, n], dL/dwarehouse)."""
    dweight, attn, warehouse = dweight.double(), attn.double(), warehouse.double()
    batch, m, n = attn.shape
    _, c_out, c_in, *cell_k = warehouse.shape
    out_channels, in_per_group, *kernel_size = dweight.shape[1:]
    grid_sizes = [k // c for k, c in zip(kernel_size, cell_k)]
    go_count, gi_count = out_channels // c_out, in_per_group // c_in
    dattn, dwarehouse = torch.zeros_like(attn), torch.zeros_like(warehouse)
    for b in range(batch):
        for s, cell_pos in enumerate(itertools.product(*map(range, grid_sizes))):
            for go in range(go_count):
                for gi in range(gi_count):
                    j = (s * go_count + go) * gi_count + gi
                    spatial = tuple(slice(p * c, (p + 1) * c) for p, c in zip(cell_pos, cell_k))
                    rows, cols = slice(go * c_out, (go + 1) * c_out), slice(gi * c_in, (gi + 1) * c_in)
                    tile = dweight[(b, rows, cols, *spatial)]
                    dattn[b, j] = (warehouse * tile).flatten(1).sum(dim=1)
                    dwarehouse += attn[b, j].view(n, *[1] * tile.dim()) * tile
    return dattn, dwarehouse


def kw_conv_loop_grads(grad, x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups):
    """(dx, dattn, dwarehouse) of kw_conv_loop for the output gradient `grad`, in float64: autograd through one
    convolution per sample with the looped kernels as a leaf, then the adjoint of the loop (no autograd through
    the loop, so realistic layer sizes take seconds)."""
    weight = kernels_loop(attn.detach(), warehouse.detach(), out_channels, x.shape[1] // groups, kernel_size)
    conv = CONV[x.dim() - 2]
    dx, dweight = torch.zeros(x.shape, dtype=torch.float64), torch.zeros_like(weight)
    for b in range(x.shape[0]):
        x_b, weight_b = x[b : b + 1].detach().double().requires_grad_(), weight[b].requires_grad_()
        y_b = conv(x_b, weight_b, None, stride, padding, dilation, groups)
        dx[b : b + 1], dweight[b] = torch.autograd.grad(y_b, (x_b, weight_b), grad[b : b + 1].double())
    return (dx, *kernel_grads_loop(dweight, attn.detach(), warehouse.detach()))
