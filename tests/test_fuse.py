"""Conv/Linear → BN (→ ReLU) folding keeps the float function."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit.fuse import find_chains


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class Wired(nn.Module):
    """Not a Sequential, with a ReLU module used twice (it must not move into one conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, bias=False), _bn(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3), _bn(4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.b2(self.c2(self.relu(self.b1(self.c1(x))))))


def test_chains_in_a_sequential_and_a_traced_model():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(4), nn.ReLU(), nn.Conv2d(4, 4, 3), _bn(4))
    assert find_chains(seq) == [("0", "1", "2"), ("3", "4")]
    assert find_chains(Wired()) == [("c1", "b1"), ("c2", "b2")]


def test_folding_keeps_the_float_function():
    model = Wired().eval()
    qm = lowbit.quantize(model, lowbit.QuantConfig(rules=[lowbit.LayerRule(
        types=["Conv2d"], weight=lowbit.QuantSpec(bits=8, granularity="per_channel"))]))
    assert isinstance(qm.b1, nn.Identity) and isinstance(qm.relu, nn.ReLU)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
        got = qm(x)
    # 8-bit per-channel weights: close, not equal; the BN itself is gone.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qm.modules())


def test_relu_moves_into_the_layer_so_its_output_quantizer_sees_post_relu_values():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(4), nn.ReLU()).eval()
    spec = lowbit.QuantSpec(bits=8, symmetric=False)
    qm = lowbit.quantize(model, lowbit.QuantConfig(rules=[lowbit.LayerRule(
        types=["Conv2d"], weight=lowbit.QuantSpec(granularity="per_channel"), output=spec)]))
    assert isinstance(qm[0].activation, nn.ReLU) and isinstance(qm[2], nn.Identity)
    lowbit.calibrate(qm, [torch.randn(4, 3, 8, 8)], progress=False)
    assert int(qm[0].output_quant.zero_point) == 0  # range starts at 0: nothing below ReLU


class DepthwiseConv(nn.Conv2d):
    """A Conv2d subclass that only sets arguments (EfficientNet's depthwise conv): a layer."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels)


class DepthwiseBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.act = DepthwiseConv(4), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def test_a_conv_subclass_folds_its_batchnorm_like_a_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DepthwiseBlock()).eval()
    for example in (None, (torch.randn(1, 3, 8, 8),)):  # fx, and the dispatch trace
        plan = lowbit.plan(model, lowbit.QuantConfig.preset("w8a8"), example)
        assert ("1.conv", "1.norm") in [tuple(chain[:2]) for chain in plan.fusions]
        assert "1.norm" not in plan.float_layers
