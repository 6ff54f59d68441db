"""ε and δ against dp-accounting called directly, and published vectors."""

import math

import dp_accounting as dpa
import pytest
from dp_accounting import dp_event as dpe
from hypothesis import given, settings
from hypothesis import strategies as st

import accounting as A
from accounting import accountants
from accounting.mechanisms import Mechanism


def _pld(event, delta, disc=1e-4):
  acc = dpa.pld.PLDAccountant(value_discretization_interval=disc)
  acc.compose(event)
  return acc.get_epsilon(delta)


def _rdp(event, delta):
  acc = dpa.rdp.RdpAccountant()
  acc.compose(event)
  return acc.get_epsilon(delta)


def _poisson_event(sigma, q, steps):
  return dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)


@pytest.mark.parametrize("sigma,q,steps,delta", [
    (1.1, 0.01, 1000, 1e-5), (0.8, 0.05, 300, 1e-6), (2.0, 1.0, 10, 1e-5), (5.0, 0.3, 50, 1e-8)])
def test_poisson_dp_sgd_equals_dp_accounting_pld_and_rdp(sigma, q, steps, delta):
  m = A.PoissonDpSgd(sigma, q, steps)
  assert A.epsilon(m, delta=delta) == _pld(_poisson_event(sigma, q, steps), delta)
  assert A.epsilon(m, delta=delta, accountant="rdp") == _rdp(_poisson_event(sigma, q, steps), delta)


def test_uls_is_dp_sgd_over_users():
  uls = A.UlsDpSgd(1.2, 0.02, 400)
  assert uls.privacy_unit == "user"
  assert A.epsilon(uls, delta=1e-6) == _pld(_poisson_event(1.2, 0.02, 400), 1e-6)


def test_shuffled_batches_claim_no_amplification():
  # 1000 examples, batches of 100 -> 10 steps per epoch; 25 steps touch an
  # example at most 3 times: three Gaussian mechanisms with sensitivity 1.
  m = A.ShuffledDpSgd(2.0, 1000, 100, 25)
  assert m.participations == 3
  ref = _pld(dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(2.0), 3), 1e-5)
  assert A.epsilon(m, delta=1e-5) == pytest.approx(ref, rel=1e-12)
  # Closed form: three Gaussians = one with σ/√3; the exact (ε, δ) curve.
  assert A.epsilon(m, delta=1e-5) == pytest.approx(
      dpa.get_epsilon_gaussian(2.0 / math.sqrt(3), 1e-5), rel=2e-3)
  # Much weaker than Poisson accounting would (wrongly) claim.
  assert A.epsilon(m, delta=1e-5) > A.epsilon(A.PoissonDpSgd(2.0, 0.1, 25), delta=1e-5)


def test_truncated_poisson_equals_dp_accounting():
  m = A.TruncatedPoissonDpSgd(1.0, 0.02, 2000, 60, 100)
  event = dpe.SelfComposedDpEvent(dpe.TruncatedSubsampledGaussianDpEvent(2000, 0.02, 60, 1.0), 100)
  assert A.epsilon(m, delta=1e-5) == pytest.approx(_pld(event, 1e-5), rel=1e-12)
  with pytest.raises(ValueError, match="accountant must be 'pld'"):
    A.epsilon(m, delta=1e-5, accountant="rdp")


def test_composed_phases_equal_dp_accounting():
  m = A.Composed((A.PoissonDpSgd(1.1, 0.01, 100), A.PoissonDpSgd(2.0, 0.02, 300),
                  A.ShuffledDpSgd(3.0, 1000, 100, 20)))
  assert m.num_steps == 420
  event = dpe.ComposedDpEvent([_poisson_event(1.1, 0.01, 100), _poisson_event(2.0, 0.02, 300),
                               dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(3.0), 2)])
  assert A.epsilon(m, delta=1e-5) == pytest.approx(_pld(event, 1e-5), rel=1e-12)
  assert A.epsilon(m, delta=1e-5, accountant="rdp") == pytest.approx(_rdp(event, 1e-5), rel=1e-12)


def test_composed_rejects_mixed_units():
  with pytest.raises(ValueError, match="same privacy unit"):
    A.Composed((A.PoissonDpSgd(1.0, 0.1, 10), A.UlsDpSgd(1.0, 0.1, 10)))


def test_delta_for_epsilon_inverts_epsilon():
  m = A.PoissonDpSgd(1.0, 0.02, 500)
  eps = A.epsilon(m, delta=1e-6)
  assert A.delta(m, epsilon=eps) == pytest.approx(1e-6, rel=2e-2)
  acc = dpa.pld.PLDAccountant()
  acc.compose(m.dp_event())
  assert A.delta(m, epsilon=2.0) == acc.get_delta(2.0)
  acc = dpa.rdp.RdpAccountant()
  acc.compose(m.dp_event())
  assert A.delta(m, epsilon=2.0, accountant="rdp") == acc.get_delta(2.0)


