"""A warehouse: the cells shared by the KW layers that join it, planned as layers join.

A warehouse is registered as a submodule (`warehouse`) of one module only, its first member in cell order;
the other members hold it as a plain attribute (`layer.warehouse` works on every member). So the cells
have one name (`<first member>.warehouse.cells`) in `parameters()`, `state_dict()` and to
`torch.func.functional_call`, which swaps each registered name once and would otherwise leave a plain
tensor behind in a module registered under several names. A state_dict that lists the cells under every
member (kw_ops before this layout) still loads: see `KWLayer._load_from_state_dict`.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from ..config import KWConfig
from .planning import LayerPlan, PlanningError, WarehousePlan, plan_warehouse

__all__ = ["Warehouse"]


class _CachedCast(torch.autograd.Function):
    """cells -> their cast computed earlier (no copy); the backward casts the gradient back to the cells' dtype."""

    @staticmethod
    def forward(ctx, cells: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = cells.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class Warehouse(nn.Module):
    """Cells [n, c_out, c_in, *cell_k] shared by the KW layers bound to it.

    Layers join in construction order and are handed cells in that order (docs/semantics.md §4); every join
    re-plans the warehouse (cell shape, n, β) and re-initialises it and its members' attention.
    `kw_ops.convert` and `kw_ops.assign_cells(model)` put members into module registration
    order, the order of the authors' code. Build a warehouse's layers inside `planning_deferred()`
    to plan once: a re-plan that replaces the tensors of an earlier plan warns (an optimizer made
    before holds the old ones), and once the warehouse has run a forward or loaded weights, a
    re-plan (a layer joining, a new order) is refused. The warehouse registers itself under its first
    member (`first.warehouse`); keep other references to it as plain attributes, not submodules.

    >>> wh = Warehouse("stage1", KWConfig(budget=1))
    >>> from kw_ops import KWConv2d
    >>> with wh.planning_deferred():
    ...     a, b = KWConv2d(64, 64, 3, padding=1, warehouse=wh), KWConv2d(64, 128, 1, warehouse=wh)
    >>> tuple(wh.cells.shape)   # cells of 64x64: m = 9 + 2
    (11, 64, 64, 1, 1)
    """

    def __init__(self, name: str = "warehouse", config: KWConfig | None = None, *, device=None, dtype=None):
        super().__init__()
        if config is not None and not isinstance(config, KWConfig):
            raise TypeError(f"Warehouse {name!r}: config must be a KWConfig, got {type(config).__name__}")
        self.name = name
        self.config = config or KWConfig()
        self.cells = nn.Parameter(torch.empty(0, device=device, dtype=dtype))
        self._members: list[nn.Module] = []
        self._plan: WarehousePlan | None = None
        self._deferred = 0
        self._settled: str | None = None  # why the plan may no longer change: ran a forward, loaded weights

    # -- membership and planning -------------------------------------------------------------
    @property
    def members(self) -> tuple[nn.Module, ...]:
        """The KW layers bound to this warehouse, in cell order."""
        return tuple(self._members)

    @property
    def plan(self) -> WarehousePlan:
        if self._plan is None:
            raise PlanningError(f"warehouse {self.name!r} has no layers yet")
        return self._plan

    def adopt_factory(self, device, dtype, who: str) -> None:
        """An empty warehouse takes its first member's device/dtype; later members must match."""
        cells = self.cells
        device = torch.device(device) if device is not None else cells.device
        dtype = dtype or cells.dtype
        same_device = device.type == cells.device.type and device.index in (None, cells.device.index)
        if same_device and dtype == cells.dtype:
            return
        if self._members:
            raise ValueError(f"{who}: device/dtype {device}/{dtype} differ from warehouse {self.name!r}'s "
                             f"{cells.device}/{cells.dtype}")
        self.cells = nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=cells.requires_grad)

    def join(self, layer: nn.Module) -> None:
        """Bind a KW layer (called by the layer's constructor); re-plans unless deferred.

        Refused (PlanningError) once the warehouse has run a forward or holds loaded weights.
        """
        shape = layer.weight_shape(len(self._members))
        joining = (f"layer {shape.name} (weight [{shape.out_channels}, {shape.in_per_group}, "
                   f"{', '.join(map(str, shape.kernel))}])")
        self._refuse_if_settled(f"{joining} cannot join it")
        self._members.append(layer)
        self._register_in_first_member()
        if not self._deferred:
            try:
                self._replan_replacing(f"{joining} joined")
            except PlanningError:
                self._members.pop()  # the warehouse stays as it was
                self._register_in_first_member()
                raise

    @contextlib.contextmanager
    def planning_deferred(self):
        """Join many layers, plan once on leaving the outermost block, and only if a layer joined inside it.

        A plan that fails there (layers that cannot share cells, or a warehouse that ran a forward or loaded
        weights meanwhile) raises PlanningError and drops the layers that joined inside: the warehouse keeps
        its members, plan and cells, as after a failed join.
        """
        before = list(self._members)
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1
            if not self._deferred and self._members != before:
                try:
                    self._refuse_if_settled("the layers that joined inside planning_deferred() cannot join it")
                    self._replan_replacing("layers joined inside planning_deferred()")
                except PlanningError:
                    self._members = before
                    raise

    def reorder(self, order: list[nn.Module]) -> None:
        """Hand out cells in the given order of members (e.g. module registration order) and re-plan."""
        if sorted(map(id, order)) != sorted(map(id, self._members)):
            raise ValueError(f"warehouse {self.name!r}: reorder() needs exactly its members")
        if [id(m) for m in order] != [id(m) for m in self._members] or self._plan is None:
            self._refuse_if_settled("its layers cannot be put in another order")
            self._members = list(order)
            self._register_in_first_member()
            self._replan_replacing("its layers were put in module order")

    def _register_in_first_member(self) -> None:
        """Register the warehouse as the first child (`warehouse`) of its first member, as a plain attribute of
        the others: one name for the cells, the state_dict and parameter order of that member unchanged."""
        for index, member in enumerate(self._members):
            children = member._modules
            if index == 0:
                member.__dict__.pop("warehouse", None)
                others = {name: children.pop(name) for name in list(children) if name != "warehouse"}
                children["warehouse"] = self
                children.update(others)
            else:
                children.pop("warehouse", None)
                member.__dict__["warehouse"] = self

    def _refuse_if_settled(self, what: str) -> None:
        """Raise PlanningError once a re-plan would wipe cells that ran a forward, were trained or were loaded."""
        settled = self._settled or ("has gradients from a backward" if self.cells.grad is not None else None)
        if settled is not None:
            names = ", ".join(p.name for p in self.plan.layers)
            raise PlanningError(
                f"warehouse {self.name!r} {settled}: {what}, because re-planning would re-initialise the "
                f"cells and attention of its layers ({names}). Build every layer of a warehouse before running or "
                f"loading it, or give the new layer a warehouse of its own."
            )

    def _replan_replacing(self, event: str) -> None:
        """replan(), then a warning when it replaced the cells and attention of an earlier plan."""
        earlier = self._plan
        before = tuple(self.cells.shape)
        self.replan()
        if earlier is not None:
            names = ", ".join(p.name for p in earlier.layers)
            warnings.warn(
                f"warehouse {self.name!r}: {event} after its plan was made; re-planning replaced its cells {before} "
                f"by new cells {tuple(self.cells.shape)} and re-initialised them and the attention of its layers "
                f"({names}): an optimizer made before holds the old tensors and values set on them are lost. Build "
                f"a warehouse's layers inside `warehouse.planning_deferred()` (or with kw_ops.convert) to plan once.",
                stacklevel=4)

    def mark_used(self) -> None:
        """Note that the cells ran a forward: from now on the plan may not change (called by KW layers'
        eager forwards; a compiled forward is caught by the gradients it leaves on the cells)."""
        if self._settled is None:
            self._settled = "has run a forward"

    def replan(self) -> None:
        """Plan cells for the current members and re-initialise the warehouse and their attention."""
        shapes = [layer.weight_shape(i) for i, layer in enumerate(self._members)]
        self._plan = plan_warehouse(self.name, shapes, self.config)
        tau = next((m.attention.temperature.item() for m in self._members if hasattr(m, "attention")), 0.0)
        cells = self.cells
        self.cells = nn.Parameter(torch.empty(self._plan.shape, device=cells.device, dtype=cells.dtype),
                                  requires_grad=cells.requires_grad)
        for layer, layer_plan in zip(self._members, self._plan.layers):
            layer._bind(layer_plan, self._plan)
            layer.attention.temperature.fill_(tau)
        self.reset_parameters()

    def check_complete(self) -> None:
        """Raise PlanningError unless every cell is assigned exactly once (docs/semantics.md §4). Checked once
        per plan (every KW layer's forward calls it): a new plan is checked again."""
        plan = self.plan
        if self.__dict__.get("_complete_plan") is not plan:
            plan.check_complete()
            self.__dict__["_complete_plan"] = plan

    def layer_plan(self, layer: nn.Module) -> LayerPlan:
        for member, layer_plan in zip(self._members, self.plan.layers):
            if member is layer:
                return layer_plan
        raise ValueError(f"warehouse {self.name!r}: layer is not a member")

    # -- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def init_slice(self, layer_plan: LayerPlan) -> None:
        """Kaiming-normal (fan_out, relu) on one layer's cells viewed as [cells * c_out, c_in, *cell_k]."""
        end = min(layer_plan.start + layer_plan.consumed, self.cells.shape[0])
        if end > layer_plan.start:
            block = self.cells[layer_plan.start:end]
            nn.init.kaiming_normal_(block.view(-1, *block.shape[2:]), mode="fan_out", nonlinearity="relu")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self._plan is None:
            return
        self.cells.zero_()  # cells no slice claims (an incomplete plan) stay zero
        for layer_plan in self._plan.layers:
            self.init_slice(layer_plan)

    # -- the cells in another dtype ------------------------------------------------------------
    def cells_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The cells in `dtype` (autocast): cast once while they are unchanged, not once per member's call.

        The copy is made without a graph and kept while the cells are the same tensor at the same version (no
        optimizer step, no load); each call with grad enabled wraps it in its own node whose backward casts that
        call's gradient back, so gradients are summed in the cells' dtype exactly as with a cast per call.
        Inside torch.compile and torch.func the cells are cast per call.
        """
        cells = self.cells
        if cells.dtype == dtype:
            return cells
        if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
            return cells.to(dtype)
        key = (id(cells), cells.data_ptr(), cells._version, dtype, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_cast")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, cells.to(dtype))
            self.__dict__["_cast"] = cached
        if torch.is_grad_enabled() and cells.requires_grad:
            return _CachedCast.apply(cells, cached[1])
        return cached[1]

    def __getstate__(self):  # the cached cast is derived: never pickled or deep-copied
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "_cast"}

    # -- torch.nn.Module plumbing -------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Load as any module does; cells loaded from a state_dict settle the plan."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "cells" in state_dict:
            self._settled = "holds loaded weights"

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=channels_last) refuses 5-D tensors and would restride 4-D ones;
        # cells have no memory format, so conversions see them as [n, c_out, rest].
        def flat(t):
            if t.dim() < 3:
                return fn(t)
            return fn(t.flatten(2)).unflatten(2, t.shape[2:])

        return super()._apply(flat, recurse)

    def extra_repr(self) -> str:
        shape = tuple(self.cells.shape) if self._plan is not None else "unplanned"
        return f"name={self.name!r}, cells={shape}, budget={self.config.budget}, layers={len(self._members)}"

    def __repr__(self):  # members print their warehouse; keep it one line
        return f"Warehouse({self.extra_repr()})"


