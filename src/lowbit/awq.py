"""Moved to ``lowbit.algorithms.awq``; this name keeps old imports working."""

from lowbit.algorithms.awq import *  # noqa: F403
