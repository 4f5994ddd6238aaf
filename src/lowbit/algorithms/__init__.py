"""Post-training algorithms that recover accuracy without training, one file each:
``equalize`` (cross-layer equalization + high-bias absorption), ``bias_correction`` and
``adaround`` (registered in ``WEIGHT_ALGORITHMS``). GPTQ and AWQ still live in
``lowbit.gptq`` / ``lowbit.awq``; they move here when next touched."""

from lowbit.algorithms import adaround  # noqa: F401  (registers "adaround")
from lowbit.algorithms.equalize import equalize

__all__ = ["equalize"]
