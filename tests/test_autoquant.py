"""``lowbit.autoquant``: stops at the first trial that meets a reachable target, reports an
unreachable one honestly, names the step whose ``evaluate`` failed, honours every argument,
and takes new steps through its registry."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from models import TwoHeads
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.analysis import AUTOQUANT_STEPS, EvaluateError, Step
from lowbit.analysis.search import Search


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


CALIB = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
EVAL = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(9))
MODEL = tiny_net()
with torch.no_grad():
    REF = MODEL(EVAL)


def w4a8(observer: str = "mse") -> QuantConfig:
    return QuantConfig(rules=[LayerRule(
        types=["Conv2d", "Linear"], weight=QuantSpec(bits=4, symmetric=True,
                                                     granularity="per_channel"),
        input=QuantSpec(bits=8, symmetric=False, observer=observer))])


def neg_mse(model: nn.Module) -> float:
    """Higher is better; 0 for the float model."""
    return -float((model(EVAL) - REF).pow(2).mean())


def observers_of(model: nn.Module) -> set[str]:
    return {q.spec.observer for q in model.modules()
            if isinstance(q, lowbit.Quantizer) and q.role == "input"}


def run(**kwargs):
    args = {"model": MODEL, "config": w4a8(), "calib_batches": CALIB, "evaluate": neg_mse,
            "max_drop": 0.0} | kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.autoquant(args.pop("model"), args.pop("config"), args.pop("calib_batches"),
                                args.pop("evaluate"), args.pop("max_drop"), **args)


@pytest.fixture(scope="module")
def unreachable():
    return run(max_drop=0.0)  # only the float model itself has no drop


def test_an_unreachable_target_is_reported_with_every_step_tried(unreachable):
    r = unreachable
    assert not r.met and not any(t.met for t in r.trials)
    assert r.float_score == 0.0 and r.target == 0.0
    steps = [t.step for t in r.trials]
    assert steps[0] == "as-given" and "observers" in steps
    assert "keep-8bit" in steps and "keep-float" in steps
    assert r.score == max(t.score for t in r.trials)  # the best trial is returned ...
    best = next(t for t in r.trials if t.score == r.score)
    assert r.config == best.recipe.config and r.kept == best.recipe.kept  # ... as it was scored
    with torch.no_grad():
        assert neg_mse(r.model) == pytest.approx(r.score)
    assert all(t.seconds > 0 and t.drop == pytest.approx(-t.score) for t in r.trials)
    for name in ("equalize", "bias-correction", "adaround", "tune-scales"):  # run, or noted
        assert name in steps or any(n.startswith(f"{name}: ") for n in r.notes)
    assert "NOT met" in r.summary()
    # keeping all but one layer in float is the most the float step tries
    assert max(len(t.recipe.kept) for t in r.trials if t.step == "keep-float") == 2
    assert r.to_dict()["trials"][0]["step"] == "as-given"


def test_stops_at_the_first_trial_that_meets_a_reachable_target(unreachable):
    first = unreachable.trials[0]
    # the first observer trial that does better than the config as given becomes the target
    better = next(t for t in unreachable.trials[1:]
                  if t.step == "observers" and t.score > first.score)
    r = run(max_drop=better.drop + 1e-12)
    labels = [t.label for t in r.trials]
    assert labels == [t.label for t in unreachable.trials[:len(labels)]]
    assert labels[-1] == better.label and r.trials[-1].met
    assert r.met and r.score == pytest.approx(better.score)
    assert r.config == better.recipe.config
    assert observers_of(r.model) == {better.label.split("=")[1]}
    # a target the config as given meets: one trial, nothing else tried
    easy = run(max_drop=-first.score + 1e-9)
    assert [t.step for t in easy.trials] == ["as-given"] and easy.met


def test_tuned_scales_are_a_step_whose_model_is_returned_as_scored():
    r = run(steps=["as-given", "tune-scales"])
    first, tuned = r.trials
    assert tuned.step == "tune-scales" and tuned.recipe.tune_scales
    assert "scales tuned" in tuned.recipe.describe()
    assert tuned.score > first.score  # closer to the float model on the evaluation data
    assert r.recipe.tune_scales
    with torch.no_grad():
        assert neg_mse(r.model) == pytest.approx(r.score)
    binary = QuantConfig(rules=[LayerRule(types=["Conv2d", "Linear"],
                                          weight=QuantSpec(bits=1, method="binary"))])
    r = run(config=binary, steps=["as-given", "tune-scales"])
    assert [t.step for t in r.trials] == ["as-given"]
    assert "tune-scales: no uniform weight grid to tune" in r.notes


def test_keep_steps_find_the_fewest_sensitive_layers():
    # Only the keep step after the config as given: earlier recovery steps would change the
    # recipe the kept layers are added to.
    keep = [t for t in run(steps=["as-given", "keep-float"]).trials if t.step == "keep-float"]
    assert [len(t.recipe.kept) for t in keep] == [1, 2]  # 1, then doubled up to the limit
    # the target that two float layers meet but one does not: the search ends with two
    two = keep[1]
    steps = ["as-given", "keep-float"]
    if keep[0].score < two.score:
        r = run(max_drop=two.drop + 1e-12, steps=steps)
        assert r.met and len(r.kept) == 2 and r.kept == two.recipe.kept
    # kept layers come from the analysis: the worst SQNR alone first
    qm = lowbit.quantize(MODEL, w4a8())
    lowbit.calibrate(qm, CALIB, progress=False)
    worst = lowbit.analyze(qm, CALIB).ranked()[0].name
    assert keep[0].recipe.kept == (worst,)
    r = run(steps=steps, max_kept=1)
    assert max(len(t.recipe.kept) for t in r.trials) == 1


def test_evaluate_errors_name_the_step():
    def fails_on_kl(model: nn.Module) -> float:
        if observers_of(model) == {"kl"}:
            raise ZeroDivisionError("boom")
        return neg_mse(model)

    with pytest.raises(EvaluateError, match=r"raised ZeroDivisionError in step 'observers' "
                                            r"\(observer=kl\): boom"):
        run(evaluate=fails_on_kl)
    with pytest.raises(EvaluateError, match=r"returned NaN in step 'as-given'"):
        run(evaluate=lambda m: math.nan if observers_of(m) else 0.0)
    with pytest.raises(EvaluateError, match=r"returned NaN in step 'float'"):
        run(evaluate=lambda m: float("nan"))
    with pytest.raises(TypeError, match=r"`evaluate` must return a number .* got str 'good' "
                                        r"in step 'float'"):
        run(evaluate=lambda m: "good")
    assert run(evaluate=lambda m: torch.tensor(1.0), max_drop=0.5).score == 1.0  # 0-d tensors


def test_budget_stops_new_trials():
    r = run(budget=1e-9)
    assert [t.step for t in r.trials] == ["as-given"]
    assert any(n.startswith("budget spent") for n in r.notes)


class Recorder(Step):
    """A step registered from outside: it tries float weights on the last layer."""

    name = "test-recorder"
    calls = 0

    def run(self, search: Search) -> None:
        type(self).calls += 1
        base = search.best.recipe
        rules = [*base.config.rules, LayerRule(names=["5"])]
        search.attempt(self.name, "last layer float", base.but(config=QuantConfig(rules=rules)))


class Missing(Step):
    name = "test-missing"

    def missing(self) -> str | None:
        return "its API is not in this lowbit"


AUTOQUANT_STEPS.register("test-recorder")(Recorder)
AUTOQUANT_STEPS.register("test-missing")(Missing)


def test_steps_plug_in_through_the_registry_and_missing_apis_are_noted():
    r = run(steps=["as-given", "test-missing", "test-recorder"])
    assert [t.step for t in r.trials] == ["as-given", "test-recorder"]
    assert Recorder.calls == 1
    assert "test-missing: skipped, its API is not in this lowbit" in r.notes
    assert not isinstance(r.model[5], lowbit.nn.QuantLayer)


def test_speed_relative_to_the_first_trial():
    r = run(steps=["as-given", "test-recorder"], example_inputs=(EVAL[:4],))
    assert r.speed_vs_first is not None and r.speed_vs_first > 0
    assert run(max_drop=1.0, example_inputs=(EVAL[:4],)).speed_vs_first == 1.0


def test_model_is_left_untouched():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(model=model, steps=["as-given", "observers"], max_drop=1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, lowbit.nn.QuantLayer) for m in model.modules())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"model": 3}, TypeError, "`model` must be a torch.nn.Module, got int"),
    ({"config": "w4a8"}, TypeError, "`config` must be a QuantConfig, got str"),
    ({"calib_batches": CALIB[0]}, TypeError, "`calib_batches` must be an iterable"),
    ({"calib_batches": iter(CALIB)}, TypeError, "not an iterator"),
    ({"calib_batches": []}, ValueError, "`calib_batches` is empty"),
    ({"evaluate": 1.0}, TypeError, "`evaluate` must be callable"),
    ({"max_drop": -0.1}, ValueError, "`max_drop` must be a finite number >= 0, got -0.1"),
    ({"max_drop": "1%"}, TypeError, "`max_drop` must be a number, got str"),
    ({"max_drop": math.inf}, ValueError, "`max_drop` must be a finite number"),
    ({"budget": 0}, ValueError, "`budget` must be a finite number > 0, got 0"),
    ({"steps": "observers"}, TypeError, "`steps` must be a non-empty list"),
    ({"steps": ["as-given", "magic"]}, ValueError, r"`steps` must be one of \[.*'observers'"),
    ({"steps": ["as-given", "observers", "observers"]}, ValueError, "names a step twice"),
    ({"steps": ["observers"]}, ValueError, "must start with 'as-given'"),
    ({"forward": 2}, TypeError, "`forward` must be callable"),
    ({"max_kept": 0}, ValueError, "`max_kept` must be a positive int or None, got 0"),
    ({"example_inputs": EVAL}, TypeError, "`example_inputs` must be a non-empty tuple"),
], ids=["model", "config", "tensor", "iterator", "empty", "evaluate", "drop<0", "drop-str",
        "drop-inf", "budget", "steps-str", "steps-unknown", "steps-twice", "steps-first",
        "forward", "max_kept", "example_inputs"])
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        run(**kwargs)


def test_a_quantized_model_is_refused():
    qm = lowbit.quantize(MODEL, w4a8())
    with pytest.raises(ValueError, match="already quantized"):
        run(model=qm)


def test_forward_is_used_for_calibration():
    seen = []

    def forward(model, batch):
        seen.append(1)
        return model(batch["x"])

    r = run(calib_batches=[{"x": b} for b in CALIB], forward=forward, steps=["as-given"])
    assert len(seen) == len(CALIB) and len(r.trials) == 1


def test_the_trials_of_a_model_fx_cannot_trace_quantize_with_the_example_inputs():
    """Given ``example_inputs``, every trial traces the model on them, as ``lowbit.quantize``
    does: two heads reading one tensor share its quantizer (one quantizer per tensor). Without
    them, the trials cannot know who reads what, and each head keeps its own."""

    class Branchy(TwoHeads):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.body(x))
            return (self.a(h) + self.b(h)) if x.sum() > -1e9 else self.a(h)  # no fx

    torch.manual_seed(0)
    model, calib = Branchy().eval(), [torch.randn(16, 6) for _ in range(2)]
    config = QuantConfig(rules=[LayerRule(types=["Linear"], weight=QuantSpec(bits=8),
                                          input=QuantSpec(bits=8, symmetric=False))])
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = lowbit.autoquant(model, config, calib, lambda m: 0.0, 1.0, example_inputs=(x,))
        blind = lowbit.autoquant(model, config, calib, lambda m: 0.0, 1.0)
    assert traced.model.a.input_quant is traced.model.b.input_quant
    assert blind.model.a.input_quant is not blind.model.b.input_quant


def test_the_keep_steps_do_not_warn_about_tracing_a_model_that_fx_cannot_trace():
    """Without example inputs, the search quantizes its trials untraced; the keep steps' plan is
    made the same way, so a model fx cannot trace gets no "pass example_inputs" warning it
    cannot act on (autoquant's caller never calls quantize or plan)."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) if x.sum() > -1e9 else -self.net(x)  # data-dependent: no fx

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.autoquant(Branchy().eval(), w4a8(), CALIB, lambda m: -float(m(EVAL).pow(2).mean()),
                         0.0, steps=["as-given", "keep-float"])
    assert not [w for w in caught if "could not trace" in str(w.message)]
