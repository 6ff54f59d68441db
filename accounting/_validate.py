"""Argument checks shared by the accounting package.

Every public entry point validates at its boundary and raises ``ValueError``
whose message names the argument, the value it got and the allowed range. The
CLI turns these messages into one line on stderr with exit status 2.
"""

from __future__ import annotations

import math
import numbers


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(name: str, value) -> float:
  if not _is_real(value) or not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
  return float(value)


# Beyond this ε is 0 to double precision, and dp-accounting overflows
# squaring σ (σ > ~1e154); a clear error beats an OverflowError.
MAX_NOISE_MULTIPLIER = 1e100


def noise_multiplier(name: str, value) -> float:
  """A noise multiplier: 0 < value <= MAX_NOISE_MULTIPLIER."""
  value = positive(name, value)
  if value > MAX_NOISE_MULTIPLIER:
    raise ValueError(f"{name} must be in (0, {MAX_NOISE_MULTIPLIER:g}], got {value!r} "
                     "(ε is already 0 to double precision there)")
  return value


def non_negative(name: str, value) -> float:
  if not _is_real(value) or not math.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  return float(value)


def probability(name: str, value) -> float:
  """A sampling probability: 0 < value <= 1."""
  if not _is_real(value) or not (0 < value <= 1):
    raise ValueError(f"{name} must be in (0, 1], got {value!r}")
  return float(value)


def open_unit(name: str, value) -> float:
  """A delta: 0 < value < 1."""
  if not _is_real(value) or not (0 < value < 1):
    raise ValueError(f"{name} must be in (0, 1), got {value!r}")
  return float(value)


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    if _is_real(value) and not isinstance(value, bool) and float(value).is_integer() and value >= 1:
      return int(value)
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


def choice(name: str, value, allowed) -> str:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
  return value
