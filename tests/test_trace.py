"""One trace of who consumes what: torch.fx where a model traces, a dispatch trace elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.fuse import find_chains
from lowbit.trace import guess_example_inputs, trace


class Block(nn.Module):
    """Conv → BN (siblings, not a Sequential) and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)) + x)


class Untraceable(Block):
    """The same wiring behind data-dependent control flow (torch.fx cannot trace it) and an
    in-place add, as Hugging Face models write residuals."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent: fx fails here
            h = self.bn(self.conv(x))
            h += x
            return self.act(h)
        return x


def _consumers(graph, name):
    node = next(n for n in graph.nodes if n.name == name)
    return [(user.name, pos) for user, pos in graph.users(node)]


@pytest.mark.parametrize("cls,method", [(Block, "fx"), (Untraceable, "dispatch")])
def test_both_traces_see_the_same_dataflow(cls, method):
    graph = trace(cls().eval(), (torch.randn(1, 4, 6, 6),))
    assert graph is not None and graph.method == method
    assert _consumers(graph, "conv") == [("bn", 0)]
    [add] = list(graph.functions("add"))
    assert _consumers(graph, "bn") == [(add.name, 0)]
    assert add.inputs[1] in graph.graph_inputs, "the residual reads the model's input"
    assert _consumers(graph, add.name) == [("act", 0)]


def test_no_graph_without_fx_or_example_inputs():
    assert trace(Untraceable()) is None
    assert trace(Block()) is not None, "fx needs no inputs"


def test_dispatch_trace_restores_training_flags_and_leaves_bn_statistics_alone():
    model = Untraceable().train()
    model.act.eval()
    before = model.bn.running_mean.clone()
    trace(model, (torch.randn(2, 4, 6, 6) + 3,))
    assert model.training and model.conv.training and not model.act.training
    assert torch.equal(model.bn.running_mean, before)


def test_bn_folds_for_siblings_in_a_module_that_fx_cannot_trace():
    model = nn.Sequential(Untraceable(), Untraceable()).eval()
    assert find_chains(model) == [], "no graph: only Sequential neighbours"
    graph = trace(model, (torch.randn(1, 4, 6, 6),))
    assert find_chains(model, graph) == [("0.conv", "0.bn"), ("1.conv", "1.bn")]
    plan = lowbit.plan(model, QuantConfig.preset("w8a8"), (torch.randn(1, 4, 6, 6),))
    assert len(plan.fusions) == 2 and not plan.skipped


def test_hugging_face_cnn_folds_every_batchnorm():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       image_size=32)
    model = transformers.ResNetModel(config).eval()
    inputs = guess_example_inputs(model)
    assert inputs is not None and inputs["pixel_values"].shape == (1, 3, 32, 32)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    plan = lowbit.plan(model, QuantConfig.preset("w8a8"))  # inputs made from the config
    assert sorted(chain[1] for chain in plan.fusions) == sorted(norms)
    assert not [n for n in plan.skipped if n in norms]


class CachingBlock(nn.Module):
    """Caches a value derived from a parameter in ``forward`` (as LeViT's attention caches its
    biases per device in eval mode): a trace must not leave its proxy in the cache."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias * 2
        return self.fc(x) + self.cache["bias"] + x


def test_tracing_leaves_values_a_forward_caches_alone():
    model = CachingBlock().eval()
    shared = model.cache
    assert trace(model).method == "fx"
    assert model.cache == {}, "the tracer's proxy stayed in the model"
    assert model.cache is shared, "a cache other objects may hold stays the same object"
    x = torch.randn(2, 4)
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    assert model.cache == {}
    lowbit.calibrate(qm, [x], progress=False)
    assert torch.allclose(qm(x), model(x), atol=0.1)


def test_levit_quantizes_and_runs_after_its_residual_blocks_are_rewritten():
    """LeViT's residual blocks trace with fx (so their adds are rewritten) and its attention
    caches biases in forward; the rewritten forward ran a stale proxy before."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LevitConfig(image_size=64, hidden_sizes=[32, 64],
                                      num_attention_heads=[2, 2], depths=[1, 1], key_dim=[8, 8],
                                      mlp_ratio=[2, 2], attention_ratio=[2, 2],
                                      down_ops=[["Subsample", 8, 2, 4, 2, 2]], num_labels=4)
    torch.manual_seed(0)
    model = transformers.LevitModel(config).eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, QuantConfig.preset("w8a8"), example_inputs=(x,))
    assert any(layer.type == "add" for layer in qm.lowbit_plan.quantized)
    lowbit.calibrate(qm, [x], progress=False)
    got = qm(pixel_values=x).last_hidden_state
    want = model(pixel_values=x).last_hidden_state
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9
