"""Property tests: building QuantSpec / LayerRule / QuantConfig / Plan from arbitrary values
either succeeds or raises TypeError/ValueError (never anything else), and whatever builds
round-trips exactly through dicts and YAML/JSON files; arbitrary file text is read or refused
with an error naming the file."""

from __future__ import annotations

import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit import LayerPlan, LayerRule, Plan, QuantConfig, QuantSpec

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 300),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                     st.lists(st.integers(0, 3), max_size=2))
likely = {
    "bits": st.integers(0, 9), "granularity": st.sampled_from(["per_tensor", "per_channel",
                                                               "per_group", "per_row"]),
    "method": st.sampled_from(["ste", "lsq", "pact", "dorefa", "binary", "slb", "nope"]),
    "observer": st.sampled_from(["minmax", "ema", "percentile", "kl", "mse", "avg"]),
    "symmetric": st.booleans(), "group_size": st.one_of(st.none(), st.integers(-1, 64)),
    "axis": st.one_of(st.none(), st.integers(-3, 3)), "dynamic": st.booleans(),
}
FIELD_NAMES = [f.name for f in fields(QuantSpec)]


@st.composite
def spec_kwargs(draw: Any) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=5, unique=True))
    out = {}
    for name in names:
        strategy = likely.get(name, anything)
        out[name] = draw(st.one_of(strategy, anything) if draw(st.booleans()) else strategy)
    return out


def _build(cls: Any, **kwargs: Any) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, NotImplementedError):
        return None


@SETTINGS
@given(spec_kwargs())
def test_quant_spec_builds_or_raises_a_clear_error(kwargs: dict[str, Any]) -> None:
    spec = _build(QuantSpec, **kwargs)
    if spec is not None:
        assert QuantSpec.from_dict(spec.to_dict()) == spec


@SETTINGS
@given(spec_kwargs(), st.lists(st.sampled_from(["Linear", "Conv2d", "Conv1d", "Dense", ""]),
                               max_size=2),
       st.lists(st.text(max_size=6), max_size=2), st.sampled_from(["weight", "input", "output"]))
def test_layer_rule_and_config_round_trip_through_files(kwargs, types, names, target) -> None:
    spec = _build(QuantSpec, **kwargs)
    rule = _build(LayerRule, types=types, names=names, **{target: spec})
    if rule is None:
        return
    config = QuantConfig(rules=[rule])
    assert QuantConfig.from_dict(config.to_dict()) == config
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".yaml", ".json"):
            path = Path(folder) / f"c{suffix}"
            config.to_file(path)
            assert QuantConfig.from_file(path) == config


@SETTINGS
@given(spec_kwargs(), st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3))
def test_plans_round_trip_through_files(kwargs, names) -> None:
    spec = _build(QuantSpec, **kwargs)
    layers = [LayerPlan(name=n, type="Linear", weight=spec) for n in dict.fromkeys(names)]
    the_plan = Plan(layers=layers)
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".yaml", ".json"):
            path = Path(folder) / f"p{suffix}"
            the_plan.to_file(path)
            assert Plan.from_file(path) == the_plan


@SETTINGS
@given(st.text(max_size=80), st.sampled_from([".yaml", ".json"]))
def test_arbitrary_file_text_is_read_or_refused_naming_the_file(text: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"arbitrary{suffix}"
        path.write_text(text)
        for reader in (QuantConfig.from_file, Plan.from_file):
            try:
                reader(path)
            except (TypeError, ValueError) as err:
                assert "arbitrary" in str(err) or "`" in str(err), str(err)
