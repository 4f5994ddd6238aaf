"""``lowbit.analyze``: where a calibrated quantized model loses accuracy, layer by layer.

Two forward passes per batch, with a forward hook on every quant layer:

1. *float pass*: every layer's quantizers bypassed, which is the float model (BN folding and
   smoothing do not change the function). Each hook gets the layer's float input and output,
   runs the layer once more on that input with its own quantizers on (its output with only
   this layer quantized: ``sqnr_isolated``) and puts the input through the input quantizer
   (activation SQNR, clipped share, a sample for the histogram);
2. *quantized pass*: every quantizer on, as deployed; each hook compares the layer's output
   with the float output kept from pass 1 (``sqnr_cumulative``: everything up to it
   quantized).

This gives the same numbers as building one model per layer with only that layer quantized
(``tests/test_analysis.py`` checks it against that slow reference) at the cost of about three
forward passes. Weight figures need no data: they come from the weights.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.analysis.report import AnalysisReport, LayerAnalysis
from lowbit.analysis.stats import (
    ErrorSum,
    InputStats,
    describe,
    grid_bounds,
    per_channel_range,
    try_qparams,
    weight_size_bits,
)
from lowbit.calibrate import _eval_state, default_forward
from lowbit.fidelity import bypassed, first_tensor, restore
from lowbit.nn import QuantLayer
from lowbit.quantizers import Quantizer
from lowbit.quantizers.uniform import reusing_weights

Forward = Callable[[nn.Module, Any], Any]


class RoundedWeightsWarning(UserWarning):
    """``analyze`` got layers whose float weights calibration replaced by their rounded value."""


@dataclass
class _Track:
    """What the hooks collect for one layer."""

    layer: Any
    order: int | None = None
    calls: int = 0
    isolated: ErrorSum = field(default_factory=ErrorSum)
    cumulative: ErrorSum = field(default_factory=ErrorSum)
    inputs: list[InputStats] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)  # float outputs of this batch


def quant_layers(model: nn.Module) -> dict[str, Any]:
    """The quant layers of a model by their layer name, in module order."""
    return {str(m.layer_name): m for m in model.modules() if isinstance(m, QuantLayer)}


def check_calibrated(model: nn.Module) -> None:
    """A clear error for a model that was never quantized or never calibrated; a warning naming
    the layers that calibration never reached."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`qm` must be a torch.nn.Module, got {type(model).__name__}")
    if not quant_layers(model):
        raise ValueError("`qm` has no lowbit quant layers; pass lowbit.quantize(model, config) "
                         "after lowbit.calibrate")
    static = [q for q in model.modules() if isinstance(q, Quantizer) and q.role != "weight"
              and not q.spec.dynamic]
    unready = sorted({q.layer_name for q in static if not q.is_ready()})
    if static and len(unready) == len({q.layer_name for q in static}):
        raise ValueError("`qm` was never calibrated: its activation quantizers have no ranges; "
                         "run lowbit.calibrate(qm, batches) first")
    if unready:
        warnings.warn(f"analysis: these layers have no activation range (calibration never "
                      f"reached them), so their inputs pass unquantized: {unready}", stacklevel=3)


def _input_pairs(layer: Any, args: tuple[Any, ...]) -> list[tuple[Quantizer, torch.Tensor]]:
    """(quantizer, the tensor it quantizes) for each quantized input of ``layer``."""
    pairs: list[tuple[Quantizer, torch.Tensor]] = []
    for pos, (slot, x) in enumerate(zip(layer.input_slots(), args)):
        q = getattr(layer, slot)
        if q is not None and isinstance(x, torch.Tensor):
            pairs.append((q, layer._smooth(x) if pos == 0 else x))
    return pairs


