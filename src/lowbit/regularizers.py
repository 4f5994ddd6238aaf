"""``quant_loss``: the regularisation terms the quantizers of a model ask for."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.quantizers import Quantizer


def quant_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every quantizer's ``loss()`` term (PACT: ``alpha²``), a scalar tensor.

    Add it to the task loss with a weight of your choice: ``loss + lam * quant_loss(qm)``
    (PACT's paper uses the weight decay as ``lam``). Zero when no quantizer has a term.
    Shared quantizers count once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]  # modules() dedups
    if not quantizers:
        raise ValueError("`model` has no lowbit quantizers; call lowbit.prepare_qat first")
    terms = [t for t in (q.loss() for q in quantizers) if t is not None]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack([t.reshape(()) for t in terms]).sum()
