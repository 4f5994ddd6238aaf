"""Where accuracy goes and how to get it back: per-layer analysis (``analyze``), the fewest
layers to keep at higher precision (``sensitivity``), and a search over recovery steps
(``autoquant``)."""

from lowbit.analysis.analyze import analyze
from lowbit.analysis.report import AnalysisReport, LayerAnalysis
from lowbit.analysis.sensitivity import SensitivityReport, keep_sensitive_layers

__all__ = ["AnalysisReport", "LayerAnalysis", "SensitivityReport", "analyze",
           "keep_sensitive_layers"]
