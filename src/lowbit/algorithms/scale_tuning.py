"""End-to-end scale tuning: keep every weight's integer codes, train its scales on the model's
output (docs/algorithms.md §15).

GPTQ, AdaRound and round-to-nearest choose codes one layer at a time, each against its own
output. What is left is an error that adds up through the model. With the codes fixed, the
dequantized weight ``(q - z)·s`` is linear in the scale, so the scales (one per channel or
group, trained in log space so they stay positive) and the layers' float biases can be fitted
by gradient descent to the float model's *final* output (EfficientQAT's E2E-QP, Chen et al.
2024): the loss is the relative squared error of the first output tensor, padding positions
left out. Nothing about the deployed graph changes: the same codes, the same zero points, new
scales in the same places, pinned like GPTQ's (``UniformQuantizer.pin_qparams``).

The last batches, about a ``held_out`` share of the samples, are never trained on: they are
scored before tuning and every ``eval_every`` steps, and the scales and biases of the best
score are the ones kept (the starting ones when no step beats them), so a learning rate that
is too high or too many steps cost time, never accuracy on data the tuning did not see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit import distributed
from lowbit.fidelity import AttentionMasks, first_tensor
from lowbit.guard import layer_errors
from lowbit.nn import QuantLayer, replace_weight
from lowbit.numerics import broadcast_param, quantize
from lowbit.quantizers.base import QParams
from lowbit.quantizers.uniform import UniformQuantizer

Forward = Callable[[nn.Module, Any], Any]
# ``lr`` is the step for 4-bit scales; a b-bit scale gets lr·2^(4-b): one Adam step then moves
# the largest code of every grid by about the same fraction of its own step.
REFERENCE_BITS = 4
REFERENCE_CACHE_BYTES = 256 << 20  # float outputs kept between steps; recomputed beyond


@dataclass
class ScaleTuning:
    """What ``tune_scales`` did: the layers whose scales it trained, the steps it ran and the
    step whose scales it kept (0: the starting ones), and the held-out relative error
    before and after (the training batches' own when nothing is held out)."""

    layers: list[str]
    steps: int
    best_step: int
    held_out_before: float
    held_out_after: float
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out error)

    def summary(self) -> str:
        return (f"tuned the scales of {len(self.layers)} layer(s) for {self.steps} step(s) in "
                f"{self.seconds:.1f} s; held-out relative error {self.held_out_before:.3e} -> "
                f"{self.held_out_after:.3e} (kept step {self.best_step})")


class _TunedWeight(nn.Module):
    """Sits in a layer's ``weight_quant`` slot while tuning: the layer's fixed codes times a
    trainable gain on each scale. ``qparams()`` gives the tuned scale, so a bias on the int32
    grid ``s_x·s_w`` (``QuantLayer.bias_step``) follows it as the exported one will."""

    folds_bn = True  # ``bias_step``: take the weight scale from ``qparams()``, not the weight
    levels: torch.Tensor  # q - z: the codes as integers around the zero point
    scale: torch.Tensor  # the calibrated scale the gains multiply

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        q = quantizer
        self.quantizer, self.axis, self.group_size = q, q.axis, q.group_size
        with torch.no_grad():
            codes = quantize(weight.float(), q.scale, q.zero_point, q.grid, q.axis,
                             q.group_size)
            z = broadcast_param(q.zero_point, weight, q.axis, q.group_size).float()
        self.register_buffer("levels", codes - z)
        self.register_buffer("scale", q.scale.detach().float().clone())
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale))
        self.dtype = weight.dtype

    def tuned_scale(self) -> torch.Tensor:
        return self.scale * self.log_gain.exp()

    def is_ready(self) -> bool:
        return True

    def qparams(self) -> QParams:
        q = self.quantizer
        return QParams(self.tuned_scale().detach().reshape(q.scale.shape), q.zero_point, q.grid,
                       q.axis, q.group_size)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = broadcast_param(self.tuned_scale(), self.levels, self.axis, self.group_size)
        return (self.levels * s).to(self.dtype)

    @torch.no_grad()
    def commit(self, layer: Any) -> None:
        """Pin the tuned scales and write the weight they dequantize to, so the quantizer
        gives back the same codes (``round((q - z)·s / s) = q - z``)."""
        scale = self.tuned_scale().reshape(self.quantizer.scale.shape)
        self.quantizer.pin_qparams(scale, self.quantizer.zero_point)
        replace_weight(layer, self.forward(layer.weight))


