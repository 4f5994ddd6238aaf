"""Calibration that changes weights: SmoothQuant, then GPTQ / AWQ (docs/algorithms.md §8, §10,
§11).

Runs inside ``lowbit.calibrate`` before activation ranges are taken, for the layers whose
specs ask for it (``QuantSpec.smoothing`` on an input, ``QuantSpec.algorithm`` on a weight):

1. one pass over the batches records what each of those Linear layers reads (per-channel
   max|x| and mean|x|, the GPTQ Hessian, a sample of rows for AWQ) and which layers read the
   same tensor (q, k and v of one attention);
2. SmoothQuant divides each shared input by ``s = max|X|^α / max|W|^(1-α)`` and multiplies the
   weights' input columns by ``s`` (``QuantLayer.smooth_input``: one Mul per layer in the
   exported graph, so it is right whatever else reads the tensor; in a post-LayerNorm
   transformer such as BERT the LayerNorm output is also the residual, so folding ``1/s`` into
   the LayerNorm would change the model);
3. weight algorithms from ``WEIGHT_ALGORITHMS`` run per group of layers sharing an input:
   ``awq`` searches scales (applied the same way) and per-group clipping, ``gptq`` rounds
   column by column. Both pin the weight's qparams (``UniformQuantizer.pin_qparams``).

Statistics are of the raw input; a layer already smoothed sees them through its factor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit import distributed
from lowbit.algorithms import awq, gptq
from lowbit.algorithms.base import Group
from lowbit.fidelity import AttentionMasks
from lowbit.nn import QuantLayer
from lowbit.registry import WEIGHT_ALGORITHMS

AWQ_ROWS = 4096  # input rows kept per layer for AWQ's searches
AWQ_ROWS_PER_BATCH = 512
INPUT_SAMPLES = 1024  # whole inputs (dim 0 entries) kept per layer for AdaRound


@dataclass
class InputStats:
    """What one layer read during the statistics pass (raw inputs, rows of ``in_features``)."""

    absmax: torch.Tensor | None = None
    mean_abs: torch.Tensor | None = None
    rows_seen: int = 0
    hessian: torch.Tensor | None = None
    hessian_rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)  # whole inputs, any layer type

    def update(self, x: torch.Tensor, needs: set[str], generator: torch.Generator,
               token_mask: torch.Tensor | None = None) -> None:
        """Fold one input in; ``token_mask`` (batch, seq) drops the rows of padding tokens
        from the weight algorithms' statistics (whole inputs are kept as they are). The channel
        maximum SmoothQuant divides by keeps every row: the input quantizer's range sees the
        padding rows too, and a padding outlier left unsmoothed widens that range for every
        real token (MiniLM ``w8a8-transformer``: mean cosine 0.9976 with all rows, 0.9899
        with real tokens only)."""
        if "inputs" in needs:
            kept = sum(len(t) for t in self.inputs)
            if kept < INPUT_SAMPLES:
                self.inputs.append(x.detach()[:INPUT_SAMPLES - kept])
            if needs == {"inputs"}:
                return
        if "absmax" in needs:
            m = x.detach().reshape(-1, x.shape[-1]).float().abs().amax(dim=0)
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        rows = real_token_rows(x, token_mask)
        if "mean_abs" in needs:
            self.mean_abs, self.rows_seen = awq.activation_mean_abs(self.mean_abs, rows,
                                                                    self.rows_seen)
        if "hessian" in needs:
            self.hessian, self.hessian_rows = gptq.hessian_update(self.hessian, rows,
                                                                  self.hessian_rows)
        if "sample" in needs and sum(len(s) for s in self.sample) < AWQ_ROWS:
            pick = torch.randperm(rows.shape[0], generator=generator)[:AWQ_ROWS_PER_BATCH]
            self.sample.append(rows[pick.to(rows.device)])

    def reduce_over_ranks(self, group: Any) -> None:
        """Fold every rank's statistics in, so all ranks apply the same algorithm to the same
        numbers: maxima and row-weighted means are exact; AWQ's row sample and AdaRound's
        inputs take an equal share from each rank, in rank order."""
        ranks = distributed.world_size(group)
        if self.absmax is not None:
            self.absmax = distributed.reduce_max(self.absmax, group)
        if self.mean_abs is not None:
            self.mean_abs, self.rows_seen = _weighted_mean(self.mean_abs, self.rows_seen, group)
        if self.hessian is not None:
            self.hessian, self.hessian_rows = _weighted_mean(self.hessian, self.hessian_rows,
                                                             group)
        if self.sample:
            share = -(-AWQ_ROWS // ranks)
            parts = distributed.gather(torch.cat(self.sample)[:share], group)
            self.sample = [torch.cat(parts)]
        if self.inputs:
            share = -(-INPUT_SAMPLES // ranks)
            mine = _first_samples(self.inputs, share)
            self.inputs = [t.to(self.inputs[0].device)
                           for part in distributed.gather_objects([t.cpu() for t in mine], group)
                           for t in part]

    def rows(self) -> torch.Tensor:
        return torch.cat(self.sample)[:AWQ_ROWS]


def real_token_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` as float rows (n, features), without the rows of padding tokens.

    ``token_mask`` is a Hugging Face ``attention_mask`` (batch, seq), nonzero on real tokens;
    it applies to inputs shaped (batch, seq, ..., features) and is ignored for any other shape
    (a pooled (batch, features) input, a decoder of another length). Padding rows are whatever
    the model computes for positions nothing reads: in a Hessian or a channel maximum they are
    noise (MiniLM, GPTQ 4-bit g128: 0.983 → 0.986 mean cosine without them).
    """
    x = x.detach()
    if (token_mask is not None and token_mask.dim() == 2 and x.dim() >= 3
            and tuple(x.shape[:2]) == tuple(token_mask.shape)):
        x = x[token_mask.to(x.device) != 0]
    return x.reshape(-1, x.shape[-1]).float()


