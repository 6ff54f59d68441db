"""Argument checks for the whole project: one set, applied the same way everywhere.

Every public entry point of ``accounting`` and ``dpfl`` validates at its
boundary with these functions and raises ``ValueError`` whose message names
the argument, the value it got and the allowed range. The CLI turns these
messages into one line on stderr with exit status 2.

What counts as a number is decided here once: Python ``int``/``float``,
numpy scalars (``np.int64(1000)``, ``np.float32(1e-5)``) and 0-d arrays of a
real dtype (``np.array(1.0)``, a concrete 0-d ``jax.Array``) are accepted alike;
``bool`` and non-finite values never are. Integer arguments also accept an
integral float (``1000.0``), never a fractional one.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _real(value):
  """``value`` as a Python int or float if it is a real scalar, else None."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  # 0-d arrays (numpy, or any concrete array type convertible by numpy, e.g. a
  # concrete jax.Array). Tracers raise on conversion: they are not concrete.
  if getattr(value, "ndim", None) == 0 and hasattr(value, "dtype"):
    try:
      kind = np.dtype(value.dtype).kind
      if kind in "iu":
        return int(np.asarray(value))
      if kind == "f":
        return float(np.asarray(value))
    except TypeError:  # not a real dtype, or a tracer (jax's conversion error is a TypeError)
      return None
  return None


def real(name: str, value, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
  """A finite real number in the interval the bounds describe."""
  x = _real(value)
  ok = x is not None and math.isfinite(x)
  if ok and low is not None:
    ok = x > low if low_open else x >= low
  if ok and high is not None:
    ok = x < high if high_open else x <= high
  if not ok:
    raise ValueError(f"{name} must be {_describe(low, high, low_open, high_open)}, got {value!r}")
  return float(x)


def _describe(low, high, low_open, high_open) -> str:
  if low is None and high is None:
    return "a finite number"
  if high is None:
    return f"a finite number {'>' if low_open else '>='} {low:g}"
  if low is None:
    return f"a finite number {'<' if high_open else '<='} {high:g}"
  return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def positive(name: str, value) -> float:
  """A finite number > 0."""
  return real(name, value, low=0, low_open=True)


def non_negative(name: str, value) -> float:
  """A finite number >= 0."""
  return real(name, value, low=0)


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


# Calibrating σ for a larger ε searches σ far below 0.1, where every PLD is
# built on a coarse floor grid and one calibration takes minutes (ε = 1e3:
# ~80 s, 1e6: ~280 s); ε above 2^7 = 128 (the top of the range McKenna et al.
# 2025 plan over, which dpfl's σ grid covers) is no meaningful privacy guarantee.
MAX_TARGET_EPSILON = 128.0


def target_epsilon(name: str, value) -> float:
  """An ε to calibrate for: 0 < value <= MAX_TARGET_EPSILON."""
  return real(name, value, low=0, high=MAX_TARGET_EPSILON, low_open=True)


def probability(name: str, value) -> float:
  """A sampling probability: 0 < value <= 1."""
  return real(name, value, low=0, high=1, low_open=True)


def open_unit(name: str, value) -> float:
  """A delta: 0 < value < 1."""
  return real(name, value, low=0, high=1, low_open=True, high_open=True)


def integer(name: str, value, *, low: int = 1, high: int | None = None) -> int:
  """An integer in ``[low, high]`` (``high=None``: unbounded)."""
  x = _real(value)
  ok = x is not None and math.isfinite(x) and float(x).is_integer()
  if ok:
    x = int(x)
    ok = x >= low and (high is None or x <= high)
  if not ok:
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
  return x


def positive_int(name: str, value) -> int:
  """An integer >= 1."""
  return integer(name, value, low=1)


# The longest run the accountants answer for. PLD composition raises the
# one-step characteristic function to the T-th power (phase error ~T·1e-16)
# and its support grows with T; 10^8 steps is beyond any training run.
MAX_STEPS = 10**8


def num_steps(name: str, value) -> int:
  """A number of steps: an integer in [1, MAX_STEPS]."""
  return integer(name, value, low=1, high=MAX_STEPS)


def choice(name: str, value, allowed) -> str:
  """One of ``allowed``."""
  try:
    ok = value in allowed
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
  return value
