"""The zoo sweep on a fast subset: a few small random-init Hugging Face models of different
families through quantize → calibrate → convert → export_onnx → ONNX Runtime
(``benchmarks/zoo.py``, imported by path), one test per model x preset x target.

A target the library misses today is marked ``xfail(strict=True)`` with its cause, so the test
fails the day the library meets it and the mark must go."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import zoo  # noqa: E402
import zoo_models  # noqa: E402

import lowbit  # noqa: E402


def xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


MBV1_COSINE = xfail("random-init HF MobileNetV1 under w8a8 reaches cosine 0.887: inside its rounding "
                    "floor (+-half-step noise on the weights alone: 0.87-0.98 over five draws), "
                    "and ORT's own int8 file reaches 0.862")

# (model, preset) -> marks per target; targets absent here are expected to hold today.
CASES: dict[tuple[str, str], dict[str, Any]] = {
    ("resnet", "w8a8"): {},
    ("mobilenet_v1", "w8a8"): {"cosine": MBV1_COSINE},
    ("vit", "w8a8-transformer"): {},  # calibrate leaves SmoothQuant off (it cost 0.982)
    ("bert", "w8a8-transformer"): {},
    ("gpt2", "w8a8-transformer"): {},  # codes drifted (98.2%) while it was smoothed
}
TARGETS = ("exports", "no_silent_float", "codes", "local_codes", "cosine")


def _params() -> list[Any]:
    out = []
    for (model, preset), marks in CASES.items():
        checks = TARGETS + (("bn_folded",) if zoo_models.BY_NAME[model].is_cnn else ())
        for check in checks:
            mark = marks.get(check)
            out.append(pytest.param(model, preset, check, id=f"{model}-{preset}-{check}",
                                    marks=[mark] if mark else []))
    return out


@functools.cache
def _baseline(model: str, folder: str) -> zoo.FloatBaseline:
    return zoo.FloatBaseline(zoo_models.BY_NAME[model], Path(folder), threads=1,
                             fp32_file=False)


@functools.cache
def _row(model: str, preset: str, folder: str) -> dict[str, Any]:
    zm = zoo_models.BY_NAME[model]
    return zoo.run_row(zm, preset, _baseline(model, folder), Path(folder), speed=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("zoo"))


@pytest.mark.parametrize(("model", "preset", "check"), _params())
def test_zoo_row(folder: str, model: str, preset: str, check: str) -> None:
    row = _row(model, preset, folder)
    if check == "exports":
        assert row["export"] == "ok", row["export"]  # dynamic batch included
    elif check == "no_silent_float":
        assert row["silently_float"] == [], row["silently_float"]
    elif check == "codes":
        assert row["codes_identical"] is not None and row["codes_identical"] >= 0.999, row
    elif check == "local_codes":  # fed ORT's own input codes, each layer computes the same
        assert row["local_identical"] is not None and row["local_identical"] >= 0.999, row
        assert row["local_max_diff"] <= 1, row
    elif check == "cosine":
        assert row["cosine"] is not None and row["cosine"] >= 0.99, row.get("cosine")
    elif check == "bn_folded":
        assert row["folded_bn"] > 0 and row["bn_left"] == 0, (row["folded_bn"], row["bn_left"])


# ------------------------------------------------------------------------- the harness itself


class _Projection(nn.Module):
    """A weight layer lowbit does not know (like HF's Conv1D) and a per-channel scale."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.gamma = _Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma(x @ self.weight)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 1, 8))  # one non-singleton dim: a scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_silently_float_finds_unknown_weight_layers_only(quiet) -> None:
    model = nn.Sequential(nn.Linear(8, 8), _Projection(),
                          nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)))
    qm = lowbit.quantize(model, lowbit.QuantConfig.preset("w8"))
    # The plain and the weight-normed Linear are quantized; the scale is not a weight layer; the
    # unknown projection stays float, and lowbit's plan lists it: nothing is silently float.
    assert zoo.silently_float(qm, qm.lowbit_plan) == []
    assert "1" in qm.lowbit_plan.skipped and "2" not in qm.lowbit_plan.float_layers
    qm.lowbit_plan.skipped.pop("1")  # a plan that forgot it: the harness finds it
    assert zoo.silently_float(qm, qm.lowbit_plan) == ["1 (_Projection)"]


def test_a_failing_model_is_a_failed_row_not_a_crashed_sweep(tmp_path, monkeypatch) -> None:
    def broken() -> nn.Module:
        raise ValueError("no such layer")

    bad = zoo_models.ZooModel("broken", "encoder", broken, "tokens")
    monkeypatch.setitem(zoo_models.BY_NAME, "broken", bad)
    monkeypatch.setitem(zoo.BY_NAME, "broken", bad)
    rows = zoo.sweep(["broken"], ["w8"], speed=False, threads=1, repeats=1, row_timeout=60,
                     folder=tmp_path, say=lambda *a: None)
    assert [(r["preset"], r["stage"], r["pass"]) for r in rows] == [("w8", "build", False)]
    assert rows[0]["error"] == "ValueError: no such layer"


def test_targets_judge_each_row() -> None:
    cnn = zoo_models.BY_NAME["resnet"]
    row = {"export": "ok", "preset": "w8a8", "silently_float": [], "codes_identical": 0.9995,
           "cosine": 0.985, "speed_b1": 1.2, "speed_b8": 0.9}
    assert zoo.targets(row, cnn) == {"exports": True, "no_silent_float": True, "codes": True,
                                     "local_codes": None, "cosine": False, "cnn_speed": False}
    row = {**row, "codes_identical": 0.98, "local_identical": 0.99999,
           "local_max_diff": 1}  # drift; the kernels agree
    assert zoo.targets(row, cnn)["codes"] is False and zoo.targets(row, cnn)["local_codes"]
    assert zoo.targets({**row, "local_max_diff": 5}, cnn)["local_codes"] is False
    row = {"export": "export: ValueError: x", "preset": "w4-g128"}
    assert zoo.targets(row, zoo_models.BY_NAME["bert"]) == {
        "exports": False, "no_silent_float": None, "codes": None, "local_codes": None,
        "cosine": None, "cnn_speed": None}


def test_the_rounding_floor_is_several_noise_draws() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = (torch.randn(8, 16),)
    with torch.no_grad():
        reference = model(x[0]).numpy()
    before = model[0].weight.detach().clone()
    draws = zoo.rounding_floor(model, x, reference, seeds=4)
    assert len(draws) == 4 and len(set(draws)) == 4 and all(0.99 < d < 1 for d in draws)
    coarse = zoo.rounding_floor(model, x, reference, bits=3, seeds=4)
    assert max(coarse) < min(draws)  # a coarser grid costs more
    assert torch.equal(model[0].weight, before)  # the noise went on copies
