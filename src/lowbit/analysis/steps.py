"""The steps ``autoquant`` tries, cheapest first, each a small registered object.

A step looks at the best recipe so far (``search.best``), proposes variants of it and scores
each through ``search.attempt`` until one meets the target. ``missing()`` says why a step
cannot run in this version of lowbit (its API is absent); the search then notes it and goes
on. Adding a recovery step is one class and one ``@AUTOQUANT_STEPS.register(name)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch

from lowbit.analysis.search import Recipe, Search, calibrate_takes
from lowbit.config import LayerRule, QuantConfig, QuantSpec
from lowbit.registry import OBSERVERS, WEIGHT_ALGORITHMS, Registry

AUTOQUANT_STEPS: Registry = Registry("autoquant step")

# Cheapest first: calibration choices, then recovery algorithms, then giving up bits.
DEFAULT_STEPS = ("as-given", "observers", "equalize", "bias-correction", "adaround",
                 "tune-scales", "keep-8bit", "keep-float")


class Step:
    """One stage of the search."""

    name: ClassVar[str] = ""

    def missing(self) -> str | None:
        """Why this lowbit cannot run the step (a missing API), or None."""
        return None

    def run(self, search: Search) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _map_specs(config: QuantConfig, targets: tuple[str, ...], change: Any) -> QuantConfig:
    """``config`` with ``change(spec)`` applied to every non-None spec of ``targets``."""
    rules = []
    for rule in config.rules:
        specs: dict[str, Any] = {t: getattr(rule, t) for t in targets}
        changed: dict[str, Any] = {t: None if s is None else change(s) for t, s in specs.items()}
        rules.append(dataclasses.replace(rule, **changed))
    return QuantConfig(rules=rules, fuse_bn=config.fuse_bn)


def _current(search: Search) -> Recipe:
    assert search.best is not None  # the first step scores the config as given
    return search.best.recipe


@AUTOQUANT_STEPS.register("as-given")
class AsGiven(Step):
    """The config as the user gave it: the reference every later step must beat."""

    name = "as-given"

    def run(self, search: Search) -> None:
        raise NotImplementedError("the search scores the config as given itself")


@AUTOQUANT_STEPS.register("observers")
class Observers(Step):
    """Every other registered range observer on the static activation specs (most robust to
    outliers first)."""

    name = "observers"
    PREFERRED = ("percentile", "mse", "kl", "minmax", "ema")

    def run(self, search: Search) -> None:
        recipe = _current(search)
        used = {s.observer for r in recipe.config.rules for s in (r.input, r.output)
                if s is not None and not s.dynamic}
        if not used:
            search.notes.append("observers: no static activation quantizer to calibrate")
            return
        names = [n for n in self.PREFERRED if n in OBSERVERS]
        names += [n for n in OBSERVERS if n not in names]
        for observer in names:
            if {observer} == used:
                continue

            def swap(spec: QuantSpec, observer: str = observer) -> QuantSpec:
                return spec if spec.dynamic else dataclasses.replace(spec, observer=observer)

            try:
                config = _map_specs(recipe.config, ("input", "output"), swap)
            except (TypeError, ValueError) as err:
                search.notes.append(f"observers: {observer!r} does not fit this config: {err}")
                continue
            trial = search.attempt(self.name, f"observer={observer}", recipe.but(config=config))
            if trial is None or trial.met:
                return


@AUTOQUANT_STEPS.register("equalize")
class Equalize(Step):
    """Cross-layer equalization (``lowbit.equalize(model)``) before quantizing: evens out
    per-channel weight ranges of consecutive layers."""

    name = "equalize"

    def missing(self) -> str | None:
        import lowbit

        return None if hasattr(lowbit, "equalize") else "lowbit.equalize is not available"

    def run(self, search: Search) -> None:
        recipe = _current(search)
        if not recipe.equalize:
            search.attempt(self.name, "cross-layer equalization", recipe.but(equalize=True))


@AUTOQUANT_STEPS.register("bias-correction")
class BiasCorrection(Step):
    """``calibrate(..., bias_correction="empirical")``: absorbs the mean output error of quantized
    weights into the bias."""

    name = "bias-correction"

    def missing(self) -> str | None:
        return None if calibrate_takes("bias_correction") else \
            "lowbit.calibrate has no `bias_correction` argument"

    def run(self, search: Search) -> None:
        recipe = _current(search)
        if not recipe.bias_correction:
            search.attempt(self.name, "bias correction", recipe.but(bias_correction=True))


@AUTOQUANT_STEPS.register("adaround")
class AdaRound(Step):
    """``QuantSpec(algorithm="adaround")`` on every weight: learned rounding per layer."""

    name = "adaround"

    def missing(self) -> str | None:
        return None if "adaround" in WEIGHT_ALGORITHMS else \
            "weight algorithm 'adaround' is not registered"

    def run(self, search: Search) -> None:
        recipe = _current(search)

        def adaround(spec: QuantSpec) -> QuantSpec:
            if spec.method != "ste" or spec.dynamic or spec.bits >= 8:
                return spec  # 8-bit rounding error is small; other methods own their rounding
            return dataclasses.replace(spec, algorithm="adaround")

        try:
            config = _map_specs(recipe.config, ("weight",), adaround)
        except (TypeError, ValueError) as err:
            search.notes.append(f"adaround: does not fit this config: {err}")
            return
        if config == recipe.config:
            search.notes.append("adaround: no weight below 8 bits to round")
            return
        search.attempt(self.name, "adaround weights", recipe.but(config=config))


@AUTOQUANT_STEPS.register("tune-scales")
class TuneScales(Step):
    """``lowbit.tune_scales`` after calibration: the codes stay, every weight scale is trained
    on the model's output (defaults: 300 steps, a fifth of the batches held out)."""

    name = "tune-scales"

    def missing(self) -> str | None:
        import lowbit

        return None if hasattr(lowbit, "tune_scales") else "lowbit.tune_scales is not available"

    def run(self, search: Search) -> None:
        recipe = _current(search)
        if recipe.tune_scales:
            return
        specs = [rule.weight for rule in recipe.config.rules if rule.weight is not None]
        if not any(s.method == "ste" and not s.dynamic for s in specs):
            search.notes.append("tune-scales: no uniform weight grid to tune")
            return
        search.attempt(self.name, "weight scales tuned end to end",
                       recipe.but(tune_scales=True))


