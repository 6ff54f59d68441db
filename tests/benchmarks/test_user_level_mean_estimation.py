"""benchmarks/user_level_mean_estimation.py: the ELS vs ULS study (issue 4, item 5).

References are independent of the module: a per-unit loop for the clipped
step, the closed-form empirical mean, dp-accounting's ε through
``accounting.epsilon`` on the mechanism each row claims, and a brute-force
first-order condition for the clipped estimator.
"""

import contextlib
import importlib.util
import io
import json
import math
import pathlib
import sys

import numpy as np
import pytest

import accounting

ROOT = pathlib.Path(__file__).resolve().parents[2]
DELTA = 1e-6


def _load():
  name = "user_level_mean_estimation_benchmark"
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(
      name, ROOT / "benchmarks" / "user_level_mean_estimation.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _load()


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
  """One end-to-end run of main() on a tiny grid: (JSON summary, plot path)."""
  plot = tmp_path_factory.mktemp("plot") / "study.png"
  argv = ["--json", "--plot", str(plot), "--no-sweeps", "--workers", "1",
          "--num-users", "60", "--dim", "8", "--epsilons", "2,8",
          "--examples-per-user", "1,3", "--sampling-probs", "1,0.25",
          "--compute-per-user", "8", "--tune-seeds", "1", "--eval-seeds", "2"]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    bench.main(argv)
  return json.loads(out.getvalue().strip().splitlines()[-1]), plot


def test_rows_are_complete_and_sane(tiny_run):
  summary, plot = tiny_run
  rows = summary["rows"]
  assert plot.exists() and plot.stat().st_size > 10_000
  cells = {(r["method"], r["epsilon"], r["k"]) for r in rows}
  assert cells == {(m, e, k) for m in ("ELS", "ULS") for e in (2.0, 8.0) for k in (1, 3)}
  assert len(rows) == len(cells)
  for r in rows:
    assert {"method", "epsilon", "k", "error"} <= set(r)
    assert isinstance(r["k"], int) and isinstance(r["epsilon"], float)
    assert math.isfinite(r["error"]) and r["error"] > 0
    # DP can only add error to the same data: no cell beats the empirical
    # mean by more than the sampling noise of 2 eval seeds (a loose 0.3x).
    assert r["error"] > 0.3 * r["non_private_error"]
    # Compute is fixed: q·N·k·T is the budget G = 8·N for every cell.
    assert r["sampling_prob"] * 60 * r["k"] * r["num_steps"] == pytest.approx(8 * 60)


def test_calibrated_noise_meets_epsilon(bench, tiny_run):
  """Each row's σ gives ε <= target for the mechanism it ran, and is not loose."""
  for r in tiny_run[0]["rows"]:
    mech = bench.mechanism(r["method"], r["noise_multiplier"], r["sampling_prob"],
                           r["num_steps"], r["k"])
    if r["method"] == "ELS":  # q = 1 included: ElsDpSgd handles it, no workaround
      assert isinstance(mech, accounting.ElsDpSgd) and mech.examples_per_user == r["k"]
    eps = accounting.epsilon(mech, delta=DELTA)
    assert eps <= r["epsilon"]
    looser = bench.mechanism(r["method"], 0.97 * r["noise_multiplier"], r["sampling_prob"],
                             r["num_steps"], r["k"])
    assert accounting.epsilon(looser, delta=DELTA) > r["epsilon"]


@pytest.mark.parametrize("sigma,k", [(40.0, 4), (1.25, 4)])
def test_els_full_batch_is_the_gaussian_with_sensitivity_k(bench, sigma, k):
  """ELS at q = 1 is accounted by ElsDpSgd as the Gaussian with sensitivity k·C.

  σ = 1.25, k = 4 is where dp-accounting's mixture PLD used to fail on the
  point mass (the benchmark once worked around it). The reference is
  dp-accounting's own Gaussian PLD at noise multiplier σ/k, composed T times.
  """
  from dp_accounting.pld import pld_privacy_accountant
  from dp_accounting import dp_event
  steps = 4
  mech = bench.mechanism("ELS", sigma, 1.0, steps, k)
  assert isinstance(mech, accounting.ElsDpSgd)
  reference = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  reference.compose(dp_event.GaussianDpEvent(sigma / k), steps)
  expected = reference.get_epsilon(DELTA)
  assert accounting.epsilon(mech, delta=DELTA) == pytest.approx(expected, rel=5e-3)


def test_units_and_exact_mean_without_clipping_or_noise(bench):
  examples, true_mean = bench.make_population(num_users=40, examples_per_user=5, dim=6,
                                              mean_norm=1.0, spread=1.0, diversity=0.5, seed=3)
  assert examples.shape == (40, 5, 6) and np.linalg.norm(true_mean) == pytest.approx(1.0)
  empirical = examples.mean(axis=(0, 1))
  for method in ("ELS", "ULS"):
    units = bench.clipping_units(method, examples)
    assert units.shape == ((200, 6) if method == "ELS" else (40, 6))
    # One full-batch step with η = 1, no clipping, no noise lands on the mean.
    last, avg = bench.private_sgd(units, sampling_prob=1.0, num_steps=1,
                                  clip_norms=np.array([1e6]), learning_rates=np.array([1.0]),
                                  noise_multipliers=np.array([0.0]),
                                  rng=np.random.default_rng(0))
    np.testing.assert_allclose(last[0], empirical, atol=1e-10)
    np.testing.assert_allclose(avg[0], empirical, atol=1e-10)


def test_one_step_equals_a_per_unit_loop(bench):
  rng = np.random.default_rng(11)
  units = rng.standard_normal((30, 5)) + 2.0
  clips, lrs, sigmas = np.array([0.3, 1.0, 50.0]), np.array([0.5, 1.0, 0.2]), np.array(
      [0.0, 1.5, 3.0])
  q = 0.4
  last, _ = bench.private_sgd(units, sampling_prob=q, num_steps=1, clip_norms=clips,
                              learning_rates=lrs, noise_multipliers=sigmas,
                              rng=np.random.default_rng(8))
  draws = np.random.default_rng(8)  # the documented order: mask, then noise
  mask = draws.random(30) < q
  noise = draws.standard_normal((3, 5))
  # Poisson sampling: the sum is divided by the *expected* count (dividing by
  # the realised count would leak it); this seed draws 17, not 12.
  assert mask.sum() != q * 30
  for m in range(3):
    total = np.zeros(5)
    for x in units[mask]:
      g = np.zeros(5) - x
      total += g * min(1.0, clips[m] / np.linalg.norm(g))
    expected = -lrs[m] * (total + sigmas[m] * clips[m] * noise[m]) / (q * 30)
    np.testing.assert_allclose(last[m], expected, rtol=1e-9, atol=1e-12)


def test_noiseless_estimators_reach_the_clipped_centre(bench):
  """σ = 0, full batch: the iterate solves Σ_u clip(θ − x_u, C) = 0 (brute force)."""
  examples, _ = bench.make_population(num_users=50, examples_per_user=4, dim=6, mean_norm=1.0,
                                      spread=1.0, diversity=0.7, seed=4)
  for method in ("ELS", "ULS"):
    units = bench.clipping_units(method, examples)
    last, _ = bench.private_sgd(units, sampling_prob=1.0, num_steps=400,
                                clip_norms=np.array([0.2]), learning_rates=np.array([1.0]),
                                noise_multipliers=np.array([0.0]),
                                rng=np.random.default_rng(0))
    grads = last[0] - units
    clipped = grads * np.minimum(1.0, 0.2 / np.linalg.norm(grads, axis=1))[:, None]
    assert np.linalg.norm(clipped.mean(axis=0)) < 1e-6
    # The clipped centre of symmetric data stays near the empirical mean.
    assert np.sum((last[0] - units.mean(axis=0)) ** 2) < 0.05


def test_without_noise_errors_fall_to_the_statistical_floor(bench):
  """With σ = 0 in place of the calibrated σ, both methods' tuned errors are the
  empirical mean's (sampling + clipping bias only); the DP rows are worse."""
  config = bench.StudyConfig(num_users=80, dim=16, epsilons=(1.0,), examples_per_user=(4,),
                             sampling_probs=(1.0, 0.25), clip_norms=(0.25, 1.0, 4.0),
                             learning_rates=(0.25, 1.0), compute_per_user=16,
                             tune_seeds=(0,), eval_seeds=(1, 2, 3))
  keys = bench.accounting_keys(config)
  noiseless = bench.run_study([config], {key: 0.0 for key in keys})[0]
  private = bench.run_study([config], bench.calibrate_all(keys, workers=1))[0]
  for rows in (noiseless, private):
    assert {r["method"] for r in rows} == {"ELS", "ULS"}
  for r in noiseless:
    assert r["error"] < 1.5 * r["non_private_error"], r
  for r, p in zip(noiseless, private):
    assert (r["method"], r["k"]) == (p["method"], p["k"])
    assert p["error"] > 2 * r["error"], (r, p)  # ε = 1 noise dominates at d/N = 0.2
