"""The state an ``autoquant`` search carries between its steps: recipes, trials, scoring.

A *recipe* is everything that builds a quantized model from the float one: the config plus
the switches of the recovery steps that are not config fields (cross-layer equalization
before quantizing, bias correction in calibration). Every trial builds its recipe afresh
(``quantize`` + ``calibrate`` on a copy of the float model) and scores it with the user's
``evaluate``, so a config the search returns was scored exactly as returned.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lowbit.analysis.size import quantized_bytes
from lowbit.config import QuantConfig

Evaluate = Callable[[nn.Module], Any]
Forward = Callable[[nn.Module, Any], Any]


class EvaluateError(ValueError):
    """``evaluate`` raised or returned NaN; the message names the step that called it."""


@dataclass(frozen=True)
class Recipe:
    """A config plus the recovery switches that are not config fields."""

    config: QuantConfig
    equalize: bool = False  # lowbit.equalize(model) before quantize
    bias_correction: bool = False  # lowbit.calibrate(..., bias_correction="empirical")
    kept: tuple[str, ...] = ()  # layers the config keeps at higher precision (by the search)
    tune_scales: bool = False  # lowbit.tune_scales(model, batches) after calibrate

    def but(self, **changes: Any) -> Recipe:
        return replace(self, **changes)

    def describe(self) -> str:
        parts = []
        if self.equalize:
            parts.append("equalized")
        if self.bias_correction:
            parts.append("bias-corrected")
        if self.tune_scales:
            parts.append("scales tuned")
        if self.kept:
            parts.append(f"{len(self.kept)} layer(s) kept")
        return ", ".join(parts) or "config only"


@dataclass
class Trial:
    """One scored recipe: which step tried it, its score and drop from float, the seconds it
    took to build (quantize + calibrate) and score, its weights' estimated bytes as exported
    (``analysis/size.py``) and whether they fit the size cap (True without one)."""

    step: str
    label: str
    score: float
    drop: float
    seconds: float
    recipe: Recipe
    met: bool
    weight_bytes: float = math.nan
    fits: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "label": self.label, "score": self.score, "drop": self.drop,
                "seconds": self.seconds, "met": self.met, "weight_bytes": self.weight_bytes,
                "fits": self.fits, "recipe": self.recipe.describe(),
                "kept": list(self.recipe.kept), "config": self.recipe.config.to_dict()}


@dataclass
class Search:
    """What the steps share: the data, the scorer, the trials so far and the best of them."""

    model: nn.Module
    calib_batches: Sequence[Any]
    evaluate: Evaluate
    forward: Forward | None
    max_drop: float
    deadline: float | None = None
    max_kept: int | None = None
    max_bytes: float | None = None  # the size cap on the weights (analysis/size.py), or None
    float_bytes: float = math.nan  # the float model's parameters in float32
    example_inputs: tuple[Any, ...] | None = None  # traced where fx fails (lowbit.plan)
    float_score: float = math.nan
    trials: list[Trial] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    best: Trial | None = None
    best_model: nn.Module | None = None
    out_of_time: bool = False

    @property
    def target(self) -> float:
        return self.float_score - self.max_drop

    def met(self) -> bool:
        return self.best is not None and self.best.met

    def best_without_kept(self) -> Recipe:
        """The recipe of the best trial that keeps no layer at higher precision."""
        return self.best_trial_without_kept().recipe

    def best_trial_without_kept(self) -> Trial:
        """The best trial that keeps no layer at higher precision."""
        best: Trial | None = None
        for trial in self.trials:
            if not trial.recipe.kept and (best is None or _better(trial, best)):
                best = trial
        assert best is not None  # the config as given is scored first
        return best

    def time_left(self) -> bool:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            if not self.out_of_time:
                self.notes.append(f"budget spent after {len(self.trials)} trial(s); later "
                                  "steps not tried")
            self.out_of_time = True
        return not self.out_of_time

    def score(self, model: nn.Module, step: str, label: str) -> float:
        """``evaluate(model)`` under ``no_grad``, checked: a number, not NaN; errors name the
        step."""
        where = f"step {step!r}" + (f" ({label})" if label else "")
        try:
            with torch.no_grad():
                value = self.evaluate(model)
        except Exception as err:  # the user's function: report it with the step that called it
            raise EvaluateError(f"`evaluate` raised {type(err).__name__} in {where}: {err}") \
                from err
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(
                value, "__float__"):
            raise TypeError(f"`evaluate` must return a number (higher is better), got "
                            f"{type(value).__name__} {value!r} in {where}")
        result = float(value)
        if math.isnan(result):
            raise EvaluateError(f"`evaluate` returned NaN in {where}")
        return result

    def build(self, recipe: Recipe) -> nn.Module:
        """Quantize and calibrate a copy of the float model as ``recipe`` says."""
        import lowbit

        model = copy.deepcopy(self.model)
        if recipe.equalize:
            out = lowbit.equalize(model)  # type: ignore[attr-defined]
            model = out if isinstance(out, nn.Module) else model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kept layers are named in the trial, not a warning
            qm = lowbit.quantize(model, recipe.config, example_inputs=self.example_inputs)
        if needs_calibration(qm):
            correction = "empirical" if recipe.bias_correction else None
            lowbit.calibrate(qm, self.calib_batches, self.forward, progress=False,
                             bias_correction=correction)
        if recipe.tune_scales:
            lowbit.tune_scales(qm, self.model, self.calib_batches, self.forward,
                               progress=False)
        return qm.eval()

    def attempt(self, step: str, label: str, recipe: Recipe, *,
                force: bool = False) -> Trial | None:
        """Build, score and record ``recipe``; None when the budget is spent (unless
        ``force``: the config as given is always scored)."""
        if not force and not self.time_left():
            return None
        start = time.perf_counter()
        qm = self.build(recipe)
        score = self.score(qm, step, label)
        drop = self.float_score - score
        size = quantized_bytes(qm)
        fits = self.max_bytes is None or size <= self.max_bytes
        trial = Trial(step=step, label=label, score=score, drop=drop,
                      seconds=time.perf_counter() - start, recipe=recipe,
                      met=drop <= self.max_drop and fits, weight_bytes=size, fits=fits)
        self.trials.append(trial)
        if self.best is None or _better(trial, self.best):
            self.best, self.best_model = trial, qm
        return trial


def _better(new: Trial, old: Trial) -> bool:
    """A trial that meets the target beats one that does not; among those that meet, fewer
    kept layers win (then the score); otherwise one within the size cap beats one over it,
    then the score decides."""
    if new.met != old.met:
        return new.met
    if new.fits != old.fits:
        return new.fits
    if new.met and len(new.recipe.kept) != len(old.recipe.kept):
        return len(new.recipe.kept) < len(old.recipe.kept)
    return new.score > old.score


def needs_calibration(qm: nn.Module) -> bool:
    """A model with quantizers calibrate would fill (static activations or data-driven
    weights); a weight-only round-to-nearest model (or one with no quant layer) needs none."""
    from lowbit.nn import QuantLayer
    from lowbit.quantizers import Quantizer
    from lowbit.weight_calibration import layers_needing_data

    if not any(isinstance(m, QuantLayer) for m in qm.modules()):
        return False
    static = any(isinstance(q, Quantizer) and q.role != "weight" and not q.spec.dynamic
                 for q in qm.modules())
    return static or bool(layers_needing_data(qm))


def calibrate_takes(name: str) -> bool:
    """Whether this lowbit's ``calibrate`` has a keyword ``name``."""
    from lowbit.calibrate import calibrate

    return name in inspect.signature(calibrate).parameters
