"""lowbit: quantize PyTorch models to 8, 4, 2 and 1 bit and export integer ONNX.

The flow is five verbs: ``plan`` → ``quantize`` → ``calibrate`` → ``convert`` → ``export_onnx``
(``prepare_qat`` + your training loop + ``schedules`` in place of ``quantize`` + ``calibrate``
for quantization-aware training); everything in between is driven by one ``QuantConfig``.
"""

from lowbit import algorithms, distributed, observers, quantizers, schedules  # noqa: F401
from lowbit import nn as _nn  # noqa: F401  (registers the layer types)
from lowbit.algorithms import ScaleTuning, equalize, tune_scales
from lowbit.analysis import (
    AnalysisReport,
    AutoQuantResult,
    SensitivityReport,
    analyze,
    autoquant,
    keep_sensitive_layers,
)
from lowbit.calibrate import SmoothingWarning, calibrate, set_calibrating
from lowbit.config import LayerRule, QuantConfig, QuantSpec
from lowbit.convert import convert
from lowbit.export.errors import ExportError
from lowbit.export.files import ExportSet, MismatchedFileSetError, load_export
from lowbit.export.onnx import export_onnx
from lowbit.export.report import ExportReport
from lowbit.placement import plan
from lowbit.plan import LayerPlan, Plan
from lowbit.quantize import prepare_qat, quantize
from lowbit.quantizers import ConstantQuantizerWarning, QParams, Quantizer
from lowbit.registry import QUANTIZERS
from lowbit.regularizers import quant_loss

__all__ = [
    "AnalysisReport",
    "AutoQuantResult",
    "ConstantQuantizerWarning",
    "ExportError",
    "ExportReport",
    "ExportSet",
    "MismatchedFileSetError",
    "QParams",
    "Quantizer",
    "LayerPlan",
    "LayerRule",
    "Plan",
    "QuantConfig",
    "QuantSpec",
    "ScaleTuning",
    "SensitivityReport",
    "SmoothingWarning",
    "analyze",
    "autoquant",
    "calibrate",
    "convert",
    "distributed",
    "equalize",
    "export_onnx",
    "keep_sensitive_layers",
    "load_export",
    "plan",
    "prepare_qat",
    "quant_loss",
    "quantize",
    "register_quantizer",
    "schedules",
    "set_calibrating",
    "tune_scales",
]
__version__ = "0.11.0"

register_quantizer = QUANTIZERS.register
"""Decorator: ``@lowbit.register_quantizer("name")`` on a ``lowbit.Quantizer`` subclass makes
``QuantSpec(method="name")`` use it (PaddleSlim's ``weight_quantize`` / ``act_quantize``)."""
