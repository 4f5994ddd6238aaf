"""Pure tensor functions of uniform quantization, matching ONNX QuantizeLinear exactly.

Mapping: ``x ≈ scale * (q - zero_point)`` with integer ``q`` in ``[qmin, qmax]``.
``quantize`` divides (not multiplies by a reciprocal), rounds half to even and saturates, which
is what ONNX ``QuantizeLinear`` does, so codes computed here equal ONNX Runtime's bit for bit.

Worked example (uint8, affine, range [-1.0, 3.0]):
    scale = (3 - (-1)) / 255 = 0.015686..., zero_point = round(0 - (-1) / scale) = 64
    x = 0.5  ->  q = round(0.5 / 0.015686) + 64 = round(31.875) + 64 = 96
    dequantize(96) = (96 - 64) * 0.015686 = 0.50196
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest scale we emit: keeps a degenerate range (all zeros) from dividing by zero while
# staying a normal float32 that ONNX Runtime accepts.
MIN_SCALE = 1e-8


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``. One sum decides almost always (NaN and inf reach it); only a
    sum that overflows is checked element by element (40x faster than ``isfinite().all()``
    on a (32, 60, 1536) activation, and calibration checks every quantizer input)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


@dataclass(frozen=True)
class IntRange:
    """The integer grid of a quantizer: ``bits``, signedness and ``[qmin, qmax]``.

    ``odd`` grids hold the ``2**bits`` odd integers of ``[-(2**bits - 1), 2**bits - 1]``: the
    zero-free value sets of binary, DoReFa and SLB weights. 2 bits: codes {-3, -1, 1, 3}, which
    with scale 1/3 are the values {-1, -1/3, 1/3, 1}. Their zero point is 0 and they are always
    signed; ``step`` is 2 (1 for ordinary grids), so ``(code - qmin) / step`` packs into ``bits``.
    """

    bits: int
    signed: bool
    narrow: bool = False
    odd: bool = False

    @property
    def qmin(self) -> int:
        if self.odd:
            return -(2**self.bits - 1)
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)
        return 1 if self.narrow else 0

    @property
    def qmax(self) -> int:
        if self.odd:
            return 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def step(self) -> int:
        """Distance between neighbouring codes: 2 on odd grids, 1 otherwise."""
        return 2 if self.odd else 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """The 8-bit torch dtype that holds the codes (int8 or uint8)."""
        return torch.int8 if self.signed else torch.uint8


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, grid: IntRange, *, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that cover ``[lo, hi]`` (elementwise, any shape).

    The range is widened to contain 0 so that 0 is exact. Symmetric grids put the zero point at
    the middle: 0 for signed codes, ``2**(bits-1)`` for unsigned ones.
    """
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        # Signed codes centre on 0, unsigned ones on 2**(bits-1); either way +amax maps to
        # qmax, so int8 and "uint8 + 128" hold exactly the same grid.
        amax = torch.maximum(-lo, hi)
        mid = 0 if grid.signed else 2 ** (grid.bits - 1)
        scale = (amax / (grid.qmax - mid)).clamp_min(MIN_SCALE)
        zero_point = torch.full_like(scale, mid, dtype=torch.int32)
        return scale, zero_point
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp_min(MIN_SCALE)
    zero_point = torch.round(grid.qmin - lo / scale).clamp(grid.qmin, grid.qmax).to(torch.int32)
    return scale, zero_point


def broadcast_param(
    p: torch.Tensor, x: torch.Tensor, axis: int | None, group_size: int | None = None
) -> torch.Tensor:
    """Reshape a per-tensor / per-channel / per-group parameter so it broadcasts against ``x``.

    Per-channel ``p`` has shape ``(C,)`` for ``x.shape[axis] == C``. Per-group ``p`` has shape
    ``(x.shape[0], x.shape[axis] // group_size)`` (blocks along ``axis``, ONNX's ``block_size``).
    """
    if p.dim() == 0 or axis is None:
        return p
    axis = axis % x.dim()
    if group_size is not None:
        p = p.repeat_interleave(group_size, dim=1)  # (O, I)
        return p.reshape(p.shape + (1,) * (x.dim() - 2))
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity gradient backward."""
    return x + (torch.round(x) - x).detach()


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    grid: IntRange,
    axis: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Integer codes of ``x`` (as float tensor holding integers): ONNX QuantizeLinear."""
    s = broadcast_param(scale, x, axis, group_size)
    z = broadcast_param(zero_point, x, axis, group_size)
    return torch.clamp(torch.round(x / s) + z, grid.qmin, grid.qmax)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """``(q - zero_point) * scale``: ONNX DequantizeLinear."""
    s = broadcast_param(scale, q, axis, group_size)
    z = broadcast_param(zero_point, q, axis, group_size)
    return (q.float() - z.float()) * s


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    grid: IntRange,
    axis: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient inside the range.

    The forward value equals ONNX ``DequantizeLinear(QuantizeLinear(x))`` exactly; the gradient
    w.r.t. ``x`` is 1 where ``x`` maps inside ``[qmin, qmax]`` and 0 where it saturates.
    """
    s = broadcast_param(scale, x, axis, group_size)
    z = broadcast_param(zero_point, x, axis, group_size).float()
    q = torch.clamp(round_ste(x / s) + z, grid.qmin, grid.qmax)
    return (q - z) * s


def fused_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    grid: IntRange,
    axis: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """:func:`fake_quantize` for training: torch's fused kernels where they apply.

    ``torch.fake_quantize_per_{tensor,channel}_affine`` run forward and backward in one pass
    each (several times faster than the elementwise chain), with the same straight-through
    gradient. They multiply by ``1/scale`` instead of dividing, so a value exactly on a rounding
    tie may land one code away from ONNX's: fine for training, which is why eval and deploy use
    :func:`fake_quantize`. Per-group scales and odd grids take the exact path.
    """
    if group_size is not None or grid.odd or x.dtype != torch.float32:
        return fake_quantize(x, scale, zero_point, grid, axis, group_size)
    if scale.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(1), zero_point.reshape(1).to(torch.int32), grid.qmin, grid.qmax)
    return torch.fake_quantize_per_channel_affine(
        x, scale, zero_point.to(torch.int32), axis % x.dim() if axis is not None else 0,
        grid.qmin, grid.qmax)


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ONNX ``DynamicQuantizeLinear`` (uint8, per tensor).

    ``scale = (max(0, max x) - min(0, min x)) / 255``; ``zero_point = saturate(round(-min / scale))``.
    """
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = (hi - lo) / 255.0
    # ONNX leaves scale == 0 undefined; an all-zero tensor gets scale 1 (codes are all 0 anyway).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(-lo / scale).clamp(0, 255).to(torch.int32)
    return scale, zero_point


DYNAMIC_GRID = IntRange(8, signed=False)


def dynamic_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX ``DynamicQuantizeLinear``: uint8 codes (as float), scale and zero point of ``x``."""
    scale, zero_point = dynamic_qparams(x)
    return quantize(x, scale, zero_point, DYNAMIC_GRID), scale, zero_point


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``< 2**bits`` (bits in 1, 2, 4, 8) into a flat uint8 tensor.

    Codes are laid out little-end first inside each byte: with 4 bits, byte = c0 | c1 << 4.
    The flat code count is padded with zeros to a whole number of bytes.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"`bits` must be one of 1, 2, 4, 8 for packing, got {bits!r}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as an int64 tensor."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"`bits` must be one of 1, 2, 4, 8 for packing, got {bits!r}")
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    codes = (packed.to(torch.int64).reshape(-1, 1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel]
