"""What a float module is, as lowbit sees it: its layer type, its weight, its public attributes.

Three things make a model's layers differ from the torch classes lowbit registers:

* **Transposed Linears.** ``transformers.pytorch_utils.Conv1D`` (GPT-2 and its relatives) is a
  Linear whose weight is stored ``(in, out)``. It is recognised by class name, module path and
  the shapes of its ``weight``/``bias`` (lowbit never imports transformers) and quantized as the
  ``"Linear"`` it is.
* **Activation look-alikes.** transformers' ``SiLUActivation`` (``hidden_act="silu"``: MobileViT,
  Llama's MLPs) is ``F.silu`` in a class of its own; it is a ``"SiLU"``, recognised by class
  name and module path like ``Conv1D``.
* **Parametrized weights.** ``torch.nn.utils.parametrizations.weight_norm`` turns a module's
  class into a generated subclass (``ParametrizedConv1d``) whose ``weight`` is computed from
  ``(g, v)``; the older hook-based ``torch.nn.utils.weight_norm`` keeps the class and recomputes
  ``weight`` from ``weight_g``/``weight_v`` before each forward. Both are layers of their
  original type, and their weight is the materialised one.
* **Unsupported weight holders.** Any module holding a parameter of two or more dimensions of
  its own (LSTM gates, ConvTranspose kernels, a custom ``nn.Parameter``) that lowbit does not
  quantize must be listed, not skipped silently. Norm layers' 1-D weights are not such weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

# Class names of transposed Linears ((in, out) weights) and the package they come from.
TRANSPOSED_LINEARS = {"Conv1D": "transformers"}
# Weight-standardized convolutions ((package, class)): a Conv2d over ``(w − mean) / std`` per
# output channel (BiT, ViT-hybrid; timm's ``StdConv2d``), with ``eps`` inside the root.
WEIGHT_STANDARDIZED = {("transformers", "WeightStandardizedConv2d"), ("timm", "StdConv2d")}
# Activation classes that compute what a torch.nn activation does: (package, class) → type.
ACTIVATION_LOOKALIKES = {("transformers", "SiLUActivation"): "SiLU"}


def float_class(module: nn.Module) -> type[nn.Module]:
    """The module's class before any parametrization (``ParametrizedConv1d`` → ``Conv1d``)."""
    return parametrize.type_before_parametrizations(module)


def is_transposed_linear(module: nn.Module) -> bool:
    """A Linear with its weight stored ``(in, out)``: transformers' ``Conv1D`` (``nf`` outputs,
    ``nx`` inputs, ``y = x @ weight + bias``)."""
    cls = float_class(module)
    package = TRANSPOSED_LINEARS.get(cls.__name__)
    if package is None or not cls.__module__.split(".")[0] == package:
        return False
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    # From the parameter dict, not getattr: inside a torch.fx trace, getattr gives proxies, and
    # Conv1D was traced through instead of kept as one call.
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    return (isinstance(nf, int) and isinstance(nx, int) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (nx, nf)
            and (bias is None or (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (nf,))))


def is_weight_standardized(module: nn.Module) -> bool:
    """A Conv2d of a known weight-standardizing class (BiT's, timm's) with no padding module
    of its own in front (HF's dynamic "same" ``pad``), which a Conv2d wrapper would not run."""
    cls = type(module)
    return (isinstance(module, nn.Conv2d)
            and (cls.__module__.split(".")[0], cls.__name__) in WEIGHT_STANDARDIZED
            and getattr(module, "pad", None) is None and isinstance(getattr(module, "eps", None),
                                                                      float))


