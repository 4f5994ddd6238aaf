"""AdaRound on transformer-shaped inputs: ragged sequence lengths, per-group weights, a real
(random-init) BERT from ``transformers``; the faster soft weight equals the paper's formula."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import tiny_bert
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.algorithms.adaround import (
    AdaRoundOptions,
    SoftWeight,
    adaround_codes,
    layer_op,
    rectified_sigmoid,
    register_adaround,
)
from lowbit.numerics import IntRange, broadcast_param, dequantize, qparams_from_range, quantize
from lowbit.quantizers.base import QParams

register_adaround("adaround-tiny", AdaRoundOptions(iterations=60, batch_size=64))


def _group_qparams(w: torch.Tensor, group: int, bits: int = 4) -> QParams:
    rows = w.reshape(w.shape[0], -1, group)
    grid = IntRange(bits, signed=False)
    scale, zp = qparams_from_range(rows.amin(-1), rows.amax(-1), grid, symmetric=False)
    return QParams(scale.reshape(w.shape[0], -1), zp.reshape(w.shape[0], -1), grid, axis=1,
                   group_size=group)


def _paper_soft_weight(v: torch.Tensor, w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``s·(clip(⌊W/s⌋ + h(V) + z, qmin, qmax) − z)`` written out as in the paper."""
    s = broadcast_param(qp.scale.float(), w, qp.axis, qp.group_size)
    z = broadcast_param(qp.zero_point.float(), w, qp.axis, qp.group_size)
    floor = torch.floor(w / s)
    codes = torch.clamp(floor + rectified_sigmoid(v) + z, qp.grid.qmin, qp.grid.qmax)
    return s * (codes - z)


def test_soft_weight_and_its_gradient_match_the_paper_formula_at_the_grid_edges() -> None:
    """The optimiser folds the grid's clip into bounds on h; values and gradients must equal
    the plain formula, also for weights outside the grid (a range pinned narrower than W)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g)
    qp = _group_qparams(w * 0.6, 8)  # a narrower grid: many weights fall outside it
    s = broadcast_param(qp.scale.float(), w, qp.axis, qp.group_size)
    z = broadcast_param(qp.zero_point.float(), w, qp.axis, qp.group_size)
    floor = torch.floor(w / s)
    assert bool(((floor + z < qp.grid.qmin) | (floor + z >= qp.grid.qmax)).any())
    v0 = torch.randn(6, 32, generator=g) * 3
    x = torch.randn(40, 32, generator=g)
    got = []
    for formula in ("paper", "folded"):
        v = nn.Parameter(v0.clone())
        if formula == "paper":
            wq = _paper_soft_weight(v, w, qp)
        else:
            soft = SoftWeight.build(floor, s, z, qp)
            wq = soft.weight(soft.h(v))
        (x @ wq.T).pow(2).sum().backward()
        assert v.grad is not None
        got.append((wq.detach(), v.grad.clone()))
    assert torch.allclose(got[0][0], got[1][0], atol=1e-6)
    assert torch.allclose(got[0][1], got[1][1], rtol=1e-4, atol=1e-5)


def test_per_group_codes_are_floor_or_ceiling_and_beat_nearest() -> None:
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(64, 24)
    mix = torch.randn(64, 64, generator=g) / 8
    x = torch.randn(2048, 64, generator=g) @ mix + 0.3
    calib, held_out = x[:1024], x[1024:]
    qp = _group_qparams(layer.weight.detach(), 16)
    codes = adaround_codes(layer.weight, qp, calib, layer_op(layer),
                           AdaRoundOptions(iterations=300, batch_size=128))
    s = broadcast_param(qp.scale, layer.weight, 1, 16)
    z = broadcast_param(qp.zero_point.float(), layer.weight, 1, 16)
    ratio = layer.weight.detach() / s + z
    assert bool(((codes == ratio.floor()) | (codes == ratio.ceil())).all())
    nearest = quantize(layer.weight.detach(), qp.scale, qp.zero_point, qp.grid, 1, 16)

    def error(c: torch.Tensor) -> float:
        wq = dequantize(c, qp.scale, qp.zero_point, 1, 16)
        with torch.no_grad():
            return float((layer(held_out) - nn.functional.linear(held_out, wq, layer.bias))
                         .pow(2).mean())

    assert error(codes) < 0.8 * error(nearest)


class TinyFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _w4_g16(algorithm: str) -> QuantConfig:
    return QuantConfig(rules=[LayerRule(types=["Linear"], weight=QuantSpec(
        bits=4, symmetric=False, granularity="per_group", group_size=16, algorithm=algorithm))])


def test_linear_inputs_of_different_sequence_lengths_are_joined_as_rows() -> None:
    """Tokenizer batches padded per batch have different lengths: (2, 5, 16), (2, 9, 16)."""
    torch.manual_seed(0)
    model = TinyFFN().eval()
    batches = [torch.randn(2, n, 16) for n in (5, 9, 7, 12)]
    test = torch.randn(4, 11, 16)
    errors = {}
    for algorithm in ("rtn", "adaround-tiny"):
        qm = lowbit.quantize(model, _w4_g16(algorithm))
        lowbit.calibrate(qm, batches, progress=False)
        with torch.no_grad():
            errors[algorithm] = float((qm(test) - model(test)).pow(2).mean())
        assert bool(qm.down.weight_quant.pinned) == (algorithm != "rtn")
    assert errors["adaround-tiny"] < errors["rtn"]


def test_conv_inputs_of_other_shapes_are_left_out_with_a_warning_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3)).eval()
    cfg = QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=QuantSpec(
        bits=4, granularity="per_channel", algorithm="adaround-tiny"))])
    qm = lowbit.quantize(model, cfg)
    with pytest.warns(UserWarning, match=r"adaround: layer '0' read inputs of several shapes"):
        lowbit.calibrate(qm, [torch.randn(4, 2, 8, 8), torch.randn(4, 2, 10, 10)],
                         progress=False)
    assert bool(qm[0].weight_quant.pinned)


def test_random_init_bert_with_ragged_batches() -> None:
    model = tiny_bert(vocab_size=120, hidden_size=32, heads=2, intermediate_size=64)
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (7, 13, 10):
        ids = torch.randint(5, 120, (3, n), generator=g)
        mask = torch.ones(3, n, dtype=torch.long)
        mask[0, n // 2:] = 0  # padding, as a tokenizer gives it
        batches.append({"input_ids": ids, "attention_mask": mask})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, _w4_g16("adaround-tiny"))
    lowbit.calibrate(qm, batches, progress=False)
    pinned = [m.layer_name for m in qm.modules()
              if getattr(m, "weight_quant", None) is not None and m.weight_quant.pinned]
    assert "encoder.layer.1.output.dense" in pinned
    assert len(pinned) == 2 * 6 + 1  # q, k, v, attention out, FFN up, FFN down; pooler
