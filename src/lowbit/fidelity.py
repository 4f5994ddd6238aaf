"""How close a quantized model computes to its float function.

The float function of a quantized model is the model with every layer's quantizers switched
off (BN folding and smoothing do not change it), so no float copy needs to be kept. Used by
calibration's smoothing check (``lowbit.calibrate``) and by the analysis tools
(``lowbit.analysis``): the first output tensor, quantizers off and on again, per-sample cosine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lowbit.nn import QuantLayer

SLOTS = ("weight_quant", "output_quant")  # and each input's (``QuantLayer.input_slots``)
MAX_COMPARED = 1 << 16  # output elements kept per sample for a cosine (a sample of them beyond)


def first_tensor(out: Any) -> torch.Tensor | None:
    """The output itself, or its first element (``ModelOutput``, tuple), a few levels deep."""
    for _ in range(8):
        if isinstance(out, torch.Tensor):
            return out
        try:
            out = out[0]
        except (TypeError, IndexError, KeyError):
            return None
    return None


def bypassed(layer: Any) -> dict[str, Any]:
    """Switch ``layer``'s quantizers off (its float function); returns them for ``restore``."""
    saved = {slot: getattr(layer, slot, None) for slot in (*SLOTS, *layer.input_slots())}
    for slot, q in saved.items():
        if q is not None:
            setattr(layer, slot, None)
    return saved


def restore(layer: Any, saved: dict[str, Any]) -> None:
    for slot, q in saved.items():
        if q is not None:
            setattr(layer, slot, q)


@contextmanager
def float_function(model: nn.Module) -> Iterator[nn.Module]:
    """Within: ``model`` computes its float function (every quantizer off)."""
    saved = [(m, bypassed(m)) for m in model.modules() if isinstance(m, QuantLayer)]
    try:
        yield model
    finally:
        for layer, slots in saved:
            restore(layer, slots)


class AttentionMasks:
    """Within: the ``attention_mask`` (batch, seq) of the model's latest forward, wherever it
    was passed: to the model itself by keyword, or by a wrapper that took positional tensors
    (``LastHidden(model)(ids, mask)``) to the Hugging Face model inside it. The first 2-D one
    a forward passes wins (inner modules may get 4-D extended masks)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionMasks:
        def start(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.mask = None  # a new forward of the model
            record(module, args, kwargs)

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("attention_mask")
            if self.mask is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self.mask = mask

        self._handles = [self.model.register_forward_pre_hook(start, with_kwargs=True)]
        self._handles += [m.register_forward_pre_hook(record, with_kwargs=True)
                          for m in self.model.modules() if m is not self.model]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def compared(y: torch.Tensor, mask: torch.Tensor | None = None,
             generator_seed: int = 0) -> torch.Tensor:
    """``y`` as (samples, elements) in float32 on the CPU, the positions of padding tokens
    zeroed (``mask``, when ``y`` is (batch, seq, ...): nothing reads them, and a cosine over
    them would judge outputs no one uses), at most ``MAX_COMPARED`` elements a sample (the
    same positions for every call with the same shape), so that references for a few batches
    of a large-vocabulary LM stay small."""
    y = y.detach().float()
    if mask is not None and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(mask.shape):
        y = y * (mask.to(y.device) != 0).reshape(*mask.shape, *[1] * (y.dim() - 2))
    flat = y.reshape(y.shape[0], -1) if y.dim() else y.view(1, 1)
    if flat.shape[1] > MAX_COMPARED:
        g = torch.Generator().manual_seed(generator_seed)
        keep = torch.randperm(flat.shape[1], generator=g)[:MAX_COMPARED].to(flat.device)
        flat = flat[:, keep]
    return flat.cpu()


def sample_cosines(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per sample (first dimension) of two (samples, elements) tensors."""
    return torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=1)