class KeepSensitive(Step):
    """Keep the layers the analysis finds most sensitive (lowest output SQNR with only that
    layer quantized) at ``level``, the fewest that meet the target: 1, 2, 4, ... layers until
    one count meets it, then a binary search below it. Each count is a real config, built and
    scored. It starts from the best recipe that keeps no layer yet, so the two keep steps do
    not pile up. Under a size cap (``autoquant(max_size=...)``) a layer whose kept weight would
    take the estimate past the cap is passed over, with a note, and the next one tried."""

    level: ClassVar[str] = "float"
    all_allowed: ClassVar[bool] = False  # may every candidate be kept (float: that is no model)

    def prepare(self, search: Search, base: Recipe) -> None:
        """Look-ups the step needs once per run: the base config's plan, made as
        ``Search.build`` quantizes (its warnings are the trials' to give, not the user's)."""
        import lowbit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.plan = {p.name: p for p in lowbit.plan(search.model, base.config,
                                                         search.example_inputs).layers}

    def changes(self, name: str) -> bool:
        """Whether keeping ``name`` at this level changes the layer."""
        return True

    def kept_weight(self, name: str) -> QuantSpec | None:
        """The weight spec of ``name`` kept at this level (None: float)."""
        return None

    def fitting(self, search: Search, candidates: list[str]) -> list[str]:
        """``candidates`` in order, leaving out each one whose kept weight would take the
        estimated weight bytes past ``search.max_bytes`` (with what the earlier ones add)."""
        if search.max_bytes is None:
            return candidates
        from lowbit.analysis.size import weight_bytes

        modules = dict(search.model.named_modules())
        total = search.best_trial_without_kept().weight_bytes
        fit, over = [], []
        for name in candidates:
            entry, weight = self.plan.get(name), getattr(modules.get(name), "weight", None)
            if entry is None or not isinstance(weight, torch.Tensor):
                continue
            shape = tuple(weight.shape)
            grow = (weight_bytes(entry.type, shape, self.kept_weight(name))
                    - weight_bytes(entry.type, shape, entry.weight))
            if total + grow <= search.max_bytes:
                fit.append(name)
                total += grow
            else:
                over.append(name)
        if over:
            search.notes.append(f"{self.name}: {len(over)} layer(s) left out, at {self.level} "
                                f"they would pass the size cap: " + ", ".join(over[:8])
                                + (" ..." if len(over) > 8 else ""))
        return fit

    def kept_rules(self, names: list[str]) -> list[LayerRule]:  # pragma: no cover - abstract
        raise NotImplementedError

    def ranking(self, search: Search, base: Recipe) -> list[str]:
        from lowbit.analysis.analyze import analyze

        # GPTQ, AWQ, AdaRound and scale tuning replace a layer's weight by its rounded value,
        # so the analysis' float pass would run the rounded weights too and see no weight error
        # (SQNR inf): rank on the same grids with round-to-nearest weights instead.
        rtn = _map_specs(base.config, ("weight",), _round_to_nearest)
        if rtn != base.config or base.tune_scales:
            search.notes.append(f"{self.name}: ranked on round-to-nearest weights (the weight "
                                "algorithms replace the float weights the analysis compares "
                                "against)")
            base = base.but(config=rtn, tune_scales=False)
        best = search.best
        model = search.best_model if best is not None and best.recipe == base else None
        if model is None:
            model = search.build(base)
        report = analyze(model, search.calib_batches, search.forward)
        ranked = [r for r in report.ranked() if r.sqnr_isolated is not None]
        search.notes.append(f"{self.name}: layers by SQNR alone (worst first): "
                            + ", ".join(f"{r.name} {r.sqnr_isolated:.1f} dB" for r in ranked[:8])
                            + (" ..." if len(ranked) > 8 else ""))
        return [r.name for r in ranked]

    def run(self, search: Search) -> None:
        base = search.best_without_kept()
        self.prepare(search, base)
        candidates = self.fitting(search, [n for n in self.ranking(search, base)
                                           if self.changes(n)])
        limit = len(candidates) if self.all_allowed else len(candidates) - 1
        if search.max_kept is not None:
            limit = min(limit, search.max_kept)
        if limit < 1:
            search.notes.append(f"{self.name}: no layer to keep at {self.level}")
            return

        def attempt(k: int) -> Any:
            names = candidates[:k]
            config = QuantConfig(rules=[*base.config.rules, *self.kept_rules(names)],
                                 fuse_bn=base.config.fuse_bn)
            return search.attempt(self.name, f"{k} layer(s) at {self.level}: {', '.join(names)}",
                                  base.but(config=config, kept=tuple(names)))

        low, k = 0, 1  # low: the largest count known to miss
        while True:
            trial = attempt(k)
            if trial is None:
                return
            if trial.met:
                break
            low = k
            if k == limit:
                return
            k = min(2 * k, limit)
        high = k  # meets
        while high - low > 1:
            mid = (low + high) // 2
            trial = attempt(mid)
            if trial is None:
                return
            if trial.met:
                high = mid
            else:
                low = mid


