"""The one-run audit's ε lower bound (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846).

The experiment: ``m`` canaries, each included in the training set
independently with probability ½. After training, the auditor guesses
"in" or "out" for ``r`` of them (abstaining on the rest) and ``v`` guesses
are right. If training is (ε, δ)-DP, the number of right guesses is
stochastically dominated by ``Binomial(r, e^ε / (1 + e^ε))`` up to a δ term
(the paper's Theorem 5.2; its Algorithm 2 turns that into a p-value):

    p(ε) = P[Binomial(r, q) >= v] + 2 m δ · max_{1<=i<=v} P[v-i <= Binomial(r, q) < v] / i,
    q = e^ε / (1 + e^ε).

Whatever the scores, ``P[p(ε_true) <= α] <= α``. So the largest ε whose
p-value is at most ``α = 1 - confidence`` is a lower bound on the true ε
that is wrong (above the truth) with probability at most ``α``: at the
default 95% confidence, a correct mechanism's bound exceeds its ε in at
most 5% of runs.

Choosing the numbers of guesses after seeing the scores is a choice among
several tests: ``epsilon_lower_bound_from_scores`` takes a fixed grid of
``(k⁺, k⁻)`` pairs and splits ``α`` evenly over them (Bonferroni), so the
maximum over the grid keeps the stated confidence. (The paper's experiments
report the best ``k`` without such a correction.)

JAX-free: numpy and scipy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from accounting import validate as check

DEFAULT_CONFIDENCE = 0.95
_EPS_TOL = 1e-6


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
            delta: float) -> float:
  """P-value of ``num_correct`` right guesses out of ``num_guesses`` under (ε, δ)-DP.

  The paper's Theorem 5.2 / Algorithm 2 (see the module docstring); with
  ``delta = 0`` it is the binomial tail ``P[Binomial(r, q) >= v]``.

  Args:
    num_canaries: m, the canaries each included with probability ½.
    num_guesses: r <= m, the guesses made (abstentions excluded).
    num_correct: v <= r, the right guesses.
    epsilon: ε >= 0 of the (ε, δ)-DP hypothesis.
    delta: δ in [0, 1) of the hypothesis.

  Returns:
    The probability, under any (ε, δ)-DP mechanism, of at least
    ``num_correct`` right guesses: small values rule (ε, δ) out.
  """
  m, r, v = num_canaries, num_guesses, num_correct
  q = scipy.special.expit(epsilon)
  tail = float(scipy.stats.binom.sf(v - 1, r, q))  # P[B >= v]
  if delta == 0 or v == 0:
    return min(tail, 1.0)
  i = np.arange(1, v + 1)
  # P[v - i <= B < v] = P[B >= v - i] - P[B >= v]
  window = scipy.stats.binom.sf(v - i - 1, r, q) - tail
  alpha = float(np.max(window / i))
  return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(*, num_canaries: int, num_guesses: int, num_correct: int,
                        delta: float = 0.0,
                        confidence: float = DEFAULT_CONFIDENCE) -> float:
  """The largest ε that ``num_correct`` right guesses rule out at ``confidence``.

  ``sup {ε >= 0 : p(ε) <= 1 - confidence}`` (0 when even ε = 0 is not ruled
  out), found by bisection on the monotone p-value to within 1e-6 from below:
  the returned value's p-value is at most ``1 - confidence``.

  Args:
    num_canaries: m, the canaries each included with probability ½.
    num_guesses: r <= m, the guesses made (abstentions excluded).
    num_correct: v <= r, the right guesses.
    delta: the δ of the (ε, δ) claim being tested (0: pure ε).
    confidence: in (0, 1); the bound exceeds the true ε with probability at
      most ``1 - confidence``.

  Returns:
    The ε lower bound, a float >= 0.
  """
  m = check.positive_int("num_canaries", num_canaries)
  r = check.integer("num_guesses", num_guesses, low=0, high=m)
  v = check.integer("num_correct", num_correct, low=0, high=r)
  delta = check.real("delta", delta, low=0, high=1, high_open=True)
  confidence = check.open_unit("confidence", confidence)
  alpha = 1.0 - confidence

  def rejected(eps: float) -> bool:
    return p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps,
                   delta=delta) <= alpha

  if not rejected(0.0):
    return 0.0
  lo, hi = 0.0, 1.0
  while rejected(hi):
    lo, hi = hi, 2 * hi
    if hi > 1e4:  # v = r: the tail q^r can make p(ε) <= α only below ~ r·log(1/α)
      return lo
  while hi - lo > _EPS_TOL:
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
  return lo


def default_guess_grid(num_canaries: int) -> tuple[tuple[int, int], ...]:
  """The ``(k⁺, k⁻)`` pairs tried when none are given, fixed before any score is seen.

  Symmetric pairs ``(k, k)`` and "in"-only pairs ``(k, 0)`` for ``k`` about
  1%, 2%, 5%, 10%, 20%, 35% and 50% of ``m`` (de-duplicated; at least 1).

  Args:
    num_canaries: m >= 1, the number of canaries.

  Returns:
    The ``(k⁺, k⁻)`` pairs: ``k⁺`` canaries guessed "in" (highest scores),
    ``k⁻`` guessed "out" (lowest), the rest abstain.
  """
  m = check.positive_int("num_canaries", num_canaries)
  ks = sorted({max(1, min(m // 2, round(f * m))) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.35,
                                                          0.5)})
  return tuple([(k, k) for k in ks if 2 * k <= m] + [(k, 0) for k in ks])


def check_guesses(guesses, num_canaries: int) -> tuple[tuple[int, int], ...]:
  """``guesses`` as ``(k⁺, k⁻)`` int pairs with ``k⁺ + k⁻ <= m`` (None: the default grid)."""
  m = check.positive_int("num_canaries", num_canaries)
  if guesses is None:
    return default_guess_grid(m)
  try:
    pairs = tuple((check.integer("k_plus", kp, low=0, high=m),
                   check.integer("k_minus", km, low=0, high=m)) for kp, km in guesses)
  except (TypeError, ValueError) as err:
    if isinstance(err, ValueError) and "k_" in str(err):
      raise ValueError(f"guesses: {err}") from None
    raise ValueError(f"guesses must be (k_plus, k_minus) pairs of integers, got "
                     f"{guesses!r}") from None
  if not pairs:
    raise ValueError("guesses must name at least one (k_plus, k_minus) pair")
  for kp, km in pairs:
    if kp + km > m:
      raise ValueError(f"guesses: k_plus + k_minus must be <= num_canaries ({m}), got "
                       f"({kp}, {km})")
  return pairs


@dataclasses.dataclass(frozen=True)
class GuessOutcome:
  """The guesses behind a bound: top ``k_plus`` called "in", bottom ``k_minus`` "out"."""

  k_plus: int
  k_minus: int
  num_guesses: int
  num_correct: int
  epsilon_lower_bound: float


def epsilon_lower_bound_from_scores(scores, included, *, delta: float = 0.0,
                                    confidence: float = DEFAULT_CONFIDENCE,
                                    guesses=None) -> tuple[float, GuessOutcome, int]:
  """The audit's ε lower bound from canary scores (higher score: more likely "in").

  For each ``(k⁺, k⁻)`` in ``guesses`` the ``k⁺`` highest-scored canaries are
  guessed "in", the ``k⁻`` lowest "out", the rest abstain; each pair's bound
  is computed at confidence ``1 - (1 - confidence) / len(guesses)``
  (Bonferroni over the pairs, so the maximum keeps ``confidence``). Ties in
  score are broken by canary index, which does not depend on inclusion.

  Args:
    scores: ``[m]`` floats.
    included: ``[m]`` bools, the canaries' true inclusion.
    delta: δ of the claim tested.
    confidence: the bound's confidence (the false-alarm rate is ``1 - confidence``).
    guesses: ``(k⁺, k⁻)`` pairs, fixed before the scores were seen (default
      ``default_guess_grid(m)``); one pair is tested at the full confidence.

  Returns:
    ``(bound, outcome of the best pair, number of pairs tested)``.
  """
  scores = np.asarray(scores, dtype=np.float64).ravel()
  included = np.asarray(included, dtype=bool).ravel()
  m = scores.size
  if m == 0 or included.size != m:
    raise ValueError(f"scores and included must be non-empty and of the same length, got "
                     f"{m} and {included.size}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite (a non-finite score cannot be ranked)")
  confidence = check.open_unit("confidence", confidence)
  pairs = check_guesses(guesses, m)
  order = np.lexsort((np.arange(m), -scores))  # descending score, then index
  ranked = included[order]
  per_pair = 1.0 - (1.0 - confidence) / len(pairs)
  best = None
  for kp, km in pairs:
    correct = int(ranked[:kp].sum()) + int((~ranked[m - km:]).sum() if km else 0)
    bound = epsilon_lower_bound(num_canaries=m, num_guesses=kp + km, num_correct=correct,
                                delta=delta, confidence=per_pair)
    outcome = GuessOutcome(kp, km, kp + km, correct, bound)
    if best is None or bound > best.epsilon_lower_bound:
      best = outcome
  return best.epsilon_lower_bound, best, len(pairs)


def max_epsilon_lower_bound(num_canaries: int, *, delta: float = 0.0,
                            confidence: float = DEFAULT_CONFIDENCE) -> float:
  """The largest bound ``m`` canaries can give: every one of ``m`` guesses right.

  Args:
    num_canaries: m >= 1.
    delta: the δ of the claim tested (0: pure ε).
    confidence: in (0, 1), as for ``epsilon_lower_bound``.

  Returns:
    ``epsilon_lower_bound`` with ``m`` guesses, all right: no audit with
    ``m`` canaries can report more.
  """
  return epsilon_lower_bound(num_canaries=num_canaries, num_guesses=num_canaries,
                             num_correct=num_canaries, delta=delta, confidence=confidence)