# Published accountant vectors (../shared/REFERENCES.md).
@pytest.mark.parametrize("sigma,q,steps,delta,published", [
    # TF Privacy compute_dp_sgd_privacy tests: N=60000, B=150, 15 epochs.
    (1.3, 150 / 60000, 15 * 60000 // 150, 1e-5, 0.7242234026),
    # TF Privacy: N=100000, B=100, 30 epochs.
    (1.0, 100 / 100000, 30 * 100000 // 100, 1e-7, 1.4154988495),
    # Opacus accountants test (its own RDP orders; ours differ slightly).
    (1.5, 0.04, 2250, 1e-5, 7.32911117143),
    # dp-accounting RDP test: one Gaussian with σ chosen for ε = 1.
    (4.530877117, 1.0, 1, 1e-6, 1.0),
])
def test_published_rdp_vectors(sigma, q, steps, delta, published):
  eps = A.epsilon(A.PoissonDpSgd(sigma, q, steps), delta=delta, accountant="rdp")
  assert eps == pytest.approx(published, rel=1e-4)


def test_jax_privacy_docstring_vector():
  # jax-privacy's docstring example: Poisson, PLD, δ=1e-6: σ=3, T=512, q=0.1 -> ε≈3.77.
  assert A.epsilon(A.PoissonDpSgd(3.0, 0.1, 512), delta=1e-6) == pytest.approx(3.77, abs=5e-3)


class _RawEvent(Mechanism):
  """Test-only: wraps an arbitrary DpEvent to exercise the PLD walker."""

  def __init__(self, event):
    object.__setattr__(self, "_event", event)

  def dp_event(self):
    return self._event

  # Identity semantics: results are cached by mechanism value, and this
  # test-only class has no dataclass fields to compare.
  __eq__ = object.__eq__
  __hash__ = object.__hash__


_MOG_EVENT = dpe.ComposedDpEvent([
    dpe.SelfComposedDpEvent(dpe.MixtureOfGaussiansDpEvent(1.0, [0, 1, 2], [.2, .6, .2]), 3),
    dpe.SelfComposedDpEvent(dpe.MixtureOfGaussiansDpEvent(2.0, [0, 2, 3], [.33, .34, .33]), 2),
])
# dp-accounting's own test value at its default grid (δ = 1e-6).
_MOG_PUBLISHED = 17.193115


def test_mixture_of_gaussians_walker_and_auto_grid():
  coarse = A.epsilon(_RawEvent(_MOG_EVENT), delta=1e-6, discretization=1e-3)
  assert coarse == pytest.approx(_pld(_MOG_EVENT, 1e-6, disc=1e-3), rel=1e-12)
  auto = A.epsilon(_RawEvent(_MOG_EVENT), delta=1e-6)
  # Pessimistic: never below the fine-grid value, and within the auto tolerance.
  assert _MOG_PUBLISHED * (1 - 1e-6) <= auto <= _MOG_PUBLISHED * (1 + 2 * accountants.AUTO_RTOL)
  assert _MOG_PUBLISHED * (1 - 1e-6) <= coarse <= _MOG_PUBLISHED * 1.005


@pytest.mark.slow
def test_mixture_of_gaussians_dp_accounting_vector_fine_grid():
  eps = A.epsilon(_RawEvent(_MOG_EVENT), delta=1e-6, discretization=1e-4)
  assert eps == pytest.approx(_MOG_PUBLISHED, rel=1e-6)


@given(sigma=st.floats(0.6, 5.0), q=st.floats(1e-3, 0.5), steps=st.integers(1, 300),
       factor=st.floats(1.05, 2.0))
@settings(max_examples=20, deadline=None)
def test_epsilon_monotone(sigma, q, steps, factor):
  def eps(s, qq, t, acc):
    return A.epsilon(A.PoissonDpSgd(s, qq, t), delta=1e-5, accountant=acc,
                     discretization=None if acc == "rdp" else 1e-3)
  for acc in ("pld", "rdp"):
    base = eps(sigma, q, steps, acc)
    assert eps(sigma, q, steps + max(1, int(steps * (factor - 1))), acc) >= base - 1e-9
    assert eps(sigma, min(1.0, q * factor), steps, acc) >= base - 1e-9
    assert eps(sigma * factor, q, steps, acc) <= base + 1e-9


def test_coarser_grids_are_pessimistic():
  # The calibration and "auto" rules rely on this: a coarser pessimistic grid
  # never reports a smaller ε than a finer one.
  for sigma, q, steps in [(0.7, 0.01, 3000), (1.0, 0.05, 200), (3.0, 0.2, 50)]:
    m = A.PoissonDpSgd(sigma, q, steps)
    values = [A.epsilon(m, delta=1e-5, discretization=d) for d in (1e-2, 1e-3, 1e-4)]
    assert values[0] >= values[1] >= values[2]


@pytest.mark.parametrize("kwargs,match", [
    (dict(delta=0.0), "delta must be in"), (dict(delta=1.0), "delta must be in"),
    (dict(delta=1e-5, accountant="moments"), "accountant must be one of"),
    (dict(delta=1e-5, discretization=-1.0), "value_discretization_interval"),
])
def test_bad_accountant_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    A.epsilon(A.PoissonDpSgd(1.0, 0.1, 10), **kwargs)


def test_epsilons_answer_many_deltas_as_epsilon_does_each():
  """accounting.epsilons: one composed PLD, the same ε as epsilon at every δ."""
  import dp_accounting as dpa
  from dp_accounting import dp_event as dpe
  mech = A.PoissonDpSgd(1.1, 0.02, 50)
  deltas = [1e-5, 1e-8, 1e-6]
  many = A.epsilons(mech, deltas=deltas, discretization=1e-3)
  acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
  acc.compose(dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(0.02, dpe.GaussianDpEvent(1.1)), 50))
  for value, delta in zip(many, deltas):
    assert value == A.epsilon(mech, delta=delta, discretization=1e-3)
    assert value == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
  assert many[1] > many[2] > many[0]
  assert A.epsilons(mech, deltas=deltas, accountant="rdp") == tuple(
      A.epsilon(mech, delta=d, accountant="rdp") for d in deltas)
  with pytest.raises(ValueError, match="deltas"):
    A.epsilons(mech, deltas=[1e-5, 1.5])
  with pytest.raises(ValueError, match="deltas"):
    A.epsilons(mech, deltas=[])
  with pytest.raises(ValueError, match="deltas"):
    A.epsilons(mech, deltas=1e-5)
