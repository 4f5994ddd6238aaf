"""Name the layer when a model-level step fails on its data.

A batch with the wrong channel count, an integer dtype or a tensor on another device fails deep
inside torch with a message that names no layer. ``layer_errors(model)`` watches which
submodule is running (forward pre-/post-hooks) and turns such a failure into a ``LayerError``
naming the innermost layer that rejected its input, with the input's shapes, dtypes and
devices, and keeping torch's own message. ``check_finite`` does the same for NaN/inf reaching
a quantizer during calibration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lowbit.numerics import all_finite


class LayerError(ValueError):
    """A layer rejected its input (shape, dtype, device or values); ``layer`` names it."""

    def __init__(self, message: str, layer: str = "") -> None:
        super().__init__(message)
        self.layer = layer


def describe(value: Any) -> str:
    """Shapes, dtypes and devices of a (nested) input, e.g. ``Tensor(8, 3) float32 cpu``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')} {value.device}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def meta_parameters(model: nn.Module) -> list[str]:
    """Names of parameters and buffers that live on the meta device (no data)."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def check_not_meta(model: nn.Module, what: str = "`model`") -> None:
    meta = meta_parameters(model)
    if meta:
        raise ValueError(f"{what} has {len(meta)} tensor(s) on the meta device (no data), e.g. "
                         f"{meta[0]!r}; materialize it first (model.to_empty(device='cpu') and "
                         "load_state_dict)")


@contextlib.contextmanager
def layer_errors(model: nn.Module, step: str) -> Iterator[None]:
    """Inside, an error raised while a submodule runs becomes a ``LayerError`` naming it.

    Errors that already name a layer (``LayerError``) and the caller's own ``TypeError`` /
    ``ValueError`` raised outside any submodule pass through unchanged.
    """
    # (name, module, args, kwargs) of the submodules running now; described only on failure.
    stack: list[tuple[str, nn.Module, Any, Any]] = []

    def pre(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            stack.append((name, module, args, kwargs))
        return hook

    def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name or "<model>"),
                                                        with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    except LayerError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        if not stack:
            raise
        name, module, args, kwargs = stack[-1]
        inputs = describe(args) + (" " + describe(kwargs) if kwargs else "")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LayerError(f"{step}: layer {name!r} ({type(module).__name__}) rejected its "
                         f"input {inputs}: {type(err).__name__}: {first}", name) from err
    finally:
        for handle in handles:
            handle.remove()


class NonFiniteError(LayerError):
    """NaN or inf reached a quantizer."""


def check_finite(x: torch.Tensor, layer: str, role: str, what: str) -> None:
    """Raise ``NonFiniteError`` when ``x`` (the ``role`` tensor of ``layer``) holds NaN or inf."""
    if x.is_floating_point() and not all_finite(x):
        nans = int(torch.isnan(x).sum())
        infs = int(torch.isinf(x).sum())
        raise NonFiniteError(f"{what}: the {role} of layer {layer!r} holds NaN or Inf values "
                             f"({nans} NaN, {infs} Inf of {x.numel()}); clean the data, or "
                             "pass nonfinite='skip' to skip such batches with a warning", layer)
