"""``lowbit.autoquant``: the cheapest recipe whose score stays within ``max_drop`` of float.

Steps, cheapest first (``analysis/steps.py``, a registry): the config as given → other
range observers → recovery algorithms (cross-layer equalization, bias correction, AdaRound;
each skipped with a note where this lowbit lacks its API) → the most sensitive layers (by
``lowbit.analyze``) at 8 bits → in float. Each step starts from the best recipe so far; the
search stops at the first trial that meets the target. Every returned config was built and
scored by the user's ``evaluate`` exactly as returned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.analysis.search import Evaluate, EvaluateError, Forward, Recipe, Search, Trial
from lowbit.analysis.size import float_bytes
from lowbit.analysis.steps import AUTOQUANT_STEPS, DEFAULT_STEPS
from lowbit.config import QuantConfig
from lowbit.nn import QuantLayer

__all__ = ["AutoQuantResult", "EvaluateError", "autoquant"]


@dataclass
class AutoQuantResult:
    """What the search tried and chose.

    ``config`` (with ``recipe``: the recovery switches it needs) is the trial that met the
    target with the fewest layers kept, or, when none met, the best-scoring one (``met``
    False). ``model`` is that trial's quantized, calibrated model. ``speed_vs_first``: ONNX
    Runtime throughput of ``model`` over the first trial's (given ``example_inputs``).
    """

    config: QuantConfig
    recipe: Recipe
    model: nn.Module
    met: bool
    score: float
    float_score: float
    max_drop: float
    trials: list[Trial] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    speed_vs_first: float | None = None
    max_bytes: float | None = None
    float_bytes: float = math.nan

    @property
    def weight_bytes(self) -> float:
        """The chosen recipe's estimated weight bytes as exported (``analysis/size.py``)."""
        return next((t.weight_bytes for t in self.trials if t.recipe == self.recipe), math.nan)

    @property
    def target(self) -> float:
        return self.float_score - self.max_drop

    @property
    def kept(self) -> tuple[str, ...]:
        return self.recipe.kept

    def summary(self) -> str:
        verdict = "met" if self.met else "NOT met (best score returned)"
        cap = ("" if self.max_bytes is None else
               f", weights <= {self.max_bytes / self.float_bytes:.3f}x float32")
        lines = [f"float {self.float_score:.4f}, target >= {self.target:.4f} "
                 f"(max drop {self.max_drop:g}{cap}): {verdict}; score {self.score:.4f} with "
                 f"{self.recipe.describe()} in {self.seconds:.1f} s"]
        lines.append(f"  {'step':<16} {'score':>8} {'drop':>8} {'size':>6} {'s':>7}  what")
        for t in self.trials:
            mark = "*" if t.met else " "
            size = f"{t.weight_bytes / self.float_bytes:>6.3f}" + (" " if t.fits else "!")
            lines.append(f"{mark} {t.step:<16} {t.score:>8.4f} {t.drop:>8.4f} {size:<7}"
                         f"{t.seconds:>6.1f}  {t.label}")
        lines.append("  size: estimated weight bytes as exported / float32 weight bytes"
                     + ("; ! over the cap" if self.max_bytes is not None else ""))
        if self.speed_vs_first is not None:
            lines.append(f"  ONNX Runtime speed of the result vs the first trial: "
                         f"{self.speed_vs_first:.2f}x")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"met": self.met, "score": self.score, "float_score": self.float_score,
                "max_drop": self.max_drop, "target": self.target, "kept": list(self.kept),
                "recipe": self.recipe.describe(), "config": self.config.to_dict(),
                "seconds": self.seconds, "speed_vs_first": self.speed_vs_first,
                "max_bytes": self.max_bytes, "float_bytes": self.float_bytes,
                "weight_bytes": self.weight_bytes,
                "trials": [t.to_dict() for t in self.trials], "notes": list(self.notes)}


def _number(value: Any, name: str, *, low: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"`{name}` must be a finite number {'>' if strict else '>='} {low:g}, "
                         f"got {value!r}")
    return float(value)


