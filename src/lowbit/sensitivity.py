"""Moved to ``lowbit.analysis.sensitivity``; this name keeps old imports working."""

from lowbit.analysis.sensitivity import *  # noqa: F403
from lowbit.analysis.sensitivity import SensitivityReport, keep_sensitive_layers  # noqa: F401
