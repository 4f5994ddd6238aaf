"""Binary weights and activations (method "binary", docs/algorithms.md §5): sign with sign(0) = +1,
the hardtanh straight-through gradient, XNOR's per-filter scale, clipping, exact codes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit.quantizers.binary  # noqa: F401
import lowbit.quantizers.dorefa  # noqa: F401
from lowbit import QuantSpec
from lowbit.numerics import dequantize
from lowbit.quantizers.base import Quantizer, make_quantizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(role: str = "weight", channel_axis: int = 0, **kw: object) -> Quantizer:
    q = make_quantizer(QuantSpec(bits=1, method="binary", **kw), role=role,  # type: ignore[arg-type]
                       channel_axis=channel_axis)
    assert q is not None
    return q


def alpha_of(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """XNOR's mean|W| per output filter, written out."""
    dims = [d for d in range(w.dim()) if d != axis]
    return w.abs().mean(dim=dims)


@pytest.mark.parametrize("role", ["weight", "input", "output"])
@pytest.mark.parametrize("train", [True, False])
def test_sign_forward_and_hardtanh_ste_backward(role: str, train: bool) -> None:
    q = make(role).train(train)
    x = torch.tensor([-3.0, -1.0, -0.5, -0.0, 0.0, 0.25, 1.0, 1.0001, 7.0]).requires_grad_()
    out = q(x)
    assert torch.equal(out.detach(), torch.tensor([-1.0, -1, -1, 1, 1, 1, 1, 1, 1])), \
        "sign(0) is +1 (also for -0.0)"
    g = torch.randn_like(x)
    out.backward(g)
    inside = torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 0, 0])
    assert torch.equal(x.grad, g * inside), "gradient passes for |x| <= 1, zero where saturated"


def test_gradient_is_zero_exactly_where_saturated_on_random_values() -> None:
    x = (torch.randn(4, 5, 6) * 2).requires_grad_()
    make("input").train()(x).sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() <= 1).float())


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (5, 7)])
def test_xnor_scales_each_filter_by_its_mean_abs(shape: tuple[int, ...]) -> None:
    q = make(xnor=True).train()
    w = (torch.randn(shape) * 0.8).requires_grad_()
    out = q(w)
    alpha = alpha_of(w.detach())
    view = (-1,) + (1,) * (w.dim() - 1)
    sign = torch.where(w.detach() >= 0, 1.0, -1.0)
    torch.testing.assert_close(out.detach(), alpha.reshape(view) * sign)
    g = torch.randn_like(w)
    out.backward(g)
    mask = (w.detach().abs() <= 1).float()
    torch.testing.assert_close(w.grad, g * mask * alpha.reshape(view))  # alpha: stop-gradient
    assert len({round(a, 6) for a in alpha.tolist()}) > 1, "one scale per filter, not one"


def test_xnor_with_per_channel_granularity_follows_the_channel_axis() -> None:
    q = make(channel_axis=1, xnor=True, granularity="per_channel")  # ConvTranspose: (in, out, ...)
    w = torch.randn(4, 6, 3, 3)
    codes, qp = q.quantize_weight(w)
    assert qp.axis == 1 and qp.scale.shape == (6,)
    torch.testing.assert_close(qp.scale, alpha_of(w, axis=1))
    assert torch.equal(dequantize(codes, qp.scale, qp.zero_point, qp.axis), q(w))


