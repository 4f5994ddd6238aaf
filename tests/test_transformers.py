"""Transformers: a tiny randomly initialised BERT through quantize → calibrate (ragged dict
batches, SmoothQuant, GPTQ, AWQ) → convert → export with dynamic axes → ONNX Runtime."""

from __future__ import annotations

import copy
import warnings

import onnx
import pytest
import torch
import transformers
from models import LastHidden
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.nn import QuantEmbedding, QuantLinear

PRESETS = ("w8a8-transformer", "w8-transformer", "w8", "w4-g32", "w4-g32-gptq",
           "w4-g32-awq")


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # an outlier channel, as trained transformers have
        model.encoder.layer[0].intermediate.dense.bias[3] = 6.0
    return model


def batch(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 2:] = 0  # one padded sentence per batch
    return {"input_ids": ids, "attention_mask": mask}


RAGGED = [batch(4, length, seed) for seed, length in enumerate((5, 11, 17, 8))]


def quantized(preset: str, model: nn.Module | None = None) -> nn.Module:
    qm = lowbit.quantize(model if model is not None else tiny_bert(), QuantConfig.preset(preset))
    lowbit.calibrate(qm, RAGGED, progress=False)
    return qm


def hidden(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).last_hidden_state


@pytest.fixture(scope="module")
def calibrated() -> dict[str, nn.Module]:
    return {name: quantized(name) for name in PRESETS}


# ------------------------------------------------------------------ calibration, fidelity


@pytest.mark.parametrize("preset", PRESETS)
def test_ragged_dict_batches_calibrate_every_layer(calibrated, preset):
    qm = calibrated[preset]
    quantizers = lowbit.calibrate.__globals__["activation_quantizers"](qm)
    assert all(q.is_ready() for q in quantizers if not q.spec.dynamic)
    embeddings = [m for m in qm.modules() if isinstance(m, QuantEmbedding)]
    assert len(embeddings) == 3  # word, position, token type tables
    b = batch(3, 9, seed=99)
    ref = hidden(tiny_bert(), b)
    got = hidden(qm, b)
    assert (got - ref).norm() / ref.norm() < 0.03


def test_smoothing_preserves_the_float_function(calibrated):
    """With every quantizer passing values through, the smoothed model is the float model."""
    qm = copy.deepcopy(calibrated["w8a8-transformer"])
    smoothed = [m for m in qm.modules() if isinstance(m, QuantLinear)
                and m.input_smoothing is not None]
    assert len(smoothed) == 13  # q, k, v, attention output, FFN up, down (x2), pooler
    assert any(float((m.input_smoothing - 1).abs().max()) > 0.1 for m in smoothed)
    for q in qm.modules():
        if isinstance(q, lowbit.Quantizer):
            q.observing = True
    b = batch(3, 9, seed=5)
    want, got = hidden(tiny_bert(), b), hidden(qm, b)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_smoothing_shares_one_scale_across_layers_that_read_one_tensor(calibrated):
    attention = calibrated["w8a8-transformer"].encoder.layer[0].attention.self
    q, k, v = attention.query, attention.key, attention.value
    assert torch.equal(q.input_smoothing, k.input_smoothing)
    assert torch.equal(q.input_smoothing, v.input_smoothing)


def test_smoothing_flattens_the_outlier_channel():
    model = tiny_bert()
    w = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    b = batch(4, 13, seed=7)
    ref = hidden(model, b)
    scale, err = {}, {}
    for alpha in (None, lowbit.presets.SMOOTHING_ALPHA):
        x = QuantSpec(bits=8, symmetric=False, smoothing=alpha)
        qm = lowbit.quantize(copy.deepcopy(model), QuantConfig(rules=[
            LayerRule(types=["Linear"], weight=w, input=x)]))
        lowbit.calibrate(qm, RAGGED, progress=False)
        scale[alpha] = float(qm.encoder.layer[0].output.dense.input_quant.qparams().scale)
        err[alpha] = float((hidden(qm, b) - ref).norm() / ref.norm())
    assert scale[lowbit.presets.SMOOTHING_ALPHA] < 0.5 * scale[None], scale
    assert err[lowbit.presets.SMOOTHING_ALPHA] < 0.7 * err[None], err


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_weight_algorithms_beat_round_to_nearest_on_a_fixed_layer(algorithm):
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(128, 64))
    mix = torch.randn(32, 128)  # correlated inputs (what GPTQ exploits)
    xs = [torch.randn(256, 32) @ mix + 0.1 * torch.randn(256, 128) for _ in range(6)]
    for x in xs:
        x[:, :4] *= 12  # activation outlier channels (what AWQ protects)
    test_x = torch.cat(xs[4:])

    def error(name: str) -> float:
        w = QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=32,
                      algorithm=name)
        qm = lowbit.quantize(copy.deepcopy(layer), QuantConfig(rules=[
            LayerRule(types=["Linear"], weight=w)]))
        lowbit.calibrate(qm, xs[:4], progress=False)
        with torch.no_grad():
            return float((qm(test_x) - layer(test_x)).square().mean())

    rtn, better = error("rtn"), error(algorithm)
    assert better < 0.8 * rtn, (rtn, better)