def tunable_layers(model: nn.Module) -> dict[str, Any]:
    """The quant layers whose weight scales ``tune_scales`` trains: a calibrated static uniform
    weight quantizer reading the layer's own weight (not a BatchNorm-folded one, whose codes
    belong to weight·γ/σ that QAT still moves)."""
    found = {}
    for name, layer in model.named_modules():
        q = getattr(layer, "weight_quant", None)
        if (isinstance(layer, QuantLayer) and isinstance(q, UniformQuantizer)
                and q.role == "weight" and not q.spec.dynamic and q.is_ready()
                and isinstance(getattr(layer, "weight", None), nn.Parameter)
                and getattr(layer, "bn", None) is None):
            found[name] = layer
    return found


def _check_arguments(model: Any, batches: Any, forward: Any, steps: Any, lr: Any,
                     biases: Any, held_out: Any, eval_every: Any) -> list[Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"`forward` must be callable, got {type(forward).__name__}")
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"`batches` must be an iterable of batches, got "
                        f"{type(batches).__name__}")
    for name, value in (("steps", steps), ("eval_every", eval_every)):
        if (value is not None or name == "steps") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"`lr` must be a positive finite number, got {lr!r}")
    if not isinstance(biases, bool):
        raise TypeError(f"`biases` must be a bool, got {type(biases).__name__} {biases!r}")
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) \
            or not 0 <= held_out < 1:
        raise ValueError(f"`held_out` must be a fraction in [0, 1), got {held_out!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty: scale tuning needs at least one batch")
    return batches


def _check_reference(reference: Any) -> None:
    if not isinstance(reference, nn.Module):
        raise TypeError(f"`reference` must be the float torch.nn.Module the model was quantized "
                        f"from, got {type(reference).__name__}")
    if any(isinstance(m, QuantLayer) for m in reference.modules()):
        raise ValueError("`reference` must be the float model the model was quantized from, "
                         "got a quantized one (lowbit.quantize returns a copy: pass the model "
                         "you gave it)")


def _output(out: Any) -> torch.Tensor:
    y = first_tensor(out)
    if y is None:
        raise TypeError("scale tuning compares the model's first output tensor with the float "
                        "model's, and this forward returned none; pass a `forward` that "
                        "returns a tensor")
    return y.float()


