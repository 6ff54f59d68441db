"""User-level accounting: ELS (mixture of Gaussians), ULS, group privacy."""

import math

import dp_accounting as dpa
import numpy as np
import pytest
import scipy.stats
from dp_accounting import dp_event as dpe
from dp_accounting.pld import privacy_loss_distribution as pld_lib

import accounting as A
from accounting import _fast_mog, accountants


@pytest.mark.parametrize("k,q,sigma", [(8, 0.01, 1.0), (3, 0.3, 2.0), (1, 0.05, 0.8), (5, 1.0, 4.0)])
def test_fast_mixture_pld_is_dp_accountings_pld(k, q, sigma):
  sens = [float(j) for j in range(k + 1)]
  probs = list(scipy.stats.binom.pmf(range(k + 1), k, q))
  ref = pld_lib.from_mixture_gaussian_mechanism(sigma, sens, probs, value_discretization_interval=1e-2)
  ours = _fast_mog.from_mixture_gaussian_mechanism(sigma, sens, probs,
                                                   value_discretization_interval=1e-2)
  for eps in np.linspace(0, 8, 33):
    assert ours.get_delta_for_epsilon(eps) == ref.get_delta_for_epsilon(eps)
  for delta in (1e-3, 1e-6, 1e-10):
    assert ours.get_epsilon_for_delta(delta) == ref.get_epsilon_for_delta(delta)


def test_els_equals_dp_accounting_mixture_event():
  m = A.ElsDpSgd(1.0, 0.02, 300, 4)
  sens = [0.0, 1.0, 2.0, 3.0, 4.0]
  probs = list(scipy.stats.binom.pmf(range(5), 4, 0.02))
  acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
  acc.compose(dpe.SelfComposedDpEvent(dpe.MixtureOfGaussiansDpEvent(1.0, sens, probs), 300))
  ref = acc.get_epsilon(1e-6)
  assert A.epsilon(m, delta=1e-6, discretization=1e-3) == pytest.approx(ref, rel=1e-9)
  # Default ("auto") grid: pessimistic and within its tolerance of the 1e-3 value.
  auto = A.epsilon(m, delta=1e-6)
  assert ref * (1 - 1e-3) <= auto <= ref * (1 + 3 * accountants.AUTO_RTOL)


def test_els_is_rdp_unsupported_with_clear_error():
  with pytest.raises(ValueError, match="accountant must be 'pld'"):
    A.epsilon(A.ElsDpSgd(1.0, 0.01, 10, 2), delta=1e-6, accountant="rdp")


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 500), (2.0, 0.1, 100)])
def test_els_with_one_example_per_user_is_example_level(sigma, q, steps):
  els = A.epsilon(A.ElsDpSgd(sigma, q, steps, 1), delta=1e-6, discretization=1e-3)
  example = A.epsilon(A.PoissonDpSgd(sigma, q, steps), delta=1e-6, discretization=1e-3)
  assert els == pytest.approx(example, rel=2e-3)


@pytest.mark.parametrize("sigma,q,steps,k", [(2.0, 0.01, 1000, 4), (4.0, 0.02, 500, 8),
                                             (3.0, 0.05, 200, 2)])
def test_els_beats_group_privacy_baseline(sigma, q, steps, k):
  els = A.epsilon(A.ElsDpSgd(sigma, q, steps, k), delta=1e-6)
  group = A.group_privacy_epsilon(A.PoissonDpSgd(sigma, q, steps), group_size=k, delta=1e-6)
  assert els <= group


def test_els_monotone_in_examples_per_user():
  values = [A.epsilon(A.ElsDpSgd(2.0, 0.01, 300, k), delta=1e-6, discretization=1e-3)
            for k in (1, 2, 4, 8)]
  assert values == sorted(values)


def test_group_privacy_closed_form():
  eps, delta = A.group_privacy(epsilon=0.5, delta=1e-6, group_size=4)
  assert eps == 2.0
  assert delta == pytest.approx(1e-6 * sum(math.exp(i * 0.5) for i in range(4)), rel=1e-12)
  assert A.group_privacy(epsilon=1.0, delta=1e-6, group_size=1) == (1.0, pytest.approx(1e-6))


def test_group_privacy_epsilon_is_certified():
  m = A.PoissonDpSgd(2.0, 0.01, 1000)
  k, target = 4, 1e-6
  eps_user = A.group_privacy_epsilon(m, group_size=k, delta=target)
  eps_example = eps_user / k
  # Independent check with dp-accounting: the example-level δ at ε_user/k,
  # converted to k examples, stays within the user-level δ.
  acc = dpa.rdp.RdpAccountant()
  acc.compose(m.dp_event())
  pld = dpa.pld.PLDAccountant()
  pld.compose(m.dp_event())
  example_delta = min(acc.get_delta(eps_example), pld.get_delta(eps_example))
  assert example_delta * math.expm1(k * eps_example) / math.expm1(eps_example) <= target * (1 + 1e-9)
  # And a slightly smaller ε would not be certified (tightness of the search).
  smaller = eps_example * 0.99
  example_delta = min(acc.get_delta(smaller), pld.get_delta(smaller))
  assert example_delta * math.expm1(k * smaller) / math.expm1(smaller) > target


def test_group_privacy_needs_example_level_mechanism():
  with pytest.raises(ValueError, match="example-level"):
    A.group_privacy_epsilon(A.UlsDpSgd(1.0, 0.1, 10), group_size=2, delta=1e-6)


def test_els_with_full_batches_is_a_gaussian_with_sensitivity_k():
  # q = 1: all k examples of a user are in every step; closed form Gaussian.
  m = A.ElsDpSgd(1.25, 1.0, 10, 4)
  ref = dpa.pld.PLDAccountant()
  ref.compose(dpe.GaussianDpEvent(1.25 / 4), 10)
  assert A.epsilon(m, delta=1e-6) == pytest.approx(ref.get_epsilon(1e-6), rel=1e-9)
  assert A.epsilon(m, delta=1e-6) == pytest.approx(
      dpa.get_epsilon_gaussian(1.25 / 4 / math.sqrt(10), 1e-6), rel=2e-3)
