"""Calibration that rewrites a weight never writes into a Parameter another module shares:
GPT-2's ``lm_head`` is tied to its token embedding."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowbit
from lowbit import QuantConfig

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("preset", ["w8a8-transformer", "w4-g32-gptq"])
def test_smoothing_and_gptq_leave_a_tied_embedding_alone(preset):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    table = model.transformer.wte.weight.detach().clone()
    batches = [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, QuantConfig.preset(preset))
        lowbit.calibrate(qm, batches, progress=False)
    assert torch.equal(qm.transformer.wte.weight.detach(), table), "the embedding kept its rows"
    assert torch.equal(model.transformer.wte.weight.detach(), table), "the caller's model too"
    with torch.no_grad():
        ids = torch.randint(0, 64, (2, 12))
        ref, got = model(ids).logits, lowbit.convert(qm)(ids).logits
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cosine > 0.98
