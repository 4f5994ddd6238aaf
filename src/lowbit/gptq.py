"""Moved to ``lowbit.algorithms.gptq``; this name keeps old imports working."""

from lowbit.algorithms.gptq import *  # noqa: F403