def autoquant(
    model: nn.Module,
    config: QuantConfig,
    calib_batches: Iterable[Any],
    evaluate: Evaluate,
    max_drop: float = 0.01,
    *,
    budget: float | None = None,
    steps: Sequence[str] = DEFAULT_STEPS,
    forward: Forward | None = None,
    max_kept: int | None = None,
    max_size: float | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
) -> AutoQuantResult:
    """Search, cheapest first, for a recipe whose ``evaluate`` score is at most ``max_drop``
    below the float model's; ``model`` is left untouched.

    ``evaluate(model) -> float`` (higher is better) gets a quantized torch model in eval mode,
    under ``torch.no_grad()``; it is called once on a copy of the float model first. Its
    errors (an exception, NaN) stop the search with an ``EvaluateError`` naming the step.
    ``calib_batches`` are re-read for every trial (a list or a DataLoader), each passed as
    ``forward(model, batch)`` (see ``lowbit.calibrate``). ``budget``: seconds after which no
    new trial starts. ``steps``: the registered steps to try, in order
    (``AUTOQUANT_STEPS.names()``; default ``DEFAULT_STEPS``). ``max_kept``: most layers the
    keep steps may keep at higher precision. ``max_size``: a cap on the weights' size as
    exported, estimated from the config (``analysis/size.py``): a fraction of the float32
    weight bytes if at most 1 (``0.2``), else bytes. Only a trial within it meets the target,
    and the keep steps pass over layers whose kept weight would break it. ``example_inputs``:
    the model's positional inputs: every trial quantizes with them (a model torch.fx cannot
    trace is traced on them, so its trials get the same quantizer placement and sharing as
    ``lowbit.quantize(..., example_inputs=)`` gives), and the first and the chosen model are
    exported with them and timed in ONNX Runtime (``speed_vs_first``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("`model` is already quantized; pass the float model")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"`config` must be a QuantConfig, got {type(config).__name__}")
    if isinstance(calib_batches, (torch.Tensor, str, bytes)) or not isinstance(
            calib_batches, Iterable):
        raise TypeError(f"`calib_batches` must be an iterable of batches, got "
                        f"{type(calib_batches).__name__}")
    if iter(calib_batches) is calib_batches:
        raise TypeError("`calib_batches` is read once per trial: pass a list or a DataLoader, "
                        "not an iterator")
    if not callable(evaluate):
        raise TypeError(f"`evaluate` must be callable (model -> score), got "
                        f"{type(evaluate).__name__}")
    max_drop = _number(max_drop, "max_drop")
    deadline = None if budget is None else time.perf_counter() + _number(
        budget, "budget", strict=True)
    if isinstance(steps, str) or not isinstance(steps, Sequence) or not steps:
        raise TypeError(f"`steps` must be a non-empty list of step names from "
                        f"{AUTOQUANT_STEPS.names()}, got {steps!r}")
    for name in steps:
        AUTOQUANT_STEPS.get(name, field="steps")
    if len(set(steps)) != len(steps):
        raise ValueError(f"`steps` names a step twice: {list(steps)}")
    if steps[0] != "as-given":
        raise ValueError(f"`steps` must start with 'as-given' (the config as given is the "
                         f"reference later steps improve on), got {list(steps)}")
    if forward is not None and not callable(forward):
        raise TypeError(f"`forward` must be callable, got {type(forward).__name__}")
    if max_kept is not None and (isinstance(max_kept, bool) or not isinstance(max_kept, int)
                                 or max_kept < 1):
        raise ValueError(f"`max_kept` must be a positive int or None, got {max_kept!r}")
    if max_size is not None:
        max_size = _number(max_size, "max_size", strict=True)
    if example_inputs is not None and (
            not isinstance(example_inputs, (tuple, list)) or not example_inputs
            or not all(isinstance(x, torch.Tensor) for x in example_inputs)):
        raise TypeError("`example_inputs` must be a non-empty tuple of tensors (the model's "
                        f"positional inputs) or None, got {type(example_inputs).__name__}")

    import copy

    start = time.perf_counter()
    batches = calib_batches if isinstance(calib_batches, Sequence) else list(calib_batches)
    if not batches:
        raise ValueError("`calib_batches` is empty: calibration needs at least one batch")
    full = float_bytes(model)
    cap = None if max_size is None else max_size * full if max_size <= 1 else max_size
    search = Search(model=model, calib_batches=batches, evaluate=evaluate, forward=forward,
                    max_drop=max_drop, deadline=deadline, max_kept=max_kept, max_bytes=cap,
                    float_bytes=full,
                    example_inputs=None if example_inputs is None else tuple(example_inputs))
    reference = copy.deepcopy(model).eval()
    search.float_score = search.score(reference, "float", "")
    del reference

    given = search.attempt("as-given", "the config as given", Recipe(config=config), force=True)
    if given is not None and not given.fits:
        search.notes.append(f"as-given: its weights take {given.weight_bytes / full:.3f}x "
                            f"float32, over the cap of {(cap or 0) / full:.3f}x: no step here "
                            "makes them smaller; pass a config with fewer bits")
    for name in steps[1:]:
        if search.met() or not search.time_left():
            break
        step = AUTOQUANT_STEPS.get(name)()
        why = step.missing()
        if why is not None:
            search.notes.append(f"{name}: skipped, {why}")
            continue
        step.run(search)

    best, qm = search.best, search.best_model
    assert best is not None and qm is not None  # the config as given is always scored
    result = AutoQuantResult(config=best.recipe.config, recipe=best.recipe, model=qm,
                             met=best.met, score=best.score, float_score=search.float_score,
                             max_drop=max_drop, trials=search.trials, notes=search.notes,
                             max_bytes=cap, float_bytes=full)
    if example_inputs is not None:
        from lowbit.analysis.speed import relative_speed

        first = search.trials[0]
        if first is best:
            result.speed_vs_first = 1.0  # the same model
        else:
            result.speed_vs_first, note = relative_speed(qm, search.build(first.recipe),
                                                         tuple(example_inputs))
            if note:
                result.notes.append(note)
    result.seconds = time.perf_counter() - start
    return result
