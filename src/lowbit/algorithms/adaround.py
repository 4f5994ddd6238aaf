"""AdaRound: learned up/down rounding of each weight (Nagel et al. 2020; docs/algorithms.md §13).

Per layer, on the range its quantizer already holds (scale ``s``, zero point ``z``):

    W̃ = s · (clip(⌊W/s⌋ + h(V) + z, qmin, qmax) − z),
    h(V) = clip(sigmoid(V)·(ζ − γ) + γ, 0, 1),   ζ = 1.1, γ = −0.1,

and ``V`` minimises ``‖f(W̃x) − f(Wx)‖² + λ Σ (1 − |2h(V) − 1|^β)`` over the layer's recorded
inputs ``x`` (``f``: the ReLU fused into the layer, if any), with Adam. The regulariser is off
for the first ``warm_up`` share of the iterations, then ``β`` anneals from 20 to 2 so that every
``h`` ends at 0 or 1. The weight becomes its dequantized codes ``⌊W/s⌋ + [V ≥ 0]`` and its
qparams are pinned (as GPTQ's), so convert, export and ``state_dict`` keep the rounding.
Conv1d/Conv2d and Linear, any weight granularity.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.base import Group, WeightAlgorithm
from lowbit.nn import replace_weight
from lowbit.numerics import broadcast_param, dequantize
from lowbit.quantizers.base import QParams
from lowbit.registry import WEIGHT_ALGORITHMS

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True, kw_only=True)
class AdaRoundOptions:
    """AdaRound's knobs. ``iterations`` Adam steps per layer on ``batch_size`` samples each
    (rows of a Linear's input with leading dims flattened, images of a conv's input);
    ``reg`` is λ; ``beta`` the (start, end) of the annealing; ``warm_up`` the share of
    iterations before the regulariser starts; ``lr`` Adam's step; ``seed`` the sampling."""

    iterations: int = 500
    batch_size: int = 256
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warm_up: float = 0.2
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        o = "AdaRoundOptions"
        for name in ("iterations", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{o}.`{name}` must be int, got {type(value).__name__} {value!r}")
        for name in ("reg", "warm_up", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{o}.`{name}` must be float, got {type(value).__name__} "
                                f"{value!r}")
        if self.iterations < 1:
            raise ValueError(f"{o}.`iterations` must be >= 1, got {self.iterations}")
        if self.batch_size < 1:
            raise ValueError(f"{o}.`batch_size` must be >= 1, got {self.batch_size}")
        if self.reg < 0:
            raise ValueError(f"{o}.`reg` must be >= 0, got {self.reg}")
        if not 0 <= self.warm_up < 1:
            raise ValueError(f"{o}.`warm_up` must be in [0, 1), got {self.warm_up}")
        if not self.lr > 0:
            raise ValueError(f"{o}.`lr` must be > 0, got {self.lr}")
        if not (isinstance(self.beta, tuple) and len(self.beta) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                        for b in self.beta)):
            raise TypeError(f"{o}.`beta` must be a (start, end) tuple of floats, got "
                            f"{self.beta!r}")
        if not self.beta[0] >= self.beta[1] > 0:
            raise ValueError(f"{o}.`beta` must satisfy start >= end > 0, got {self.beta}")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V)·(ζ − γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = rest`` (the fractional part), so training starts from W itself."""
    h = rest.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def beta_at(step: int, options: AdaRoundOptions) -> float | None:
    """β of the regulariser at ``step`` (``None`` during warm-up): linear from start to end."""
    start = int(options.warm_up * options.iterations)
    if step < start:
        return None
    t = (step - start) / max(1, options.iterations - start)
    b0, b1 = options.beta
    return b1 + (b0 - b1) * (1 - t)


def adaround_codes(weight: torch.Tensor, qp: QParams, inputs: torch.Tensor,
                   op: Any, options: AdaRoundOptions,
                   activation: nn.Module | None = None) -> torch.Tensor:
    """Integer codes of ``weight`` (a float tensor of integers, weight-shaped) chosen by AdaRound
    on ``qp``'s grid, reconstructing ``op(inputs, W)`` (``op(x, w)``: the layer with weight ``w``).

    ``inputs``: samples along dim 0 (rows of a Linear input, images of a conv input)."""
    w = weight.detach().float()
    s = broadcast_param(qp.scale.float(), w, qp.axis, qp.group_size).to(w.device)
    z = broadcast_param(qp.zero_point.float(), w, qp.axis, qp.group_size).to(w.device)
    floor = torch.floor(w / s)
    v = nn.Parameter(_init_v(w / s - floor))
    act = activation if activation is not None else nn.Identity()
    opt = torch.optim.Adam([v], lr=options.lr)
    gen = torch.Generator().manual_seed(options.seed)
    n = inputs.shape[0]
    with _threads_for(w.numel() * min(options.batch_size, n) * _positions(inputs)):
        _optimize(v, opt, gen, floor, s, z, qp, inputs, op, act, w, options)
    with torch.no_grad():
        return torch.clamp(floor + (v >= 0).float() + z, qp.grid.qmin, qp.grid.qmax)


SMALL_STEP_MACS = 1 << 27


def _positions(inputs: torch.Tensor) -> int:
    """Output positions per sample (a conv's H·W, roughly; 1 for rows)."""
    return max(1, inputs[0].numel() // inputs.shape[1]) if inputs.dim() > 2 else 1


@contextlib.contextmanager
def _threads_for(macs: int) -> Iterator[None]:
    """One intra-op thread for small steps: a few-microsecond op costs more in thread
    hand-offs than it saves (a 48→16 Linear ran 0.22 s/step with 2 threads on a busy 2-core
    machine, 0.004 s with one)."""
    old = torch.get_num_threads()
    if macs < SMALL_STEP_MACS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


TARGET_CACHE_BYTES = 256 << 20  # the float layer's outputs kept for every sample, below this


@dataclass(frozen=True)
class SoftWeight:
    """``s·(clip(⌊W/s⌋ + h(V) + z, qmin, qmax) − z)`` as ``base + s·clip(h_raw(V), lo, hi)``:
    the grid's clip folded into per-element bounds on ``h`` (whole numbers apart, so ``lo`` and
    ``hi`` are 0 or 1 and ``base`` holds the whole steps past them). The same values and
    gradients as the formula, in fewer passes over the weight per step."""

    base: torch.Tensor
    scale: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def build(cls, floor: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
              qp: QParams) -> SoftWeight:
        a = qp.grid.qmin - z - floor  # h may not go below a, nor above b
        b = qp.grid.qmax - z - floor
        base = s * (floor + (a - 1).clamp(min=0) + b.clamp(max=0))
        return cls(base, s, a.clamp(0, 1), b.clamp(0, 1))

    def h(self, v: torch.Tensor) -> torch.Tensor:
        """``h(V)`` within the bounds (what the regulariser sees, too)."""
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, self.lo, self.hi)

    def weight(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.base, self.scale, h)


def _optimize(v: nn.Parameter, opt: torch.optim.Optimizer, gen: torch.Generator,
              floor: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qp: QParams,
              inputs: torch.Tensor, op: Any, act: nn.Module, w: torch.Tensor,
              options: AdaRoundOptions) -> None:
    """Adam on ``V`` (``SoftWeight``); the float layer's outputs are computed once for every
    sample where they fit in ``TARGET_CACHE_BYTES``, else per step."""
    n = inputs.shape[0]
    with torch.no_grad():
        soft = SoftWeight.build(floor, s, z, qp)
        targets = None
        if n * _out_numel(op, inputs[:1], w) * 4 <= TARGET_CACHE_BYTES:
            targets = torch.cat([act(op(inputs[i:i + 4096], w)) for i in range(0, n, 4096)])
    for step in range(options.iterations):
        pick = torch.randint(n, (min(options.batch_size, n),), generator=gen).to(inputs.device)
        x = inputs[pick]
        if targets is not None:
            target = targets[pick]
        else:
            with torch.no_grad():
                target = act(op(x, w))
        h = soft.h(v)
        out = act(op(x, soft.weight(h)))
        diff = (out - target).pow(2)
        loss = diff.sum(dim=1).mean() if diff.dim() > 1 else diff.mean()
        beta = beta_at(step, options)
        if beta is not None and options.reg > 0:
            loss = loss + options.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _out_numel(op: Any, x: torch.Tensor, w: torch.Tensor) -> int:
    """Output elements per sample of ``op`` (run on one sample)."""
    with torch.no_grad():
        return int(op(x, w).numel())


def recorded_inputs(layer: Any, inputs: list[torch.Tensor], name: str) -> torch.Tensor:
    """The recorded inputs as one tensor of samples along dim 0: a Linear's rows (leading dims
    flattened, so batches of different sequence lengths join), a conv's images (those of the
    first batch's shape, with a warning naming the layer when others are left out)."""
    if isinstance(layer, nn.Linear):
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
    shape = inputs[0].shape[1:]
    same = [x for x in inputs if x.shape[1:] == shape]
    if len(same) < len(inputs):
        warnings.warn(f"adaround: layer {name!r} read inputs of several shapes; it learns its "
                      f"rounding on the {sum(len(x) for x in same)} of shape {tuple(shape)} "
                      f"only", stacklevel=5)
    return torch.cat(same)


def layer_op(layer: Any) -> Any:
    """``op(x, w)``: the layer's own op with weight ``w`` and its float bias (which matters
    only under the fused activation)."""
    bias = None if layer.bias is None else layer.bias.detach().float()
    if isinstance(layer, nn.Linear):
        return lambda x, w: F.linear(x, w, bias)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return lambda x, w: layer._conv_forward(x, w, bias)
    raise NotImplementedError(f"AdaRound supports Linear, Conv1d and Conv2d, got "
                              f"{type(layer).__name__}")


@WEIGHT_ALGORITHMS.register("adaround")
class AdaRound(WeightAlgorithm):
    """Nagel et al. 2020: per-layer learned rounding (module docstring). ``options`` holds the
    defaults; ``register_adaround`` adds a variant with other options under its own name."""

    needs = frozenset({"inputs"})
    layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d)
    options: ClassVar[AdaRoundOptions] = AdaRoundOptions()

    def apply(self, group: Group) -> None:
        for name, layer, stats in zip(group.names, group.layers, group.stats):
            if not stats.inputs:
                continue
            x = recorded_inputs(layer, stats.inputs, name)
            x = layer._smooth(x.to(layer.weight.device).float())  # reads x / s, holds W·s
            q = layer.weight_quant
            _, qp = q.quantize_weight(layer.weight)
            with torch.enable_grad():
                codes = adaround_codes(layer.weight, qp, x, layer_op(layer), self.options,
                                       layer.activation)
            with torch.no_grad():
                w = dequantize(codes, qp.scale, qp.zero_point, qp.axis, qp.group_size)
                replace_weight(layer, w)
            q.pin_qparams(qp.scale, qp.zero_point)


def register_adaround(name: str, options: AdaRoundOptions) -> type[AdaRound]:
    """Register AdaRound with ``options`` as ``QuantSpec(algorithm=name)`` (configs stay plain
    names, so they round-trip through YAML)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty str, got {name!r}")
    if not isinstance(options, AdaRoundOptions):
        raise TypeError(f"`options` must be an AdaRoundOptions, got {type(options).__name__}")
    cls = type(f"AdaRound_{name}", (AdaRound,), {"options": options})
    WEIGHT_ALGORITHMS.register(name)(cls)
    return cls
