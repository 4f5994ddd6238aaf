"""``quantize``: apply a plan to a model — fold BN, swap layers for Quant wrappers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lowbit import distributed
from lowbit.attention import unfold_multihead_attention
from lowbit.checkpoint import attach_metadata
from lowbit.config import QuantConfig
from lowbit.float_modules import deep_copyable, float_class, is_reparametrized
from lowbit.functional import FUNCTIONAL_TYPES, insert_functional
from lowbit.fuse import apply_chains, set_module
from lowbit.guard import check_not_meta
from lowbit.nn import GRID_KEEPING_TYPES, QuantLayer, init_weight_quantizer, quant_type_for
from lowbit.placement import check_example_inputs, plan
from lowbit.plan import Plan
from lowbit.quantize_checks import ModuleSnapshot, check_plan_fits
from lowbit.quantizers import scope
from lowbit.registry import LAYERS
from lowbit.share import reuse_output_quantizers, share_input_quantizers
from lowbit.trace import ModelGraph, trace

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
    return _quantize(model, config, example_inputs, inplace, qat=False)


def prepare_qat(
    model: nn.Module,
    config: QuantConfig | Plan,
    *,
    example_inputs: Sequence[object] | None = None,
    inplace: bool = False,
    freeze_bn: int | None = None,
) -> nn.Module:
    """A quantized copy of ``model`` for quantization-aware training, in ``train()`` mode.

    Like ``quantize``, but each Conv/Linear → BatchNorm chain keeps its BatchNorm inside the
    quant layer and folds it while training (Jacob et al.; MindSpore ``bn_fold``): batch
    statistics until ``freeze_bn`` training steps of the layer have run (``None``: never
    frozen; MindSpore ``freeze_bn``), running statistics after, and exactly the folded layer in
    eval mode and after ``lowbit.convert``. Train it with your own loop and optimizer; see
    ``lowbit.schedules`` for temperature, BN re-estimation and binary weight clipping.
    """
    if freeze_bn is not None and (isinstance(freeze_bn, bool) or not isinstance(freeze_bn, int)):
        raise TypeError(f"`freeze_bn` must be an int (training steps) or None, got "
                        f"{type(freeze_bn).__name__} {freeze_bn!r}")
    if freeze_bn is not None and freeze_bn < 0:
        raise ValueError(f"`freeze_bn` must be >= 0 training steps, got {freeze_bn}")
    qm = _quantize(model, config, example_inputs, inplace, qat=True, freeze_bn=freeze_bn)
    from lowbit.schedules import attach_state

    attach_state(qm)
    return qm.train()


def _quantize(model: nn.Module, config: QuantConfig | Plan, example_inputs: Sequence[object] | None,
              inplace: bool, *, qat: bool, freeze_bn: int | None = None) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"`inplace` must be a bool (True or False), got "
                        f"{type(inplace).__name__} {inplace!r}")
    check_not_meta(model)
    check_example_inputs(example_inputs)
    if not isinstance(config, (QuantConfig, Plan)):
        raise TypeError(f"`config` must be a QuantConfig or a Plan, got {type(config).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("`model` is already quantized; pass the float model")
    if not inplace:
        with deep_copyable(model):
            model = copy.deepcopy(model)
        return _quantize_here(model, config, example_inputs, qat, freeze_bn)
    snapshot = ModuleSnapshot(model)
    try:
        return _quantize_here(model, config, example_inputs, qat, freeze_bn)
    except BaseException:
        snapshot.restore()  # a failing call leaves the caller's model as it was
        raise


def _quantize_here(model: nn.Module, config: QuantConfig | Plan,
                   example_inputs: Sequence[object] | None, qat: bool,
                   freeze_bn: int | None) -> nn.Module:
    """Plan (for a config) and apply it to ``model`` itself: the caller's copy, or the
    caller's model under ``inplace=True``."""
    unfold_multihead_attention(model)  # written out as Linears (lowbit.attention)
    graph = trace(model, example_inputs)  # of the float model: plan, fusions and sharing
    the_plan = (plan(model, config, example_inputs, graph=graph)
                if isinstance(config, QuantConfig) else config)
    if not the_plan.quantized:
        found = sorted({layer.type for layer in the_plan.layers})
        raise ValueError(
            "nothing to quantize: no layer of the model matches a rule with a spec "
            f"(quantizable layers found: {len(the_plan.layers)}, types {found}; "
            f"supported types: {LAYERS.names()})"
            + "".join(f"; {n or '<model>'}: {why}" for n, why in
                      list(the_plan.skipped.items())[:3])
        )
    functional = {layer.name for layer in the_plan.quantized
                  if layer.type in FUNCTIONAL_TYPES | GRID_KEEPING_TYPES
                  and not _has_module(model, layer.name)}
    check_plan_fits(model, the_plan, functional, from_config=isinstance(config, QuantConfig))
    return _apply_plan(model, the_plan, functional, graph, qat, freeze_bn)


