"""Deployment: ONNX export with a dynamic batch, and the authors' detection fine-tuning setup.

While exporting or tracing, KW layers switch to the export formulation of
`kw_ops.ops.export_impl` (batched MatMuls over kernel offsets), whose batch stays symbolic.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .nn.attention import KWAttention
from .ops.export_impl import export_mode

__all__ = ["export_onnx", "export_mode", "FrozenBatchNorm1d", "prepare_for_detection"]

#: batch of the input traced by `export_onnx`: torch.export specialises a batch of 0 or 1 into the graph
TRACE_BATCH = 2
#: largest batch the exported graph is declared for
MAX_EXPORT_BATCH = 4096


def _trace_example(example: torch.Tensor) -> torch.Tensor:
    """[B >= 1, C, *size] -> its first sample repeated TRACE_BATCH times (the graph does not depend on values)."""
    if example.ndim < 2 or example.shape[0] == 0:
        raise ValueError(f"export_onnx: example must be an input batch [B >= 1, C, *size], got shape "
                         f"{tuple(example.shape)}")
    return example[:1].repeat(TRACE_BATCH, *([1] * (example.ndim - 1)))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int = 18) -> str:
    """Export `model` (in eval mode) to ONNX with a dynamic batch dimension; returns the path.

    example: one input batch [B, C, *size], any B >= 1 (batch 1 included); the exported graph accepts
    batches 1 to MAX_EXPORT_BATCH. Every module's training flag is restored afterwards (also when the export
    raises), so a training model with frozen submodules in eval mode keeps them so.
    """
    modes = [(module, module.training) for module in model.modules()]
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    try:
        model.eval()
        with torch.no_grad(), export_mode():
            program = torch.onnx.export(model, (_trace_example(example),), path, dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["output"],
                                        dynamic_shapes=({0: batch},), external_data=False)
    finally:
        for module, training in modes:
            module.training = training
    if program is not None:
        program.save(path)
    return path


class FrozenBatchNorm1d(nn.Module):
    """BatchNorm1d with fixed statistics and affine parameters (buffers), as detection backbones use."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm1d) -> FrozenBatchNorm1d:
        frozen = cls(bn.num_features, bn.eps).to(bn.running_mean.device, bn.running_mean.dtype)
        with torch.no_grad():
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C] -> [B, C]"""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale + (self.bias - self.running_mean * scale)


def prepare_for_detection(model: nn.Module, freeze_attention_norm: bool = True, drop_beta: bool = True) -> nn.Module:
    """Fine-tuning setup of the authors' detection backbones, in place: attention BatchNorms frozen
    (statistics and affine), τ = 0 and β zeroed so the temperature blend is gone for good."""
    for module in model.modules():
        if not isinstance(module, KWAttention):
            continue
        if freeze_attention_norm and isinstance(module.norm1, nn.BatchNorm1d):
            module.norm1 = FrozenBatchNorm1d.from_batchnorm(module.norm1)
            module.norm_kind = "frozen"
        if drop_beta:
            module.temperature.zero_()
            module.beta.zero_()
    return model
