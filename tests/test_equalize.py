"""Cross-layer equalization and high-bias absorption (docs/algorithms.md §12)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms._links import find_links
from lowbit.algorithms.equalize import INPUT_MEANS_ATTR, relu_normal_mean
from lowbit.fuse import find_chains, fold_bn, set_module


def _bn(c: int, dims: int = 2) -> nn.Module:
    return nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)


def _conv_pair(act: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), act, nn.Conv2d(8, 6, 3, padding=1))


def _depthwise() -> nn.Module:
    """MobileNetV2's conv → depthwise → conv, with BN and ReLU."""
    return nn.Sequential(nn.Conv2d(4, 12, 1), _bn(12), nn.ReLU(),
                         nn.Conv2d(12, 12, 3, padding=1, groups=12), _bn(12), nn.ReLU(),
                         nn.Conv2d(12, 5, 1))


class Traced(nn.Module):
    """Not a Sequential: found with torch.fx (functional relu, flatten into a Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(24, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.flatten(self.pool(torch.relu(self.conv(x))), 1)
        return self.fc2(torch.nn.functional.relu(self.fc1(y)))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx fails, the Sequential fallback finds the pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if bool(x.sum() > -1e9) else -x


CASES = {  # name: (factory, input shape)
    "relu": (lambda: _conv_pair(nn.ReLU()), (4, 3, 8, 8)),
    "leaky_relu": (lambda: _conv_pair(nn.LeakyReLU(0.1)), (4, 3, 8, 8)),
    "identity": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 1)), (4, 3, 8, 8)),
    "maxpool": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(8 * 9, 5)), (4, 3, 8, 8)),
    "linear": (lambda: nn.Sequential(nn.Linear(10, 20), _bn(20, 1), nn.ReLU(),
                                     nn.Linear(20, 7)), (16, 10)),
    "depthwise": (_depthwise, (4, 4, 8, 8)),
    "traced": (Traced, (4, 2, 7, 7)),
    "untraceable": (Untraceable, (4, 8)),
}


def _randomized(model: nn.Module) -> nn.Module:
    """Spread the channel ranges (what equalization is for) and give BNs real statistics."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            spread = torch.exp(2 * torch.randn(m.weight.shape[0], generator=g))
            m.weight.data *= spread.reshape(-1, *([1] * (m.weight.dim() - 1)))
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.2, 3.0, generator=g)
            m.weight.data.uniform_(0.1, 4.0, generator=g)
            m.bias.data.normal_(generator=g)
    return model.eval()


def _ranges(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(dim=1)


@pytest.mark.parametrize("name", list(CASES))
def test_equalization_keeps_the_float_function(name: str) -> None:
    factory, shape = CASES[name]
    model = _randomized(factory())
    x = torch.randn(shape)
    eq = lowbit.equalize(model, bias_absorption=False)
    with torch.no_grad():
        ref, out = model(x), eq(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), \
        float((out - ref).abs().max())


def _folded(model: nn.Module) -> nn.Module:
    """The model with BNs folded and nothing else done (what equalize starts from)."""
    model = copy.deepcopy(model)
    for chain in find_chains(model):
        fold_bn(model.get_submodule(chain[0]), model.get_submodule(chain[1]))
        set_module(model, chain[1], nn.Identity())
    return model


@pytest.mark.parametrize("name", ["relu", "identity", "linear", "depthwise", "traced"])
def test_producer_channel_ranges_get_equalized(name: str) -> None:
    factory, _ = CASES[name]
    model = _randomized(factory())
    folded = _folded(model)
    eq = lowbit.equalize(model, bias_absorption=False)
    links = find_links(folded)
    assert links
    for link in links:
        before = _ranges(folded.get_submodule(link.producer))
        after = _ranges(eq.get_submodule(link.producer))
        assert float(after.max() / after.min()) < 0.5 * float(before.max() / before.min()), \
            link


def test_balanced_pair_has_equal_ranges_on_both_sides() -> None:
    model = _randomized(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)))
    eq = lowbit.equalize(model)
    r1 = _ranges(eq[0])
    r2 = eq[2].weight.detach().abs().amax(dim=0)
    assert torch.allclose(r1, r2, rtol=1e-5)