def analyze(
    qm: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    *,
    max_batches: int | None = None,
    seed: int = 0,
) -> AnalysisReport:
    """Per-layer SQNR, ranges and clipping of a quantized, calibrated model.

    ``batches`` are passed as ``forward(qm, batch)`` (default: a tensor is the input, a
    tuple/list positional inputs, a dict keyword inputs), at most ``max_batches`` of them;
    ``seed`` fixes the sample of input values behind each histogram. The model is left as it
    was (flags and quantizers restored, even on error). Print the result for a table,
    ``.to_html(path)`` / ``.to_json(path)`` to keep it.
    """
    check_calibrated(qm)
    if forward is None:
        forward = default_forward
    elif not callable(forward):
        raise TypeError(f"`forward` must be callable, got {type(forward).__name__}")
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"`batches` must be an iterable of batches, got {type(batches).__name__}"
                        + ("; wrap a single tensor in a list: [x]"
                           if isinstance(batches, torch.Tensor) else ""))
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(
            max_batches, int) or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive int or None, got {max_batches!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}")

    start = time.perf_counter()
    layers = quant_layers(qm)
    rounded = [name for name, layer in layers.items()
               if bool(getattr(getattr(layer, "weight_quant", None), "pinned", False))]
    if rounded:
        warnings.warn(
            f"{len(rounded)} layer(s) hold weights that calibration already put on their grid "
            f"(GPTQ, AWQ, AdaRound or tune_scales): {', '.join(rounded[:4])}"
            f"{' ...' if len(rounded) > 4 else ''}; the float pass runs those weights, so their "
            "SQNR leaves weight rounding out. To rank layers, analyze a copy quantized with "
            "round-to-nearest weights (algorithm='rtn'), as autoquant does",
            RoundedWeightsWarning, stacklevel=2)
    tracks = {name: _Track(layer) for name, layer in layers.items()}
    generator = torch.Generator().manual_seed(seed)
    # Each layer's quantizers, kept while the float pass bypasses them (filled below, inside
    # eval mode, so that the quantizers are switched to eval with the model).
    saved: dict[str, dict[str, Any]] = {}
    phase = {"float": True, "order": 0}
    model_out = _Track(qm)  # the model's output: ``pending`` holds the float one

    def layer_hook(name: str) -> Callable[..., None]:
        track = tracks[name]

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            if not phase["float"]:
                if track.pending:
                    ref = track.pending.pop(0)
                    if ref.shape == out.shape:
                        track.cumulative.add(ref, out)
                return
            if track.order is None:
                track.order = phase["order"]
                phase["order"] += 1
            track.calls += 1
            track.pending.append(out.detach())
            restore(module, saved[name])  # this layer alone quantized, on the float input
            try:
                track.isolated.add(out, module.forward(*args, **kwargs))
                for i, (q, x) in enumerate(_input_pairs(module, args)):
                    if len(track.inputs) <= i:
                        track.inputs.append(InputStats())
                    track.inputs[i].add(x, q, generator)
            finally:
                bypassed(module)

        return hook

    def model_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        y = first_tensor(out)
        if y is None:
            return
        if phase["float"]:
            model_out.pending = [y.detach()]
        elif model_out.pending and model_out.pending[0].shape == y.shape:
            model_out.cumulative.add(model_out.pending.pop(), y)

    handles = [layer.register_forward_hook(layer_hook(name), with_kwargs=True)
               for name, layer in layers.items()]
    handles.append(qm.register_forward_hook(model_hook))
    count = 0
    try:
        with _eval_state(qm), reusing_weights(qm):  # weights are fixed: fake each once
            saved.update({name: bypassed(layer) for name, layer in layers.items()})
            for batch in batches:
                for layer in layers.values():
                    bypassed(layer)
                phase["float"] = True
                forward(qm, batch)
                for name, layer in layers.items():
                    restore(layer, saved[name])
                phase["float"] = False
                forward(qm, batch)
                for track in tracks.values():
                    track.pending.clear()
                count += 1
                if max_batches is not None and count >= max_batches:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for name, saved_slots in saved.items():
            restore(layers[name], saved_slots)
    if count == 0:
        raise ValueError("`batches` is empty: the analysis needs at least one batch")

    rows = [_row(name, track) for name, track in tracks.items()]
    unseen = [r.name for r in rows if r.order is None]
    if unseen:
        warnings.warn(f"analysis: these layers never ran on the batches, so they have no "
                      f"SQNR: {unseen}", stacklevel=2)
    rows.sort(key=lambda r: (r.order is None, r.order if r.order is not None else 0))
    return AnalysisReport(layers=rows, output_sqnr=model_out.cumulative.db(), batches=count,
                          seconds=time.perf_counter() - start)


def _row(name: str, track: _Track) -> LayerAnalysis:
    layer = track.layer
    w_q: Quantizer | None = layer.weight_quant
    weight = getattr(layer, "weight", None)
    in_q: Quantizer | None = layer.input_quant
    row = LayerAnalysis(
        name=name, type=type(layer).float_type.__name__, order=track.order,
        weight=describe(w_q) if isinstance(weight, torch.Tensor) else "-",
        input=describe(in_q) if not isinstance(layer, nn.Embedding) else "-",
        sqnr_isolated=track.isolated.db(), sqnr_cumulative=track.cumulative.db(),
        calls=track.calls)
    if isinstance(weight, torch.Tensor):
        with torch.no_grad():
            w = layer.folded_weight_and_bias()[0] if layer.bn is not None else weight
            w = w.detach()
            row.size_bits, row.float_bits = weight_size_bits(w, getattr(layer, "bias", None), w_q)
            row.weight_channel_min, row.weight_channel_max = per_channel_range(w)
            if w_q is not None:
                was = w_q.training
                w_q.eval()
                try:
                    wq = w_q(w)
                finally:
                    w_q.train(was)
                err = ErrorSum()
                err.add(w, wq)
                row.weight_sqnr = err.db()
                qp = try_qparams(w_q)
                if qp is not None and qp.group_size is None:
                    lo, hi = grid_bounds(qp)
                    n = w.shape[0]
                    row.weight_clip_lo = lo.expand(n).tolist() if lo.dim() == 0 else lo.tolist()
                    row.weight_clip_hi = hi.expand(n).tolist() if hi.dim() == 0 else hi.tolist()
    if track.inputs:
        first = track.inputs[0]
        total = ErrorSum()
        for stats in track.inputs:
            total.signal += stats.error.signal
            total.noise += stats.error.noise
            total.count += stats.error.count
        row.input_sqnr = total.db()
        values = sum(s.values for s in track.inputs)
        row.clipped = sum(s.clipped for s in track.inputs) / values if values else None
        qp = try_qparams(in_q)
        if qp is not None:
            lo, hi = grid_bounds(qp)
            row.input_clip = (float(lo.min()), float(hi.max()))  # per channel: the outer bounds
        row.input_min, row.input_max = first.lo, first.hi
        row.hist_counts, row.hist_edges = first.histogram(row.input_clip)
    return row
