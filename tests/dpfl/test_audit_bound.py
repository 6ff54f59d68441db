"""The one-run audit's bound (Steinke, Nasr & Jagielski 2023, Theorem 5.2 / Algorithm 2).

References are independent: the binomial tails are summed term by term with
exact binomial coefficients, the all-correct case has a closed form, and the
confidence is checked by simulating the worst ε-DP mechanism (randomized
response) many times.
"""

import math

import numpy as np
import pytest

from dpfl.audit import bound


def _tail(r, v, q):
  """P[Binomial(r, q) >= v], term by term."""
  return math.fsum(math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(v, r + 1))


def _brute_p_value(m, r, v, eps, delta):
  q = math.exp(eps) / (1 + math.exp(eps))
  tail = _tail(r, v, q)
  if delta == 0:
    return min(1.0, tail)
  alpha = 0.0
  for i in range(1, v + 1):
    window = math.fsum(math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(v - i, v))
    alpha = max(alpha, window / i)
  return min(1.0, tail + 2 * m * delta * alpha)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (100, 40, 30, 0.5, 0.0), (100, 40, 30, 1.0, 1e-5), (1000, 200, 170, 1.5, 1e-5),
    (1000, 200, 200, 4.0, 1e-3), (50, 50, 26, 0.0, 0.0), (10, 3, 0, 2.0, 0.1),
])
def test_p_value_matches_brute_force_binomial_sums(m, r, v, eps, delta):
  got = bound.p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta)
  want = _brute_p_value(m, r, v, eps, delta)
  assert got == pytest.approx(want, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("m,r,v,delta,confidence", [
    (1000, 200, 170, 1e-5, 0.95), (1000, 300, 210, 0.0, 0.95), (100, 60, 50, 1e-3, 0.99),
])
def test_bound_is_the_largest_epsilon_the_p_value_rules_out(m, r, v, delta, confidence):
  eps = bound.epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta,
                                  confidence=confidence)
  assert eps > 0
  assert _brute_p_value(m, r, v, eps, delta) <= 1 - confidence
  assert _brute_p_value(m, r, v, eps + 1e-5, delta) > 1 - confidence


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
def test_all_correct_pure_dp_has_the_closed_form(r):
  """v = r, δ = 0: p(ε) = q^r, so the bound is logit((1 - confidence)^(1/r))."""
  q = 0.05 ** (1 / r)
  want = max(0.0, math.log(q / (1 - q)))  # r = 1: even a right guess rules out nothing
  got = bound.epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=r)
  assert got == pytest.approx(want, abs=2e-6)
  assert bound.max_epsilon_lower_bound(r) == got


def test_chance_level_guesses_give_zero():
  assert bound.epsilon_lower_bound(num_canaries=1000, num_guesses=1000, num_correct=500) == 0
  assert bound.epsilon_lower_bound(num_canaries=10, num_guesses=0, num_correct=0) == 0


def test_the_delta_term_only_lowers_the_bound():
  kw = dict(num_canaries=1000, num_guesses=300, num_correct=250)
  assert (bound.epsilon_lower_bound(**kw, delta=1e-3) < bound.epsilon_lower_bound(**kw, delta=1e-6)
          <= bound.epsilon_lower_bound(**kw))


def test_confidence_holds_for_the_worst_pure_dp_mechanism():
  """Randomized response at ε0 makes each guess right with probability e^ε0/(1+e^ε0).

  A bound above ε0 is a false alarm; the theorem allows at most 5% of runs.
  Over 400 simulated runs, 35 or more false alarms would have probability
  < 1e-3 if that held (Binomial(400, 0.05) tail), so this test fails
  spuriously at most once in a thousand seeds; the seed is fixed.
  """
  rng = np.random.default_rng(0)
  eps0, r = 1.0, 200
  correct = rng.binomial(r, math.exp(eps0) / (1 + math.exp(eps0)), size=400)
  lower = {v: bound.epsilon_lower_bound(num_canaries=r, num_guesses=r, num_correct=int(v))
           for v in set(correct.tolist())}
  alarms = sum(lower[v] > eps0 for v in correct.tolist())
  assert alarms < 35
  assert alarms > 0  # the bound is not trivially loose: it sometimes reaches ε0


def test_scores_guesses_and_bonferroni():
  included = np.array([True] * 30 + [False] * 30)
  scores = np.where(included, 1.0, 0.0) + np.linspace(0, 0.5, 60)
  one, outcome, tested = bound.epsilon_lower_bound_from_scores(scores, included,
                                                               guesses=[(20, 20)])
  assert tested == 1 and outcome.num_correct == 40 and outcome.num_guesses == 40
  assert one == bound.epsilon_lower_bound(num_canaries=60, num_guesses=40, num_correct=40)
  grid, _, tested = bound.epsilon_lower_bound_from_scores(scores, included,
                                                          guesses=[(20, 20), (5, 0)])
  assert tested == 2
  assert grid == bound.epsilon_lower_bound(num_canaries=60, num_guesses=40, num_correct=40,
                                           confidence=1 - 0.05 / 2)


def test_ties_are_broken_by_index_not_by_inclusion():
  included = np.array([False, True, False, True])
  _, outcome, _ = bound.epsilon_lower_bound_from_scores(np.zeros(4), included,
                                                        guesses=[(1, 0)])
  assert outcome.num_correct == 0  # canary 0 (out) ranks first among equal scores


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_canaries=0, num_guesses=0, num_correct=0), "num_canaries"),
    (dict(num_canaries=10, num_guesses=11, num_correct=0), "num_guesses"),
    (dict(num_canaries=10, num_guesses=5, num_correct=6), "num_correct"),
    (dict(num_canaries=10, num_guesses=5, num_correct=5, confidence=1.0), "confidence"),
    (dict(num_canaries=10, num_guesses=5, num_correct=5, delta=-1e-5), "delta"),
])
def test_bad_arguments_name_themselves(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bound.epsilon_lower_bound(**kwargs)


def test_bad_scores_and_guesses():
  with pytest.raises(ValueError, match="same length"):
    bound.epsilon_lower_bound_from_scores(np.zeros(3), np.zeros(4, bool))
  with pytest.raises(ValueError, match="finite"):
    bound.epsilon_lower_bound_from_scores(np.array([np.nan, 0.0]), np.zeros(2, bool))
  with pytest.raises(ValueError, match="k_plus \\+ k_minus"):
    bound.epsilon_lower_bound_from_scores(np.zeros(3), np.zeros(3, bool), guesses=[(2, 2)])
