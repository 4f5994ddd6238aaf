"""Post-training weight algorithms, one file each, registered in ``WEIGHT_ALGORITHMS`` where
they round or scale weights: ``gptq`` (and ``awq-gptq``), ``awq``, ``adaround``; plus
``equalize`` (cross-layer equalization + high-bias absorption), ``bias_correction`` and
``scale_tuning`` (end-to-end training of the weight scales, codes fixed).
``base`` holds what they share; ``lowbit.weight_calibration`` feeds them statistics."""

from lowbit.algorithms import adaround, awq, base, gptq  # noqa: F401  (register the algorithms)
from lowbit.algorithms.equalize import equalize
from lowbit.algorithms.scale_tuning import ScaleTuning, tune_scales

__all__ = ["ScaleTuning", "equalize", "tune_scales"]
