"""Post-training calibration: run data through a quantized model with observers on."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from lowbit import distributed
from lowbit.algorithms.bias_correction import check_mode as check_bias_correction
from lowbit.algorithms.bias_correction import correct_biases
from lowbit.fidelity import (
    AttentionMasks,
    compared,
    first_tensor,
    float_function,
    sample_cosines,
)
from lowbit.float_modules import deep_copyable
from lowbit.guard import NonFiniteError, check_finite, check_not_meta, layer_errors
from lowbit.quantizers import Quantizer
from lowbit.quantizers.uniform import reusing_weights
from lowbit.weight_calibration import calibrate_weights, layers_needing_data, smoothed_layers

Forward = Callable[[nn.Module, Any], Any]
_END = object()  # the end of the batches


def activation_quantizers(model: nn.Module) -> list[Quantizer]:
    """Quantizers of inputs and outputs (the ones calibration fills), in model order."""
    return [m for m in model.modules() if isinstance(m, Quantizer) and m.role != "weight"]


def _require_quantized(model: nn.Module) -> list[Quantizer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, Quantizer) for m in model.modules()):
        raise ValueError("`model` has no lowbit quantizers; call lowbit.quantize(model, config) "
                         "first")
    return activation_quantizers(model)


def set_calibrating(model: nn.Module, enabled: bool, *, reset: bool = True) -> None:
    """Switch observers on (``True``: ranges are recorded, values pass through unchanged) or
    off (``False``: ranges are frozen into scales and zero points, fake quant resumes; a
    quantizer whose whole observed range maps to one code warns, naming the layer).

    Turning it on with ``reset=True`` forgets earlier statistics.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, got {type(enabled).__name__}")
    for q in _require_quantized(model):
        if q.spec.dynamic:
            continue
        if enabled:
            if reset:
                q.reset_statistics()
            q.observing = True
        elif q.observing:
            q.observing = False
            q.freeze()
            q.check_calibrated_range()  # ConstantQuantizerWarning if all of it is one code


@contextmanager
def _eval_state(model: nn.Module):
    """Eval mode and no grad inside; every module's ``training`` flag restored after."""
    flags = {m: m.training for m in model.modules()}
    observing = {q: q.observing for q in model.modules() if isinstance(q, Quantizer)}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag
        for q, flag in observing.items():
            q.observing = flag


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a tuple/list holds positional inputs; a dict keyword inputs."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        f"a calibration batch must be a Tensor, tuple/list or dict, got {type(batch).__name__}; "
        "pass `forward=lambda model, batch: ...` for other layouts"
    )


