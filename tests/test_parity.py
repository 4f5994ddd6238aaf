"""Parity with ONNX Runtime: a kernel's own disagreement told from drift carried downstream."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.export.onnx import _disagreement_hint
from lowbit.export.verify import Parity, verify

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False, observer="minmax")


class Shift(nn.Module):
    """A float op between quantized layers; set ``delta`` after export to make torch compute
    something the file does not (a stand-in for a kernel that disagrees)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("delta", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta


def _exported(model: nn.Module, cfg: QuantConfig, shape: tuple[int, ...], tmp_path):
    torch.manual_seed(0)
    qm = lowbit.quantize(model.eval(), cfg)
    lowbit.calibrate(qm, [torch.randn(shape) for _ in range(4)], progress=False)
    dm = lowbit.convert(qm)
    x = torch.randn(shape)
    report = lowbit.export_onnx(dm, tmp_path / "m.onnx", (x,))
    return dm, x, report


def _layers(names: list[tuple[str, float]]) -> list[str]:
    return [name for name, _ in names]


def test_a_disagreeing_layer_is_named_and_the_layers_after_it_agree_locally(tmp_path, quiet):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Shift(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    cfg = QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=W8, input=A8)])
    dm, x, report = _exported(model, cfg, (2, 3, 12, 12), tmp_path)
    assert report.parity.local_identical == 1.0 and report.parity.local_max_diff == 0
    assert report.parity.local_total == report.parity.codes_total > 0

    dm[1].delta.fill_(0.37 * float(dm[2].input_qdq.scale))  # torch now differs after conv 0
    parity = verify(dm, report.onnx_path, [(x,)])
    assert _layers(parity.worst_layers)[:2] == ["2.input_qdq", "4.input_qdq"]  # carried on
    assert _layers(parity.local_worst) == ["2.input_qdq"]  # ...but only conv 2's input is wrong
    assert parity.local_identical > parity.codes_identical


def test_dynamic_layers_are_fed_the_runtimes_codes_too(tmp_path, quiet):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), Shift(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 8))
    dm, x, report = _exported(model, QuantConfig.preset("w8"), (8, 16), tmp_path)
    assert report.parity.local_identical == 1.0

    dm[1].delta.fill_(0.01)
    parity = verify(dm, report.onnx_path, [(x,)])
    assert "4" in _layers(parity.worst_layers)  # the shift reaches the last layer's codes
    assert _layers(parity.local_worst) == ["2"]  # fed ORT's codes, the last layer agrees


def test_the_export_warning_tells_drift_from_a_wrong_kernel():
    drift = Parity(codes_identical=0.91, codes_max_diff=39, local_identical=0.999996,
                   local_total=4_500_000, local_worst=[("stage3.conv", 1e-5)])
    hint = _disagreement_hint(drift, "int8", False)
    assert "every layer agrees (18 of 4500000 codes differ, none by more than one" in hint
    assert "carried on layer to layer" in hint
    wrong = Parity(codes_identical=0.91, codes_max_diff=39, local_identical=0.95,
                   local_total=1000, local_max_diff=1, local_worst=[("stage3.conv", 0.2)])
    hint = _disagreement_hint(wrong, "uint8", False)
    assert "stage3.conv differs in 20.00% of its codes" in hint
    rare_but_far = Parity(codes_identical=0.91, codes_max_diff=39, local_identical=0.9999,
                          local_total=10_000, local_max_diff=12, local_worst=[("fc", 1e-4)])
    assert "fc differs" in _disagreement_hint(rare_but_far, "uint8", False)


class _TwoReaders(nn.Module):
    """Two Linears read one input: the exported file quantizes it once for both."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.q(x)) * self.k(x))


def test_every_reader_of_a_shared_dynamic_quantizer_is_compared(tmp_path, quiet):
    from lowbit.deploy import DynamicLinear
    from lowbit.export.verify import _debug_model

    dm, x, report = _exported(_TwoReaders(), QuantConfig.preset("w8"), (8, 16), tmp_path)
    dynamic = sum(isinstance(m, DynamicLinear) for m in dm.modules())
    _, taps = _debug_model(report.onnx_path)
    assert len(taps) < dynamic  # the file shares q's and k's DynamicQuantizeLinear
    assert report.parity.tensors_compared == dynamic == 3
    assert report.parity.local_identical == 1.0 and not report.parity.unmatched