def test_relu6_links_are_skipped_with_a_warning() -> None:
    model = _randomized(_conv_pair(nn.ReLU6()))
    with pytest.warns(UserWarning, match=r"0 → 3: joined by ReLU6"):
        eq = lowbit.equalize(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(eq(x), model(x), atol=1e-5)
    assert torch.equal(eq[3].weight, model[3].weight)  # the consumer was not scaled


def _with_statistics(model: nn.Module, data: list[torch.Tensor]) -> nn.Module:
    """BN running statistics equal to the data's (cumulative average over the batches)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    return model.eval()


def _high_bias_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(12, 16), _bn(16, 1), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        model[1].bias.fill_(6.0)  # pre-activations ~ N(6, 0.5²): always above c = 6 − 1.5
        model[1].weight.fill_(0.5)
    return model


def test_high_bias_absorption_moves_bias_and_keeps_the_function() -> None:
    data = [torch.randn(256, 12) for _ in range(8)]
    model = _with_statistics(_high_bias_model(), data)
    plain = lowbit.equalize(model, bias_absorption=False)
    absorbed = lowbit.equalize(model)
    with torch.no_grad():
        assert float(absorbed[0].bias.abs().mean()) < 0.5 * float(plain[0].bias.abs().mean())
        assert not torch.allclose(absorbed[3].bias, plain[3].bias)
        x = torch.randn(512, 12)
        ref = model(x)
        close = (absorbed(x) - ref).abs() <= 1e-5 * float(ref.abs().max())
    # Exact wherever every pre-activation is >= c = β − 3|γ| (all but ~0.13% of them).
    assert float(close.float().mean()) > 0.95


def test_input_means_follow_the_batchnorm_statistics() -> None:
    data = [torch.randn(512, 12) for _ in range(8)]
    model = _with_statistics(_high_bias_model(), data)
    with torch.no_grad():
        model[1].bias.normal_()  # around 0: the ReLU clips a good share
    eq = lowbit.equalize(model)
    means = getattr(eq, INPUT_MEANS_ATTR)
    assert set(means) == {"3"}
    with torch.no_grad():
        seen = eq[2](eq[1](eq[0](torch.cat(data)))).mean(dim=0)
    assert torch.allclose(means["3"], seen, atol=0.05 * float(seen.abs().max()))


def test_relu_normal_mean_matches_sampling() -> None:
    mean, std = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 2.0, 0.5])
    samples = (mean + std * torch.randn(200_000, 3)).clamp_min(0).mean(dim=0)
    assert torch.allclose(relu_normal_mean(mean, std), samples, atol=0.01)


def test_copy_by_default_inplace_on_request() -> None:
    model = _randomized(_conv_pair(nn.ReLU()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eq = lowbit.equalize(model)
    assert eq is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert lowbit.equalize(model, inplace=True) is model
    assert isinstance(model[1], nn.Identity)  # the BN was folded


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"model": "net"}, TypeError, r"`model` must be a torch.nn.Module, got str"),
    ({"inplace": 1}, TypeError, r"`inplace` must be a bool, got int 1"),
    ({"bias_absorption": "yes"}, TypeError, r"`bias_absorption` must be a bool"),
    ({"iterations": 2.0}, TypeError, r"`iterations` must be an int, got float"),
    ({"iterations": 0}, ValueError, r"`iterations` must be >= 1, got 0"),
], ids=["model", "inplace", "bias_absorption", "iterations-type", "iterations-value"])
def test_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    model = kwargs.pop("model", _conv_pair(nn.ReLU()))
    with pytest.raises(error, match=match):
        lowbit.equalize(model, **kwargs)


def test_quantized_model_is_refused(quiet) -> None:
    qm = lowbit.quantize(_conv_pair(nn.ReLU()).eval(), lowbit.QuantConfig.preset("w8a8"))
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.equalize(qm)