SMOOTHING_CHECK_BATCHES = 8  # the smoothing check calibrates on the first half, scores on the rest


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    nonfinite: Literal["raise", "skip"] = "raise",
    bias_correction: str | None = None,
    smoothing_check: bool = True,
) -> int:
    """Record activation ranges over ``batches`` and freeze them; returns the batch count.

    Layers whose specs ask for data-driven weights (``QuantSpec.smoothing``,
    ``QuantSpec.algorithm`` ``"gptq"``/``"awq"``/``"adaround"``) get a statistics pass over
    the same batches first (``lowbit.weight_calibration``), so ``batches`` must then be
    re-iterable. Batches may differ in shape (e.g. tokenizer outputs padded per batch).

    SmoothQuant is kept only where it pays off for the whole model (``smoothing_check``):
    two trial copies, with and without smoothing, are calibrated on the first half of the
    first ``SMOOTHING_CHECK_BATCHES`` batches and scored on the other half by their output's
    cosine to the float function (the first output tensor, per sample, padding positions left
    out); when smoothing scores lower it is left off, with a ``SmoothingWarning`` that gives
    both scores. Models without outlier channels (random-init ViTs) lose accuracy to it;
    trained encoders with outliers (MiniLM) keep it.
    ``smoothing_check=False`` smooths as the specs say, without the trials.

    Under ``torch.distributed`` (more than one rank, see ``lowbit.distributed``) each rank
    feeds its own shard of the batches, the same number on every rank, and all statistics are
    reduced over the ranks: every rank ends with the same ranges, those one process would take
    over all the shards' batches (exactly so for min-max and histogram observers, with the
    shards interleaved: rank r holding batches r, r + W, ...).

    ``bias_correction`` (``"empirical"``: one more pass over the batches; ``"analytical"``:
    from the BatchNorm statistics ``lowbit.equalize`` kept; ``None``) removes the mean output
    shift that weight rounding causes, before ranges are taken
    (``lowbit.algorithms.bias_correction``).

    Each batch is passed as ``forward(model, batch)`` (default: see ``default_forward``; for a
    loader of ``(x, y)`` pairs use ``forward=lambda m, b: m(b[0])``). Runs in eval mode under
    ``no_grad`` and restores every module's training flag afterwards, even on error.

    A batch a layer rejects (wrong shape, dtype or device) raises a ``LayerError`` (a
    ``ValueError``) naming the layer. NaN/inf reaching a quantizer raises one too
    (``nonfinite="raise"``), or skips that batch with a warning naming the layer
    (``nonfinite="skip"``; layers before it may already have recorded the batch).
    """
    quantizers = _require_quantized(model)
    check_not_meta(model)
    for name, flag in (("progress", progress), ("smoothing_check", smoothing_check)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__} {flag!r}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"`nonfinite` must be 'raise' or 'skip', got {nonfinite!r}")
    if forward is None:
        forward = default_forward
    elif not callable(forward):
        raise TypeError(f"`forward` must be callable, got {type(forward).__name__}")
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"`batches` must be an iterable of batches, got {type(batches).__name__}"
            + ("; wrap a single tensor in a list: [x]" if isinstance(batches, torch.Tensor)
               else "")
        )
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive int or None, got {max_batches!r}")
    check_bias_correction(bias_correction)
    if ((layers_needing_data(model) or bias_correction == "empirical")
            and iter(batches) is batches):
        raise TypeError(
            "`batches` is read twice when layers use `smoothing`, a weight algorithm "
            "or empirical bias correction (statistics, then ranges): pass a list or a "
            "DataLoader, not an iterator"
        )

    group = distributed.active_group()
    if group is not None:
        if nonfinite == "skip":
            raise ValueError(
                "`nonfinite` must be 'raise' when calibrating across "
                f"{distributed.world_size(group)} ranks, got 'skip': a rank that skips a batch "
                "would leave the others waiting for its statistics; clean the data instead")
        distributed.check_same_model(model, group)
    run = _Run(forward, group, nonfinite)
    smoothing = True
    alphas = smoothed_layers(model)
    if smoothing_check and alphas:
        smoothing = _smoothing_pays_off(model, batches, run, max_batches, alphas)
    return run(model, quantizers, batches, max_batches=max_batches, progress=progress,
               bias_correction=bias_correction, smoothing=smoothing)


class _Run:
    """One calibration of one model: statistics (and weight changes), then ranges."""

    def __init__(self, forward: Forward, group: Any, nonfinite: str) -> None:
        self.forward, self.group, self.nonfinite = forward, group, nonfinite

    def __call__(self, model: nn.Module, quantizers: list[Quantizer], batches: Iterable[Any], *,
                 max_batches: int | None, progress: bool, bias_correction: str | None,
                 smoothing: bool) -> int:
        group, nonfinite = self.group, self.nonfinite
        seen_batches = [0]  # the batch being fed, for messages

        def feed(desc: str) -> int:
            iterator: Iterable[Any] = batches
            if progress:
                from tqdm.auto import tqdm

                total = max_batches if max_batches is not None else _len_or_none(batches)
                iterator = tqdm(batches, total=total, desc=desc, unit="batch", leave=False)
            with reusing_weights(model):  # no weight changes within one pass
                count, seen = feed_each(iter(iterator))
            if count == 0:
                raise ValueError("`batches` is empty: calibration needs at least one batch"
                                 + (f" (all {seen} were skipped for NaN/inf)" if seen else ""))
            return count

        def feed_each(batch_iter: Any) -> tuple[int, int]:
            """(batches fed, batches seen)."""
            count = seen = 0
            while True:
                batch = next(batch_iter, _END)
                if group is not None:  # every rank feeds a batch, or none does
                    if not distributed.agree_on_next(batch is not _END, group, seen + 1):
                        break
                elif batch is _END:
                    break
                seen += 1
                seen_batches[0] = seen
                try:
                    with layer_errors(model, f"calibration batch {seen}"):
                        self.forward(model, batch)
                except NonFiniteError as err:
                    if nonfinite == "raise":
                        raise
                    warnings.warn(f"skipped {str(err).split('; clean the data')[0]}",
                                  stacklevel=5)
                    continue
                count += 1
                if max_batches is not None and count >= max_batches:
                    break
            return count, seen

        def finite_hook(q: Quantizer) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                if module.observing and args and isinstance(args[0], torch.Tensor):
                    check_finite(args[0], q.layer_name or "?", q.role,
                                 f"calibration batch {seen_batches[0]}")
            return hook

        handles = [q.register_forward_pre_hook(finite_hook(q)) for q in quantizers]
        try:
            with _eval_state(model):
                if layers_needing_data(model):
                    set_calibrating(model, True)
                    calibrate_weights(model, batches, lambda _: feed("weight statistics"),
                                      smoothing=smoothing)
                if bias_correction is not None:
                    set_calibrating(model, True)
                    correct_biases(model, bias_correction, lambda: feed("bias correction"))
                set_calibrating(model, True)
                count = feed("calibrating")
                set_calibrating(model, False)
        finally:
            for handle in handles:
                handle.remove()

        unseen = sorted({q.layer_name for q in quantizers if not q.is_ready()})
        if unseen:
            warnings.warn(f"calibration never reached these layers, so their activation ranges "
                          f"are unset: {unseen}", stacklevel=3)
        return count

    def outputs(self, model: nn.Module, batches: list[Any]) -> Iterator[torch.Tensor | None]:
        """``model``'s first output tensor on each batch, as ``fidelity.compared`` keeps it
        (padding positions zeroed); None where the output holds no tensor."""
        with _eval_state(model), AttentionMasks(model) as masks:
            for batch in batches:
                with layer_errors(model, "the smoothing check"):
                    out = first_tensor(self.forward(model, batch))
                yield None if out is None else compared(out, masks.mask)

    def score(self, model: nn.Module, batches: list[Any], refs: list[torch.Tensor]) -> float:
        """Mean per-sample cosine of ``model``'s output to ``refs`` (over every rank)."""
        total = torch.zeros(2, dtype=torch.float64)
        for got, ref in zip(self.outputs(model, batches), refs):
            if got is None:
                return math.nan
            cos = sample_cosines(got, ref)
            total += torch.tensor([float(cos.sum()), float(cos.numel())], dtype=torch.float64)
        if self.group is not None:
            device = distributed.device_for(self.group)
            (total,) = distributed.reduce_sum([total.to(device)], self.group)
        return float(total[0] / total[1].clamp_min(1))


