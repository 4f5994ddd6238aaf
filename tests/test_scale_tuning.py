"""End-to-end scale tuning (docs/algorithms.md §15): the codes stay, the scales move, the
output gets closer to the float model's and everything downstream keeps the tuned scales."""

from __future__ import annotations

import pytest
import torch
from models import tiny_bert
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.algorithms.scale_tuning import tunable_layers
from lowbit.quantizers import Quantizer

W4_GROUPS = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=16)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 8)).eval()


def _batches(n: int = 10, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 32, generator=g) for _ in range(n)]


def _calibrated(config: QuantConfig, model: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    model = model or _mlp()
    qm = lowbit.quantize(model, config)
    lowbit.calibrate(qm, _batches(), progress=False)
    return model, qm


def _error(qm: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        got = torch.cat([qm(x) for x in batches])
        ref = torch.cat([model(x) for x in batches])
    return float(((got - ref) ** 2).sum() / (ref ** 2).sum())


def _codes(qm: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.weight_quant.quantize_weight(layer.weight.detach())[0]
            for name, layer in tunable_layers(qm).items()}


WEIGHT_ONLY = QuantConfig(rules=[LayerRule(types=["Linear"], weight=W4_GROUPS)])
GPTQ = QuantConfig(rules=[LayerRule(types=["Linear"], weight=QuantSpec(
    bits=4, symmetric=False, granularity="per_group", group_size=16, algorithm="gptq"))])
W4A8 = QuantConfig(rules=[LayerRule(types=["Linear"], weight=QuantSpec(bits=4),
                                    input=QuantSpec(bits=8, symmetric=False))])


@pytest.mark.parametrize("config", [WEIGHT_ONLY, W4A8, GPTQ], ids=["w4-groups", "w4a8", "gptq"])
def test_tuning_keeps_the_codes_and_lowers_the_error_on_unseen_data(config):
    model, qm = _calibrated(config)
    unseen = _batches(4, seed=7)
    codes = _codes(qm)
    scales = {n: layer.weight_quant.scale.clone() for n, layer in tunable_layers(qm).items()}
    before = _error(qm, model, unseen)
    result = lowbit.tune_scales(qm, model, _batches(), steps=120, lr=1e-2, progress=False)
    assert result.best_step > 0 and result.held_out_after < result.held_out_before
    assert _error(qm, model, unseen) < 0.9 * before
    for name, layer in tunable_layers(qm).items():
        assert torch.equal(layer.weight_quant.quantize_weight(layer.weight.detach())[0],
                           codes[name]), name
        assert bool(layer.weight_quant.pinned)
        assert not torch.equal(layer.weight_quant.scale, scales[name])
        assert isinstance(layer.weight_quant, Quantizer)


@pytest.mark.parametrize("preset", ["w4a8", "w8a8"])
def test_tuned_scales_survive_convert_export_and_a_state_dict_round_trip(preset, tmp_path):
    """w8a8 puts each bias on the int32 grid s_x·s_w: it must follow the tuned s_w."""
    config = W4A8 if preset == "w4a8" else QuantConfig.preset(preset)
    model, qm = _calibrated(config)
    codes = _codes(qm)
    lowbit.tune_scales(qm, model, _batches(), steps=60, lr=1e-2, held_out=0, progress=False)
    assert all(torch.equal(c, _codes(qm)[name]) for name, c in codes.items())
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        tuned = qm(x)
    fresh = lowbit.quantize(_mlp(), config)
    fresh.load_state_dict(qm.state_dict())
    dm = lowbit.convert(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
        assert torch.equal(dm(x), tuned)
    report = lowbit.export_onnx(dm, tmp_path / "tuned.onnx", (x,))
    assert report.parity.codes_identical == 1.0


def test_an_hf_encoder_tunes_on_padded_batches_and_exports():
    model = tiny_bert(vocab_size=200, hidden_size=64, heads=4, intermediate_size=128)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        ids = torch.randint(1, 200, (8, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 10:] = 0  # half the sentences padded
        batches.append({"input_ids": ids, "attention_mask": mask})
    with pytest.warns(UserWarning, match="Embedding"):  # tables stay float here
        qm = lowbit.quantize(model, WEIGHT_ONLY)
    lowbit.calibrate(qm, batches, progress=False)
    result = lowbit.tune_scales(qm, model, batches, steps=40, lr=1e-2, progress=False)
    assert result.held_out_after < result.held_out_before
    assert any(".attention.self.query" in name for name in result.layers)
    dm = lowbit.convert(qm)
    with torch.no_grad():
        a = qm(**batches[0]).last_hidden_state
        b = dm(**batches[0]).last_hidden_state
    assert torch.equal(a, b)


def test_a_causal_lm_with_tied_embeddings_tunes_on_its_logits():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 300, (4, 16), generator=g)} for _ in range(6)]
    rule = LayerRule(types=["Linear", "Embedding"], weight=W4_GROUPS)
    qm = lowbit.quantize(model, QuantConfig(rules=[rule]))
    lowbit.calibrate(qm, batches, progress=False)
    codes = _codes(qm)
    result = lowbit.tune_scales(qm, model, batches, steps=30, lr=1e-2, progress=False)
    assert result.held_out_after < result.held_out_before
    assert {"lm_head", "transformer.wte"} <= set(result.layers)  # tied: each its own scales
    assert all(torch.equal(c, _codes(qm)[name]) for name, c in codes.items())
    dm = lowbit.convert(qm)
    with torch.no_grad():
        assert torch.equal(qm(**batches[0]).logits, dm(**batches[0]).logits)


def test_references_too_large_to_keep_are_recomputed_to_the_same_result(monkeypatch):
    from lowbit.algorithms import scale_tuning

    results = []
    for limit in (scale_tuning.REFERENCE_CACHE_BYTES, 0):
        monkeypatch.setattr(scale_tuning, "REFERENCE_CACHE_BYTES", limit)
        model, qm = _calibrated(W4A8)
        result = lowbit.tune_scales(qm, model, _batches(), steps=20, lr=1e-2, progress=False)
        results.append((result.history, qm.state_dict()))
    (history, state), (history_again, state_again) = results
    assert history == history_again
    assert all(torch.equal(state[k], state_again[k]) for k in state)


def test_too_high_a_learning_rate_never_leaves_the_model_worse():
    model, qm = _calibrated(W4A8)
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    result = lowbit.tune_scales(qm, model, _batches(), steps=20, lr=5.0, eval_every=5,
                                progress=False)
    assert result.held_out_after <= result.held_out_before
    if result.best_step == 0:  # nothing beat the start: the model is as it was
        for key, value in qm.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_the_held_out_share_is_counted_in_samples():
    from lowbit.algorithms.scale_tuning import split_held_out

    ragged = [torch.randn(64, 5) for _ in range(6)] + [torch.randn(8, 5)]
    train, scored = split_held_out(ragged, 0.2)  # 20% of 392 samples: the last 64 + 8 = 72
    assert [len(b) for b in scored] == [64, 8] and len(train) == 5
    tokens = [{"input_ids": torch.ones(n, 7, dtype=torch.long)} for n in (16, 16, 16, 16, 4)]
    assert [b["input_ids"].shape[0] for b in split_held_out(tokens, 0.2)[1]] == [16, 4]
    even = [torch.randn(4, 5) for _ in range(10)]
    assert len(split_held_out(even, 0.2)[1]) == 2 and len(split_held_out(even, 0.01)[1]) == 1
    assert split_held_out(even[:1], 0.5) == (even[:1], even[:1])  # one batch: scored as trained
    assert split_held_out(even, 0) == (even, even)


def test_the_model_is_left_whole_when_a_batch_fails():
    model, qm = _calibrated(W4A8)
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    flags = {n: p.requires_grad for n, p in qm.named_parameters()}
    with pytest.raises(ValueError, match="0"):
        lowbit.tune_scales(qm, model, [*_batches(4), torch.randn(64, 5)], steps=10, held_out=0,
                           progress=False)
    assert all(isinstance(layer.weight_quant, Quantizer) for layer in tunable_layers(qm).values())
    assert {n: p.requires_grad for n, p in qm.named_parameters()} == flags
    for key, value in qm.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("kwargs, error, words", [
    ({"steps": 0}, ValueError, "`steps`"),
    ({"steps": 2.5}, ValueError, "`steps`"),
    ({"steps": None}, ValueError, "`steps`"),
    ({"lr": -1.0}, ValueError, "`lr`"),
    ({"lr": float("nan")}, ValueError, "`lr`"),
    ({"held_out": 1.0}, ValueError, "`held_out`"),
    ({"biases": "yes"}, TypeError, "`biases`"),
    ({"eval_every": 0}, ValueError, "`eval_every`"),
    ({"forward": 3}, TypeError, "`forward`"),
])
def test_bad_arguments_name_the_argument(kwargs, error, words):
    _, qm = _calibrated(W4A8)
    with pytest.raises(error, match=words):
        lowbit.tune_scales(qm, _mlp(), _batches(2), progress=False, **kwargs)


def test_bad_batches_and_models_are_clear_errors():
    model, qm = _calibrated(W4A8)
    with pytest.raises(TypeError, match="`batches`"):
        lowbit.tune_scales(qm, model, torch.randn(4, 32))
    with pytest.raises(ValueError, match="empty"):
        lowbit.tune_scales(qm, model, [])
    with pytest.raises(ValueError, match="no lowbit quantizers"):
        lowbit.tune_scales(_mlp(), model, _batches(2))
    with pytest.raises(TypeError, match="`reference` must be the float torch.nn.Module"):
        lowbit.tune_scales(qm, _batches(2), _batches(2))
    with pytest.raises(ValueError, match="`reference` .* got a quantized one"):
        lowbit.tune_scales(qm, qm, _batches(2))
    uncalibrated = lowbit.quantize(_mlp(), W4A8)
    with pytest.raises(ValueError, match="not calibrated"):
        lowbit.tune_scales(uncalibrated, model, _batches(2))
    binary = lowbit.quantize(_mlp(), QuantConfig(rules=[LayerRule(
        types=["Linear"], weight=QuantSpec(bits=1, method="binary"))]))
    with pytest.raises(ValueError, match="no layer whose weight scales"):
        lowbit.tune_scales(binary, model, _batches(2))
