"""Participation patterns: how often, and how far apart, one unit can appear.

A privacy unit (an example, or a user) contributes to the sum released at some
of the ``n`` steps. ``(k, b)``-participation (Choquette-Choo et al. 2023,
"Multi-Epoch Matrix Factorization Mechanisms", arXiv 2211.06530; in the
b-min-separation form of "(Amplified) Banded Matrix Factorizations", arXiv
2306.08153) allows any set of steps with at most ``k`` elements, any two of
which are at least ``b`` apart, where ``n = k * b``. Single participation is
the case ``k = 1, b = n``: one step, any step.

Every pattern of a fixed-epoch-order schedule (step ``r``, ``r + b``, ...) and
of cyclic Poisson sampling with ``b`` groups is a b-min-separated pattern, so a
sensitivity computed here also bounds those schedules.
"""

from __future__ import annotations

from typing import NamedTuple

from dpfl.mf import _checks as check


class Participation(NamedTuple):
  """``(k, b)``: at most ``k`` participations, any two at least ``b`` steps apart.

  Attributes:
    num_participations: ``k``, the most steps one unit contributes to.
    min_separation: ``b``; two participations at steps ``i < j`` need
      ``j - i >= b``. ``k * b`` equals the number of steps.
  """

  num_participations: int
  min_separation: int

  @property
  def is_single(self) -> bool:
    return self.num_participations == 1

  def describe(self) -> str:
    if self.is_single:
      return "single participation"
    return (f"{self.num_participations} participations, "
            f"min separation {self.min_separation}")


def participation(num_steps: int, *, num_participations: int | None = None,
                  min_separation: int | None = None) -> Participation:
  """Builds and checks a ``(k, b)`` participation pattern for ``num_steps``.

  Give ``num_participations`` (``k``; then ``b = n / k``), ``min_separation``
  (``b``; then ``k = n / b``), both, or neither (single participation).

  Raises:
    ValueError: if ``k < 1``, ``b < 1``, or ``k * b != num_steps``.
  """
  n = check.integer("num_steps", num_steps)
  if num_participations is None and min_separation is None:
    return Participation(1, n)
  if num_participations is not None:
    k = check.integer("num_participations", num_participations, high=n)
    if min_separation is None:
      if n % k:
        raise ValueError(
            f"num_participations must divide num_steps={n} (min_separation = "
            f"num_steps / num_participations), got {k}")
      return Participation(k, n // k)
  b = check.integer("min_separation", min_separation, high=n)
  if num_participations is None:
    if n % b:
      raise ValueError(
          f"min_separation must divide num_steps={n} (num_participations = "
          f"num_steps / min_separation), got {b}")
    return Participation(n // b, b)
  if k * b != n:
    raise ValueError(
        f"num_participations * min_separation must equal num_steps={n}, got "
        f"{k} * {b} = {k * b}")
  return Participation(k, b)


def as_participation(num_steps: int, value) -> Participation:
  """Accepts None (single), a ``Participation`` or a ``(k, b)`` pair."""
  if value is None:
    return participation(num_steps)
  try:
    k, b = value
  except (TypeError, ValueError):
    raise ValueError(
        f"participation must be None or a (num_participations, min_separation) pair, "
        f"got {value!r}") from None
  return participation(num_steps, num_participations=k, min_separation=b)