def _apply_plan(model: nn.Module, the_plan: Plan, functional: set[str],
                graph: ModelGraph | None, qat: bool, freeze_bn: int | None) -> nn.Module:
    quantized = {layer.name for layer in the_plan.quantized}
    activations, norms = apply_chains(model, list(the_plan.fusions), quantized, keep_bn=qat)
    # Functional ops are plan entries with no module behind them yet (``layer1.op_add``...).
    if functional:
        insert_functional(model, functional)

    reparametrized: list[str] = []
    for layer in the_plan.quantized:
        try:
            float_module = model.get_submodule(layer.name)
        except AttributeError:
            raise ValueError(f"the plan names layer {layer.name!r}, which the model lacks") from None
        cls = LAYERS.get(layer.type)
        if quant_type_for(float_module) != layer.type:
            raise ValueError(f"the plan says layer {layer.name!r} is a {layer.type}, but the "
                             f"model's is a {float_class(float_module).__name__}")
        if qat and is_reparametrized(float_module):
            reparametrized.append(layer.name)
        wrapper = cls.from_float(float_module, layer.specs, layer.name)
        wrapper.train(float_module.training)
        if layer.name in activations:
            relu = activations.pop(layer.name)
            # A ±1 output quantizer replaces the ReLU (sign(BN(conv)), BinaryNet): a ReLU
            # before it would make every code +1.
            if wrapper.output_quant is None or not wrapper.output_quant.splits_at_zero:
                wrapper.activation = relu
        if layer.name in norms:
            attach_bn(wrapper, norms.pop(layer.name), freeze_bn)
        set_module(model, layer.name, wrapper)
    share_input_quantizers(model, graph)
    reuse_output_quantizers(model, graph)
    follow_model_device(model)

    if reparametrized:
        warnings.warn(f"lowbit trains the materialised weight of {len(reparametrized)} "
                      f"weight-normed (parametrized) or weight-standardized layer(s) directly: "
                      f"{reparametrized}; the (g, v) parametrization or the standardization is "
                      "not kept under QAT", stacklevel=4)
    floats = the_plan.float_layers
    if floats:
        listed = "; ".join(f"{n or '<model>'}: {why}" for n, why in floats.items())
        warnings.warn(f"lowbit left {len(floats)} layer(s) in float: {listed}", stacklevel=4)
    setattr(model, PLAN_ATTR, the_plan)
    attach_metadata(model)
    scope.attach(model)  # a shared quantizer handles each tensor once per call
    distributed.install_check(model)  # ranks of a training job must hold the same model
    return model


def follow_model_device(model: nn.Module, like: nn.Module | None = None) -> None:
    """Put new quantizers (built on the CPU) where the model (or ``like``) lives, when it lives
    on one device."""
    devices = {p.device for p in (like or model).parameters()}
    if len(devices) == 1:
        model.to(devices.pop())


def attach_bn(wrapper: Any, bn: Any, freeze_bn: int | None) -> None:
    """Give a quant layer the BatchNorm it folds while training."""
    wrapper.bn = bn
    wrapper.freeze_bn = freeze_bn
    if wrapper.weight_quant is not None and wrapper.weight_quant.folds_bn:
        # The quantized weight is now W·k: its initial range (or LSQ step) must be that one's.
        weight, _, _ = wrapper.folded_weight_and_bias()
        wrapper.weight_quant.reset_statistics()
        init_weight_quantizer(wrapper.weight_quant, weight.detach())
    # Training steps seen (a buffer, so a resumed run freezes at the same step).
    wrapper.register_buffer("bn_steps", torch.zeros((), dtype=torch.int64,
                                                    device=bn.running_mean.device))


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``(name, wrapper)`` for every Quant wrapper in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
