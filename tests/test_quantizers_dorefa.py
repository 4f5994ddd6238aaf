"""DoReFa (method "dorefa", docs/algorithms.md §4): values and gradients against tensorpack's
expressions, odd weight codes that dequantize exactly, the activation grid, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit.quantizers.binary  # noqa: F401
import lowbit.quantizers.dorefa  # noqa: F401
from lowbit import QuantSpec
from lowbit.numerics import dequantize, quantize, round_ste
from lowbit.quantizers.base import Quantizer, make_quantizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(bits: int, role: str = "weight", **kw: object) -> Quantizer:
    q = make_quantizer(QuantSpec(bits=bits, method="dorefa", **kw), role=role,  # type: ignore[arg-type]
                       channel_axis=0 if role == "weight" else 1)
    assert q is not None
    return q


def quantize_k(r: torch.Tensor, k: int) -> torch.Tensor:
    n = 2**k - 1
    return round_ste(r * n) / n


def ref_weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """tensorpack's ``quantize_weight`` written out."""
    if k == 1:
        e = w.abs().mean().detach()
        sign = torch.where(w >= 0, 1.0, -1.0)
        return w + (sign * e - w).detach()  # identity gradient
    t = torch.tanh(w)
    r = t / (2 * t.abs().max()) + 0.5
    return 2 * quantize_k(r, k) - 1


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("train", [True, False])
def test_weights_match_tanh_normalised_reference_value_and_gradient(k: int, train: bool) -> None:
    q = make(k).train(train)
    w = (torch.randn(8, 3, 3, 3) * 0.7).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    g = torch.randn_like(w)
    out = q(w)
    out.backward(g)
    expected = ref_weight(w_ref, k)
    expected.backward(g)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
    assert w.grad is not None and bool((w.grad != g).any()), "the gradient goes through tanh"
    n = 2**k - 1
    assert set(torch.unique(out.detach() * n).round().tolist()) <= set(range(-n, n + 1, 2))


def test_one_bit_weights_are_mean_abs_times_sign_with_identity_gradient() -> None:
    q = make(1).train()
    w = torch.randn(6, 5)
    w[0, 0] = 0.0
    w.requires_grad_()
    out = q(w)
    e = w.detach().abs().mean()
    assert torch.equal(out.detach(), torch.where(w.detach() >= 0, e, -e))
    assert out[0, 0] == e, "sign(0) is +1"
    g = torch.randn_like(w)
    out.backward(g)
    assert torch.equal(w.grad, g), "E|w| is a stop-gradient and the sign passes the gradient"
    torch.testing.assert_close(out, ref_weight(w, 1))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_weight_gives_odd_codes_that_dequantize_to_eval_exactly(k: int,
                                                                         device: str) -> None:
    q = make(k).eval()
    w = torch.randn(16, 8, 3, 3, device=device)
    codes, qp = q.quantize_weight(w)
    assert qp.grid.odd and qp.grid.signed and (qp.grid.qmin, qp.grid.qmax) == (1 - 2**k, 2**k - 1)
    assert qp.axis is None and qp.scale.dim() == 0 and qp.zero_point.dtype == torch.int32
    assert bool((qp.zero_point == 0).all()) and qp.scale.device.type == device
    assert torch.equal(codes, codes.round()) and bool((codes.remainder(2) == 1).all())
    assert codes.min() >= qp.grid.qmin and codes.max() <= qp.grid.qmax
    assert len(torch.unique(codes)) <= 2**k
    assert torch.equal(dequantize(codes, qp.scale, qp.zero_point, qp.axis), q(w))
    if k > 1:
        torch.testing.assert_close(qp.scale, torch.tensor(1 / (2**k - 1), device=device))
        assert codes.abs().max() == 2**k - 1, "the largest |tanh(w)| maps to ±1"
    else:
        torch.testing.assert_close(qp.scale, w.abs().mean())


def test_two_bit_weights_use_all_four_values() -> None:
    codes, qp = make(2).quantize_weight(torch.linspace(-2, 2, 101))
    assert sorted(torch.unique(codes).tolist()) == [-3, -1, 1, 3]
    assert torch.equal(torch.unique(dequantize(codes, qp.scale, qp.zero_point)),
                       torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 7), rows=st.integers(1, 6), cols=st.integers(1, 9),
       spread=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_quantize_weight_round_trips_for_any_weight(k: int, rows: int, cols: int,
                                                    spread: float, seed: int) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * spread
    q = make(k).eval()
    codes, qp = q.quantize_weight(w)
    assert bool((codes.remainder(2) == 1).all())
    assert torch.equal(dequantize(codes, qp.scale, qp.zero_point, qp.axis), q(w))


