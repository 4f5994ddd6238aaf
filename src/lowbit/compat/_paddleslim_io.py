"""PaddleSlim's ``InputSpec`` and the example inputs, dynamic axes and file names that
:mod:`lowbit.compat.paddleslim` hands to ``lowbit.export_onnx``."""

from __future__ import annotations

import inspect
import os
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit.export.report import ExportReport

DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float16", "float64", "bfloat16", "int8", "uint8", "int16", "int32", "int64",
    "bool")}


def check_type(name: str, value: Any, kind: type | tuple[type, ...]) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        allowed = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"`{name}` must be {allowed}, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class InputSpec:
    """``paddle.static.InputSpec``: a shape (``None`` or -1: a dynamic axis), a dtype, a name."""

    shape: Sequence[int | None]
    dtype: str | torch.dtype = "float32"
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.shape, (str, bytes)) or not isinstance(self.shape, (list, tuple)):
            raise TypeError(f"InputSpec `shape` must be a list of int or None, got "
                            f"{type(self.shape).__name__} {self.shape!r}")
        for dim in self.shape:
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)
                                    or dim < -1 or dim == 0):
                raise ValueError(f"InputSpec `shape` must hold positive ints, None or -1 "
                                 f"(dynamic), got {list(self.shape)}")
        object.__setattr__(self, "shape", tuple(None if d in (None, -1) else d
                                                for d in self.shape))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.name is not None:
            check_type("InputSpec.name", self.name, str)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[str(self.dtype)]


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.").removeprefix("paddle.")
    if name not in DTYPES:
        raise ValueError(f"InputSpec `dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


_SEEN: weakref.WeakKeyDictionary[nn.Module, list[InputSpec]] = weakref.WeakKeyDictionary()


def _record_inputs(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: remember the shapes of the last inputs (``input_spec=None`` uses them)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return
    if args and all(isinstance(a, torch.Tensor) for a in args):
        _SEEN[module] = [InputSpec([None, *a.shape[1:]] if a.dim() else [], a.dtype)
                         for a in args]


def watch_inputs(model: nn.Module) -> None:
    if _record_inputs not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_record_inputs)


def _as_spec(i: int, item: Any) -> InputSpec | torch.Tensor:
    if isinstance(item, (InputSpec, torch.Tensor)):
        return item
    if isinstance(item, (list, tuple)):
        return InputSpec(item)
    if hasattr(item, "shape"):  # an InputSpec-like object (e.g. paddle.static.InputSpec)
        return InputSpec(list(item.shape), getattr(item, "dtype", None) or "float32",
                         getattr(item, "name", None))
    raise TypeError(f"`input_spec[{i}]` must be an InputSpec, a Tensor or a shape list, got "
                    f"{type(item).__name__} {item!r}")


def _specs(model: nn.Module, input_spec: Any) -> list[InputSpec | torch.Tensor]:
    if input_spec is None:
        if model not in _SEEN:
            raise ValueError("`input_spec` is None, so the saved model takes the inputs of the "
                             "model's last forward call, but it has not run since quantize; "
                             "pass input_spec=[InputSpec([None, C, H, W])] or run it once")
        return list(_SEEN[model])
    if isinstance(input_spec, (InputSpec, torch.Tensor)) or not isinstance(input_spec,
                                                                           (list, tuple)):
        raise TypeError(f"`input_spec` must be a list of InputSpec, Tensor or shape lists, got "
                        f"{type(input_spec).__name__}; wrap one input in a list: [spec]")
    if input_spec and all(d is None or isinstance(d, int) for d in input_spec):
        raise TypeError(f"`input_spec` must be a list with one entry per input, got the flat "
                        f"shape {list(input_spec)}; write [{list(input_spec)}]")
    return [_as_spec(i, item) for i, item in enumerate(input_spec)]


def example_inputs(model: nn.Module, input_spec: Any) -> tuple[tuple[Any, ...], Any, Any]:
    """Example inputs, ``dynamic_shapes`` (``None`` dims → ``torch.export.Dim``) and names."""
    specs = _specs(model, input_spec)
    seen = _SEEN.get(model, [])
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    inputs: list[torch.Tensor] = []
    dynamic: list[dict[int, Any] | None] = []
    names: list[str] = []
    for k, spec in enumerate(specs):
        default = params[k].name if k < len(params) else f"input_{k}"
        if isinstance(spec, torch.Tensor):
            inputs.append(spec)
            dynamic.append(None)
            names.append(default)
            continue
        last = seen[k].shape if k < len(seen) and len(seen[k].shape) == len(spec.shape) else ()
        shape = [d if d is not None else max(2, int(last[i] or 2) if last else 2)
                 for i, d in enumerate(spec.shape)]
        make = torch.randn if spec.torch_dtype.is_floating_point else torch.zeros
        inputs.append(make(shape, dtype=spec.torch_dtype))
        label = re.sub(r"\W", "_", spec.name or default)
        dims = {i: torch.export.Dim(f"{label}_dim{i}") for i, d in enumerate(spec.shape)
                if d is None}
        dynamic.append(dims or None)
        names.append(spec.name or default)
    named = any(isinstance(s, InputSpec) and s.name for s in specs)
    return (tuple(inputs), tuple(dynamic) if any(dynamic) else None, names if named else None)


def onnx_path(path: Any) -> Path:
    """Paddle's path prefix ``dir/name`` → ``dir/name.onnx``."""
    check_type("path", path, (str, os.PathLike))
    out = Path(path)
    return out if out.suffix == ".onnx" else out.with_name(out.name + ".onnx")


def save_onnx(deploy: nn.Module, path: Path, inputs: Any, dynamic: Any, names: Any) -> ExportReport:
    path.parent.mkdir(parents=True, exist_ok=True)  # as Paddle's save creates its folders
    return lowbit.export_onnx(deploy, path, inputs, dynamic_shapes=dynamic, input_names=names)
