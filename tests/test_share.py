"""One quantizer per tensor: consumers of one tensor share their input quantizer."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.nn import QuantAdd

A8 = QuantSpec(bits=8, symmetric=False)


class Block(nn.Module):
    """A ReLU output read by a conv and (through an identity shortcut) by a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.conv(h) + self.branch(h) + self.shortcut(h)


def test_consumers_of_one_tensor_share_their_quantizer(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    cfg = QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=QuantSpec(), input=A8),
                             LayerRule(types=["add"], input=A8)])
    qm = lowbit.quantize(Block().eval(), cfg, example_inputs=(x,))
    assert qm.conv.input_quant is qm.branch.input_quant
    adds = [m for m in qm.modules() if isinstance(m, QuantAdd)]
    assert len(adds) == 2
    assert any(a.other_quant is qm.conv.input_quant for a in adds), "seen through the Identity"
    assert qm.stem.input_quant is not qm.conv.input_quant
    lowbit.calibrate(qm, [x], progress=False)
    state = qm.state_dict()
    assert torch.equal(state["conv.input_quant.scale"], state["branch.input_quant.scale"])
    report = lowbit.export_onnx(lowbit.convert(qm), tmp_path / "m.onnx", (x,))
    assert report.parity.codes_max_diff <= 1


def test_different_grids_are_not_shared():
    cfg = QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=QuantSpec(), input=A8),
                             LayerRule(names=["branch"], weight=QuantSpec(),
                                       input=QuantSpec(bits=4, symmetric=False))])
    qm = lowbit.quantize(Block().eval(), cfg)
    assert qm.conv.input_quant is not qm.branch.input_quant
