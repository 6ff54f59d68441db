"""Adaptive clipping's accounting: the (sum, count) pair as one Gaussian, checked against dp-accounting."""

import json
import math

import dp_accounting as dpa
import pytest

from accounting import cli
from accounting import plan as planning
from accounting.adaptive import AdaptiveClip

Q, STEPS, DELTA = 0.05, 60, 1e-5


def _direct(sigma_eff, accountant, *, q=Q, steps=STEPS):
  """ε of T Poisson-subsampled Gaussians at σ_eff, from dp-accounting alone."""
  event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma_eff)),
                                  steps)
  if accountant == "pld":
    acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
  else:
    acc = dpa.rdp.RdpAccountant()
  return acc.compose(event).get_epsilon(DELTA)


def _plan(sigma, count_stddev, accountant="pld"):
  sampling = planning.SamplingPlan(scheme="poisson", population_size=2000, sampling_prob=Q,
                                   batch_size=100)
  return planning.plan_run(privacy_unit="example", sampling=sampling, l2_clip_norm=0.3,
                           delta=DELTA, num_steps=STEPS, noise_multiplier=sigma,
                           accountant=accountant,
                           adaptive=AdaptiveClip(0.3, count_noise_stddev=count_stddev))


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_is_the_pair_as_one_gaussian_per_dp_accounting(accountant):
  sigma, sb = 1.1, 2.0
  sigma_eff = (sigma ** -2 + (2 * sb) ** -2) ** -0.5  # Andrew et al. 2021, Thm 1
  plan = _plan(sigma, sb, accountant)
  assert plan.accounted_noise_multiplier == pytest.approx(sigma_eff, rel=1e-12)
  direct = _direct(sigma_eff, accountant)
  assert plan.epsilon() == pytest.approx(direct, rel=2e-3)
  if accountant == "rdp":  # strictly more than the gradient query alone: the count is paid
    assert plan.epsilon() > _direct(sigma, accountant) * 1.001


def test_cli_count_noise_flag_reproduces_the_plan(capsys):
  code = cli.main(["epsilon", "--noise-multiplier", "1.1", "--sampling-prob", str(Q), "--steps",
                   str(STEPS), "--delta", str(DELTA), "--count-noise-stddev", "2", "--json"])
  assert code == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["effective_noise_multiplier"] == pytest.approx((1.1 ** -2 + 4.0 ** -2) ** -0.5)
  assert out["epsilon"] == pytest.approx(_plan(1.1, 2.0).epsilon(), rel=1e-9)
  assert cli.main(["epsilon", "--noise-multiplier", "1.1", "--sampling-prob", "0.01",
                   "--steps", "10", "--delta", "1e-5", "--count-noise-stddev", "0"]) == 2
  assert "--count-noise-stddev" in capsys.readouterr().err


def test_target_epsilon_raises_the_gradient_noise_and_is_met():
  sampling = planning.SamplingPlan(scheme="poisson", population_size=2000, sampling_prob=Q,
                                   batch_size=100)
  common = dict(privacy_unit="example", sampling=sampling, l2_clip_norm=0.3, delta=DELTA,
                num_steps=STEPS, target_epsilon=2.0, accountant="rdp")
  adaptive = planning.plan_run(**common, adaptive=AdaptiveClip(0.3, count_noise_stddev=5.0))
  assert adaptive.noise_multiplier > adaptive.accounted_noise_multiplier  # the count is paid
  assert adaptive.epsilon() <= 2.0
  assert _direct(adaptive.accounted_noise_multiplier, "rdp") == pytest.approx(2.0, rel=5e-3)
  with pytest.raises(ValueError, match="count_noise_stddev=0.1 is too small"):
    planning.plan_run(**common, adaptive=AdaptiveClip(0.3, count_noise_stddev=0.1))


def test_matrix_mechanism_counts_every_participation():
  k, b = 3, 10
  noise = planning.NoisePlan(strategy="blt", planned_steps=k * b, sensitivity=2.5,
                             max_participations=k, min_separation=b)
  sampling = planning.SamplingPlan(scheme="cyclic", population_size=1000, batch_size=100)
  plan = planning.plan_run(privacy_unit="example", sampling=sampling, l2_clip_norm=1.0,
                           delta=DELTA, num_steps=k * b, noise_multiplier=2.0, noise=noise,
                           adaptive=AdaptiveClip(1.0, count_noise_stddev=3.0))
  sigma_eff = (2.0 ** -2 + k * (2 * 3.0) ** -2) ** -0.5
  assert plan.accounted_noise_multiplier == pytest.approx(sigma_eff)
  acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
  direct = acc.compose(dpa.GaussianDpEvent(sigma_eff)).get_epsilon(DELTA)
  assert plan.epsilon() == pytest.approx(direct, rel=2e-3)


def test_plan_round_trips_and_refuses_what_it_cannot_account():
  plan = _plan(1.1, 2.0)
  assert planning.PrivacyPlan.from_json(plan.to_json()) == plan
  noise = planning.NoisePlan(strategy="banded", planned_steps=20, sensitivity=1.0,
                             max_participations=2, min_separation=10, amplified=True)
  sampling = planning.SamplingPlan(scheme="cyclic_poisson", population_size=1000,
                                   sampling_prob=0.1, num_groups=10)
  with pytest.raises(ValueError, match="amplified banded"):
    planning.plan_run(privacy_unit="example", sampling=sampling, l2_clip_norm=1.0,
                      delta=DELTA, num_steps=20, noise_multiplier=1.0, noise=noise,
                      adaptive=AdaptiveClip(1.0, count_noise_stddev=3.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial=0.0), r"initial must be .*> 0"),
    (dict(initial=math.inf), r"initial must be"),
    (dict(initial=1.0, target_quantile=1.0), r"target_quantile must be in \(0, 1\)"),
    (dict(initial=1.0, target_quantile=-0.1), r"target_quantile must be in \(0, 1\)"),
    (dict(initial=1.0, learning_rate=0.0), r"learning_rate must be .*> 0"),
    (dict(initial=1.0, count_noise_stddev=-1.0), r"count_noise_stddev must be"),
])
def test_bad_options_name_the_option_and_range(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AdaptiveClip(**kwargs)
