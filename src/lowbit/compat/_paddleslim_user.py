"""The adapter that runs PaddleSlim's user classes (``weight_quantize``, ``act_quantize``,
``weight_preprocess``, ``act_preprocess``) inside lowbit, for :mod:`lowbit.compat.paddleslim`.

Each class is built with ``cls()`` per layer, as PaddleSlim does. A quantize class maps a float
tensor to its fake-quantized value: enough to train. To convert and export it must also define
``qparams() -> lowbit.QParams``; a weight quantizer may define ``quantize_weight(weight) ->
(codes, QParams)``. A weight preprocess is applied to the weight before its codes are taken; an
activation preprocess is dropped at export (as PaddleSlim drops it at save), which is exact where
it is a clip inside the quantizer's range.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

import lowbit
from lowbit.config import QuantSpec
from lowbit.quantizers import QParams, Quantizer
from lowbit.registry import QUANTIZERS


class UserQuantizer(Quantizer):
    """Adapter, not an algorithm: a user's preprocess and/or quantize module inside lowbit.

    ``forward``: ``preprocess`` (if any), then the user's quantize module or, without one,
    lowbit's ``ste`` quantizer with this spec (``inner``). ``adapter`` makes one registered
    subclass per combination of user classes.
    """

    preprocess_cls: ClassVar[type[nn.Module] | None] = None
    quantize_cls: ClassVar[type[nn.Module] | None] = None
    argument: ClassVar[str] = "act_quantize"

    def __init__(self, spec: QuantSpec, *, role: Any, axis: int | None) -> None:
        super().__init__(spec, role=role, axis=axis)
        self.pre = None if self.preprocess_cls is None else self.preprocess_cls()
        self.user = None if self.quantize_cls is None else self.quantize_cls()
        self.inner = None if self.user is not None else \
            QUANTIZERS.get("ste")(spec.replace(method="ste"), role=role, axis=axis)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        inner = self.__dict__.get("_modules", {}).get("inner")
        if name == "layer_name" and inner is not None:
            inner.layer_name = value  # errors of the inner quantizer name the layer

    @property
    def exportable(self) -> bool:
        return self.user is None or hasattr(self.user, "qparams")

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pre is None else self.pre(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._pre(x)
        if self.observing:  # calibration: record, pass through
            if self.inner is not None:
                self.inner.observe(y)
            return x
        return self.inner(y) if self.inner is not None else self.user(y)  # type: ignore[misc]

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.observe(self._pre(x))

    def set_weight_shape(self, shape: torch.Size) -> None:
        if self.inner is not None:
            self.inner.set_weight_shape(shape)

    def freeze(self) -> None:
        if self.inner is not None:
            self.inner.freeze()

    def reset_statistics(self) -> None:
        if self.inner is not None:
            self.inner.reset_statistics()

    def is_ready(self) -> bool:
        if self.inner is not None:
            return self.inner.is_ready()
        ready = getattr(self.user, "is_ready", None)
        return self.exportable and (ready is None or bool(ready()))

    def qparams(self) -> QParams:
        if self.inner is not None:
            return self.inner.qparams()
        if not self.exportable:
            raise NotImplementedError(
                f"layer {self.layer_name!r}: the {self.argument} class "
                f"{type(self.user).__name__} defines no qparams(), so it can train but lowbit "
                "cannot convert or export it; add `def qparams(self) -> lowbit.QParams` "
                "(its frozen scale, zero point and grid)")
        qp = self.user.qparams()  # type: ignore[union-attr,operator]
        if not isinstance(qp, QParams):
            raise TypeError(f"layer {self.layer_name!r}: {type(self.user).__name__}.qparams() "
                            f"must return a lowbit.QParams, got {type(qp).__name__}")
        return qp

    @torch.no_grad()
    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        w = self._pre(weight)  # a weight preprocess is part of the weight that is stored
        if self.inner is not None:
            return self.inner.quantize_weight(w)
        own = getattr(self.user, "quantize_weight", None)
        return own(w) if own is not None else super().quantize_weight(w)

    def extra_repr(self) -> str:
        parts = [f"preprocess={type(self.pre).__name__}" if self.pre is not None else "",
                 f"quantize={type(self.user).__name__}" if self.user is not None else ""]
        return ", ".join(p for p in parts if p)


_ADAPTERS: dict[tuple[Any, ...], str] = {}


def adapter(role: str, pre: type[nn.Module] | None, quant: type[nn.Module] | None) -> str:
    """The registered method name of the adapter for these user classes (made once)."""
    key = (role, pre, quant)
    if key not in _ADAPTERS:
        label = "+".join(c.__name__ for c in (pre, quant) if c is not None)
        name = f"paddleslim:{role}:{label}:{len(_ADAPTERS)}"
        argument = ("weight_quantize" if role == "weight" else "act_quantize")
        cls = type(f"PaddleSlimUser_{label.replace('+', '_')}", (UserQuantizer,),
                   {"preprocess_cls": pre, "quantize_cls": quant, "roles": (role,),
                    "supported_bits": tuple(range(2, 9)), "argument": argument})
        lowbit.register_quantizer(name)(cls)
        _ADAPTERS[key] = name
    return _ADAPTERS[key]


def warn_dropped_preprocess(model: nn.Module) -> None:
    dropped = sorted({q.layer_name for q in model.modules() if isinstance(q, UserQuantizer)
                      and q.role != "weight" and q.pre is not None})
    if dropped:
        warnings.warn(f"act_preprocess is not part of the saved model (PaddleSlim removes "
                      f"preprocess layers at save) for layers {dropped}; the export matches "
                      "the trained model where the preprocess is a clip inside the "
                      "quantizer's range", stacklevel=4)


def check_class(name: str, cls: Any) -> None:
    if cls is None:
        return
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module subclass (a class: PaddleSlim "
                        f"builds one per layer with {name}()), got {type(cls).__name__} {cls!r}")


def instantiate(name: str, cls: type[nn.Module] | None) -> None:
    if cls is None:
        return
    try:
        cls()
    except TypeError as err:
        raise TypeError(f"`{name}` class {cls.__name__} must be constructible with no "
                        f"arguments (PaddleSlim calls {cls.__name__}()): {err}") from None