def standardized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a weight-standardized conv convolves with: per output channel, zero mean and
    unit (biased) variance, ``eps`` added to the variance."""
    w: torch.Tensor = module._parameters["weight"]  # type: ignore[assignment]
    eps = float(module.__dict__["eps"])  # a plain attribute (checked by the caller)
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape_as(w)


def activation_lookalike(module: nn.Module) -> str | None:
    """The layer type of an activation that is a torch.nn one under another class, or None."""
    cls = type(module)
    return ACTIVATION_LOOKALIKES.get((cls.__module__.split(".")[0], cls.__name__))


def _weight_norm_hooks(module: nn.Module) -> list[Any]:
    """The hook-based ``torch.nn.utils.weight_norm`` objects of ``module`` (old API)."""
    from torch.nn.utils.weight_norm import WeightNorm

    return [h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm)]


@contextmanager
def deep_copyable(model: nn.Module) -> Iterator[None]:
    """Within: ``copy.deepcopy(model)`` works on models with hook-based weight norm, whose
    cached ``weight`` (computed with grad) torch refuses to copy. The cache is detached meanwhile
    (the hook recomputes it before every forward anyway) and restored after."""
    cached = [(m, h.name, getattr(m, h.name)) for m in model.modules()
              for h in _weight_norm_hooks(m) if isinstance(getattr(m, h.name, None), torch.Tensor)]
    for module, name, value in cached:
        setattr(module, name, value.detach())
    try:
        yield
    finally:
        for module, name, value in cached:
            setattr(module, name, value)


def is_reparametrized(module: nn.Module) -> bool:
    """Its weight is computed from other parameters (a parametrization, weight norm or weight
    standardization)."""
    return (parametrize.is_parametrized(module) or bool(_weight_norm_hooks(module))
            or is_weight_standardized(module))


def materialized(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as the module computes it now (parametrizations and hook-based weight
    norm evaluated, so a stale cached value is never read), or None."""
    for hook in _weight_norm_hooks(module):
        if hook.name == name:
            return hook.compute_weight(module)
    if name == "weight" and is_weight_standardized(module):
        return standardized_weight(module)
    return getattr(module, name, None)


def as_parameter(module: nn.Module, name: str, transpose: bool = False) -> nn.Parameter | None:
    """The tensor a Quant wrapper holds as ``name``: the module's own Parameter where it has
    one (shared, so optimizers and tied weights keep it), else a new Parameter holding the
    materialised value (transposed for a transposed Linear's weight)."""
    value = materialized(module, name)
    if value is None or (isinstance(value, nn.Parameter) and not transpose):
        return value
    data = value.detach().t().contiguous() if transpose else value.detach().clone()
    return nn.Parameter(data, requires_grad=value.requires_grad)


def weight_of(module: nn.Module, layer_name: str, transpose: bool = False) -> nn.Parameter:
    """``as_parameter(module, "weight")`` for a layer that must have a weight."""
    weight = as_parameter(module, "weight", transpose)
    if weight is None:
        raise ValueError(f"layer {layer_name!r} ({float_class(module).__name__}) has no "
                         "weight to quantize (its `weight` is None)")
    return weight


def public_attributes(module: nn.Module) -> dict[str, Any]:
    """The float module's public plain attributes (``in_features``, ``kernel_size``,
    ``padding_idx``, ``nf``...): what model code may read and a drop-in replacement keeps.
    Tensors (a cached ``weight`` of the hook-based weight norm) are not attributes."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, torch.Tensor)}


def weight_parameters(module: nn.Module) -> list[str]:
    """Names of the module's own weights: parameters of two or more dimensions (and
    parametrized tensors), not its children's. Norm layers' 1-D weights are not listed."""
    names = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if parametrize.is_parametrized(module):
        names += [n for n in module.parametrizations  # type: ignore[union-attr]
                  if materialized(module, n) is not None and getattr(module, n).dim() >= 2]
    # Hook-based weight norm: weight_g / weight_v stand for one weight.
    for hook in _weight_norm_hooks(module):
        names = [n for n in names if n not in (f"{hook.name}_g", f"{hook.name}_v")]
        names.append(hook.name)
    return names


def is_parametrization_list(module: nn.Module) -> bool:
    """The container of a parametrization's originals (its owner lists the weight)."""
    return isinstance(module, parametrize.ParametrizationList)