@pytest.mark.parametrize("granularity", ["per_group", "per_channel"])
def test_gptq_clip_search_and_act_order_beat_plain_gptq(granularity, monkeypatch):
    """The defaults (Hessian clip search, act order) against GPTQ on the min/max grid in column
    order: lower output error on held-out inputs, qparams pinned in the quantizer's layout."""
    torch.manual_seed(2)
    layer = nn.Sequential(nn.Linear(128, 64))
    with torch.no_grad():
        layer[0].weight[:, 5] *= 6  # a heavy input column: min/max ranges too wide
    mix = torch.randn(32, 128)
    xs = [torch.randn(256, 32) @ mix + 0.1 * torch.randn(256, 128) for _ in range(6)]
    test_x = torch.cat(xs[4:])
    w = QuantSpec(bits=4, symmetric=False, granularity=granularity, algorithm="gptq",
                  group_size=32 if granularity == "per_group" else None)
    config = QuantConfig(rules=[LayerRule(types=["Linear"], weight=w)])

    def error() -> tuple[float, torch.Tensor]:
        qm = lowbit.quantize(copy.deepcopy(layer), config)
        lowbit.calibrate(qm, xs[:4], progress=False)
        with torch.no_grad():
            return (float((qm(test_x) - layer(test_x)).square().mean()),
                    qm[0].weight_quant.scale.clone())

    tuned, scale = error()
    monkeypatch.setattr(lowbit.algorithms.gptq.GPTQ, "act_order", False)
    monkeypatch.setattr(lowbit.algorithms.gptq.GPTQ, "clip_steps", 0)
    plain, plain_scale = error()
    assert scale.shape == plain_scale.shape == ((64, 4) if granularity == "per_group" else (64,))
    assert bool((scale < 0.95 * plain_scale).any())  # some ranges were shrunk
    assert tuned < 0.9 * plain, (tuned, plain)  # measured: 0.84 per group, 0.73 per channel


def test_gptq_statistics_leave_out_padding_tokens(monkeypatch):
    """Rows of padded positions (attention_mask 0) do not enter the Hessian; inputs that are
    not (batch, seq, features), such as the pooler's, count whole."""
    rows: dict[int, int] = {}
    update = lowbit.algorithms.gptq.hessian_update

    def spy(h, x, count):
        rows[x.shape[-1]] = rows.get(x.shape[-1], 0) + x.reshape(-1, x.shape[-1]).shape[0]
        return update(h, x, count)

    monkeypatch.setattr(lowbit.algorithms.gptq, "hessian_update", spy)
    qm = lowbit.quantize(tiny_bert(), QuantConfig.preset("w4-g32-gptq"))
    lowbit.calibrate(qm, RAGGED, progress=False)
    real = sum(int(b["attention_mask"].sum()) for b in RAGGED)
    # 128 wide: the FFN output of 2 layers; 64 wide: q, k, v, attention output, FFN input
    # (x 2 layers) and the pooler, which sees one row per sentence.
    assert rows[128] == 2 * real
    assert rows[64] == 2 * 5 * real + sum(len(b["input_ids"]) for b in RAGGED)
    assert real < sum(b["input_ids"].numel() for b in RAGGED)


def test_gptq_weights_lie_on_their_pinned_grid(calibrated):
    layer = calibrated["w4-g32-gptq"].encoder.layer[1].output.dense
    q = layer.weight_quant
    assert bool(q.pinned)
    codes, qp = q.quantize_weight(layer.weight)
    w = lowbit.numerics.dequantize(codes, qp.scale, qp.zero_point, qp.axis, qp.group_size)
    assert torch.allclose(w, layer.weight, atol=1e-6)
    layer.refresh_weight_range()  # a pinned range is never re-derived
    assert torch.equal(q.quantize_weight(layer.weight)[1].scale, qp.scale)


# ------------------------------------------------------------------ checkpoints, export


@pytest.mark.parametrize("preset", PRESETS)
def test_state_dict_of_a_quantized_hf_model_loads_exactly(calibrated, preset):
    qm = calibrated[preset]
    fresh = lowbit.quantize(tiny_bert(), QuantConfig.preset(preset))
    fresh.load_state_dict(qm.state_dict())
    b = batch(2, 6, seed=3)
    assert torch.equal(hidden(fresh, b), hidden(qm, b))
    assert torch.equal(hidden(lowbit.convert(fresh), b), hidden(lowbit.convert(qm), b))


