"""Matrix-mechanism descriptions: events, ε against dp-accounting, ledger, calibration."""

import json
import math
import subprocess
import sys

import dp_accounting as dpa
import pytest
from dp_accounting import dp_event as dpe
from hypothesis import given, settings
from hypothesis import strategies as st

import accounting as A
from accounting import mechanisms
from accounting.matrix import AmplifiedBandedMatrixMechanism, MatrixMechanism, UserMatrixMechanism

DELTA = 1e-6


def _pld_epsilon(event, delta=DELTA):
  acc = dpa.pld.PLDAccountant()  # dp-accounting's default grid, 1e-4
  acc.compose(event)
  return acc.get_epsilon(delta)


ALL = [
    MatrixMechanism(1.3, 2.1, 1024, "blt"),
    MatrixMechanism(0.9, 3.0, 1000, "dense", 4, 250, num_steps=17),
    UserMatrixMechanism(2.0, 1.5, 64, "banded", 2, 32),
    AmplifiedBandedMatrixMechanism(1.1, 0.05, 2000, 16),
]


@pytest.mark.parametrize("m", ALL, ids=lambda m: m.kind)
def test_json_round_trip(m):
  again = mechanisms.from_dict(json.loads(json.dumps(m.to_dict())))
  assert again == m and type(again) is type(m)
  assert repr(again.dp_event()) == repr(m.dp_event())
  assert A.from_dict(m.to_dict()) == m


def test_privacy_units():
  assert MatrixMechanism(1.0, 1.0, 8, "blt").privacy_unit == "example"
  assert UserMatrixMechanism(1.0, 1.0, 8, "blt").privacy_unit == "user"
  assert AmplifiedBandedMatrixMechanism(1.0, 0.1, 8, 2).privacy_unit == "example"


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.7])
def test_matrix_mechanism_is_one_gaussian(sigma):
  m = MatrixMechanism(sigma, 4.2, 512, "dense", 4, 128)
  assert repr(m.dp_event()) == repr(dpe.GaussianDpEvent(sigma))
  ours = A.epsilon(m, delta=DELTA)
  assert ours == pytest.approx(_pld_epsilon(dpe.GaussianDpEvent(sigma)), rel=1e-12)
  # The PLD bound is pessimistic and within ~0.1% of the exact Gaussian ε
  # (Balle & Wang 2018, dp-accounting's closed form).
  exact = dpa.get_epsilon_gaussian(sigma, DELTA)
  assert exact <= ours <= exact * 1.002 + 1e-4
  acc = dpa.rdp.RdpAccountant()
  acc.compose(dpe.GaussianDpEvent(sigma))
  assert A.epsilon(m, delta=DELTA, accountant="rdp") == pytest.approx(acc.get_epsilon(DELTA))


def test_user_level_is_the_same_gaussian():
  example = MatrixMechanism(1.7, 2.0, 100, "blt", 2, 50)
  user = UserMatrixMechanism(1.7, 2.0, 100, "blt", 2, 50)
  assert A.epsilon(user, delta=DELTA) == A.epsilon(example, delta=DELTA)


@pytest.mark.parametrize("k,b", [(1, 64), (2, 32), (4, 16), (8, 8)])
def test_identity_with_k_participations_is_dp_sgd_without_amplification(k, b):
  # C = I with k participations: sens = sqrt(k), per-step noise sigma * sqrt(k);
  # k composed Gaussians of multiplier sigma*sqrt(k) are one of multiplier sigma.
  sigma, n = 1.2, 64
  m = MatrixMechanism(sigma, math.sqrt(k), n, "identity", k, b)
  composed = dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(sigma * math.sqrt(k)), k)
  assert A.epsilon(m, delta=DELTA) == pytest.approx(_pld_epsilon(composed), rel=1e-9)
  # ... and the shuffled DP-SGD description of the same run (k epochs of b steps).
  shuffled = A.ShuffledDpSgd(sigma * math.sqrt(k), dataset_size=b * 10, batch_size=10,
                             num_steps=n)
  assert shuffled.participations == k
  assert A.epsilon(m, delta=DELTA) == pytest.approx(A.epsilon(shuffled, delta=DELTA), rel=1e-9)


@pytest.mark.parametrize("steps,bands", [(2000, 16), (1000, 1), (100, 7), (5, 16)])
def test_amplified_banded_is_dp_sgd_for_ceil_n_over_b_steps(steps, bands):
  sigma, q = 0.9, 0.04
  m = AmplifiedBandedMatrixMechanism(sigma, q, steps, bands)
  rounds = math.ceil(steps / bands)
  assert m.participations == rounds
  event = dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)),
                                  rounds)
  assert repr(m.dp_event()) == repr(event)
  assert A.epsilon(m, delta=DELTA) == pytest.approx(_pld_epsilon(event), rel=1e-9)
  assert A.epsilon(m, delta=DELTA) == A.epsilon(A.PoissonDpSgd(sigma, q, rounds), delta=DELTA)