@AUTOQUANT_STEPS.register("keep-8bit")
class Keep8Bit(KeepSensitive):
    """The most sensitive layers with 8-bit weights and inputs (where they had fewer bits)."""

    name = "keep-8bit"
    level = "8 bit"
    all_allowed = True

    def changes(self, name: str) -> bool:
        entry = self.plan.get(name)
        return entry is not None and any(
            s is not None and s.bits < 8 for s in (entry.weight, entry.input))

    def kept_weight(self, name: str) -> QuantSpec | None:
        return _at_8(self.plan[name].weight, weight=True)

    def kept_rules(self, names: list[str]) -> list[LayerRule]:
        return [LayerRule(names=[n], weight=_at_8(self.plan[n].weight, weight=True),
                          input=_at_8(self.plan[n].input, weight=False),
                          output=self.plan[n].output) for n in names]


def _round_to_nearest(spec: QuantSpec) -> QuantSpec:
    if spec.algorithm == "rtn":
        return spec
    return dataclasses.replace(spec, algorithm="rtn")


def _at_8(spec: QuantSpec | None, *, weight: bool) -> QuantSpec | None:
    if spec is None or spec.bits >= 8:
        return spec
    try:
        return dataclasses.replace(spec, bits=8)
    except (TypeError, ValueError):  # a method without an 8-bit form (binary, dorefa): uniform
        if weight:
            return QuantSpec(bits=8, symmetric=True, granularity="per_channel")
        return QuantSpec(bits=8, symmetric=False, observer="mse")


@AUTOQUANT_STEPS.register("keep-float")
class KeepFloat(KeepSensitive):
    """The most sensitive layers in float."""

    name = "keep-float"
    level = "float"

    def kept_rules(self, names: list[str]) -> list[LayerRule]:
        return [LayerRule(names=list(names))]
