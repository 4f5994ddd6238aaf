"""AdaRound (docs/algorithms.md §13): learned rounding beats nearest, survives export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.algorithms.adaround import (
    AdaRoundOptions,
    adaround_codes,
    beta_at,
    layer_op,
    rectified_sigmoid,
    register_adaround,
)
from lowbit.numerics import IntRange, dequantize, qparams_from_range, quantize
from lowbit.quantizers.base import QParams
from lowbit.registry import WEIGHT_ALGORITHMS

FAST = AdaRoundOptions(iterations=200, batch_size=64)


def _qparams(w: torch.Tensor, bits: int = 4) -> QParams:
    rows = w.reshape(w.shape[0], -1)
    grid = IntRange(bits, signed=True)
    scale, zp = qparams_from_range(rows.amin(1), rows.amax(1), grid, symmetric=True)
    return QParams(scale, zp, grid, axis=0)


def _error(layer: nn.Module, codes: torch.Tensor, qp: QParams, x: torch.Tensor) -> float:
    op = layer_op(layer)
    w = dequantize(codes, qp.scale, qp.zero_point, qp.axis)
    with torch.no_grad():
        return float((op(x, w) - op(x, layer.weight)).pow(2).mean())


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_adaround_beats_round_to_nearest_on_held_out_inputs(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(48, 16)
        mix = torch.randn(48, 48, generator=g) / 48**0.5
        x = torch.randn(1024, 48, generator=g) @ mix + 0.5  # correlated, offset inputs
    else:
        layer = nn.Conv2d(6, 8, 3, padding=1)
        x = torch.randn(256, 6, 6, 6, generator=g).cumsum(dim=1) / 2 + 0.5
    calib, held_out = x[: len(x) // 2], x[len(x) // 2:]
    qp = _qparams(layer.weight.detach())
    nearest = quantize(layer.weight.detach(), qp.scale, qp.zero_point, qp.grid, qp.axis)
    learned = adaround_codes(layer.weight, qp, calib, layer_op(layer), FAST)
    assert learned.shape == layer.weight.shape
    assert bool(((learned >= qp.grid.qmin) & (learned <= qp.grid.qmax)).all())
    # Every code is the floor or the ceiling of W/s: AdaRound only picks the direction.
    ratio = layer.weight.detach() / qp.scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    assert bool(((learned == ratio.floor()) | (learned == ratio.ceil())).all())
    assert _error(layer, learned, qp, held_out) < 0.8 * _error(layer, nearest, qp, held_out)


def test_rectified_sigmoid_and_beta_schedule() -> None:
    assert float(rectified_sigmoid(torch.tensor(0.0))) == pytest.approx(0.5)
    h = rectified_sigmoid(torch.linspace(-20, 20, 101))
    assert float(h.min()) == 0.0 and float(h.max()) == 1.0
    opts = AdaRoundOptions(iterations=100, warm_up=0.2)
    assert beta_at(0, opts) is None and beta_at(19, opts) is None
    assert beta_at(20, opts) == pytest.approx(20.0)
    assert beta_at(100, opts) == pytest.approx(2.0)
    assert 2.0 < beta_at(60, opts) < 20.0


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


def _config(algorithm: str) -> QuantConfig:
    return QuantConfig(rules=[LayerRule(
        types=["Conv2d", "Linear"],
        weight=QuantSpec(bits=4, granularity="per_channel", algorithm=algorithm),
        input=QuantSpec(bits=8, symmetric=False))])


register_adaround("adaround-test", AdaRoundOptions(iterations=100, batch_size=32))


@pytest.fixture(scope="module")
def calibrated() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = _net()
    batches = [torch.randn(16, 2, 6, 6) for _ in range(4)]
    qm = lowbit.quantize(model, _config("adaround-test"))
    lowbit.calibrate(qm, batches, progress=False)
    return model, qm, batches


def test_weights_are_their_pinned_codes(calibrated) -> None:
    model, qm, _ = calibrated
    for name in ("0", "3", "7"):
        layer = qm.get_submodule(name)
        q = layer.weight_quant
        assert bool(q.pinned), name
        codes, qp = q.quantize_weight(layer.weight)
        w = dequantize(codes, qp.scale, qp.zero_point, qp.axis)
        assert torch.equal(w, layer.weight.detach()), name
    assert not torch.equal(qm.get_submodule("3").weight, model[3].weight)


def test_codes_survive_convert_export_and_onnx_runtime(calibrated, tmp_path, quiet) -> None:
    _, qm, batches = calibrated
    dm = lowbit.convert(qm)
    x = batches[0]
    with torch.no_grad():
        assert torch.equal(dm(x), qm(x))
    report = lowbit.export_onnx(dm, tmp_path / "adaround.onnx", (x,))
    parity = report.parity
    assert parity.codes_identical is not None and parity.codes_identical >= 0.99
    assert parity.codes_max_diff <= 1 and parity.output_max_lsb <= 1.01


def test_codes_survive_state_dict(calibrated, quiet) -> None:
    model, qm, batches = calibrated
    fresh = lowbit.quantize(model, _config("adaround-test"))
    fresh.load_state_dict(qm.state_dict())
    fresh.eval()
    layer = fresh.get_submodule("3")
    assert bool(layer.weight_quant.pinned)
    layer.refresh_weight_range()  # a pinned range is never re-derived from the weight
    with torch.no_grad():
        assert torch.equal(fresh(batches[1]), qm(batches[1]))


def test_adaround_lowers_model_output_error_against_nearest(quiet) -> None:
    torch.manual_seed(1)
    model = _net()
    batches = [torch.randn(32, 2, 6, 6) for _ in range(4)]
    test = torch.randn(64, 2, 6, 6)
    errors = {}
    for algorithm in ("rtn", "adaround-test"):
        qm = lowbit.quantize(model, _config(algorithm))
        lowbit.calibrate(qm, batches, progress=False)
        with torch.no_grad():
            errors[algorithm] = float((qm(test) - model(test)).pow(2).mean())
    assert errors["adaround-test"] < errors["rtn"]


def test_options_are_honoured() -> None:
    layer = nn.Linear(16, 8)
    x = torch.randn(256, 16) + 1
    qp = _qparams(layer.weight.detach())
    few = adaround_codes(layer.weight, qp, x, layer_op(layer), AdaRoundOptions(iterations=1))
    nearest = quantize(layer.weight.detach(), qp.scale, qp.zero_point, qp.grid, qp.axis)
    assert torch.equal(few, nearest)  # one small step from h = frac(W/s): still nearest
    many = adaround_codes(layer.weight, qp, x, layer_op(layer), FAST)
    assert not torch.equal(many, nearest)


def test_registered_variants_and_the_default() -> None:
    assert "adaround" in WEIGHT_ALGORITHMS and "adaround-test" in WEIGHT_ALGORITHMS
    assert WEIGHT_ALGORITHMS.get("adaround-test").options.iterations == 100
    assert QuantSpec(bits=4, algorithm="adaround").algorithm == "adaround"
    with pytest.raises(TypeError, match="AdaRoundOptions"):
        register_adaround("adaround-bad", {"iterations": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"iterations": 0}, ValueError, r"AdaRoundOptions.`iterations` must be >= 1, got 0"),
    ({"iterations": 1.5}, TypeError, r"AdaRoundOptions.`iterations` must be int, got float"),
    ({"batch_size": 0}, ValueError, r"`batch_size` must be >= 1"),
    ({"reg": -1.0}, ValueError, r"`reg` must be >= 0, got -1.0"),
    ({"reg": "big"}, TypeError, r"`reg` must be float, got str"),
    ({"warm_up": 1.0}, ValueError, r"`warm_up` must be in \[0, 1\), got 1.0"),
    ({"lr": 0.0}, ValueError, r"`lr` must be > 0"),
    ({"beta": (2.0, 20.0)}, ValueError, r"`beta` must satisfy start >= end > 0"),
    ({"beta": [20, 2]}, TypeError, r"`beta` must be a \(start, end\) tuple"),
], ids=["iterations", "iterations-type", "batch_size", "reg", "reg-type", "warm_up", "lr",
        "beta-order", "beta-type"])
def test_option_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        AdaRoundOptions(**kwargs)
