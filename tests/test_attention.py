"""torch's own attention (nn.MultiheadAttention, nn.TransformerEncoder/DecoderLayer) through
every preset: written out as four Linears (lowbit.attention) and quantized like any other."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.attention import ExplicitMultiheadAttention

N, L, S = 3, 5, 7


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(("batch_first", "dims", "bias"),
                         list(itertools.product([True, False], [None, (12, 20)], [True, False])))
def test_the_written_out_attention_computes_what_torch_does(batch_first, dims, bias):
    torch.manual_seed(0)
    kdim, vdim = dims or (None, None)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, bias=bias, kdim=kdim,
                                vdim=vdim).eval()
    explicit = ExplicitMultiheadAttention(mha).eval()

    def make(width: int, length: int) -> torch.Tensor:
        return torch.randn(N, length, width) if batch_first else torch.randn(length, N, width)

    q, k, v = make(16, L), make(kdim or 16, S), make(vdim or 16, S)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    blocked = torch.rand(L, S) > 0.8
    blocked[:, 0] = False
    per_head = torch.randn(N * 4, L, S)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": blocked},
                   {"attn_mask": per_head, "key_padding_mask": padding.float() * -1e4},
                   {"need_weights": False}, {"average_attn_weights": False}):
        with torch.no_grad():
            want, got = mha(q, k, v, **kwargs), explicit(q, k, v, **kwargs)
        assert _close(want[0], got[0]) and _close(want[1], got[1]), kwargs


def test_unbatched_and_causal_calls_match():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    explicit = ExplicitMultiheadAttention(mha).eval()
    x = torch.randn(5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": causal, "is_causal": True}):
            want, got = mha(x, x, x, **kwargs), explicit(x, x, x, **kwargs)
            assert _close(want[0], got[0]) and _close(want[1], got[1])
        # is_causal without a mask: torch refuses, the written-out form builds the mask
        got = explicit(x, x, x, is_causal=True, need_weights=False)[0]
        assert _close(got, mha(x, x, x, attn_mask=causal, need_weights=False)[0])


def _encoder(width: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(width, 4, 2 * width, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Linear(width, 8)).eval()


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-transformer", "w8", "w4-g128"])
def test_torch_transformer_encoders_quantize_and_export(preset, tmp_path, quiet):
    from lowbit.export.verify import feed, session

    torch.manual_seed(0)
    model = _encoder(128)
    x = torch.randn(2, 10, 128)
    qm = lowbit.quantize(model, QuantConfig.preset(preset), example_inputs=(x,))
    linears = {f"0.layers.{i}.{name}" for i in (0, 1)
               for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                            "self_attn.out_proj", "linear1", "linear2")}
    assert linears <= {layer.name for layer in qm.lowbit_plan.quantized}
    assert not qm.lowbit_plan.float_layers
    assert isinstance(model[0].layers[0].self_attn, nn.MultiheadAttention)  # caller's untouched
    lowbit.calibrate(qm, [torch.randn(4, 10, 128) for _ in range(4)], progress=False)
    report = lowbit.export_onnx(lowbit.convert(qm), tmp_path / "enc.onnx", (x,))
    assert report.parity.output_max_lsb is not None and report.parity.output_max_lsb <= 2
    sess = session(tmp_path / "enc.onnx")
    got = sess.run(None, feed(sess, (x,)))[0].ravel()
    with torch.no_grad():
        want = model(x).numpy().ravel()
    assert np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.99


def test_decoder_layers_with_cross_attention_quantize(quiet):
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(64, 4, 128, batch_first=True).eval()
    tgt, memory = torch.randn(2, 6, 64), torch.randn(2, 9, 64)
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"), example_inputs=(tgt, memory))
    names = {layer.name for layer in qm.lowbit_plan.quantized}
    assert {"self_attn.q_proj", "multihead_attn.k_proj", "multihead_attn.out_proj"} <= names
    lowbit.calibrate(qm, [(torch.randn(2, 6, 64), torch.randn(2, 9, 64)) for _ in range(4)],
                     progress=False)
    with torch.no_grad():
        got, want = lowbit.convert(qm)(tgt, memory), model(tgt, memory)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_plan_names_the_written_out_linears_and_quantize_takes_that_plan(quiet):
    model = _encoder(64)
    x = torch.randn(2, 10, 64)
    the_plan = lowbit.plan(model, QuantConfig.preset("w8a8"), (x,))
    assert "0.layers.0.self_attn.v_proj" in {layer.name for layer in the_plan.quantized}
    qm = lowbit.quantize(model, the_plan, example_inputs=(x,))
    assert type(qm[0].layers[0].self_attn.v_proj).__name__ == "QuantLinear"


def test_a_failing_inplace_quantize_leaves_the_attention_as_it_was():
    model = _encoder(64)
    attention = model[0].layers[0].self_attn
    nothing = QuantConfig(rules=[lowbit.LayerRule(types=["Conv2d"],
                                                  weight=lowbit.QuantSpec(bits=8))])
    with pytest.raises(ValueError, match="nothing to quantize"):
        lowbit.quantize(model, nothing, inplace=True)
    assert model[0].layers[0].self_attn is attention


def test_attention_it_cannot_write_out_stays_float_with_its_out_proj(quiet):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.att(x, x, x)[0])

    qm = lowbit.quantize(Block().eval(), QuantConfig.preset("w8a8"))
    assert [layer.name for layer in qm.lowbit_plan.quantized] == ["fc"]
    assert "reads its weight" in qm.lowbit_plan.float_layers["att.out_proj"]
    bare = lowbit.plan(nn.MultiheadAttention(16, 2), QuantConfig.preset("w8a8"))
    assert "out_proj" in bare.skipped and not bare.quantized  # the model itself stays as it is
    lowbit.calibrate(qm, [torch.randn(2, 5, 16)], progress=False)
    lowbit.convert(qm)  # the out_proj wrapper would have had no range


class _ReadsWeights(nn.Module):
    """Model code that hands a Linear's weight to a functional op (WavLM's attention does,
    with F.multi_head_attention_forward) and a Linear it never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(nn.functional.linear(x, self.proj.weight, self.proj.bias)))


@pytest.mark.parametrize("preset", ["w8a8", "w8"])
def test_layers_the_forward_never_calls_stay_float_and_say_why(preset, tmp_path, quiet):
    model = _ReadsWeights().eval()
    x = torch.randn(4, 16)
    qm = lowbit.quantize(model, QuantConfig.preset(preset), example_inputs=(x,))
    assert [layer.name for layer in qm.lowbit_plan.quantized] == ["head"]
    for name in ("proj", "unused"):
        assert "not called by the model's forward" in qm.lowbit_plan.float_layers[name]
    lowbit.calibrate(qm, [torch.randn(4, 16) for _ in range(2)], progress=False)
    report = lowbit.export_onnx(lowbit.convert(qm), tmp_path / "m.onnx", (x,))
    assert report.parity.output_max_lsb is not None and report.parity.output_max_lsb <= 1.01


def test_torch_transformer_encoders_train_under_qat(quiet):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.1)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(64, 8))
    x, y = torch.randn(8, 10, 64), torch.randint(0, 8, (8,))
    qm = lowbit.prepare_qat(model, QuantConfig.preset("w8a8-qat"), example_inputs=(x,))
    assert "0.layers.1.self_attn.v_proj" in {layer.name for layer in qm.lowbit_plan.quantized}
    opt = torch.optim.Adam(qm.parameters(), 1e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(qm(x).mean(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]  # the projections' fake-quant weights train
    lowbit.convert(qm.eval())