def _weighted_mean(mean: torch.Tensor, count: int, group: Any) -> tuple[torch.Tensor, int]:
    """The mean over every rank's rows, from each rank's mean of ``count`` rows."""
    n = torch.full((), float(count), dtype=torch.float64, device=mean.device)
    total, n = distributed.reduce_sum([mean.double() * count, n], group)
    return (total / n).to(mean.dtype), int(n)


def _first_samples(tensors: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` entries along dim 0 of a list of batches."""
    out, left = [], n
    for t in tensors:
        if left <= 0:
            break
        out.append(t[:left])
        left -= t.shape[0]
    return out


# ----------------------------------------------------------------------------- the pass


def _needs(layer: Any) -> set[str]:
    needs: set[str] = set()
    x_spec = layer.input_quant.spec if layer.input_quant is not None else None
    if x_spec is not None and x_spec.smoothing is not None:
        needs.add("absmax")
    w_q = layer.weight_quant
    if w_q is not None:
        needs |= WEIGHT_ALGORITHMS.get(w_q.spec.algorithm).needs
    return needs


def _quantizers(layer: Any) -> tuple[Any, Any]:
    return layer.weight_quant, layer.input_quant


def layers_needing_data(model: nn.Module) -> dict[str, tuple[Any, set[str]]]:
    """Quant layers whose weights calibration changes, with the statistics each needs."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer) and getattr(module, "weight", None) is not None:
            needs = _needs(module)
            if needs:
                w_q, x_q = _quantizers(module)
                types = (WEIGHT_ALGORITHMS.get(w_q.spec.algorithm).layer_types
                         if w_q is not None else (nn.Linear,))
                if x_q is not None and x_q.spec.smoothing is not None:
                    types = (nn.Linear,)
                if not isinstance(module, types):
                    raise ValueError(
                        f"layer {name!r} ({type(module).float_type.__name__}): `smoothing` and "
                        "weight algorithms other than 'rtn' and 'adaround' apply to Linear "
                        "layers only"
                    )
                x_spec = x_q.spec if x_q is not None else None
                w_spec = w_q.spec if w_q is not None else None
                if x_spec is not None and x_spec.smoothing is not None and \
                        w_spec is not None and w_spec.algorithm == "awq":
                    raise ValueError(f"layer {name!r}: `smoothing` and algorithm 'awq' both "
                                     "choose input scales; use one of them")
                found[name] = (module, needs)
    return found


def smoothed_layers(model: nn.Module) -> dict[str, float]:
    """The layers whose input spec asks for SmoothQuant, with their α."""
    return {name: float(layer.input_quant.spec.smoothing)
            for name, (layer, _) in layers_needing_data(model).items() if _asks_smoothing(layer)}


def _asks_smoothing(layer: Any) -> bool:
    return layer.input_quant is not None and layer.input_quant.spec.smoothing is not None


def calibrate_weights(model: nn.Module, batches: Iterable[Any],
                      run: Callable[[Iterable[Any]], int], *, smoothing: bool = True) -> list[str]:
    """Statistics pass (``run`` feeds every batch through ``model``), then smoothing (unless
    ``smoothing`` is False: ``lowbit.calibrate`` found it does not pay off) and the weight
    algorithms. Returns the names of the layers it changed."""
    targets = layers_needing_data(model)
    for layer, _ in targets.values():
        if _asks_smoothing(layer):
            layer.smoothing_declined = not smoothing
    if not smoothing:  # the channel maxima are SmoothQuant's alone: no pass for them
        targets = {name: (layer, needs - {"absmax"}) for name, (layer, needs) in targets.items()
                   if needs - {"absmax"}}
    if not targets:
        return []
    generator = torch.Generator().manual_seed(0)
    stats = {name: InputStats() for name in targets}
    first_input: dict[str, torch.Tensor] = {}
    masks = AttentionMasks(model)  # the forward's attention_mask, however it was passed
    hooks = []
    for name, (layer, needs) in targets.items():
        def record(module: nn.Module, args: tuple[Any, ...], name: str = name,
                   needs: set[str] = needs) -> None:
            x = args[0]
            first_input.setdefault(name, x)
            stats[name].update(x, needs, generator, masks.mask)
        hooks.append(layer.register_forward_pre_hook(record))
    try:
        with masks:
            run(batches)
    finally:
        for h in hooks:
            h.remove()
    group = distributed.active_group()
    if group is not None:
        _reduce_over_ranks(stats, first_input, group)
    groups = _groups(targets, stats, first_input)
    for group in groups if smoothing else ():
        _smooth(group)
    for group in groups:
        by_algorithm: dict[str, Group] = {}
        for name, layer, st in zip(group.names, group.layers, group.stats):
            g = by_algorithm.setdefault(layer.weight_quant.spec.algorithm, Group([], [], []))
            g.names.append(name)
            g.layers.append(layer)
            g.stats.append(st)
        for algorithm, members in by_algorithm.items():
            WEIGHT_ALGORITHMS.get(algorithm)().apply(members)
    return list(targets)


def _reduce_over_ranks(stats: dict[str, InputStats], reached: dict[str, torch.Tensor],
                       group: Any) -> None:
    """Every rank's statistics into every rank's (layers in the same order on every rank)."""
    names = list(stats)
    device = next(iter(reached.values())).device if reached else distributed.device_for(group)
    here = torch.tensor([float(name in reached) for name in names], device=device)
    (ranks_reaching,) = distributed.reduce_sum([here], group)
    ranks = distributed.world_size(group)
    partial = [n for n, c in zip(names, ranks_reaching.tolist()) if 0 < c < ranks]
    if partial:
        raise distributed.RankMismatchError(
            f"the calibration batches reached layers {partial} on some ranks only, so the ranks "
            "cannot agree on their weights; give every rank batches that run every layer")
    for name in names:
        if name in reached:
            stats[name].reduce_over_ranks(group)


def _groups(targets: dict[str, tuple[Any, set[str]]], stats: dict[str, InputStats],
            first_input: dict[str, torch.Tensor]) -> list[Group]:
    """Layers grouped by the tensor they first read (identity, not value)."""
    groups: list[Group] = []
    by_tensor: dict[int, Group] = {}
    for name, (layer, _) in targets.items():
        x = first_input.get(name)
        if x is None:
            continue  # never reached: nothing to calibrate with
        group = by_tensor.get(id(x))
        if group is None:
            group = by_tensor[id(x)] = Group([], [], [])
            groups.append(group)
        group.names.append(name)
        group.layers.append(layer)
        group.stats.append(stats[name])
    return groups


def _smooth(group: Group) -> None:
    """SmoothQuant over the group's layers that ask for it, with one ``s`` for the shared
    input (the largest α asked for)."""
    members = [(layer, st) for layer, st in zip(group.layers, group.stats)
               if layer.input_quant is not None and layer.input_quant.spec.smoothing is not None]
    if not members:
        return
    alpha = max(layer.input_quant.spec.smoothing for layer, _ in members)
    absmax = members[0][1].absmax
    assert absmax is not None
    x_max = absmax.to(members[0][0].weight.device) * group.factor().float().abs()
    w_max = torch.stack([layer.weight.detach().float().abs().amax(dim=0)
                         for layer, _ in members]).amax(dim=0)
    s = x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)
    for layer, _ in members:
        layer.smooth_input(s)
