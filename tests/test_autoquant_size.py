"""``autoquant(max_size=...)``: the weight-size estimate matches the exported file, only trials
within the cap meet the target, and the keep steps pass over layers that would break it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from models import LastHidden
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.analysis.size import float_bytes, quantized_bytes, weight_bytes

transformers = pytest.importorskip("transformers")


def w4_g32(**extra) -> QuantSpec:
    return QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32, **extra)


def test_weight_bytes_of_the_worked_example():
    spec = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=128)
    assert weight_bytes("Linear", (1536, 384), spec) == 589_824 * 0.5 + 4_608 * 5
    assert weight_bytes("Linear", (1536, 384), None) == 589_824 * 4
    per_row = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    assert weight_bytes("Embedding", (100, 64), per_row) == 6400 + 100 * 5
    # 4-bit per-channel Conv codes are stored as int8: not packed
    w4 = QuantSpec(bits=4, symmetric=True, granularity="per_channel")
    assert weight_bytes("Conv2d", (8, 4, 3, 3), w4) == 288 + 8 * 5
    assert weight_bytes("Embedding", (100, 64), w4) == 3200 + 100 * 5


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=3000, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=256,
                                     max_position_embeddings=64)
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize("embedding", [w4_g32(), QuantSpec(bits=8, granularity="per_channel")],
                         ids=["emb-int4-g32", "emb-int8-rows"])
def test_estimate_matches_the_exported_file(embedding, tmp_path):
    model = bert()
    config = QuantConfig(rules=[LayerRule(types=["Linear"], weight=w4_g32()),
                                LayerRule(types=["Embedding"], weight=embedding)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, config)
        ids = torch.randint(0, 3000, (2, 9), generator=torch.Generator().manual_seed(0))
        lowbit.export_onnx(LastHidden(lowbit.convert(qm)), tmp_path / "m.onnx",
                           (ids, torch.ones_like(ids)))
    size = (tmp_path / "m.onnx").stat().st_size
    estimate = quantized_bytes(qm)
    assert abs(estimate - size) / size < 0.05, (estimate, size)  # graph structure is the rest
    assert estimate < 0.3 * float_bytes(model)


# ------------------------------------------------------------------ the search under a cap


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, 10)).eval()


MODEL = mlp()
X = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    REF = MODEL(X)
CALIB = [X[:16]]
CONFIG = QuantConfig(rules=[LayerRule(types=["Linear"], weight=w4_g32())])
FLOAT = float_bytes(MODEL)  # (64·256 + 256·256 + 256·10 + 522) · 4
GIVEN = (64 * 256 // 2 + 512 * 5) + (256 * 256 // 2 + 2048 * 5) + (2560 // 2 + 80 * 5) + 522 * 4
GROW = {"0": 64 * 256 // 2, "2": 256 * 256 // 2, "4": 2560 // 2}  # 8-bit codes, same groups


def neg_mse(model: nn.Module) -> float:
    return -float((model(X) - REF).pow(2).mean())


def search(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.autoquant(MODEL, CONFIG, CALIB, neg_mse, **kwargs)


def test_keep_8bit_passes_over_layers_that_would_break_the_cap():
    free = search(max_drop=0.0, steps=["as-given", "keep-8bit"])
    assert free.trials[0].weight_bytes == GIVEN
    assert any("2" in t.recipe.kept for t in free.trials)  # uncapped, the big layer is kept
    cap = GIVEN + GROW["0"] + GROW["4"] + 100  # room for the two small layers only
    capped = search(max_drop=0.0, steps=["as-given", "keep-8bit"], max_size=cap)
    kept = [t.recipe.kept for t in capped.trials if t.step == "keep-8bit"]
    assert kept and all("2" not in k for k in kept)
    assert any(set(k) == {"0", "4"} for k in kept)
    assert all(t.fits and t.weight_bytes <= cap for t in capped.trials)
    assert any(n.startswith("keep-8bit: 1 layer(s) left out") and n.endswith(": 2")
               for n in capped.notes)
    assert capped.max_bytes == cap and capped.to_dict()["max_bytes"] == cap
    # the same cap as a fraction of the float32 weight bytes
    ratio = search(max_drop=0.0, steps=["as-given", "keep-8bit"], max_size=cap / FLOAT)
    assert [t.recipe.kept for t in ratio.trials] == [t.recipe.kept for t in capped.trials]


def test_a_trial_over_the_cap_does_not_meet_the_target():
    loose = search(max_drop=1.0, steps=["as-given"])
    assert loose.met and loose.weight_bytes == GIVEN
    tight = search(max_drop=1.0, steps=["as-given", "keep-8bit"], max_size=0.5 * GIVEN / FLOAT)
    assert not tight.met and not tight.trials[0].fits and not tight.trials[0].met
    assert any(n.startswith("as-given: its weights take") for n in tight.notes)
    assert "over the cap" in tight.summary()
    assert math.isclose(tight.weight_bytes / FLOAT, GIVEN / FLOAT)


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, r"`max_size` must be a finite number > 0, got 0"),
    (-0.2, ValueError, r"`max_size` must be a finite number > 0"),
    (float("nan"), ValueError, r"`max_size` must be a finite number > 0, got nan"),
    ("0.2", TypeError, r"`max_size` must be a number, got str '0.2'"),
    (True, TypeError, r"`max_size` must be a number, got bool"),
])
def test_max_size_is_validated(value, error, match):
    with pytest.raises(error, match=match):
        lowbit.autoquant(MODEL, CONFIG, CALIB, neg_mse, max_size=value)


def test_keep_steps_rank_gptq_layers_on_round_to_nearest_weights():
    gptq = QuantConfig(rules=[LayerRule(types=["Linear"], weight=w4_g32(algorithm="gptq"))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = lowbit.autoquant(MODEL, gptq, CALIB, neg_mse, 0.0, steps=["as-given", "keep-8bit"])
    assert any(n.startswith("keep-8bit: ranked on round-to-nearest weights") for n in r.notes)
    ranked = next(n for n in r.notes if n.startswith("keep-8bit: layers by SQNR alone"))
    assert "inf dB" not in ranked and all(f"{name} " in ranked for name in ("0", "2", "4"))
    # the kept trials still use GPTQ
    assert all(rule.weight.algorithm == "gptq" for t in r.trials for rule in t.recipe.config.rules
               if rule.weight is not None and rule.weight.bits == 4)
