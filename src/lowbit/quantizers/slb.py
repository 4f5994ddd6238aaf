"""SLB: searching for low-bit weights (Yang et al., NeurIPS 2020; method ``"slb"``).

Each weight element holds logits over the fixed value set ``V = linspace(-1, 1, n)``,
``n = 2**bits`` (1 bit {-1, 1}; 2 bits {-1, -1/3, 1/3, 1}; no zero, no learned scale: the
following BatchNorm absorbs the magnitude, so ``folds_bn`` is False). As odd integer codes,
``v = code / (n - 1)`` with ``code = 2q - (n - 1)``, ``q`` in ``[0, n - 1]`` (``IntRange(odd=True)``).

Training searches the values: the weight is the expectation ``sum_j softmax(A * t)_j v_j``,
where the temperature ``t`` *multiplies* the logits ``A`` and grows over training (the schedule
calls ``set_temperature``); once ``hard`` is set, training uses ``v[argmax A]`` as eval and
convert always do, and the logits get no gradient (the search is over). The layer's float
weight only lends its shape: the logits are the trained parameters.

Init: ``observe`` + ``freeze`` (what the layer does at quantize time) start from the weight, so
a pretrained model starts from its own nearest values: ``w`` is normalised per output channel
by ``max|w|`` and ``A_j = -(w_n - v_j)^2 / (2 sigma^2)`` with ``sigma`` half the spacing of V
(argmax is the nearest value, softmax peaked but not one-hot). ``init_random_`` is Golden
Stick's init instead: He-normal (fan_out) logits, probabilities near uniform.

Memory: the logits are ``n`` times the weight's size (float32), plus as much for their
gradient and optimizer state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit.config import QuantSpec
from lowbit.numerics import all_finite
from lowbit.quantizers.base import QParams, Quantizer, Role
from lowbit.registry import QUANTIZERS


@QUANTIZERS.register("slb")
class SLBQuantizer(Quantizer):
    """Weights as a learned distribution over ``linspace(-1, 1, 2**bits)``."""

    supported_bits = (1, 2, 4)
    roles = ("weight",)
    folds_bn = False
    odd_grid = True

    logits: nn.Parameter | None
    temperature: torch.Tensor
    hard: torch.Tensor
    initialized: torch.Tensor
    codes: torch.Tensor
    value_scale: torch.Tensor

    def __init__(self, spec: QuantSpec, *, role: Role, axis: int | None) -> None:
        if role != "weight":
            raise ValueError(f"method 'slb' quantizes weights only, got role={role!r}")
        super().__init__(spec, role=role, axis=axis)
        self.n = 2**spec.bits
        # Odd codes and their scale 1/(n-1): values are computed as codes * scale everywhere,
        # so eval_forward equals dequantize(codes, scale, 0) bit for bit.
        codes = torch.arange(self.n, dtype=torch.float32) * 2 - (self.n - 1)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("value_scale", torch.tensor(1.0 / (self.n - 1)), persistent=False)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("hard", torch.tensor(False))
        self._hard: bool | None = False  # `hard` on the host; None: read it
        self.register_buffer("initialized", torch.tensor(False))
        self.register_parameter("logits", None)  # set_weight_shape: weight.shape + (n,)
        self._pending: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        """The value set V, ascending: ``codes * (1 / (n - 1))``."""
        return self.codes * self.value_scale

    def set_weight_shape(self, shape: torch.Size) -> None:
        """Create the logits (float32, zeros) for a weight of ``shape``, before any optimizer."""
        full = tuple(shape) + (self.n,)
        if self.logits is not None and tuple(self.logits.shape) == full:
            return
        self.logits = nn.Parameter(torch.zeros(full, device=self.temperature.device))
        self.initialized.fill_(False)

    def set_temperature(self, t: float, hard: bool) -> None:
        """Set the factor ``t`` that multiplies the logits and whether training uses argmax."""
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"`t` must be a float, got {type(t).__name__} {t!r}")
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"`t` must be a finite float > 0, got {t!r}")
        if not isinstance(hard, bool):
            raise TypeError(f"`hard` must be a bool, got {type(hard).__name__} {hard!r}")
        self.temperature.fill_(float(t))
        self.hard.fill_(hard)
        self._hard = hard

    def _require_logits(self) -> nn.Parameter:
        if self.logits is None:
            raise ValueError(
                f"the slb weight quantizer of layer {self.layer_name!r} has no logits yet; "
                "build it through the layer or call lowbit.nn.init_weight_quantizer(q, weight)"
            )
        return self.logits

    def _check_shape(self, w: torch.Tensor) -> nn.Parameter:
        logits = self._require_logits()
        if tuple(w.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"layer {self.layer_name!r}: the slb quantizer holds logits for a weight of "
                f"shape {tuple(logits.shape[:-1])}, got a weight of shape {tuple(w.shape)}"
            )
        return logits

    def _argmax_weight(self, logits: torch.Tensor) -> torch.Tensor:
        return self.codes[logits.detach().argmax(dim=-1)] * self.value_scale

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expectation over V of ``softmax(logits * t)`` (or ``v[argmax]`` once ``hard``);
        ``x`` (the latent weight) lends only its shape."""
        logits = self._check_shape(x)
        if self._hard is None:  # after a load: one read, then no device sync per step
            self._hard = bool(self.hard)
        if self._hard:
            return self._argmax_weight(logits)
        probs = torch.softmax(logits * self.temperature, dim=-1)
        return torch.matmul(probs, self.values())

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``v[argmax logits]``: exactly what the converted model computes."""
        return self._argmax_weight(self._check_shape(x))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Remember the float weight; ``freeze`` initialises the logits from it."""
        if not all_finite(x):
            raise ValueError(f"the weight of layer {self.layer_name!r} holds NaN or Inf values")
        self._pending = x.detach()

    @torch.no_grad()
    def freeze(self) -> None:
        if self._pending is not None:
            self.init_from_weight_(self._pending)
            self._pending = None

    def reset_statistics(self) -> None:
        self._pending = None

    @torch.no_grad()
    def init_from_weight_(self, weight: torch.Tensor) -> None:
        """Logits ``-(w_n - v_j)^2 / (2 sigma^2)``: argmax is the nearest value of ``w``
        normalised per output channel by ``max|w|``; ``sigma`` is half V's spacing."""
        self._check_shape(weight)
        self.to(device=weight.device)  # the quantizer follows its weight
        logits = self._require_logits()
        w = weight.detach().float()
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
        amax = amax.reshape((-1,) + (1,) * (w.dim() - 1))
        w_n = (w / amax).unsqueeze(-1)
        sigma = 1.0 / (self.n - 1)  # spacing 2 / (n - 1)
        logits.copy_(-((w_n - self.values()) ** 2) / (2 * sigma**2))
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_random_(self, generator: torch.Generator | None = None) -> None:
        """Golden Stick's init: He-normal (fan_out) logits, probabilities near uniform.
        ``generator`` must live on the logits' device."""
        nn.init.kaiming_normal_(self._require_logits(), mode="fan_out", generator=generator)
        self.initialized.fill_(True)

    def is_ready(self) -> bool:
        return self.logits is not None and bool(self.initialized)

    def qparams(self) -> QParams:
        if not self.is_ready():
            raise ValueError(
                f"the slb weight quantizer of layer {self.layer_name!r} is not initialised; "
                "call lowbit.nn.init_weight_quantizer(q, weight) first"
            )
        zero_point = torch.zeros((), dtype=torch.int32, device=self.value_scale.device)
        return QParams(self.value_scale.detach().clone(), zero_point, self.grid, None)

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """Odd codes ``2 * argmax - (n - 1)`` (float) with scale ``1/(n-1)``, zero point 0."""
        qp = self.qparams()
        logits = self._check_shape(weight)
        return self.codes[logits.detach().argmax(dim=-1)], qp

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._hard = None  # re-read the loaded `hard`
        key = prefix + "logits"
        if key in state_dict:
            got = tuple(state_dict[key].shape)
            if not got or got[-1] != self.n:
                raise ValueError(
                    f"layer {self.layer_name!r}: slb `logits` in the state dict have shape {got}; "
                    f"the last dimension must be {self.n} values for {self.spec.bits} bit(s)"
                )
            if self.logits is None:  # not built through a layer: take the saved shape
                self.set_weight_shape(torch.Size(got[:-1]))
            elif tuple(self.logits.shape) != got:
                raise ValueError(
                    f"layer {self.layer_name!r}: slb `logits` in the state dict have shape {got}, "
                    f"this quantizer's weight needs {tuple(self.logits.shape)} "
                    f"(weight shape + ({self.n},))"
                )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        shape = None if self.logits is None else tuple(self.logits.shape)
        return f"{self.spec.bits} bit, values linspace(-1, 1, {self.n}), logits={shape}, method=slb"
