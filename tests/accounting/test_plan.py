"""accounting.plan: the one configuration -> mechanism map, against dp-accounting called directly.

Every row of the mapping table in accounting/plan.py's docstring is checked
by building the dp-accounting event for the configuration here, from the
papers' definitions (not from our mechanisms), and composing it with
dp-accounting's own PLD accountant.
"""

import dataclasses
import json
import math

import dp_accounting as dpa
import pytest
from dp_accounting import dp_event as dpe

import accounting
from accounting import plan as P

DELTA = 1e-6
SIGMA = 1.2
# Both sides round privacy losses pessimistically onto the same grid (Δ = 1e-4);
# they differ only in FFT round-off and composition order.
RTOL_SAME_GRID = 1e-6
# dp-accounting's own PLD of the truncated and mixture (ELS) events takes tens
# of seconds at Δ = 1e-4; those rows are compared on Δ = 1e-3 (same grid on
# both sides), and the plan's default-grid ε (ELS: the adaptive "auto" grid,
# within accountants.AUTO_RTOL of the limit) within this of it.
COARSE = 1e-3
RTOL_COARSE = 3e-3


def reference_epsilon(event, *, discretization: float = 1e-4) -> float:
  acc = dpa.pld.PLDAccountant(value_discretization_interval=discretization)
  acc.compose(event)
  return acc.get_epsilon(DELTA)


def poisson_gaussian(q, sigma, count):
  return dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), count)


def binomial_weights(k, q):
  return [math.comb(k, j) * q ** j * (1 - q) ** (k - j) for j in range(k + 1)]


def make_plan(privacy_unit, sampling, *, steps, noise=None, accountant="pld", **extra):
  return P.PrivacyPlan(privacy_unit=privacy_unit, sampling=sampling, noise_multiplier=SIGMA,
                       l2_clip_norm=1.0, noise=noise or P.NoisePlan(), delta=DELTA,
                       num_steps=steps, accountant=accountant, **extra)


def matrix_noise(n, k, b, sensitivity=2.0, amplified=False):
  return P.NoisePlan(strategy="banded" if amplified else "blt", planned_steps=n,
                     sensitivity=sensitivity, max_participations=k, min_separation=b,
                     amplified=amplified)


T = 24
N, B = 100, 25           # shuffle / cyclic: N // B = 4 steps an epoch
Q, K = 0.05, 3