def test_epsilon_does_not_depend_on_steps_recorded():
  full = MatrixMechanism(1.1, 2.0, 256, "blt")
  assert full.num_steps == 256
  for steps in (1, 17, 255):
    partial = full.with_steps(steps)
    assert partial.num_steps == steps and partial.planned_steps == 256
    assert A.epsilon(partial, delta=DELTA) == A.epsilon(full, delta=DELTA)
  with pytest.raises(ValueError, match=r"num_steps must be <= planned_steps \(256\)"):
    full.with_steps(257)


def test_ledger_merges_steps_and_never_under_reports(tmp_path):
  step = MatrixMechanism(1.1, 2.0, 8, "banded", 2, 4, num_steps=1)
  full_epsilon = A.epsilon(MatrixMechanism(1.1, 2.0, 8, "banded", 2, 4), delta=DELTA)
  ledger = A.Ledger()
  ledger.record(step)
  # The first step already reports the whole mechanism's ε.
  assert ledger.epsilon(delta=DELTA) == pytest.approx(full_epsilon, rel=1e-12)
  for _ in range(7):
    ledger.record(step)
  assert len(ledger) == 1 and ledger.num_steps == 8
  assert ledger.entries[0] == MatrixMechanism(1.1, 2.0, 8, "banded", 2, 4)
  assert ledger.epsilon(delta=DELTA) == pytest.approx(full_epsilon, rel=1e-12)
  # A ninth step of the same 8-step mechanism cannot be part of it: it starts a
  # second run, composed after the first (never merged into it).
  extra = A.Ledger(ledger.entries)
  extra.record(step)
  assert [e.num_steps for e in extra.entries] == [8, 1]
  assert extra.epsilon(delta=DELTA) > full_epsilon
  # Save, resume: the resumed run's steps compose with the history (conservative).
  ledger.save(tmp_path / "ledger.json")
  resumed = A.Ledger.load(tmp_path / "ledger.json")
  assert resumed == ledger and resumed.epsilon(delta=DELTA) == ledger.epsilon(delta=DELTA)
  resumed.record(step)
  assert len(resumed) == 2
  two = dpe.ComposedDpEvent([dpe.GaussianDpEvent(1.1), dpe.GaussianDpEvent(1.1)])
  assert resumed.epsilon(delta=DELTA) == pytest.approx(_pld_epsilon(two), rel=1e-6)
  assert resumed.epsilon(delta=DELTA) > full_epsilon


def test_ledger_amplified_banded_counts_steps():
  ledger = A.Ledger()
  for _ in range(33):
    ledger.record(AmplifiedBandedMatrixMechanism(1.0, 0.1, 1, 16))
  assert ledger.entries == (AmplifiedBandedMatrixMechanism(1.0, 0.1, 33, 16),)
  assert ledger.epsilon(delta=DELTA) == pytest.approx(
      A.epsilon(A.PoissonDpSgd(1.0, 0.1, 3), delta=DELTA), rel=1e-12)


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibration_meets_target_with_closed_form_check(target):
  result = A.calibrate_noise_multiplier(
      lambda s: MatrixMechanism(s, 3.0, 1000, "blt", 4, 250), target_epsilon=target,
      delta=DELTA)
  sigma = result.value
  assert isinstance(result.mechanism, MatrixMechanism)
  assert result.mechanism.noise_multiplier == sigma
  # Independent check: dp-accounting's exact Gaussian ε (Balle & Wang 2018),
  # and its own exact calibration as the tight reference.
  assert dpa.get_epsilon_gaussian(sigma, DELTA) <= target
  assert result.epsilon <= target
  exact_sigma = dpa.get_sigma_gaussian(target, DELTA)
  assert exact_sigma <= sigma <= exact_sigma * 1.01
  assert _pld_epsilon(dpe.GaussianDpEvent(sigma)) <= target


def test_calibration_of_amplified_banded():
  result = A.calibrate_noise_multiplier(
      lambda s: AmplifiedBandedMatrixMechanism(s, 0.05, 2000, 20), target_epsilon=2.0,
      delta=1e-5)
  event = dpe.SelfComposedDpEvent(
      dpe.PoissonSampledDpEvent(0.05, dpe.GaussianDpEvent(result.value)), 100)
  assert _pld_epsilon(event, 1e-5) <= 2.0
  assert _pld_epsilon(dpe.SelfComposedDpEvent(
      dpe.PoissonSampledDpEvent(0.05, dpe.GaussianDpEvent(result.value / 1.01)), 100),
      1e-5) > 2.0


