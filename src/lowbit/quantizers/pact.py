"""PACT: learned activation clipping (method ``"pact"``; Choi et al., 2018; docs/algorithms.md §3).

One clip level ``alpha`` (a scalar ``nn.Parameter``) per activation tensor:
``y = clip(x, lo, alpha)``, ``y_q = round(y / s) · s`` with ``s = alpha / qmax``, zero point 0.
Unsigned grids clip at ``lo = 0``: the paper's PACT (``symmetric=False``, or ``signed=False``;
a symmetric unsigned spec still gets zero point 0, since PACT's range starts at 0). Signed grids
clip at ``lo = qmin · s``: ``-alpha`` with ``narrow_range=True``, and one step further down on a
full grid (int8: ``-128 s``), so that training, ``eval_forward`` and the deploy model's
``QuantizeLinear`` (which saturates at ``qmin``) agree on every value.

Gradients are the paper's straight-through ones: ``∂y_q/∂alpha = 1`` where ``x >= alpha``
(``qmin/qmax``, i.e. -1 with a narrow grid, where ``x <= lo``), 0 elsewhere; ``∂y_q/∂x = 1``
inside the clip range, 0 outside. ``torch.where`` decides the ends (``torch.minimum`` would
split the gradient in half at ties); the rounding passes the gradient straight through.

``alpha`` starts at ``spec.alpha_init`` if given; ``lowbit.calibrate`` (observe / freeze with
the spec's observer) replaces it with the observed range (``hi``; signed: ``max(-lo, hi)``);
otherwise the first training batch sets it to the fraction of its max (signed: max ``|x|``)
with the least fake-quantization error. ``loss()`` is the
paper's ``alpha²`` (``lowbit.quant_loss`` sums these; multiply by λ). ``warm_up`` does nothing.
The clip level used is ``|alpha|`` (at least ``qmax·MIN_SCALE``), so an optimizer step past zero
flips the sign and keeps learning instead of freezing at a floor with a zero gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit import distributed, observers
from lowbit.config import QuantSpec
from lowbit.numerics import MIN_SCALE, fake_quantize, fused_fake_quantize
from lowbit.quantizers.base import QParams, Quantizer, Role
from lowbit.registry import QUANTIZERS

if TYPE_CHECKING:
    from lowbit.observers import Observer


@QUANTIZERS.register("pact")
class PACTQuantizer(Quantizer):
    """Activation quantizer with a learned clip level ``alpha``."""

    supported_bits = tuple(range(2, 9))
    roles = ("weight", "activation")  # PaddleSlim also clips weights with PACT
    options = ("alpha_init",)
    folds_bn = True

    observer: Observer
    alpha: nn.Parameter
    initialized: torch.Tensor
    zero: torch.Tensor

    def __init__(self, spec: QuantSpec, *, role: Role, axis: int | None) -> None:
        super().__init__(spec, role=role, axis=axis)
        if spec.granularity != "per_tensor":
            raise NotImplementedError(
                f"method 'pact' learns one clip level per tensor; granularity="
                f"{spec.granularity!r} is not supported, use 'per_tensor'")
        if spec.dynamic:
            raise ValueError("method 'pact' learns its clip level, so QuantSpec.`dynamic` must "
                             "be False, got True; use method='ste' for dynamic quantization")
        self.observer = observers.build(spec, shared=role != "weight")
        given = spec.alpha_init is not None
        # One element, not 0-dim: FSDP2 shards no 0-dim parameters.
        self.alpha = nn.Parameter(torch.tensor([float(spec.alpha_init or 1.0)]))
        self.register_buffer("initialized", torch.tensor(given))
        self.register_buffer("zero", torch.zeros((), dtype=torch.int32), persistent=False)
        self._ready = given  # mirrors `initialized` once True: no device sync per forward
        self.min_alpha = MIN_SCALE * self.grid.qmax  # keeps the step >= MIN_SCALE

    @property
    def scale(self) -> torch.Tensor:
        """The frozen step ``alpha / qmax`` (what ``qparams`` hands out and the layers'
        integer bias uses)."""
        return self.alpha.detach().reshape(()).abs().clamp_min(self.min_alpha) / self.grid.qmax

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clip with the paper's gradients, then fake-quantize straight through."""
        if not self.is_ready():
            alpha = self.initial_alpha(x)
            group = self.observer.group()
            # Under torch.distributed every rank starts from the mean of the ranks' choices.
            self._set(alpha if group is None else distributed.reduce_mean(alpha, group))
        alpha = self.alpha.reshape(()).abs().clamp_min(self.min_alpha)
        if self.grid.signed:
            lo = alpha * (self.grid.qmin / self.grid.qmax)
            y = torch.where(x >= alpha, alpha, torch.where(x <= lo, lo, x))
        else:
            y = torch.where(x >= alpha, alpha, torch.where(x < 0, 0.0, x))
        with torch.no_grad():
            q = fused_fake_quantize(y, self.scale, self.zero, self.grid)
        return q + (y - y.detach())  # value exactly q, gradient that of y

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ONNX fake quantization with ``qparams()``: equals clip-then-quantize."""
        if not self.is_ready():
            return x
        return fake_quantize(x, self.scale, self.zero, self.grid)

    @torch.no_grad()
    def initial_alpha(self, x: torch.Tensor, candidates: int = 64,
                      sample: int = 1 << 16) -> torch.Tensor:
        """Clip level from one batch: the one of ``candidates`` fractions of its max (signed:
        max ``|x|``) whose fake quantization has the least squared error. At 2 bits the max
        itself would leave most post-ReLU values at code 0 (on digits: W2A2 -7 points with the
        max, see docs/benchmarks.md); the search starts PACT where its gradient can refine."""
        flat = x.detach().float().reshape(-1)
        if flat.numel() > sample:  # an evenly strided subsample keeps the search cheap
            flat = flat[:: flat.numel() // sample]
        top = flat.abs().amax() if self.grid.signed else flat.amax()
        if not bool(top > 0):
            return top
        alphas = top * torch.linspace(1.0 / candidates, 1.0, candidates, device=flat.device)
        steps = alphas[:, None] / self.grid.qmax  # (candidates, 1)
        q = torch.clamp(torch.round(flat[None] / steps), self.grid.qmin if self.grid.signed
                        else 0, self.grid.qmax) * steps
        errors = (q - flat[None]).square().mean(dim=1)
        return alphas[int(errors.argmin())]

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Feed ``x`` to the observer (calibration)."""
        self.check_observed(x)
        self.observer.update(x.detach().float().reshape(1, -1))

    @torch.no_grad()
    def freeze(self) -> None:
        """Set ``alpha`` from the observed range (``hi``; signed grids ``max(-lo, hi)``)."""
        if not self.observer.has_data():
            return
        lo, hi = self.observer.range()
        self._set(torch.maximum(-lo, hi) if self.grid.signed else hi)

    def reset_statistics(self) -> None:
        self.observer.reset()

    def loss(self) -> torch.Tensor:
        """PACT's L2 term ``alpha²`` (the user scales it by λ)."""
        return self.alpha.reshape(()) ** 2

    def is_ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def qparams(self) -> QParams:
        if not self.is_ready():
            raise ValueError(
                f"the {self.role} quantizer of layer {self.layer_name!r} has no clip level yet; "
                "set QuantSpec.alpha_init, run lowbit.calibrate(model, batches) or train "
                "before convert"
            )
        return QParams(self.scale.clone(), self.zero.clone(), self.grid, None)

    @torch.no_grad()
    def _set(self, alpha: torch.Tensor) -> None:
        self.alpha.copy_(alpha.reshape(1).clamp_min(self.min_alpha))
        self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._ready = False  # re-read `initialized` after the load
        key = prefix + "alpha"
        if key in state_dict and state_dict[key].dim() == 0:  # lowbit < 0.4: a 0-dim alpha
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args)
