"""Group privacy: the user-level guarantee of an example-level mechanism.

If a mechanism is (ε, δ)-DP for one example, it is (kε, δ_k)-DP for any k
examples with δ_k = δ·(e^{kε} − 1)/(e^{ε} − 1) (Vadhan 2017, Lemma 2.2; the
standard bound). This is the baseline ELS accounting improves on (Charles
et al. 2024): a user holding k examples is a group of k.
"""

from __future__ import annotations

import math

from accounting import validate as check
from accounting import accountants
from accounting.mechanisms import Mechanism


def group_privacy(*, epsilon: float, delta: float, group_size: int) -> tuple[float, float]:
  """(ε_k, δ_k) for groups of ``group_size`` from an (ε, δ) guarantee.

  Args:
    epsilon: the per-example ε.
    delta: the per-example δ.
    group_size: k, the examples per group (user).

  Returns:
    ``(ε_k, δ_k) = (k·ε, δ·(e^{kε} − 1)/(e^ε − 1))``, the guarantee for a
    group of k examples.
  """
  epsilon = check.non_negative("epsilon", epsilon)
  delta = check.open_unit("delta", delta)
  k = check.positive_int("group_size", group_size)
  if epsilon == 0:
    return 0.0, min(1.0, k * delta)
  # (e^{kε}-1)/(e^ε-1) = sum_{i<k} e^{iε}; computed via expm1 for small ε.
  factor = math.expm1(k * epsilon) / math.expm1(epsilon) if k * epsilon < 700 else math.inf
  return k * epsilon, min(1.0, delta * factor)


def group_privacy_epsilon(mechanism: Mechanism, *, group_size: int, delta: float,
                          accountant: str = "pld", discretization=None) -> float:
  """The smallest user-level ε that group privacy certifies at user-level ``delta``.

  Searches the example-level ε at which the converted δ_k equals ``delta``:
  returns k·ε for the smallest ε (on a fine log grid, then bisection) with
  δ_example(ε)·(e^{kε} − 1)/(e^ε − 1) <= delta. Every returned value has been
  checked to satisfy that inequality; ``inf`` if none does.

  Args:
    mechanism: an example-level mechanism description.
    group_size: k, the number of examples per user.
    delta: the user-level δ to certify.
    accountant: back end for the example-level δ(ε).
    discretization: the PLD grid Δ of the whole search (None or ``"auto"``:
      the accountant's default for the mechanism; see ``accounting.delta``).

  Returns:
    The user-level ε at ``delta`` (``inf`` where no ε certifies it).
  """
  accountants.check_mechanism(mechanism)
  if mechanism.privacy_unit != "example":
    raise ValueError("group_privacy_epsilon needs an example-level mechanism, got "
                     f"privacy unit {mechanism.privacy_unit!r}")
  k = check.positive_int("group_size", group_size)
  delta = check.open_unit("delta", delta)
  check.choice("accountant", accountant, accountants.ACCOUNTANTS)
  # δ(ε) from RDP decays like e^{-(α-1)ε}; the PLD keeps a small mass at +∞
  # (its tail truncation), so for the large ε that group privacy needs, RDP
  # can be the tighter bound. Both are valid upper bounds: take the smaller
  # (RDP only where dp-accounting's RDP supports the mechanism).
  use_rdp = accountant == "rdp" or not mechanism.pld_only
  rdp_delta = lambda e: accountants.delta(mechanism, epsilon=e, accountant="rdp")
  if accountant == "pld":
    # One grid for the whole search ("auto" would refine it per query): the
    # accountant's default for the mechanism (dp-accounting's Δ for every
    # example-level one). The composed PLD is cached: composed once, queried often.
    disc = None if discretization == "auto" else discretization
    pld_delta = lambda e: accountants.delta(mechanism, epsilon=e, discretization=disc)
    example_delta = (lambda e: min(pld_delta(e), rdp_delta(e))) if use_rdp else pld_delta
  else:
    example_delta = rdp_delta

  def user_delta(eps: float) -> float:
    return group_privacy(epsilon=eps, delta=max(example_delta(eps), 1e-300),
                         group_size=k)[1] if eps > 0 else min(1.0, k * example_delta(0.0))

  grid = [10 ** (x / 20) for x in range(-80, 61)]  # 1e-4 .. 1e3
  prev = 0.0
  for eps in grid:
    if k * eps > 700:
      break
    if user_delta(eps) <= delta:
      lo, hi = prev, eps  # user_delta(lo) > delta (or lo = 0), user_delta(hi) <= delta
      for _ in range(40):
        mid = (lo + hi) / 2
        if user_delta(mid) <= delta:
          hi = mid
        else:
          lo = mid
      return k * hi
    prev = eps
  return math.inf
