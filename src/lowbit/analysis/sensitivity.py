"""Mixed precision by measurement: the fewest layers to keep at higher precision so that the
quantized model reaches a fidelity target.

Layer-wise sensitivity, then greedy: quantize and calibrate with ``config``; for each
quantized layer, score the model with only that layer back in float (its quantizers
bypassed); add the layers with the largest gains, one at a time, until the score reaches
``target``. The result is ``config`` plus one rule for the chosen layers (float by default, or
the specs of ``fallback``), re-quantized and re-scored, so the reported score is the real one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit import fidelity
from lowbit.calibrate import calibrate, default_forward
from lowbit.config import LayerRule, QuantConfig
from lowbit.nn import QuantLayer

Output = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class SensitivityReport:
    """What the search measured and chose (scores are mean cosine to the float outputs)."""

    baseline: float  # the model quantized with ``config`` alone
    per_layer: dict[str, float] = field(default_factory=dict)  # score with that layer in float
    chosen: list[str] = field(default_factory=list)  # in the order they were added
    score: float = 0.0  # the returned config, quantized and calibrated afresh
    config: QuantConfig | None = None

    def summary(self) -> str:
        lines = [f"baseline {self.baseline:.5f} -> {self.score:.5f} with "
                 f"{len(self.chosen)} layer(s) kept: {self.chosen}"]
        ranked = sorted(self.per_layer.items(), key=lambda kv: -kv[1])
        lines += [f"  {name}: {score:.5f}" for name, score in ranked[:10]]
        return "\n".join(lines)


def first_tensor(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's output, or its first element (``ModelOutput``, tuple)."""
    out = fidelity.first_tensor(default_forward(model, batch))
    if out is None:
        raise TypeError("the model's output holds no tensor to compare; pass `output=`")
    return out


def _score(model: nn.Module, batches: Sequence[Any], refs: list[torch.Tensor],
           output: Output) -> float:
    """Mean cosine similarity, per sample (first dimension), to the float outputs."""
    sims = []
    with torch.no_grad():
        for batch, ref in zip(batches, refs):
            got = output(model, batch).float()
            sims.append(fidelity.sample_cosines(got.reshape(got.shape[0], -1),
                                                ref.reshape(ref.shape[0], -1)))
    return float(torch.cat(sims).mean())


def keep_sensitive_layers(
    model: nn.Module,
    config: QuantConfig,
    batches: Iterable[Any],
    *,
    target: float,
    eval_batches: Sequence[Any] | None = None,
    fallback: LayerRule | None = None,
    output: Output | None = None,
    max_layers: int | None = None,
) -> SensitivityReport:
    """Search the fewest layers to keep at ``fallback`` precision (float by default) for the
    mean output cosine to the float model to reach ``target``; ``model`` is left untouched.

    ``batches`` calibrate (re-iterable); ``eval_batches`` (default: ``batches``) score.
    ``output(model, batch)`` gives the tensor to compare (default: the first output tensor).
    ``fallback``'s ``weight``/``input``/``output`` specs are given to the chosen layers (its
    ``types``/``names`` are ignored). Sensitivities are measured with each layer in float.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"`config` must be a QuantConfig, got {type(config).__name__}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not -1 < target <= 1:
        raise ValueError(f"`target` must be a cosine in (-1, 1], got {target!r}")
    if fallback is not None and not isinstance(fallback, LayerRule):
        raise TypeError(f"`fallback` must be a LayerRule or None, got {type(fallback).__name__}")
    if max_layers is not None and (isinstance(max_layers, bool) or not isinstance(
            max_layers, int) or max_layers < 0):
        raise ValueError(f"`max_layers` must be an int >= 0 or None, got {max_layers!r}")
    if iter(batches) is batches:  # type: ignore[comparison-overlap]
        raise TypeError("`batches` is read more than once: pass a list or a DataLoader")
    output = output or first_tensor
    scoring = list(eval_batches) if eval_batches is not None else list(batches)
    if not scoring:
        raise ValueError("`eval_batches` is empty: the search needs at least one batch")
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        refs = [output(reference, b).float() for b in scoring]

    from lowbit.quantize import quantize

    def build(cfg: QuantConfig) -> nn.Module:
        qm = quantize(copy.deepcopy(model), cfg)
        calibrate(qm, batches, progress=False)
        return qm.eval()

    qm = build(config)
    report = SensitivityReport(baseline=_score(qm, scoring, refs, output))
    layers: dict[str, Any] = {str(m.layer_name): m for m in qm.modules()
                              if isinstance(m, QuantLayer)}
    for name, layer in layers.items():
        saved = fidelity.bypassed(layer)
        try:
            report.per_layer[name] = _score(qm, scoring, refs, output)
        finally:
            fidelity.restore(layer, saved)

    score = report.baseline
    limit = len(layers) if max_layers is None else max_layers
    for name in sorted(report.per_layer, key=lambda n: -report.per_layer[n]):
        if score >= target or len(report.chosen) >= limit:
            break
        if report.per_layer[name] <= report.baseline:
            break  # no layer left whose float form helps
        report.chosen.append(name)
        fidelity.bypassed(layers[name])  # cumulative: chosen layers stay in float
        score = _score(qm, scoring, refs, output)

    keep = fallback or LayerRule()
    rules = list(config.rules)
    if report.chosen:
        rules.append(LayerRule(names=list(report.chosen), weight=keep.weight, input=keep.input,
                               output=keep.output))
    report.config = QuantConfig(rules=rules, fuse_bn=config.fuse_bn)
    report.score = _score(build(report.config), scoring, refs, output) if report.chosen \
        else report.baseline
    return report
