"""What ``quantize`` checks before it touches a model, and how it undoes a failed in-place call.

``check_plan_fits`` validates a plan against the model first (every named layer exists and has
the planned type, every fusion's modules exist, explicit weight axes are in range), so a plan
made from another model fails with a clear error before any BatchNorm is folded.
``ModuleSnapshot`` records each submodule's children, parameters, buffers and hooks
(references, not copies: quantize swaps modules and assigns new Parameters, it never writes
into the caller's tensors) so ``quantize(..., inplace=True)`` can put the model back exactly as
it was when a later step still fails.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from lowbit.float_modules import float_class
from lowbit.nn import quant_type_for
from lowbit.plan import Plan


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_plan_fits(model: nn.Module, the_plan: Plan, functional: set[str], *,
                    from_config: bool) -> None:
    """Raise ``ValueError`` naming the first plan entry the model cannot take."""
    for layer in the_plan.quantized:
        if layer.name in functional:
            continue
        module = _module(model, layer.name)
        if module is None:
            raise ValueError(f"the plan names layer {layer.name!r}, which the model lacks: was "
                             "the plan made from another model? Make one from this model with "
                             "lowbit.plan(model, config)")
        if quant_type_for(module) != layer.type:
            raise ValueError(f"the plan says layer {layer.name!r} is a {layer.type}, but the "
                             f"model's is a {float_class(module).__name__}: was the plan made "
                             "from another model?")
        weight = getattr(module, "weight", None)
        spec = layer.weight
        if spec is not None and spec.axis is not None and weight is not None:
            dims = weight.dim()
            if not -dims <= spec.axis < dims:
                raise ValueError(f"layer {layer.name!r}: weight `axis` {spec.axis} is out of "
                                 f"range for its {dims}-d weight {tuple(weight.shape)}; allowed "
                                 f"{-dims}..{dims - 1}")
    for chain in the_plan.fusions:
        missing = [n for n in chain if _module(model, n) is None]
        if missing:
            raise ValueError(f"the plan's fusion {list(chain)} names a module the model lacks: "
                             f"{missing} (was the plan made from another model?)")
    if not from_config:
        planned = {layer.name for layer in the_plan.layers} | set(the_plan.skipped)
        unplanned = [n for n, m in model.named_modules()
                     if n and n not in planned and quant_type_for(m) in ("Linear", "Conv1d",
                                                                         "Conv2d")]
        if unplanned:
            warnings.warn(f"the plan does not list {len(unplanned)} quantizable layer(s) of "
                          f"this model, which stay in float: {unplanned[:5]}"
                          f"{' ...' if len(unplanned) > 5 else ''} (was the plan made from "
                          "another model?)", stacklevel=4)


class ModuleSnapshot:
    """The structure of every submodule of a model, to restore after a failed in-place edit."""

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[nn.Module, dict[str, tuple[Any, dict[Any, Any] | None]]]] = []
        for module in model.modules():
            state = {k: (v, dict(v) if isinstance(v, dict) else None)
                     for k, v in module.__dict__.items()}
            self.saved.append((module, state))

    def restore(self) -> None:
        for module, state in self.saved:
            for key in [k for k in module.__dict__ if k not in state]:
                del module.__dict__[key]
            for key, (value, content) in state.items():
                module.__dict__[key] = value
                if content is not None:
                    value.clear()
                    value.update(content)
