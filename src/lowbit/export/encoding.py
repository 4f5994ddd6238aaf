"""How 8-bit weight codes are stored in the file: int8, or uint8 with the zero point moved by 128.

Both hold the same grid (``u = s + 128``), so the model computes the same values; what differs
is which ONNX Runtime kernel runs. With uint8 activations, int8 weights select the u8s8 kernels,
which on x86 CPUs without VNNI use ``vpmaddubsw``: it adds pairs of u8·s8 products in int16
and saturates, so results are wrong wherever ``|w1| + |w2| > 128`` meets large activation codes
(measured on the digits CNN: 26% of activation codes differ). uint8 weights select the u8u8
kernels, exact on every CPU. ``"auto"`` picks int8 where the export machine has VNNI (or is not
x86) and uint8 otherwise; weights narrower than 8 bits cannot saturate and stay int8.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lowbit.deploy import DynamicLinear, IntWeight
from lowbit.numerics import IntRange

WeightDtype = Literal["auto", "int8", "uint8"]
WEIGHT_DTYPES = ("auto", "int8", "uint8")


def cpu_has_vnni() -> bool | None:
    """True/False on x86 Linux (from /proc/cpuinfo flags); None where unknown or not x86."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def resolve_weight_dtype(choice: str) -> tuple[str, str]:
    """The storage dtype for 8-bit weights and the reason, for the report."""
    if choice not in WEIGHT_DTYPES:
        raise ValueError(f"`weight_dtype` must be one of {list(WEIGHT_DTYPES)}, got {choice!r}")
    if choice != "auto":
        return choice, "as requested"
    vnni = cpu_has_vnni()
    if vnni is None:
        x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
        if x86:
            return "uint8", "auto: x86 CPU whose VNNI support is unknown (u8u8 is exact)"
        return "int8", f"auto: {platform.machine()} CPU (no u8s8 saturation)"
    if vnni:
        return "int8", "auto: x86 CPU with VNNI (exact u8s8 kernels)"
    return "uint8", "auto: x86 CPU without VNNI, where u8s8 kernels saturate"


def _saturation_prone(grid: IntRange) -> bool:
    # vpmaddubsw overflows int16 when 255·(|w1| + |w2|) > 32767: codes beyond ±64 can.
    return grid.signed and max(-grid.qmin, grid.qmax) > 64


def _shift(codes: torch.Tensor) -> torch.Tensor:
    return (codes.to(torch.int16) + 128).to(torch.uint8)


def _unsigned(grid: IntRange) -> IntRange:
    # An odd grid shifted by 128 is no longer odd-centred: describe it as plain uint8 codes.
    return IntRange(8, signed=False, narrow=grid.narrow and not grid.odd)


def with_unsigned_weights(model: nn.Module) -> nn.Module:
    """A copy of a deploy model whose 8-bit signed weight codes are stored as uint8."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, IntWeight) and _saturation_prone(m.grid):
            m.codes, m.zero_point = _shift(m.codes), _shift(m.zero_point)
            m.grid = _unsigned(m.grid)
        elif isinstance(m, DynamicLinear) and _saturation_prone(m.grid):
            m.weight_t, m.weight_zero_point = _shift(m.weight_t), _shift(m.weight_zero_point)
            m.grid = _unsigned(m.grid)
    return model
