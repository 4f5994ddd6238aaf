"""What every post-training weight algorithm shares: the layers it gets (a ``Group`` of quant
layers that read one tensor, with their input statistics) and the interface it implements
(``WeightAlgorithm``: the statistics it needs, ``apply``). ``rtn`` is the do-nothing entry.
``lowbit.weight_calibration`` gathers the statistics and calls the registered algorithms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.registry import WEIGHT_ALGORITHMS

if TYPE_CHECKING:
    from lowbit.weight_calibration import InputStats


@dataclass
class Group:
    """Quant layers that read the same tensor, with their statistics."""

    names: list[str]
    layers: list[Any]
    stats: list[InputStats]

    def factor(self) -> torch.Tensor:
        """The smoothing factor the group's input already gets (1 where none)."""
        s = self.layers[0].input_smoothing
        return torch.ones_like(self.layers[0].weight[0]) if s is None else s


class WeightAlgorithm:
    """A post-training weight algorithm: the statistics it needs and how it applies them."""

    needs: frozenset[str] = frozenset()
    layer_types: tuple[type, ...] = (nn.Linear,)  # the float layer types it handles

    def apply(self, group: Group) -> None:
        raise NotImplementedError


@WEIGHT_ALGORITHMS.register("rtn")
class RoundToNearest(WeightAlgorithm):
    """Round to nearest on the observer's range: nothing to do with data."""

    def apply(self, group: Group) -> None:
        return None
