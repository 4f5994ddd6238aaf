"""Where accuracy goes and how to get it back: per-layer analysis (``analyze``), the fewest
layers to keep at higher precision (``sensitivity``), and a search over recovery steps
(``autoquant``)."""

from lowbit.analysis.analyze import RoundedWeightsWarning, analyze
from lowbit.analysis.autoquant import AutoQuantResult, EvaluateError, autoquant
from lowbit.analysis.report import AnalysisReport, LayerAnalysis
from lowbit.analysis.sensitivity import SensitivityReport, keep_sensitive_layers
from lowbit.analysis.steps import AUTOQUANT_STEPS, DEFAULT_STEPS, Step

__all__ = ["AUTOQUANT_STEPS", "DEFAULT_STEPS", "AnalysisReport", "AutoQuantResult",
           "EvaluateError", "LayerAnalysis", "RoundedWeightsWarning", "SensitivityReport", "Step",
           "analyze", "autoquant", "keep_sensitive_layers"]
