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
sensitivity computed for min-separation also bounds those schedules.

Fixed-epoch order (``FixedEpoch``; Choquette-Choo et al. 2023, arXiv
2211.06530, the "(k, b)-participation" of its Sec. 2 with a fixed order) is
the stricter pattern cyclic training really has: one fixed order repeated
every epoch of ``b`` steps, so unit ``r`` takes part exactly at steps
``r, r + b, r + 2b, ... < n``. There are only ``b`` patterns; with ``b`` not
dividing ``n`` they have ``ceil(n / b)`` or ``floor(n / b)`` steps, and
``num_participations`` is ``ceil(n / b)``.
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

  # Which patterns: every b-min-separated set ("min-sep") or the b fixed ones.
  kind = "min-sep"

  @property
  def is_single(self) -> bool:
    """Whether ``k == 1`` (single participation)."""
    return self.num_participations == 1

  def describe(self) -> str:
    """The pattern in words, for reports (e.g. ``"4 participations, min separation 25"``)."""
    if self.is_single:
      return "single participation"
    return (f"{self.num_participations} participations, "
            f"min separation {self.min_separation}")


class FixedEpoch(Participation):
  """Fixed-epoch order: unit ``r`` takes part exactly at ``r, r + b, r + 2b, ... < n``.

  ``min_separation`` is ``b``, the steps of one epoch (the period of the
  order); ``num_participations`` is ``ceil(n / b)``, the most steps a unit
  takes part in. Not equal to a ``Participation`` with the same numbers
  (fewer patterns: its sensitivity can be lower). Build it with
  ``fixed_epoch``, which checks the pair against ``n``; a strategy given one
  checks it again.

  Attributes:
    num_participations: ``k = ceil(n / b)``, the most steps one unit takes
      part in (pattern ``r`` has ``ceil((n - r) / b)`` steps).
    min_separation: ``b``, the period of the order (steps per epoch), in
      ``[1, n]``; ``b`` need not divide ``n``.
  """

  __slots__ = ()
  kind = "fixed-epoch"

  def __eq__(self, other):
    # A plain (k, b) pair compares by value; a min-separation Participation never equals.
    if isinstance(other, Participation) and not isinstance(other, FixedEpoch):
      return False
    return tuple.__eq__(self, other)

  def __ne__(self, other):
    return not self == other

  # Equal to the plain pair, so hashed as it (a == b must imply equal hashes).
  __hash__ = tuple.__hash__

  def patterns(self, num_steps: int) -> list:
    """The ``b`` patterns ``[r, r + b, ...]`` (steps below ``num_steps``)."""
    import numpy as np
    b = self.min_separation
    return [np.arange(r, num_steps, b) for r in range(min(b, num_steps))]

  def describe(self) -> str:
    """The pattern in words, for reports."""
    if self.is_single:
      return "single participation"
    return (f"fixed-epoch order, {self.min_separation} steps per epoch "
            f"(at most {self.num_participations} participations)")


# The same names as the accounting records (``accounting.matrix.PARTICIPATIONS``).
KINDS = (Participation.kind, FixedEpoch.kind)


def fixed_epoch(num_steps: int, *, num_participations: int | None = None,
                min_separation: int | None = None) -> FixedEpoch:
  """Builds and checks a fixed-epoch pattern for ``num_steps``.

  Give ``min_separation`` (``b``, the steps per epoch, any value in
  ``[1, n]``; then ``k = ceil(n / b)``) or ``num_participations`` (``k``;
  then ``b = ceil(n / k)``, which must give exactly ``k`` participations),
  or both (then ``k`` must be ``ceil(n / b)``), or neither (single
  participation: ``b = n``).

  Args:
    num_steps: ``n``, an integer >= 1.
    num_participations: ``k``, in ``[1, n]``, or None.
    min_separation: ``b``, the period of the order, in ``[1, n]``, or None.

  Returns:
    The ``FixedEpoch`` ``(k, b)``.

  Raises:
    ValueError: if no fixed-epoch order of ``n`` steps has these numbers.
  """
  n = check.integer("num_steps", num_steps)
  if num_participations is None and min_separation is None:
    return FixedEpoch(1, n)
  if min_separation is not None:
    b = check.integer("min_separation", min_separation, high=n)
    k = -(-n // b)
    if num_participations is not None:
      given = check.integer("num_participations", num_participations, high=n)
      if given != k:
        raise ValueError(
            f"num_participations must be ceil(num_steps / min_separation) = {k} under "
            f"fixed-epoch order (num_steps={n}, min_separation={b}), got {given}")
    return FixedEpoch(k, b)
  k = check.integer("num_participations", num_participations, high=n)
  b = -(-n // k)
  if -(-n // b) != k:
    raise ValueError(
        f"num_participations={k} is not the most participations of any fixed-epoch order "
        f"of num_steps={n} steps (a period of b = ceil(n / k) = {b} steps gives "
        f"{-(-n // b)}); give min_separation (the period b) instead")
  return FixedEpoch(k, b)


def participation(num_steps: int, *, num_participations: int | None = None,
                  min_separation: int | None = None) -> Participation:
  """Builds and checks a ``(k, b)`` participation pattern for ``num_steps``.

  Give ``num_participations`` (``k``; then ``b = n / k``), ``min_separation``
  (``b``; then ``k = n / b``), both, or neither (single participation).

  Args:
    num_steps: ``n``, an integer >= 1.
    num_participations: ``k``, in ``[1, n]`` and dividing ``n``, or None.
    min_separation: ``b``, in ``[1, n]`` and dividing ``n``, or None.

  Returns:
    The min-separation ``Participation`` ``(k, b)``, ``k * b = n``.

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
  """Accepts None (single), a ``Participation`` / ``FixedEpoch`` or a ``(k, b)`` pair.

  A plain pair is min-separation; a ``FixedEpoch`` stays fixed-epoch.
  """
  if value is None:
    return participation(num_steps)
  if isinstance(value, FixedEpoch):
    return fixed_epoch(num_steps, num_participations=value.num_participations,
                       min_separation=value.min_separation)
  try:
    k, b = value
  except (TypeError, ValueError):
    raise ValueError(
        f"participation must be None or a (num_participations, min_separation) pair, "
        f"got {value!r}") from None
  return participation(num_steps, num_participations=k, min_separation=b)
