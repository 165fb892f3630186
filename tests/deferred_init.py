"""The meta-device recipe of deferred initialisation (and FSDP), shared by the layer and baseline tests."""
import torch


def deferred_init(build):
    """Build on meta, allocate on CPU with `to_empty`, then `reset_parameters` of every module that has one.

    `to_empty` leaves memory as it was; NaN (7 in integer tensors) in every tensor first makes whatever
    reset_parameters leaves out visible.
    """
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else 7)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model