def test_all_zero_weights_stay_finite() -> None:
    for k in (1, 2):
        out = make(k)(torch.zeros(3, 3))
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_activations_clip_then_quantize_with_an_ste_mask(k: int) -> None:
    q = make(k, role="input").train()
    x = torch.cat([torch.linspace(-1.5, 2.5, 97), torch.tensor([0.0, 1.0])]).requires_grad_()
    out = q(x)
    n = 2**k - 1
    expected = torch.round(x.detach().clamp(0, 1) * n) / n
    torch.testing.assert_close(out.detach(), expected, atol=1e-6, rtol=0)
    out.sum().backward()
    inside = (x.detach() >= 0) & (x.detach() <= 1)
    assert torch.equal(x.grad, inside.float()), "gradient 1 inside [0, 1], 0 outside"
    torch.testing.assert_close(q.eval()(x.detach()), out.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [2, 4])
def test_activation_qparams_are_the_unsigned_grid_and_match_eval(k: int) -> None:
    q = make(k, role="output").eval()  # the default spec says symmetric: the grid is unsigned
    qp = q.qparams()
    n = 2**k - 1
    assert not qp.grid.signed and not qp.grid.odd and (qp.grid.qmin, qp.grid.qmax) == (0, n)
    assert qp.axis is None and qp.zero_point.item() == 0 and qp.zero_point.dtype == torch.int32
    assert qp.scale.item() == pytest.approx(1 / n)
    assert not q.odd_grid and type(q).odd_grid
    x = torch.randn(1000) * 2
    deploy = dequantize(quantize(x, qp.scale, qp.zero_point, qp.grid), qp.scale, qp.zero_point)
    assert torch.equal(q(x), deploy), "eval is exactly ONNX QuantizeLinear/DequantizeLinear"


def test_weight_qparams_describe_the_odd_grid() -> None:
    qp = make(3).qparams()
    assert qp.grid.odd and qp.grid.qmax == 7 and qp.axis is None
    assert qp.scale.item() == pytest.approx(1 / 7)
    assert make(1).qparams().grid.odd


def test_class_attributes_and_repr() -> None:
    q = make(2)
    assert q.folds_bn is False and q.odd_grid and "xnor" not in q.options
    assert "odd2" in repr(q) and "uint4" in repr(make(4, role="input"))


def test_state_dict_round_trip_keeps_quant_delay_progress() -> None:
    q = make(2, role="input", quant_delay=2).train()
    x = torch.rand(20)
    assert torch.equal(q(x), x), "float during quant_delay"
    fresh = make(2, role="input", quant_delay=2).train()
    fresh.load_state_dict(q.state_dict())
    assert fresh.train_steps.item() == 1
    fresh(x)
    assert not torch.equal(fresh(x), x), "quantizes once the delay is over"
    plain = make(4)
    assert plain.state_dict() == {}, "no state without quant_delay"
    result = make(4).load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize(
    ("role", "kwargs", "match"),
    [
        ("input", {"signed": True}, r"`signed` must be False or None .*activations.*signed=True"),
        ("weight", {"signed": False}, r"`signed` must be True or None .*weights.*signed=False"),
        ("weight", {"granularity": "per_channel"},
         r"`granularity` must be 'per_tensor' .*dorefa.*got 'per_channel'"),
        ("input", {"granularity": "per_channel"}, r"`granularity` must be 'per_tensor'"),
        ("weight", {"narrow_range": True}, r"`narrow_range` must be False .*dorefa"),
        ("input", {"bits": 8, "symmetric": False, "dynamic": True},
         r"`dynamic` must be False .*dorefa"),
    ],
)
def test_invalid_specs_name_the_field_and_the_value(role: str, kwargs: dict, match: str) -> None:
    kwargs = {"bits": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_quantizer(QuantSpec(method="dorefa", **kwargs), role=role,  # type: ignore[arg-type]
                       channel_axis=0)


def test_xnor_is_rejected_for_dorefa() -> None:
    with pytest.raises(ValueError, match=r"`xnor` is only used by method\(s\) \['binary'\]"):
        QuantSpec(bits=2, method="dorefa", xnor=True)


def test_eight_bit_weights_are_rejected_because_int8_cannot_hold_their_codes() -> None:
    with pytest.raises(ValueError, match="1..7 for 'dorefa' weights"):
        make(8)
