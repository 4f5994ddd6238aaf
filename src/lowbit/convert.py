"""``convert``: freeze a calibrated (or trained) quantized model into a deploy model."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from lowbit.deploy import (
    DeployActivation,
    DeployBinary,
    DeployCat,
    DeployConv,
    DeployEmbedding,
    DeployLinear,
    DeploySiLU,
    DynamicLinear,
)
from lowbit.fuse import set_module
from lowbit.nn import (
    QuantActivation,
    QuantCat,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLayer,
    QuantLinear,
    QuantSiLU,
    _QuantBinary,
)
from lowbit.quantize import follow_model_device


def _deploy_linear(wrapper: Any) -> nn.Module:
    if wrapper.input_quant is not None and wrapper.input_quant.spec.dynamic:
        return DynamicLinear(wrapper)
    return DeployLinear(wrapper)


def to_deploy(wrapper: QuantLayer) -> nn.Module:
    """The deploy module of one Quant wrapper."""
    for q in wrapper.quantizers():
        q.qparams()  # raises a clear error for a quantizer that never saw data
    if isinstance(wrapper, QuantLinear):
        return _deploy_linear(wrapper)
    if isinstance(wrapper, QuantEmbedding):
        return DeployEmbedding(wrapper)
    if isinstance(wrapper, (QuantConv1d, QuantConv2d)):
        return DeployConv(wrapper)
    if isinstance(wrapper, _QuantBinary):
        return DeployBinary(wrapper)
    if isinstance(wrapper, QuantCat):
        return DeployCat(wrapper)
    if isinstance(wrapper, QuantSiLU):
        return DeploySiLU(wrapper)
    if isinstance(wrapper, QuantActivation):
        return DeployActivation(wrapper)
    raise NotImplementedError(f"no deploy form for {type(wrapper).__name__}")  # pragma: no cover


def convert(model: nn.Module) -> nn.Module:
    """A deploy copy of ``model``: integer weight codes, frozen scales, eval mode.

    ``model`` itself is left untouched. Raises ``ValueError`` naming the layer when an
    activation quantizer has no range (the model was not calibrated or trained).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("`model` has no lowbit Quant layers; call lowbit.quantize (and "
                         "lowbit.calibrate) first")
    unsmoothed = [m.layer_name for m in model.modules() if isinstance(m, QuantLayer)
                  and m.input_quant is not None and m.input_quant.spec.smoothing is not None
                  and getattr(m, "input_smoothing", None) is None and not m.smoothing_declined]
    if unsmoothed:
        warnings.warn(f"{len(unsmoothed)} layer(s) ask for `smoothing` but were never calibrated "
                      f"with data, so they are not smoothed: {unsmoothed[:5]}"
                      f"{' ...' if len(unsmoothed) > 5 else ''}; run lowbit.calibrate(model, "
                      "batches) before convert", stacklevel=2)
    deployed = copy.deepcopy(model)
    if isinstance(deployed, QuantLayer):
        single = to_deploy(deployed)
        follow_model_device(single, like=model)
        return single.eval()
    for name, module in list(deployed.named_modules()):
        if isinstance(module, QuantLayer):
            set_module(deployed, name, to_deploy(module))
    follow_model_device(deployed, like=model)
    return deployed.eval()