@given(sigma=st.floats(0.3, 8.0), factor=st.floats(1.01, 3.0), n=st.integers(1, 10_000))
@settings(max_examples=15, deadline=None)
def test_epsilon_decreases_with_noise(sigma, factor, n):
  low = A.epsilon(MatrixMechanism(sigma, 1.0, n, "blt"), delta=1e-5)
  high = A.epsilon(MatrixMechanism(sigma * factor, 1.0, n, "blt"), delta=1e-5)
  assert high <= low


@given(sigma=st.floats(0.6, 4.0), q=st.floats(1e-3, 0.3), steps=st.integers(1, 300),
       bands=st.integers(1, 40))
@settings(max_examples=15, deadline=None)
def test_amplified_banded_monotone_in_steps_and_bands(sigma, q, steps, bands):
  eps = lambda t, b: A.epsilon(AmplifiedBandedMatrixMechanism(sigma, q, t, b), delta=1e-5,
                               discretization=1e-3)
  base = eps(steps, bands)
  assert eps(steps + bands, bands) >= base       # more steps: never less ε
  assert eps(steps, bands + 1) <= base + 1e-12   # more bands: never more ε


@pytest.mark.parametrize("ctor,match", [
    (lambda: MatrixMechanism(0.0, 1.0, 8, "blt"), "noise_multiplier must be a finite number > 0"),
    (lambda: MatrixMechanism(-1.0, 1.0, 8, "blt"), "noise_multiplier"),
    (lambda: MatrixMechanism(float("nan"), 1.0, 8, "blt"), "noise_multiplier"),
    (lambda: MatrixMechanism(1.0, 0.0, 8, "blt"), "sensitivity must be a finite number > 0"),
    (lambda: MatrixMechanism(1.0, float("inf"), 8, "blt"), "sensitivity"),
    (lambda: MatrixMechanism(1.0, 1.0, 0, "blt"), "planned_steps must be an integer >= 1"),
    (lambda: MatrixMechanism(1.0, 1.0, 2.5, "blt"), "planned_steps"),
    (lambda: MatrixMechanism(1.0, 1.0, 8, ""), "strategy must be a non-empty string"),
    (lambda: MatrixMechanism(1.0, 1.0, 8, None), "strategy"),
    (lambda: MatrixMechanism(1.0, 1.0, 8, "blt", 0), "max_participations must be an integer"),
    (lambda: MatrixMechanism(1.0, 1.0, 8, "blt", 2), "min_separation must be given"),
    (lambda: MatrixMechanism(1.0, 1.0, 8, "blt", 2, 0), "min_separation must be an integer"),
    (lambda: MatrixMechanism(1.0, 1.0, 8, "blt", 3, 4), r"max_participations=3 .* do not fit"),
    (lambda: MatrixMechanism(1.0, 1.0, 8, "blt", num_steps=0), "num_steps must be an integer"),
    (lambda: MatrixMechanism(1.0, 1.0, 8, "blt", num_steps=9), "num_steps must be <= planned"),
    (lambda: UserMatrixMechanism(1.0, -2.0, 8, "blt"), "sensitivity"),
    (lambda: AmplifiedBandedMatrixMechanism(0.0, 0.1, 8, 2), "noise_multiplier"),
    (lambda: AmplifiedBandedMatrixMechanism(1.0, 0.0, 8, 2), r"sampling_prob must be in \(0, 1\]"),
    (lambda: AmplifiedBandedMatrixMechanism(1.0, 1.5, 8, 2), "sampling_prob"),
    (lambda: AmplifiedBandedMatrixMechanism(1.0, 0.1, 0, 2), "num_steps must be an integer"),
    (lambda: AmplifiedBandedMatrixMechanism(1.0, 0.1, 8, 0), "num_bands must be an integer"),
])
def test_validation_names_the_argument(ctor, match):
  with pytest.raises(ValueError, match=match):
    ctor()


def test_matrix_module_is_jax_free():
  code = ("import sys, accounting.matrix; "
          "bad = [m for m in ('jax', 'optax', 'flax', 'dpfl') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_ledger_starts_a_new_run_when_a_matrix_mechanism_is_used_up():
  import accounting as A
  from accounting.matrix import MatrixMechanism
  m = MatrixMechanism(noise_multiplier=2.0, sensitivity=1.5, planned_steps=4, strategy="blt")
  ledger = A.Ledger()
  for _ in range(6):  # a 4-step run, then the first 2 steps of a second run
    ledger.record(m.with_steps(1))
  assert [e.num_steps for e in ledger.entries] == [4, 2]
  import dp_accounting as dpa
  acc = dpa.pld.PLDAccountant()
  acc.compose(dpa.GaussianDpEvent(2.0), 2)  # two full Gaussian releases
  assert ledger.epsilon(delta=1e-6) == pytest.approx(acc.get_epsilon(1e-6), rel=1e-6)
