"""``quantize``: apply a plan to a model — fold BN, swap layers for Quant wrappers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

from torch import nn

from lowbit.config import QuantConfig
from lowbit.functional import FUNCTIONAL_TYPES, insert_functional
from lowbit.fuse import apply_chains, set_module
from lowbit.nn import QuantLayer
from lowbit.plan import Plan, plan
from lowbit.registry import LAYERS
from lowbit.share import share_input_quantizers

PLAN_ATTR = "lowbit_plan"


def quantize(
    model: nn.Module,
    config: QuantConfig | Plan,
    *,
    example_inputs: Sequence[object] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A quantized copy of ``model``, ready for ``calibrate`` (PTQ) or training (QAT).

    ``config`` is a ``QuantConfig`` (resolved with ``lowbit.plan``) or an edited ``Plan``.
    BatchNorm layers listed in the plan's fusions are folded into the preceding layer first.
    Layers that stay in float are named in one warning and in ``model.lowbit_plan``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(config, QuantConfig):
        the_plan = plan(model, config, example_inputs)
    elif isinstance(config, Plan):
        the_plan = config
    else:
        raise TypeError(f"`config` must be a QuantConfig or a Plan, got {type(config).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("`model` is already quantized; pass the float model")
    if not the_plan.quantized:
        found = sorted({layer.type for layer in the_plan.layers})
        raise ValueError(
            "nothing to quantize: no layer of the model matches a rule with a spec "
            f"(quantizable layers found: {len(the_plan.layers)}, types {found}; "
            f"supported types: {LAYERS.names()})"
        )

    functional = {layer.name for layer in the_plan.quantized
                  if layer.type in FUNCTIONAL_TYPES and not _has_module(model, layer.name)}
    if functional and inplace:
        raise NotImplementedError(
            "inplace=True cannot be combined with rules for functional 'add'/'matmul' ops: "
            f"inserting {sorted(functional)} builds a new traced module; use inplace=False"
        )
    model = model if inplace else copy.deepcopy(model)
    quantized = {layer.name for layer in the_plan.quantized}
    activations = apply_chains(model, list(the_plan.fusions), quantized)
    # Functional ops are plan entries with no module behind them yet (``op_add``...).
    if functional:
        model = insert_functional(model, functional, example_inputs)

    for layer in the_plan.quantized:
        try:
            float_module = model.get_submodule(layer.name)
        except AttributeError:
            raise ValueError(f"the plan names layer {layer.name!r}, which the model lacks") from None
        cls = LAYERS.get(layer.type)
        if type(float_module) is not cls.float_type:
            raise ValueError(f"the plan says layer {layer.name!r} is a {layer.type}, but the "
                             f"model's is a {type(float_module).__name__}")
        wrapper = cls.from_float(float_module, layer.specs, layer.name)
        wrapper.train(float_module.training)
        if layer.name in activations:
            wrapper.activation = activations.pop(layer.name)
        set_module(model, layer.name, wrapper)
    share_input_quantizers(model)

    floats = the_plan.float_layers
    if floats:
        listed = "; ".join(f"{n or '<model>'}: {why}" for n, why in floats.items())
        warnings.warn(f"lowbit left {len(floats)} layer(s) in float: {listed}", stacklevel=2)
    setattr(model, PLAN_ATTR, the_plan)
    return model


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``(name, wrapper)`` for every Quant wrapper in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
