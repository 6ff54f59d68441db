"""Argument checks shared by ``dpfl.mf``.

Every public entry point validates at its boundary and raises ``ValueError``
whose message names the argument, the value it got and the allowed range (the
``dpfl mf`` command rewrites argument names into its flags).
"""

from __future__ import annotations

import math
import numbers

OBJECTIVES = ("max", "mean")
# The loss each optimized strategy minimizes unless told otherwise: the
# defaults of jax-privacy's optimizers (BLT: max error, as in Dvijotham et al.
# 2024; banded and dense: mean error, as in Choquette-Choo et al. 2023).
DEFAULT_OBJECTIVE = {"banded": "mean", "blt": "max", "dense": "mean"}


def integer(name: str, value, *, low: int = 1, high: int | None = None) -> int:
  """An integer in ``[low, high]`` (``high=None``: unbounded)."""
  ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if not ok and isinstance(value, numbers.Real) and not isinstance(value, bool):
    ok = math.isfinite(value) and float(value).is_integer()
  if ok:
    value = int(value)
    ok = value >= low and (high is None or value <= high)
  if not ok:
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
  return value


def objective(value) -> str:
  if value not in OBJECTIVES:
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {value!r}")
  return value


def unit_interval(name: str, value, *, closed_low: bool = True) -> float:
  """A real number in ``[0, 1)`` (or ``(0, 1)`` with ``closed_low=False``)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value >= 1 or value < 0
      or (value == 0 and not closed_low)):
    interval = "[0, 1)" if closed_low else "(0, 1)"
    raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
  return float(value)