@pytest.mark.parametrize("preset", ["w8a8-transformer", "w4-g32-awq"])
def test_export_with_dynamic_axes_matches_onnx_runtime(calibrated, preset, tmp_path):
    dm = lowbit.convert(calibrated[preset])
    b = batch(2, 7, seed=11)
    other = batch(3, 12, seed=12)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no parity warning
        report = lowbit.export_onnx(
            LastHidden(dm), tmp_path / "bert.onnx", (b["input_ids"], b["attention_mask"]),
            dynamic_shapes=(dims, dims),
            verify_inputs=[(other["input_ids"], other["attention_mask"])])
    assert report.parity.output_max_abs < 1e-4
    if preset == "w8a8-transformer":
        assert report.parity.codes_identical >= 0.999 and report.parity.codes_max_diff <= 1
    graph = onnx.load(str(tmp_path / "bert.onnx")).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in graph.input}
    assert all(isinstance(d, str) for dims_ in inputs.values() for d in dims_), inputs
    table = next(i for i in graph.initializer if i.dims[:1] == [120])  # word embeddings
    assert table.data_type == onnx.TensorProto.INT8


def test_embedding_deploy_gathers_integer_rows_exactly(calibrated):
    qm = calibrated["w8"]
    table = qm.embeddings.word_embeddings
    dm = lowbit.convert(qm)
    ids = torch.tensor([[0, 5, 119], [7, 7, 3]])
    with torch.no_grad():
        assert torch.equal(dm.embeddings.word_embeddings(ids), table(ids))
    codes = dm.embeddings.word_embeddings.weight.codes
    assert codes.dtype == torch.int8 and codes.shape == (120, 64)


# ------------------------------------------------------------------ errors


def test_specs_refuse_smoothing_and_algorithms_in_the_wrong_place():
    w, x = QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False)
    with pytest.raises(ValueError, match="smoothing"):
        QuantSpec(bits=8, smoothing=1.5)
    with pytest.raises(ValueError, match="algorithm"):
        QuantSpec(bits=4, algorithm="best")
    with pytest.raises(ValueError, match="smoothing"):
        LayerRule(types=["Linear"], weight=w.replace(smoothing=0.5), input=x)
    with pytest.raises(ValueError, match="algorithm"):
        LayerRule(types=["Linear"], weight=w, input=x.replace(algorithm="gptq"))
    with pytest.raises(ValueError, match="smoothing"):
        LayerRule(types=["Linear"], input=x.replace(smoothing=0.5))
    with pytest.raises(ValueError, match="algorithm"):
        QuantSpec(bits=4, method="lsq", algorithm="gptq")


def test_smoothing_and_awq_on_one_layer_is_refused():
    rule = LayerRule(types=["Linear"], weight=QuantSpec(bits=4, algorithm="awq"),
                     input=QuantSpec(bits=8, symmetric=False, smoothing=0.5))
    qm = lowbit.quantize(nn.Sequential(nn.Linear(8, 8)), QuantConfig(rules=[rule]))
    with pytest.raises(ValueError, match="smoothing.*awq"):
        lowbit.calibrate(qm, [torch.randn(4, 8)], progress=False)


def test_weight_calibration_needs_re_iterable_batches():
    qm = lowbit.quantize(tiny_bert(), QuantConfig.preset("w4-g32-gptq"))
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    with pytest.raises(TypeError, match="re|twice"):
        lowbit.calibrate(qm, iter(RAGGED), progress=False)
    assert all(torch.equal(before[k], v) for k, v in qm.state_dict().items())


def test_convert_warns_when_smoothing_was_never_calibrated():
    qm = lowbit.quantize(tiny_bert(), QuantConfig.preset("w8-transformer"))  # dynamic: no data
    with pytest.warns(UserWarning, match=r"13 layer\(s\) ask for `smoothing`.*lowbit.calibrate"):
        dm = lowbit.convert(qm)
    b = batch(2, 6, seed=4)
    assert torch.allclose(hidden(dm, b), hidden(tiny_bert(), b), atol=0.1)


def test_awq_then_gptq_scales_the_input_and_pins_the_grid():
    """``awq-gptq``: AWQ's scales, then GPTQ rounding of the scaled weight."""
    rule = LayerRule(types=["Linear"], weight=QuantSpec(
        bits=4, symmetric=False, granularity="per_group", group_size=32, algorithm="awq-gptq"))
    qm = lowbit.quantize(tiny_bert(), QuantConfig(rules=[rule]))
    lowbit.calibrate(qm, RAGGED, progress=False)
    dense = qm.encoder.layer[0].output.dense
    assert dense.input_smoothing is not None and bool(dense.weight_quant.pinned)