# (row of the table, plan, the dp-accounting event from the definitions, its grid Δ)
ROWS = [
    ("poisson / identity / example",
     make_plan("example", P.SamplingPlan("poisson", sampling_prob=Q), steps=T),
     poisson_gaussian(Q, SIGMA, T), 1e-4),
    ("truncated_poisson / identity / example",
     make_plan("example", P.SamplingPlan("truncated_poisson", sampling_prob=Q,
                                         population_size=N, max_batch_size=8), steps=T),
     dpe.SelfComposedDpEvent(dpe.TruncatedSubsampledGaussianDpEvent(
         dataset_size=N, sampling_probability=Q, truncated_batch_size=8,
         noise_multiplier=SIGMA), T), COARSE),
    ("poisson / identity / user-user (ULS)",
     make_plan("user", P.SamplingPlan("poisson", unit="user", sampling_prob=Q), steps=T),
     poisson_gaussian(Q, SIGMA, T), 1e-4),
    ("poisson / identity / user-example (ELS)",
     make_plan("user", P.SamplingPlan("poisson", unit="example", sampling_prob=Q,
                                      examples_per_user=K), steps=T),
     # A user's k examples each sampled with probability q: the sum's
     # sensitivity is j·C with Binomial(k, q) probability.
     dpe.SelfComposedDpEvent(dpe.MixtureOfGaussiansDpEvent(
         SIGMA, [float(j) for j in range(K + 1)], binomial_weights(K, Q)), T), COARSE),
    ("shuffle / identity / example",
     make_plan("example", P.SamplingPlan("shuffle", population_size=N, batch_size=B),
               steps=T - 1),
     # No amplification: each example in ceil(T / (N // B)) Gaussian releases.
     dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(SIGMA), math.ceil((T - 1) / (N // B))),
     1e-4),
    ("cyclic / matrix / example",
     make_plan("example", P.SamplingPlan("cyclic", population_size=N, batch_size=B), steps=T,
               noise=matrix_noise(T, T // 4, 4)),
     # The release C G + σ·sens(C)·C_clip·Z is one Gaussian mechanism with σ.
     dpe.GaussianDpEvent(SIGMA), 1e-4),
    ("cyclic / matrix / user",
     make_plan("user", P.SamplingPlan("cyclic", unit="user", population_size=N, batch_size=B),
               steps=T - 3, noise=matrix_noise(T, T // 4, 4)),
     dpe.GaussianDpEvent(SIGMA), 1e-4),
    ("cyclic_poisson / amplified banded / example",
     make_plan("example", P.SamplingPlan("cyclic_poisson", population_size=N, sampling_prob=Q,
                                         num_groups=4), steps=T - 1,
               noise=matrix_noise(T, T // 4, 4, sensitivity=1.0, amplified=True)),
     # Bands = groups: an example's steps are 4 apart, so it is Poisson
     # sampled (rate q) in ceil(T / 4) independent Gaussian steps.
     poisson_gaussian(Q, SIGMA, math.ceil((T - 1) / 4)), 1e-4),
]


@pytest.mark.parametrize("row, plan, event, disc", ROWS, ids=[r[0] for r in ROWS])
def test_every_row_of_the_mapping_is_dp_accountings_epsilon(row, plan, event, disc):
  ref = reference_epsilon(event, discretization=disc)
  same_grid = accounting.epsilon(plan.mechanism(), delta=DELTA, discretization=disc)
  assert same_grid >= ref * (1 - RTOL_SAME_GRID), row      # never optimistic
  assert same_grid <= ref * (1 + RTOL_SAME_GRID), row
  # The plan's ε is the ε of its mechanism (one mapping, one number).
  ours = plan.epsilon()
  assert ours == accounting.epsilon(plan.mechanism(), delta=DELTA)
  if disc != COARSE:
    assert ours == pytest.approx(same_grid, rel=RTOL_SAME_GRID)
  else:  # a finer grid: tighter than the coarse reference, by its rounding at most
    assert ref * (1 - RTOL_COARSE) <= ours <= ref * (1 + RTOL_COARSE), row


def test_a_prefix_of_the_run_is_the_mechanism_of_fewer_steps():
  plan = ROWS[0][1]
  assert plan.epsilon(5) == pytest.approx(reference_epsilon(poisson_gaussian(Q, SIGMA, 5)),
                                          rel=RTOL_SAME_GRID)
  assert plan.epsilon(5) < plan.epsilon()


# --- JSON ----------------------------------------------------------------------------

@pytest.mark.parametrize("plan", [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_json_round_trip(plan):
  plan = dataclasses.replace(plan, noise=dataclasses.replace(
      plan.noise, options={"buffers": 3, "objective": "max"}), target_epsilon=4.0)
  again = P.PrivacyPlan.from_json(plan.to_json())
  assert again == plan
  assert again.mechanism() == plan.mechanism()
  assert json.loads(again.to_json()) == json.loads(plan.to_json())


def test_json_refuses_unknown_fields_and_other_formats():
  data = ROWS[0][1].to_dict()
  with pytest.raises(ValueError, match="unknown plan field.*'colour'"):
    P.PrivacyPlan.from_dict({**data, "colour": "red"})
  with pytest.raises(ValueError, match="format"):
    P.PrivacyPlan.from_dict({**data, "format": "dpfl-ledger"})
  with pytest.raises(ValueError, match="version"):
    P.PrivacyPlan.from_dict({**data, "version": 99})
  with pytest.raises(ValueError, match="JSON"):
    P.PrivacyPlan.from_json(ROWS[0][1].to_json()[:-5])
  with pytest.raises(ValueError, match="noise_multiplier"):
    P.PrivacyPlan.from_dict({**data, "noise_multiplier": -1.0})


# --- bad combinations ----------------------------------------------------------------

ELS = P.SamplingPlan("poisson", unit="example", sampling_prob=Q, examples_per_user=K)
BAD = [
    ("cyclic without a matrix strategy",
     lambda: make_plan("example", P.SamplingPlan("cyclic", population_size=N, batch_size=B),
                       steps=T), "planned_steps"),
    ("truncated Poisson at user level",
     lambda: make_plan("user", P.SamplingPlan("truncated_poisson", sampling_prob=Q,
                                              population_size=N, max_batch_size=8), steps=T),
     "truncated_poisson"),
    ("ELS without examples_per_user",
     lambda: make_plan("user", P.SamplingPlan("poisson", sampling_prob=Q), steps=T),
     "examples_per_user"),
    ("ELS with RDP", lambda: make_plan("user", ELS, steps=T, accountant="rdp"), "accountant"),
    ("local_steps with example units",
     lambda: make_plan("example", P.SamplingPlan("poisson", sampling_prob=Q), steps=T,
                       local_steps=3), "local_steps"),
    ("num_steps past the strategy's planned_steps",
     lambda: make_plan("example", P.SamplingPlan("cyclic", population_size=N, batch_size=B),
                       steps=T + 1, noise=matrix_noise(T, T // 4, 4)),
     r"num_steps \(25\).*planned_steps \(24\)"),
    ("a matrix strategy with Poisson sampling",
     lambda: make_plan("example", P.SamplingPlan("poisson", sampling_prob=Q), steps=T,
                       noise=matrix_noise(T, 1, T)), "cyclic"),
    ("example-level plan sampling users",
     lambda: make_plan("example", P.SamplingPlan("poisson", unit="user", sampling_prob=Q),
                       steps=T), "sampling unit"),
    ("an unknown scheme", lambda: P.SamplingPlan("bernoulli", sampling_prob=Q),
     "sampling scheme"),
    ("cyclic without population_size", lambda: P.SamplingPlan("cyclic", batch_size=B),
     "population_size"),
]


@pytest.mark.parametrize("case, build, field", BAD, ids=[b[0] for b in BAD])
def test_bad_combinations_are_refused_naming_the_field(case, build, field):
  with pytest.raises(ValueError, match=field):
    build()


# --- the planner -----------------------------------------------------------------------

CALIBRATED = [
    ("example", P.SamplingPlan("poisson", sampling_prob=Q), None, 2.0),
    ("user", ELS, None, 3.0),
    ("example", P.SamplingPlan("shuffle", population_size=N, batch_size=B), None, 5.0),
    ("example", P.SamplingPlan("cyclic", population_size=N, batch_size=B),
     matrix_noise(T, T // 4, 4), 1.0),
]


@pytest.mark.parametrize("unit, sampling, noise, target", CALIBRATED,
                         ids=[c[1].scheme + "/" + c[0] for c in CALIBRATED])
def test_calibration_never_exceeds_the_target(unit, sampling, noise, target):
  plan = P.plan_run(privacy_unit=unit, sampling=sampling, l2_clip_norm=1.0, delta=DELTA,
                    num_steps=T, noise=noise, target_epsilon=target)
  assert plan.target_epsilon == target
  assert plan.epsilon() <= target
  # Tight: 2% less noise is over budget.
  looser = dataclasses.replace(plan, noise_multiplier=0.98 * plan.noise_multiplier)
  assert looser.epsilon() > target


def test_calibration_covers_the_prior_ledger_entries():
  sampling = P.SamplingPlan("poisson", sampling_prob=Q)
  prior = (accounting.PoissonDpSgd(2.0, Q, 40),)
  common = dict(privacy_unit="example", sampling=sampling, l2_clip_norm=1.0, delta=DELTA,
                num_steps=T, target_epsilon=2.0)
  alone = P.plan_run(**common)
  after = P.plan_run(prior=prior, **common)
  assert after.noise_multiplier > alone.noise_multiplier
  # Composition of the earlier run with this one, built in dp-accounting directly.
  ref = reference_epsilon(dpe.ComposedDpEvent([
      poisson_gaussian(Q, 2.0, 40), poisson_gaussian(Q, after.noise_multiplier, T)]),
      discretization=1e-4)
  assert ref <= 2.0 * (1 + RTOL_SAME_GRID)
  assert accounting.epsilon(P.compose_after(prior, after.mechanism()), delta=DELTA) <= 2.0


def test_plan_run_needs_exactly_one_of_sigma_and_target():
  common = dict(privacy_unit="example", sampling=P.SamplingPlan("poisson", sampling_prob=Q),
                l2_clip_norm=1.0, delta=DELTA, num_steps=T)
  with pytest.raises(ValueError, match="noise_multiplier.*target_epsilon"):
    P.plan_run(**common)
  with pytest.raises(ValueError, match="noise_multiplier.*target_epsilon"):
    P.plan_run(noise_multiplier=1.0, target_epsilon=1.0, **common)


# --- epochs -> steps ----------------------------------------------------------------------

def test_steps_from_epochs_closed_forms():
  n, b, epochs = 1438, 256, 40
  cyclic = P.SamplingPlan("cyclic", population_size=n, batch_size=b)
  shuffle = P.SamplingPlan("shuffle", population_size=n, batch_size=b)
  poisson = P.SamplingPlan("poisson", sampling_prob=b / n, population_size=n, batch_size=b)
  assert cyclic.steps_from_epochs(epochs) == epochs * (n // b) == 200
  assert shuffle.steps_from_epochs(epochs) == epochs * (n // b) == 200
  assert poisson.steps_from_epochs(epochs) == math.ceil(epochs * n / b) == 225
  # Fractional epochs round up (never fewer steps than the passes asked for).
  assert cyclic.steps_from_epochs(2.5) == math.ceil(2.5 * (n // b)) == 13
  assert poisson.steps_from_epochs(0.1) == math.ceil(0.1 * n / b) == 1
  with pytest.raises(ValueError, match="epochs"):
    cyclic.steps_from_epochs(0)