def _smoothing_pays_off(model: nn.Module, batches: Iterable[Any], run: _Run,
                        max_batches: int | None, alphas: dict[str, float]) -> bool:
    """Calibrate two copies of ``model`` on the first half of the first few batches, with and
    without SmoothQuant, and say whether smoothing gets the model's output closer to its float
    function on the second half (warning when it does not).

    Scored on batches the trials did not calibrate on: smoothing fitted to a few batches can
    look better on them and worse on any other (random-init ViT: 0.99981 vs 0.99975 on its
    own batches, 0.9969 vs 0.9995 on held-out ones). Where the output cannot be compared (a
    ``forward`` that returns no tensor), smoothing is kept as the specs ask."""
    limit = min(SMOOTHING_CHECK_BATCHES, max_batches or SMOOTHING_CHECK_BATCHES)
    subset = list(itertools.islice(iter(batches), limit))
    if not subset:
        return True  # the real run says the batches are empty
    fit, held = (subset[:len(subset) // 2], subset[len(subset) // 2:]) if len(subset) > 1 \
        else (subset, subset)
    with float_function(model):
        outputs = list(run.outputs(model, held))
    refs = [out for out in outputs if out is not None]
    if len(refs) < len(outputs):
        return True
    score = {}
    for smoothing in (True, False):
        with deep_copyable(model):
            trial = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real run warns about what it finds
            run(trial, activation_quantizers(trial), fit, max_batches=None, progress=False,
                bias_correction=None, smoothing=smoothing)
        score[smoothing] = run.score(trial, held, refs)
        del trial
    if not score[True] < score[False]:  # ties and NaN keep what the specs ask for
        return True
    alpha = ", ".join(f"{a:g}" for a in sorted(set(alphas.values())))
    where = (f"calibrated on {len(fit)} batch(es) and scored on {len(held)} others"
             if held is not fit else "calibrated and scored on the one batch")
    warnings.warn(
        f"SmoothQuant (α {alpha}, {len(alphas)} layers) left off: {where}, the output's cosine "
        "to the float model "
        f"is {score[False]:.5f} without it and {score[True]:.5f} with it (as in models "
        "without outlier channels for it to move); calibrate(..., smoothing_check=False) smooths "
        "anyway", SmoothingWarning, stacklevel=3)
    return False


class SmoothingWarning(UserWarning):
    """Calibration left SmoothQuant off because it lowered the model's output fidelity."""


def _len_or_none(obj: object) -> int | None:
    try:
        return len(obj)  # type: ignore[arg-type]
    except TypeError:
        return None
