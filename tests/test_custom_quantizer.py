"""A user's own algorithm: one class, one decorator, and the whole flow works with it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QParams, QuantConfig, QuantSpec
from lowbit.numerics import IntRange, round_ste


@lowbit.register_quantizer("ternary")
class Ternary(lowbit.Quantizer):
    """Weights in {-s, 0, +s} with s = 0.7·mean|w| (ternary weight networks), STE gradient."""

    supported_bits = (2,)
    roles = ("weight",)

    def __init__(self, spec: QuantSpec, *, role, axis) -> None:
        super().__init__(spec, role=role, axis=axis)
        self.grid = IntRange(2, signed=True, narrow=True)  # codes -1, 0, 1

    def _scale(self, w: torch.Tensor) -> torch.Tensor:
        return 0.7 * w.detach().abs().mean()

    def train_forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self._scale(w)
        return round_ste((w / s).clamp(-1, 1)) * s

    eval_forward = train_forward

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        s = self._scale(weight)
        codes = torch.round((weight.detach() / s).clamp(-1, 1))
        return codes, QParams(s, torch.zeros((), dtype=torch.int32), self.grid, None)

    def qparams(self) -> QParams:  # only the weight's own call knows its scale
        return QParams(torch.ones(()), torch.zeros((), dtype=torch.int32), self.grid, None)


def test_registered_quantizer_trains_converts_and_exports(tmp_path):
    cfg = QuantConfig(rules=[LayerRule(types=["Linear"], weight=QuantSpec(bits=2,
                                                                          method="ternary"))])
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    qm = lowbit.prepare_qat(model, cfg)
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    before = qm[0].weight.detach().clone()
    for _ in range(3):
        qm(torch.randn(8, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, qm[0].weight), "the STE passes gradients to the weight"

    dm = lowbit.convert(qm)
    assert set(dm[0].weight.codes.unique().tolist()) <= {-1, 0, 1}
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(dm(x), qm.eval()(x), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lowbit.export_onnx(dm, tmp_path / "ternary.onnx", (x,))
    assert report.parity.output_max_lsb <= 1.0


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        lowbit.register_quantizer("ste")(Ternary)


def test_a_spec_for_an_unsupported_role_names_the_method():
    with pytest.raises(ValueError, match="'ternary' quantizes weights only"):
        LayerRule(input=QuantSpec(bits=2, method="ternary"))