@pytest.mark.parametrize("xnor", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_weight_codes_are_pm1_and_dequantize_to_eval_exactly(xnor: bool,
                                                                      device: str) -> None:
    q = make(xnor=xnor).eval()
    w = torch.randn(16, 4, 3, 3, device=device)
    w[0, 0, 0, 0] = 0.0
    codes, qp = q.quantize_weight(w)
    assert qp.grid.odd and qp.grid.bits == 1 and (qp.grid.qmin, qp.grid.qmax) == (-1, 1)
    assert set(torch.unique(codes).tolist()) == {-1.0, 1.0} and codes[0, 0, 0, 0] == 1
    assert qp.zero_point.dtype == torch.int32 and bool((qp.zero_point == 0).all())
    assert qp.zero_point.shape == qp.scale.shape and qp.scale.device.type == device
    if xnor:
        assert qp.axis == 0 and qp.scale.shape == (16,)
        torch.testing.assert_close(qp.scale, alpha_of(w))
    else:
        assert qp.axis is None and qp.scale.dim() == 0 and qp.scale.item() == 1.0
    assert torch.equal(dequantize(codes, qp.scale, qp.zero_point, qp.axis), q(w))
    assert torch.equal(q.train()(w), q.eval()(w)), "no state: train and eval agree"


def test_quantize_weight_detaches_a_parameter() -> None:
    w = nn.Parameter(torch.randn(3, 4))
    codes, qp = make(xnor=True).quantize_weight(w)
    assert not codes.requires_grad and not qp.scale.requires_grad


def test_activation_qparams_are_unit_scale_on_the_odd_one_bit_grid() -> None:
    qp = make("input").qparams()
    assert qp.scale.item() == 1.0 and qp.scale.dim() == 0 and qp.axis is None
    assert qp.zero_point.item() == 0 and qp.zero_point.dtype == torch.int32
    assert qp.grid.odd and qp.grid.bits == 1 and qp.grid.signed


def test_constrain_clips_the_latent_weight_in_place() -> None:
    q = make()
    w = nn.Parameter(torch.tensor([[-2.5, -1.0, 0.3], [0.99, 1.0, 4.0]]))
    before = w.data_ptr()
    q.constrain_(w)
    assert w.data_ptr() == before and w.requires_grad
    assert torch.equal(w.detach(), torch.tensor([[-1.0, -1.0, 0.3], [0.99, 1.0, 1.0]]))


def test_a_training_step_then_constrain_keeps_weights_in_range() -> None:
    q = make(xnor=True).train()
    w = nn.Parameter(torch.randn(4, 6))
    opt = torch.optim.SGD([w], lr=5.0)
    (q(w) * torch.randn(4, 6)).sum().backward()
    opt.step()
    assert w.detach().abs().max() > 1
    q.constrain_(w)
    assert w.detach().abs().max() <= 1


def test_class_attributes_and_repr() -> None:
    q = make(xnor=True)
    assert q.supported_bits == (1,) and q.options == ("xnor",)
    assert q.folds_bn is False and q.odd_grid and set(q.roles) == {"weight", "activation"}
    assert "xnor" in repr(q) and "scale=1" in repr(make("input"))


def test_state_dict_round_trip() -> None:
    q = make(xnor=True)
    assert q.state_dict() == {}, "binary quantizers hold no state"
    delayed = make("input", quant_delay=3).train()
    x = torch.randn(10)
    assert torch.equal(delayed(x), x)
    fresh = make("input", quant_delay=3).train()
    result = fresh.load_state_dict(delayed.state_dict(), strict=True)
    assert not result.missing_keys and fresh.train_steps.item() == 1


@pytest.mark.parametrize(
    ("role", "kwargs", "match"),
    [
        ("input", {"xnor": True}, r"`xnor` applies to weights only.*xnor=True.*input"),
        ("output", {"xnor": True}, r"`xnor` applies to weights only.*output"),
        ("weight", {"granularity": "per_channel"},
         r"`granularity` must be one of \['per_tensor'\] .*binary.*got 'per_channel'"),
        ("weight", {"xnor": True, "granularity": "per_group", "group_size": 2},
         r"`granularity` must be one of \['per_tensor', 'per_channel'\].*got 'per_group'"),
        ("weight", {"narrow_range": True}, r"`narrow_range` must be False .*binary"),
        ("weight", {"signed": False}, r"`signed` must be True or None for 'binary' weights.*"
                                      r"signed=False"),
    ],
)
def test_invalid_specs_name_the_field_and_the_value(role: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(role, **kwargs)


def test_config_rejects_other_bit_widths_and_xnor_elsewhere() -> None:
    with pytest.raises(ValueError, match=r"`bits` must be one of \[1\] for method 'binary'"):
        QuantSpec(bits=2, method="binary")
    with pytest.raises(ValueError, match=r"`xnor` is only used by method\(s\) \['binary'\]"):
        QuantSpec(bits=8, method="ste", xnor=True)
