"""Argument checks shared by ``dpfl.mf``.

Every public entry point validates at its boundary and raises ``ValueError``
whose message names the argument, the value it got and the allowed range (the
``dpfl mf`` command rewrites argument names into its flags).
"""

from __future__ import annotations

from accounting.validate import integer, positive, real  # noqa: F401  (one set for the project)

OBJECTIVES = ("max", "mean")
# The loss each optimized strategy minimizes unless told otherwise: the
# defaults of jax-privacy's optimizers (BLT: max error, as in Dvijotham et al.
# 2024; banded and dense: mean error, as in Choquette-Choo et al. 2023).
DEFAULT_OBJECTIVE = {"banded": "mean", "blt": "max", "dense": "mean"}


def objective(value) -> str:
  if value not in OBJECTIVES:
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {value!r}")
  return value


def unit_interval(name: str, value, *, closed_low: bool = True) -> float:
  """A real number in ``[0, 1)`` (or ``(0, 1)`` with ``closed_low=False``)."""
  return real(name, value, low=0, high=1, low_open=not closed_low, high_open=True)