def test_embedding_rules_cannot_quantize_indices():
    rule = LayerRule(types=["Embedding"], weight=QuantSpec(bits=8),
                     input=QuantSpec(bits=8, symmetric=False))
    with pytest.raises(ValueError, match="indices"):
        lowbit.quantize(nn.Sequential(nn.Embedding(10, 4)), QuantConfig(rules=[rule]))


def test_embeddings_stay_float_unless_a_rule_names_them():
    with pytest.warns(UserWarning, match="Embedding is quantized only where a rule names"):
        qm = lowbit.quantize(tiny_bert(), QuantConfig.preset("w8a8"))
    assert not any(isinstance(m, QuantEmbedding) for m in qm.modules())


def test_disagreement_that_grows_with_depth_is_explained_as_drift():
    from lowbit.export.onnx import _disagreement_hint
    from lowbit.export.verify import Parity

    drift = Parity(codes_identical=0.91, first_identical=1.0, codes_max_diff=39,
                   local_identical=1.0, local_total=1000)
    assert "carried on layer to layer" in _disagreement_hint(drift, "int8", False)
    wrong_from_the_start = Parity(codes_identical=0.74, first_identical=0.74, codes_max_diff=60)
    hint = _disagreement_hint(wrong_from_the_start, "int8", True)
    assert "int4_format='matmulnbits'" in hint


# ------------------------------------------------------------------ mixed precision


def test_sensitivity_search_keeps_the_layers_that_help_most():
    model = tiny_bert()
    cfg = QuantConfig.preset("w4a8")
    first = lowbit.keep_sensitive_layers(model, cfg, RAGGED, target=1.0, max_layers=2)
    assert len(first.chosen) == 2
    best = max(first.per_layer, key=first.per_layer.get)
    assert first.chosen[0] == best and first.per_layer[best] > first.baseline
    assert first.score > first.baseline  # re-quantized with the two layers in float
    last = first.config.rules[-1]
    assert list(last.names) == first.chosen and last.weight is None and last.input is None
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # model untouched

    met = lowbit.keep_sensitive_layers(model, cfg, RAGGED, target=first.baseline - 1e-6)
    assert met.chosen == [] and met.config.rules == cfg.rules and met.score == met.baseline


def test_sensitivity_search_reaches_a_reachable_target_with_a_fallback_spec():
    model = tiny_bert()
    cfg = QuantConfig.preset("w4a8")
    fallback = LayerRule(weight=QuantSpec(bits=8, granularity="per_channel"))  # weight-only
    probe = lowbit.keep_sensitive_layers(model, cfg, RAGGED, target=1.0, max_layers=3)
    target = (probe.baseline + probe.score) / 2
    report = lowbit.keep_sensitive_layers(model, cfg, RAGGED, target=target, fallback=fallback)
    assert 1 <= len(report.chosen) <= 3
    kept = report.config.rules[-1]
    assert kept.weight == fallback.weight and kept.input is None
    assert report.score > report.baseline


@pytest.mark.parametrize("kwargs, error, match", [
    ({"target": 1.5}, ValueError, "`target`"),
    ({"target": True}, ValueError, "`target`"),
    ({"target": 0.9, "fallback": "float"}, TypeError, "`fallback`"),
    ({"target": 0.9, "max_layers": -1}, ValueError, "`max_layers`"),
    ({"target": 0.9, "eval_batches": []}, ValueError, "`eval_batches`"),
])
def test_sensitivity_search_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        lowbit.keep_sensitive_layers(tiny_bert(), QuantConfig.preset("w4a8"), RAGGED, **kwargs)
    with pytest.raises(TypeError, match="`batches`"):
        lowbit.keep_sensitive_layers(tiny_bert(), QuantConfig.preset("w8a8"), iter(RAGGED),
                                     target=0.9)


def test_checkpoints_from_before_pinned_qparams_still_load():
    qm = quantized("w8a8-transformer")
    state = {k: v for k, v in qm.state_dict().items() if not k.endswith(".pinned")}
    fresh = lowbit.quantize(tiny_bert(), QuantConfig.preset("w8a8-transformer"))
    fresh.load_state_dict(state)  # strict: the missing `pinned` buffers default to False
    assert not any(bool(m.pinned) for m in fresh.modules() if hasattr(m, "pinned"))
    b = batch(2, 6, seed=8)
    assert torch.equal(hidden(fresh, b), hidden(qm, b))
