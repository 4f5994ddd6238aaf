"""The numbers behind ``lowbit.analyze``: SQNR sums, a quantizer's range, a layer's size.

Pure helpers on tensors and quantizers, so that ``analyze.py`` only wires hooks and passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.numerics import broadcast_param
from lowbit.quantizers import QParams, Quantizer

SAMPLE_PER_CALL = 2048  # input values kept per layer call for the histogram
SAMPLE_CAP = 65536  # and per layer in all
HIST_BINS = 120


def sqnr_db(signal: float, noise: float) -> float:
    """``10·log10(Σ ref² / Σ (ref − test)²)`` from the two sums; ``inf`` where exact."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class ErrorSum:
    """Running ``Σ ref²`` and ``Σ (ref − test)²`` over every batch and call (float64)."""

    signal: float = 0.0
    noise: float = 0.0
    count: int = 0

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        ref64, test64 = ref.detach().double(), test.detach().double()
        self.signal += float(ref64.pow(2).sum())
        self.noise += float((ref64 - test64).pow(2).sum())
        self.count += 1

    def db(self) -> float | None:
        return sqnr_db(self.signal, self.noise) if self.count else None


def try_qparams(q: Quantizer | None) -> QParams | None:
    """The quantizer's frozen qparams, or None (dynamic, value sets without a scaled grid,
    not calibrated)."""
    if q is None or q.spec.dynamic:
        return None
    try:
        return q.qparams()
    except (NotImplementedError, ValueError, AttributeError):
        return None


def grid_bounds(qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The real interval a grid covers: ``scale·(qmin − zp)`` to ``scale·(qmax − zp)``."""
    zp = qp.zero_point.float()
    return qp.scale.float() * (qp.grid.qmin - zp), qp.scale.float() * (qp.grid.qmax - zp)


@dataclass
class InputStats:
    """One quantized input of a layer: SQNR sums, clipped share, a sample for the histogram."""

    error: ErrorSum = field(default_factory=ErrorSum)
    values: int = 0
    clipped: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0

    def add(self, x: torch.Tensor, q: Quantizer, generator: torch.Generator) -> None:
        x = x.detach().float()
        self.error.add(x, q(x))
        self.values += x.numel()
        qp = try_qparams(q)
        if qp is not None:
            # Saturated: further than half a step outside the grid, where the error grows
            # past rounding's (a value a hair above the top code is rounded, not clipped).
            lo, hi = grid_bounds(qp)
            half = qp.scale.float() / 2
            lo = broadcast_param(lo - half, x, qp.axis)
            hi = broadcast_param(hi + half, x, qp.axis)
            self.clipped += int(((x < lo) | (x > hi)).sum())
        if x.numel():
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
        if self.sampled < SAMPLE_CAP and x.numel():
            flat = x.reshape(-1)
            take = min(SAMPLE_PER_CALL, SAMPLE_CAP - self.sampled, flat.numel())
            idx = torch.randint(flat.numel(), (take,), generator=generator)
            self.sample.append(flat[idx.to(flat.device)].cpu())
            self.sampled += take

    def histogram(self, clip: tuple[float, float] | None) -> tuple[list[int], list[float]]:
        """Counts of the sampled values over a range that holds the observed extremes and the
        clip range, so values beyond the clip show up as bars past its marks."""
        values = torch.cat(self.sample) if self.sample else torch.zeros(0)
        lo, hi = self.lo, self.hi
        if clip is not None:
            lo, hi = min(lo, clip[0]), max(hi, clip[1])
        if not math.isfinite(lo) or not math.isfinite(hi):
            return [], []
        if hi <= lo:
            hi = lo + 1e-6
        counts = torch.histc(values, bins=HIST_BINS, min=lo, max=hi)
        edges = torch.linspace(lo, hi, HIST_BINS + 1)
        return [int(c) for c in counts.tolist()], [float(e) for e in edges.tolist()]


def per_channel_range(weight: torch.Tensor) -> tuple[list[float], list[float]]:
    """Min and max of each output channel (axis 0) of a weight."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    return rows.amin(dim=1).tolist(), rows.amax(dim=1).tolist()


def weight_size_bits(weight: torch.Tensor, bias: Any, q: Quantizer | None) -> tuple[int, int]:
    """``(quantized, float)`` size in bits: weight codes at their bit width plus 32-bit scales
    (and zero points at the code width where the grid is affine), bias at 32 bits (it is
    int32 on the integer path, float32 otherwise)."""
    bias_bits = 32 * bias.numel() if isinstance(bias, torch.Tensor) else 0
    float_bits = 32 * weight.numel() + bias_bits
    if q is None:
        return float_bits, float_bits
    bits = weight.numel() * q.spec.bits
    qp = try_qparams(q)
    if qp is not None:
        bits += 32 * qp.scale.numel()
        if not q.spec.symmetric:
            bits += q.spec.bits * qp.zero_point.numel()
    return bits + bias_bits, float_bits


def describe(q: Quantizer | None) -> str:
    """``"int8 per_channel"``, ``"uint8 dynamic"``, ``"uint4 per_group(128)"`` or ``"float"``."""
    if q is None:
        return "float"
    kind = "int" if q.grid.signed else "uint"
    if q.spec.dynamic:
        return f"{kind}{q.spec.bits} dynamic"
    gran: str = q.spec.granularity
    if gran == "per_group":
        gran = f"per_group({q.spec.group_size})"
    return f"{kind}{q.spec.bits} {gran}"
