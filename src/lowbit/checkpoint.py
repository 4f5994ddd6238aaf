"""Checkpoints that know what they are: lowbit metadata in a quantized model's state dict.

``quantize``/``prepare_qat`` attach two hooks to the model they return (``convert`` copies
them to the deploy model): ``state_dict()`` gains one entry, ``lowbit_checkpoint``, a uint8
tensor holding JSON (a tensor, so ``torch.load(weights_only=True)`` and safetensors both keep
it) with the format version, the lowbit version that saved it and, per quantizer or deploy
quantization module, its method, bits, signedness and granularity. ``load_state_dict``
compares it with the model's own and raises ``CheckpointMismatchError`` (a ``ValueError``)
naming the first differing layer and both values (and the lowbit version that saved it, where
that is another), before any tensor is copied: a ``w4a4-lsq`` checkpoint no longer loads silently
into a ``w8a8-qat`` model, nor a per-channel one into a per-tensor model.

Checkpoints without the entry (saved before it existed, or with it removed by
``strip_metadata``) load as before. With ``strict=False``, quantizers present on one side
only are not compared (partial loads stay possible); quantizers present on both sides must
still agree, since loading across formats changes the model's outputs without a word.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

KEY = "lowbit_checkpoint"
FORMAT = "lowbit.checkpoint"
VERSION = 1
FIELDS = ("method", "bits", "signed", "granularity")
_ATTACHED = "_lowbit_checkpoint_hooks"


class CheckpointMismatchError(ValueError):
    """A checkpoint saved from a differently quantized model."""


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {method, bits, signed, granularity}}`` of every quantizer (fake-quant
    models) and every quantization module with a grid (deploy models), in model order."""
    from lowbit.quantizers import Quantizer

    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            spec = module.spec
            out[name] = {"method": spec.method, "bits": spec.bits,
                         "signed": bool(module.grid.signed), "granularity": spec.granularity}
        elif hasattr(module, "grid") and callable(getattr(module, "qparams", None)):
            qp = module.qparams()
            out[name] = {"method": f"deploy:{type(module).__name__}", "bits": qp.grid.bits,
                         "signed": bool(qp.grid.signed), "granularity": qp.granularity}
    return out


def metadata_tensor(model: nn.Module) -> torch.Tensor:
    from lowbit import __version__

    data = {"format": FORMAT, "version": VERSION, "lowbit": __version__,
            "quantizers": describe(model)}
    return torch.frombuffer(bytearray(json.dumps(data).encode()), dtype=torch.uint8)


def read_metadata(value: Any, where: str) -> tuple[dict[str, Any], str | None]:
    """Parse a ``lowbit_checkpoint`` entry into its quantizers and the lowbit version that saved
    it (None before versions were recorded); raise ``CheckpointMismatchError`` if unusable."""
    try:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            raise TypeError("not a uint8 tensor")
        data = json.loads(bytes(value.cpu().numpy().tobytes()).decode())
    except (TypeError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointMismatchError(f"checkpoint entry {where!r} is not lowbit metadata "
                                      f"({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointMismatchError(f"checkpoint entry {where!r} is not lowbit metadata")
    if data.get("version") != VERSION:
        raise CheckpointMismatchError(
            f"checkpoint entry {where!r} has lowbit checkpoint format version "
            f"{data.get('version')!r}; this lowbit reads version {VERSION}: upgrade lowbit")
    quantizers = data.get("quantizers")
    if not isinstance(quantizers, dict):
        raise CheckpointMismatchError(f"checkpoint entry {where!r} lists no quantizers")
    saved_by = data.get("lowbit")
    return quantizers, saved_by if isinstance(saved_by, str) else None


def _fmt(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k}={entry.get(k)!r}" for k in FIELDS)


def _where(prefix: str, name: str) -> str:
    full = prefix + name
    layer, _, part = full.rpartition(".")
    return f"layer {layer!r} ({part})" if layer else f"{full!r}"


def _version_hint(saved_by: str | None) -> str:
    """A hint for a mismatch when another lowbit version saved the checkpoint: where a model's
    quantizers sit can change between versions (see docs/design.md)."""
    from lowbit import __version__

    if saved_by == __version__:
        return ""
    who = f"lowbit {saved_by}" if saved_by else "a lowbit older than 0.9.0"
    return (f" (the checkpoint was saved by {who}, this is lowbit {__version__}: quantizer "
            "placement may differ between versions; quantize and load with the version that "
            "saved it, or re-run calibration here)")


def compare(saved: dict[str, Any], mine: dict[str, dict[str, Any]], *, strict: bool,
            prefix: str = "", saved_by: str | None = None) -> None:
    """Raise ``CheckpointMismatchError`` at the first quantizer (model order) that differs;
    ``saved_by`` (the lowbit version that saved it) adds a hint where it is not this one."""
    hint = _version_hint(saved_by)
    for name, entry in mine.items():
        theirs = saved.get(name)
        if theirs is None:
            if strict:
                raise CheckpointMismatchError(
                    f"checkpoint does not fit this model: {_where(prefix, name)} is quantized "
                    f"here ({_fmt(entry)}) but not in the checkpoint; load it into a model "
                    "quantized with the config it was saved from" + hint)
            continue
        if not isinstance(theirs, dict):
            raise CheckpointMismatchError(f"checkpoint metadata for {name!r} is malformed")
        for field in FIELDS:
            if theirs.get(field) != entry[field]:
                raise CheckpointMismatchError(
                    f"checkpoint does not fit this model: {_where(prefix, name)} was saved "
                    f"with {field}={theirs.get(field)!r}, this model has {field}="
                    f"{entry[field]!r} (saved: {_fmt(theirs)}; here: {_fmt(entry)}); load it "
                    "into a model quantized with the config it was saved from, or drop the "
                    f"{KEY!r} entry (lowbit.checkpoint.strip_metadata) to load it anyway{hint}")
    if strict:
        extra = [n for n in saved if n not in mine]
        if extra:
            raise CheckpointMismatchError(
                f"checkpoint does not fit this model: {_where(prefix, extra[0])} is quantized "
                f"in the checkpoint ({_fmt(saved[extra[0]])}) but not here{hint}")


def _save_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str,
               local_metadata: Any) -> None:
    state_dict[prefix + KEY] = metadata_tensor(module)


def _load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
               strict: bool, missing_keys: list[str], unexpected_keys: list[str],
               error_msgs: list[str]) -> None:
    if prefix + KEY not in state_dict:
        return  # saved before lowbit wrote metadata: load as before
    saved, saved_by = read_metadata(state_dict.pop(prefix + KEY), prefix + KEY)
    compare(saved, describe(module), strict=strict, prefix=prefix, saved_by=saved_by)


def attach_metadata(model: nn.Module) -> None:
    """Make ``model``'s state dict carry lowbit metadata and its loads check it (once)."""
    if getattr(model, _ATTACHED, False):
        return
    model.register_state_dict_post_hook(_save_hook)
    model.register_load_state_dict_pre_hook(_load_hook)
    setattr(model, _ATTACHED, True)


def strip_metadata(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` without lowbit metadata entries (to load across formats on
    purpose)."""
    return {k: v for k, v in state_dict.items() if k != KEY and not k.endswith("." + KEY)}