def _relative_error(out: Any, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    y = _real_tokens(_output(out), mask)
    return ((y - ref) ** 2).sum() / ref.pow(2).sum().clamp_min(1e-30)


def _real_tokens(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``y`` with the positions of padding tokens zeroed (``mask``: (batch, seq), as
    ``fidelity.compared`` does, but keeping the gradient)."""
    if mask is not None and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(mask.shape):
        y = y * (mask.to(y.device) != 0).reshape(*mask.shape, *[1] * (y.dim() - 2))
    return y


def split_held_out(batches: list[Any], held_out: float) -> tuple[list[Any], list[Any]]:
    """``(train, scored)``: the last batches whose samples come closest to a ``held_out`` share
    of all samples are scored, the rest trained on; at least one batch each when there are two
    or more (all batches both ways otherwise, or when ``held_out`` is 0). Counted in samples,
    not batches: a short last batch (the remainder of a dataset) is not a fifth of it."""
    if held_out == 0 or len(batches) < 2:
        return batches, batches
    sizes = [_samples(b) for b in batches]
    target = held_out * sum(sizes)
    tails = [sum(sizes[len(sizes) - k:]) for k in range(1, len(sizes))]
    k = 1 + min(range(len(tails)), key=lambda i: abs(tails[i] - target))
    return batches[:-k], batches[-k:]


def _samples(batch: Any) -> int:
    """The samples in a batch: the first dimension of its first tensor (1 when it has none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else (
        batch if isinstance(batch, (list, tuple)) else ())
    return next((_samples(x) for x in items
                 if isinstance(x, (torch.Tensor, list, tuple, dict))), 1)


def tune_scales(
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    biases: bool = True,
    held_out: float = 0.2,
    eval_every: int | None = None,
    progress: bool = True,
) -> ScaleTuning:
    """Train the scales of every calibrated weight quantizer of ``model`` (at ``lr`` for 4-bit
    weights, ``lr·2^(4-bits)`` for others; and, with ``biases``, the float biases of those
    layers at ``lr / 10``) so its first output matches ``reference``'s, the float model it was
    quantized from, on ``batches``; the codes stay as calibration chose them. Call it after
    ``lowbit.calibrate`` and before ``convert``.

    The float model is needed, not just ``model`` with its quantizers off: GPTQ, AWQ, AdaRound
    and bias correction write their results into the quantized model's weights and biases, so
    its own float function has already lost what they could not keep.

    ``steps`` Adam steps, one batch each, cycling through the training batches (all but the
    last batches that hold closest to a ``held_out`` share of the samples, at least one batch
    held out when there are two or more);
    the held-out batches are scored every ``eval_every`` steps (default: once per pass over
    the training batches, at most 10 times per run) and the best scales are kept. Activation
    ranges stay frozen and quantized in the loop (straight-through gradients). Under
    ``torch.distributed`` the gradients and scores are averaged over the ranks, so every rank
    keeps the same scales.
    """
    from lowbit.calibrate import _eval_state, _require_quantized, default_forward

    batches = _check_arguments(model, batches, forward, steps, lr, biases, held_out, eval_every)
    _check_reference(reference)
    activations = _require_quantized(model)
    unready = [q.layer_name for q in activations if not q.spec.dynamic and not q.is_ready()]
    if unready:
        raise ValueError(f"`model` is not calibrated (no activation range for {unready[:5]}); "
                         "run lowbit.calibrate(model, batches) before tune_scales")
    layers = tunable_layers(model)
    if not layers:
        raise ValueError("`model` has no layer whose weight scales can be tuned: that needs a "
                         "calibrated static uniform weight quantizer (not dynamic, binary, LSQ "
                         "or on a BatchNorm-folded conv)")
    run = forward or default_forward
    train, scored = split_held_out(batches, held_out)
    group = distributed.active_group()
    if eval_every is None:  # the same on every rank: each scoring is a collective
        passes = float(len(train))
        if group is not None:
            device = distributed.device_for(group)
            passes = float(distributed.reduce_max(torch.tensor(passes, device=device), group))
        eval_every = max(int(passes), -(-steps // 10))
    start = time.perf_counter()

    # Both models stay in eval mode with their mask hooks on for the whole run: an LM's
    # references are recomputed every step, and neither needs setting up again each time.
    with _eval_state(reference), AttentionMasks(reference) as reference_masks, \
            _eval_state(model), AttentionMasks(model) as masks:
        refs = _References(reference, run, reference_masks, [*train, *scored])
        tuned = {name: _TunedWeight(layer.weight_quant, layer.weight)
                 for name, layer in layers.items()}
        params = [t.log_gain for t in tuned.values()]
        bias_params = [layer.bias for layer in layers.values()
                       if biases and isinstance(getattr(layer, "bias", None), nn.Parameter)]
        saved_bias = [b.detach().clone() for b in bias_params]
        grads = {p: p.requires_grad for p in model.parameters()}
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in (*params, *bias_params):
                p.requires_grad_(True)
            for name, layer in layers.items():
                layer.weight_quant = tuned[name]
            loop = _Loop(model, run, masks, refs, group)
            result = loop.train(_optimizer(list(tuned.values()), bias_params, lr),
                                [*params, *bias_params], train, scored, steps=steps,
                                eval_every=eval_every, progress=progress)
        finally:
            for name, layer in layers.items():
                layer.weight_quant = tuned[name].quantizer
            for p, flag in grads.items():
                p.requires_grad_(flag)
        best_step, history, best_state = result
        with torch.no_grad():
            if best_state is None:  # nothing beat the start: leave the model as it was
                for b, value in zip(bias_params, saved_bias):
                    b.copy_(value)
            else:
                for p, value in zip((*params, *bias_params), best_state):
                    p.copy_(value)
                for name, layer in layers.items():
                    tuned[name].commit(layer)
    before = history[0][1]
    after = min(score for _, score in history)
    return ScaleTuning(list(layers), steps, best_step, before, after,
                       time.perf_counter() - start, history)


class _References:
    """The float model's first output for each batch (padding zeroed): computed once and kept
    while they fit in ``REFERENCE_CACHE_BYTES`` (a sentence encoder's hidden states), else
    recomputed at each use (an LM's logits over a large vocabulary would not fit)."""

    def __init__(self, model: nn.Module, run: Forward, masks: AttentionMasks,
                 batches: list[Any]) -> None:
        self.model, self.run, self.masks = model, run, masks
        self.cache: dict[int, torch.Tensor] | None = {}
        first = self._compute(batches[0])
        if first.element_size() * first.numel() * len(batches) > REFERENCE_CACHE_BYTES:
            self.cache = None
        else:
            self.cache[id(batches[0])] = first
            for batch in batches[1:]:
                self.cache[id(batch)] = self._compute(batch)

    def __getitem__(self, batch: Any) -> torch.Tensor:
        if self.cache is None:
            return self._compute(batch)
        return self.cache[id(batch)]

    def _compute(self, batch: Any) -> torch.Tensor:
        """The reference's output (the model is in eval mode and ``masks`` open: see
        ``tune_scales``)."""
        with torch.no_grad(), layer_errors(self.model, "scale tuning's float pass"):
            out = _output(self.run(self.model, batch))
        return _real_tokens(out.detach(), self.masks.mask)


@dataclass
class _Loop:
    """One tuning run: the model with its tuned weights in place, how a batch runs, the float
    references, and the process group the ranks reduce over (None: one process)."""

    model: nn.Module
    run: Forward
    masks: AttentionMasks
    refs: _References
    group: Any

    def error(self, batch: Any) -> torch.Tensor:
        return _relative_error(self.run(self.model, batch), self.refs[batch], self.masks.mask)

    def held_out_error(self, scored: list[Any]) -> float:
        """Mean relative error over ``scored`` (over every rank's)."""
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in scored:
                total += torch.tensor([float(self.error(batch)), 1.0], dtype=torch.float64)
        if self.group is not None:
            device = distributed.device_for(self.group)
            (total,) = distributed.reduce_sum([total.to(device)], self.group)
        return float(total[0] / total[1])

    def average_gradients(self, trained: list[torch.Tensor]) -> None:
        if self.group is None:
            return
        ranks = distributed.world_size(self.group)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in trained]
        for p, g in zip(trained, distributed.reduce_sum(grads, self.group)):
            p.grad = g / ranks

    def train(self, opt: torch.optim.Optimizer, trained: list[torch.Tensor], train: list[Any],
              scored: list[Any], *, steps: int, eval_every: int, progress: bool
              ) -> tuple[int, list[tuple[int, float]], list[torch.Tensor] | None]:
        """``steps`` Adam steps over ``train``; returns the best step, the held-out history
        and the best step's parameter values (None when the start was best)."""
        best = self.held_out_error(scored)
        history, best_step, best_state = [(0, best)], 0, None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="tuning scales", unit="step", leave=False)
        for step in range(1, steps + 1):
            batch = train[(step - 1) % len(train)]
            with torch.enable_grad(), layer_errors(self.model, f"scale tuning step {step}"):
                loss = self.error(batch)
                opt.zero_grad(set_to_none=False)
                loss.backward()
            self.average_gradients(trained)
            opt.step()
            if bar is not None:
                bar.update()
            if step % eval_every == 0 or step == steps:
                score = self.held_out_error(scored)
                history.append((step, score))
                if score < best:
                    best, best_step = score, step
                    best_state = [p.detach().clone() for p in trained]
        if bar is not None:
            bar.close()
        return best_step, history, best_state


def _optimizer(tuned: list[_TunedWeight], biases: list[torch.Tensor],
               lr: float) -> torch.optim.Optimizer:
    """Adam with one group per weight bit width (``lr·2^(4-bits)``) and the biases at lr/10."""
    by_bits: dict[int, list[torch.Tensor]] = {}
    for t in tuned:
        by_bits.setdefault(t.quantizer.spec.bits, []).append(t.log_gain)
    groups: list[dict[str, Any]] = [{"params": ps, "lr": lr * 2.0 ** (REFERENCE_BITS - bits)}
                                    for bits, ps in by_bits.items()]
    if biases:
        groups.append({"params": biases, "lr": lr / 10})
    return torch.optim.Adam(groups)


__all__ = ["ScaleTuning", "tunable_layers", "tune_scales"]
