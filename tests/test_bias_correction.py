"""Bias correction (docs/algorithms.md §14): a planted rounding bias is removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec

SCALE = 0.1


def _planted_linear() -> nn.Sequential:
    """Every weight sits 0.4 steps above a 4-bit code except each row's max (7 steps), so
    round-to-nearest lowers each by 0.4·SCALE: ε = −0.04 on all but one weight per row."""
    layer = nn.Linear(16, 4)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-7, 6, (4, 16), generator=g).float()
    w = (codes + 0.4) * SCALE
    w[:, 0] = 7 * SCALE
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.zero_()
    return nn.Sequential(layer).eval()


def _weight_only(granularity: str = "per_channel") -> QuantConfig:
    return QuantConfig(rules=[LayerRule(
        types=["Linear", "Conv2d"], weight=QuantSpec(bits=4, granularity=granularity))])


def _mean_error(qm: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        err = qm(x) - model(x)
    return err.movedim(1, -1).reshape(-1, err.shape[1]).mean(dim=0)  # per output channel


def test_empirical_correction_removes_a_planted_shift() -> None:
    model = _planted_linear()
    batches = [torch.rand(64, 16) * 2 for _ in range(4)]  # E[x] = 1 per input
    x = torch.rand(512, 16) * 2
    planted = -0.4 * SCALE * 15 * 1.0  # 15 weights per row, each −0.04, times E[x] = 1
    plain = lowbit.quantize(model, _weight_only())
    lowbit.calibrate(plain, batches, progress=False)
    before = _mean_error(plain, model, x)
    assert torch.allclose(before, torch.full((4,), planted), atol=0.05)
    fixed = lowbit.quantize(model, _weight_only())
    lowbit.calibrate(fixed, batches, progress=False, bias_correction="empirical")
    after = _mean_error(fixed, model, x)
    assert float(after.abs().max()) < 0.05 * abs(planted)
    assert torch.allclose(fixed[0].bias, model[0].bias - before, atol=0.05)


def test_a_layer_without_bias_gets_one() -> None:
    model = nn.Sequential(nn.Linear(16, 4, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(_planted_linear()[0].weight)
    qm = lowbit.quantize(model, _weight_only())
    lowbit.calibrate(qm, [torch.rand(64, 16) * 2], progress=False, bias_correction="empirical")
    assert qm[0].bias is not None and float(qm[0].bias.detach().abs().min()) > 0.3


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def _with_statistics(model: nn.Module, data: list[torch.Tensor]) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    return model.eval()


@pytest.mark.parametrize("mode", ["empirical", "analytical"])
def test_corrections_shrink_the_mean_output_error_of_a_bn_net(mode: str) -> None:
    data = [torch.randn(64, 3, 8, 8) + 0.5 for _ in range(8)]
    model = _with_statistics(_conv_net(), data)
    with torch.no_grad():  # large positive outputs: rounding errors add up in one direction
        model[1].bias.add_(1.0)
        model[4].bias.add_(1.0)
    eq = lowbit.equalize(model, bias_absorption=False)
    cfg = _weight_only("per_tensor")
    x = torch.cat(data)
    plain = lowbit.quantize(eq, cfg)
    lowbit.calibrate(plain, data, progress=False)
    fixed = lowbit.quantize(eq, cfg)
    with pytest.warns(UserWarning, match=r"\['0'\]") if mode == "analytical" else _nothing():
        lowbit.calibrate(fixed, data, progress=False, bias_correction=mode)
    before = _mean_error(plain, eq, x).abs().mean()
    after = _mean_error(fixed, eq, x).abs().mean()
    assert float(after) < 0.5 * float(before), (float(before), float(after))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def test_analytical_needs_equalize_statistics() -> None:
    qm = lowbit.quantize(_conv_net().eval(), _weight_only())
    with pytest.raises(ValueError, match=r"run `model = lowbit.equalize\(model\)`"):
        lowbit.calibrate(qm, [torch.randn(2, 3, 8, 8)], progress=False,
                         bias_correction="analytical")


@pytest.mark.parametrize(("value", "error", "match"), [
    ("emperical", ValueError, r"`bias_correction` must be one of \['empirical', 'analytical'\] "
                              r"or None, got 'emperical'"),
    (True, TypeError, r"`bias_correction` must be a str or None, got bool True"),
], ids=["typo", "bool"])
def test_mode_validation(value: object, error: type[Exception], match: str) -> None:
    qm = lowbit.quantize(_planted_linear(), _weight_only())
    with pytest.raises(error, match=match):
        lowbit.calibrate(qm, [torch.rand(4, 16)], progress=False, bias_correction=value)


def test_empirical_reads_the_batches_twice_so_iterators_are_refused() -> None:
    qm = lowbit.quantize(_planted_linear(), _weight_only())
    with pytest.raises(TypeError, match="not an iterator"):
        lowbit.calibrate(qm, iter([torch.rand(4, 16)]), progress=False,
                         bias_correction="empirical")
