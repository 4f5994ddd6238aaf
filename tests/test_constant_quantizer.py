"""A quantizer that maps every value of its tensor to one code warns once, naming the layer and
the fix: after calibration, on the first quantized training batch and on the first eval batch
after training; never on healthy quantizers or on a tensor that is itself constant."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.quantizers import Quantizer
from lowbit.quantizers.base import ConstantQuantizerWarning

SIGN = QuantSpec(bits=1, method="binary")
pytestmark = pytest.mark.filterwarnings("ignore:lowbit left")


def relu_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 3)).eval()


def batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(8, 1, 4, 4) for _ in range(n)]


def constant_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ConstantQuantizerWarning)]


def test_calibration_warns_for_a_binary_input_after_a_relu() -> None:
    cfg = QuantConfig(rules=[LayerRule(names=["3"], input=SIGN)])
    qm = lowbit.quantize(relu_net(), cfg)
    with pytest.warns(ConstantQuantizerWarning) as record:
        lowbit.calibrate(qm, batches(), progress=False)
    (message,) = constant_warnings(record)
    assert "input quantizer of layer '3'" in message and "all quantize to 1" in message
    assert "inputs lie in [0," in message
    assert "binary" in message and "sign before the ReLU" in message and "signed=False" in message


def test_calibration_warns_for_an_unsigned_grid_on_non_positive_inputs() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():  # the second layer's input is -ReLU(...) <= 0
        model[0].weight.neg_()
    negated = nn.Sequential(model[0], nn.ReLU(), _Neg(), model[2])
    # DoReFa activations clip to [0, 1] (zero point 0): every value <= 0 becomes code 0
    cfg = QuantConfig(rules=[LayerRule(types=["Linear"],
                                       input=QuantSpec(bits=2, method="dorefa", signed=False))])
    qm = lowbit.quantize(negated, cfg)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lowbit.calibrate(qm, [torch.randn(16, 6) for _ in range(2)], progress=False)
    messages = constant_warnings(record)
    assert len(messages) == 1 and "layer '3'" in messages[0] and "uint2" in messages[0]
    assert "all <= 0" in messages[0] and "affine or signed grid" in messages[0]


class _Neg(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_no_warning_for_healthy_quantizers_or_constant_tensors() -> None:
    qm = lowbit.quantize(relu_net(), QuantConfig.preset("w8a8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantQuantizerWarning)
        lowbit.calibrate(qm, batches(), progress=False)
        qm(torch.randn(4, 1, 4, 4))
        # all zeros: the tensor itself is constant, not the quantizer's doing
        binary = lowbit.quantize(relu_net(), QuantConfig(rules=[LayerRule(names=["0"],
                                                                          input=SIGN)]))
        lowbit.calibrate(binary, [torch.zeros(4, 1, 4, 4)], progress=False)
        binary(torch.zeros(2, 1, 4, 4))


def test_a_degenerate_fixed_range_warns_on_the_first_eval_batch() -> None:
    lsq = QuantSpec(bits=4, symmetric=False, method="lsq")
    qm = lowbit.quantize(relu_net(), QuantConfig(rules=[LayerRule(names=["5"], input=lsq)]))
    qm[5].input_quant.set_qparams(scale=100.0, zero_point=0)  # inputs of a few units: all 0
    with pytest.warns(ConstantQuantizerWarning, match=r"layer '5' \(method 'lsq', uint4\).*"
                                                      r"narrower than one step"):
        qm(torch.randn(4, 1, 4, 4))


def test_qat_warns_once_per_quantizer_and_checks_only_at_phase_changes(monkeypatch) -> None:
    calls: list[str] = []
    original = Quantizer._check_constant

    def counting(self, x, y, mode):  # noqa: ANN001, ANN202
        if self.role != "weight":
            calls.append(mode)
        return original(self, x, y, mode)

    monkeypatch.setattr(Quantizer, "_check_constant", counting)
    cfg = QuantConfig(rules=[LayerRule(names=["3"], weight=SIGN, input=SIGN)])
    qm = lowbit.prepare_qat(relu_net(), cfg)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _epoch in range(2):
            qm.train()
            for x in batches(4):
                qm(x).sum().backward()
                opt.step()
                opt.zero_grad()
            qm.eval()
            with torch.no_grad():
                qm(batches(1)[0])
                qm(batches(1)[0])
        lowbit.convert(qm)
    messages = constant_warnings(record)
    assert len(messages) == 1 and "layer '3'" in messages[0], messages
    # one activation quantizer: one check per train phase and per eval phase, not per batch
    assert calls == ["train", "eval", "train", "eval"]


def test_the_warning_category_is_public_and_filterable() -> None:
    assert issubclass(lowbit.ConstantQuantizerWarning, UserWarning)
    cfg = QuantConfig(rules=[LayerRule(names=["3"], input=SIGN)])
    qm = lowbit.quantize(relu_net(), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=lowbit.ConstantQuantizerWarning)
        lowbit.calibrate(qm, batches(), progress=False)
