"""``dpfl mf --sampling cyclic-poisson``: amplified banded MF from the command line.

References: ``accounting.AmplifiedBandedMatrixMechanism`` called directly,
dp-accounting's PLD of DP-SGD over ``ceil(T / M)`` steps, dense linear
algebra for the losses, and ``make_private``'s own strategy and sampler.
"""

import argparse
import json
import math

import numpy as np
import pytest

from accounting import accountants
from accounting import plan as planning
from accounting.matrix import AmplifiedBandedMatrixMechanism
from dpfl import cli as console
from dpfl import ftrl
from dpfl.mf import cli

AMPLIFIED = ["--strategy", "banded", "--sampling", "cyclic-poisson"]


def _run(*argv):
  parser = argparse.ArgumentParser()
  cli.add_arguments(parser)
  return cli.run(parser.parse_args(list(argv)))


def _dpa_epsilon(sigma, q, steps, delta):
  import dp_accounting as dpa
  accountant = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
  accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
  return accountant.get_epsilon(delta)


def test_epsilon_is_the_amplified_banded_mechanisms():
  # 30 steps of 4 bands: each example sampled in at most ceil(30 / 4) = 8 steps.
  result = _run(*AMPLIFIED, "--bands", "4", "--sampling-prob", "0.2", "--steps", "30",
                "--noise-multiplier", "1", "--delta", "1e-5")
  direct = AmplifiedBandedMatrixMechanism(noise_multiplier=1.0, sampling_prob=0.2,
                                          num_steps=30, num_bands=4)
  assert result["epsilon"] == accountants.epsilon(direct, delta=1e-5)
  assert result["epsilon"] == pytest.approx(_dpa_epsilon(1.0, 0.2, 8, 1e-5), rel=5e-3)
  assert (result["epochs"], result["min_sep"], result["planned_steps"]) == (8, 4, 32)
  assert result["noise_multiplier"] == 1.0 and result["sampling_prob"] == 0.2
  plan = planning.PrivacyPlan.from_dict(result["plan"])
  assert plan.mechanism() == direct and plan.noise.amplified


def test_dataset_form_uses_make_privates_group_rate():
  # 1003 examples in 4 groups of 1003 // 4 = 250 (3 never sampled): q = 50 / 250.
  result = _run(*AMPLIFIED, "--bands", "4", "--dataset-size", "1003", "--batch-size", "50",
                "--steps", "30", "--noise-multiplier", "1", "--delta", "1e-5")
  assert result["sampling_prob"] == 50 / 250
  assert (result["dataset_size"], result["batch_size"]) == (1003, 50)
  direct = AmplifiedBandedMatrixMechanism(noise_multiplier=1.0, sampling_prob=0.2,
                                          num_steps=30, num_bands=4)
  assert result["epsilon"] == accountants.epsilon(direct, delta=1e-5)
  assert planning.PrivacyPlan.from_dict(result["plan"]).expected_batch_size == 50


def test_target_epsilon_calibrates_the_noise_multiplier():
  result = _run(*AMPLIFIED, "--bands", "8", "--sampling-prob", "0.05", "--steps", "200",
                "--target-epsilon", "2", "--delta", "1e-6")
  sigma = result["noise_multiplier"]

  def direct(s):
    return accountants.epsilon(AmplifiedBandedMatrixMechanism(
        noise_multiplier=s, sampling_prob=0.05, num_steps=200, num_bands=8), delta=1e-6)

  assert result["epsilon"] == direct(sigma) <= 2.0
  assert direct(sigma * 0.99) > 2.0  # and not needlessly large
  assert _dpa_epsilon(sigma, 0.05, 25, 1e-6) == pytest.approx(2.0, rel=1e-2)
  assert result["noise_stddev"] == pytest.approx(sigma * result["sensitivity"])
  assert "calibrated" in cli.format_table(result)


def test_losses_are_those_of_the_column_normalised_banded_c():
  import dpfl.mf as mf
  result = _run(*AMPLIFIED, "--bands", "4", "--sampling-prob", "0.2", "--steps", "30",
                "--noise-multiplier", "1", "--delta", "1e-5")
  # The strategy make_private builds: 8 * 4 = 32 planned steps under (8, 4).
  strategy = mf.optimize_banded(32, bands=4, participation=(8, 4), objective="mean")
  C = strategy.matrix
  assert np.allclose(np.triu(C, 1), 0) and np.allclose(np.tril(C, -4), 0)
  column_norm = np.linalg.norm(C, axis=0).max()
  assert column_norm == pytest.approx(1.0, rel=1e-9)
  B = np.tril(np.ones((32, 32))) @ np.linalg.inv(C)  # prefix sums A, B = A C^{-1}
  rows = np.sum(B ** 2, axis=1)
  assert result["sensitivity"] == pytest.approx(column_norm, rel=1e-12)
  assert result["max_loss"] == pytest.approx(column_norm ** 2 * rows.max(), rel=1e-9)
  assert result["mean_loss"] == pytest.approx(column_norm ** 2 * rows.mean(), rel=1e-9)


def test_the_strategy_and_rate_are_make_privates():
  import jax.numpy as jnp
  import optax

  import dpfl
  args = dict(bands=4, dataset_size=1003, batch_size=50, steps=30)
  result = _run(*AMPLIFIED, "--bands", "4", "--dataset-size", "1003", "--batch-size", "50",
                "--steps", "30", "--noise-multiplier", "1", "--delta", "1e-5")
  pt = dpfl.make_private(lambda p, b: jnp.sum(p * b), optax.sgd(0.1), l2_clip_norm=1.0,
                         dataset_size=args["dataset_size"], batch_size=args["batch_size"],
                         num_steps=args["steps"], noise_multiplier=1.0, delta=1e-5,
                         strategy="banded", sampling_scheme="poisson",
                         strategy_options={"bands": args["bands"]}, key=0, seed=0)
  noise = result["plan"]["noise"]
  assert noise["fingerprint"] == pt.plan.noise.fingerprint  # the very same C
  assert noise["sensitivity"] == pt.plan.noise.sensitivity
  assert result["sampling_prob"] == pt.sampler.sampling_prob
  assert result["epsilon"] == pt.plan.epsilon()


def test_default_bands_are_make_privates():
  result = _run(*AMPLIFIED, "--sampling-prob", "0.2", "--steps", "30",
                "--noise-multiplier", "1", "--delta", "1e-5")
  assert result["bands"] == ftrl.bands_for({}, limit=30, why="") == 16
  assert (result["epochs"], result["planned_steps"]) == (2, 32)
  parser = argparse.ArgumentParser()
  cli.add_arguments(parser)  # --help states the default without importing dpfl.ftrl
  help_text = " ".join(parser.format_help().split())
  assert f"min({ftrl.DEFAULT_BANDS}, T), as make_private" in help_text


def test_console_json_has_dpfl_mfs_keys(capsys):
  assert console.main(["mf", "--strategy", "banded", "--steps", "16", "--bands", "4",
                       "--noise-multiplier", "1", "--delta", "1e-5", "--json"]) == 0
  cyclic = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert console.main(["mf", *AMPLIFIED, "--bands", "4", "--sampling-prob", "0.2", "--steps",
                       "30", "--noise-multiplier", "1", "--delta", "1e-5", "--json"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  amplified = json.loads(out[-1])
  assert set(cyclic) <= set(amplified)
  assert amplified["sampling"] == "cyclic-poisson" and amplified["strategy"] == "banded"
  assert console.main(["mf", *AMPLIFIED, "--bands", "4", "--sampling-prob", "0.2", "--steps",
                       "30", "--noise-multiplier", "1", "--delta", "1e-5"]) == 0
  table = capsys.readouterr().out
  assert "amplified banded" in table and "epsilon" in table


@pytest.mark.parametrize("argv,flags", [
    (AMPLIFIED + ["--bands", "9", "--steps", "8", "--sampling-prob", "0.1"],
     ["--bands", "[1, 8]"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8", "--dataset-size", "3", "--batch-size", "1"],
     ["--bands", "[1, 3]", "--dataset-size"]),
    (AMPLIFIED + ["--bands", "40", "--steps", "80", "--dataset-size", "30",
                  "--batch-size", "1"], ["--bands", "[1, 30]", "--dataset-size"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8", "--sampling-prob", "0.1",
                  "--dataset-size", "100"], ["--sampling-prob", "--dataset-size"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8", "--sampling-prob", "0.1",
                  "--batch-size", "10"], ["--sampling-prob", "--batch-size"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8", "--dataset-size", "101",
                  "--batch-size", "26"], ["--batch-size", "[1, --dataset-size // --bands = 25]"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8", "--dataset-size", "100"], ["--batch-size"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8", "--batch-size", "10"], ["--dataset-size"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8"], ["--sampling-prob", "--dataset-size"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8", "--sampling-prob", "0"],
     ["--sampling-prob", "(0, 1]"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "8", "--sampling-prob", "1.5"],
     ["--sampling-prob", "(0, 1]"]),
    (AMPLIFIED + ["--bands", "0", "--steps", "8", "--sampling-prob", "0.1"], ["--bands"]),
    (AMPLIFIED + ["--bands", "4", "--steps", "0", "--sampling-prob", "0.1"], ["--steps"]),
    (["--strategy", "blt", "--sampling", "cyclic-poisson", "--steps", "8",
      "--sampling-prob", "0.1"], ["--strategy banded", "blt"]),
    (AMPLIFIED + ["--bands", "2", "--steps", "8", "--sampling-prob", "0.1",
                  "--participations", "2"], ["--participations"]),
    (AMPLIFIED + ["--bands", "2", "--steps", "8", "--sampling-prob", "0.1",
                  "--min-sep", "4"], ["--min-sep"]),
    (AMPLIFIED + ["--bands", "2", "--steps", "8", "--sampling-prob", "0.1",
                  "--buffers", "2"], ["--buffers"]),
    (["--strategy", "banded", "--steps", "8", "--sampling-prob", "0.1"],
     ["--sampling-prob", "--sampling cyclic-poisson"]),
    (["--strategy", "banded", "--steps", "8", "--sampling", "cyclic", "--dataset-size", "10",
      "--batch-size", "2"], ["--dataset-size", "--sampling cyclic-poisson"]),
])
def test_bad_combinations_exit_2_with_one_line(argv, flags, capsys):
  privacy = [] if "--noise-multiplier" in argv else ["--noise-multiplier", "1", "--delta",
                                                     "1e-5"]
  assert console.main(["mf", *argv, *privacy]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and "Traceback" not in captured.err, captured.err
  for flag in flags:
    assert flag in err[0], err[0]


@pytest.mark.parametrize("privacy,flag", [
    ([], "--noise-multiplier"),
    (["--noise-multiplier", "1"], "--delta"),
    (["--target-epsilon", "2"], "--delta"),
    (["--delta", "1e-5"], "--target-epsilon"),
    (["--noise-multiplier", "-1", "--delta", "1e-5"], "--noise-multiplier"),
    (["--noise-multiplier", "1", "--delta", "2"], "--delta"),
])
def test_missing_or_bad_privacy_flags_exit_2(privacy, flag, capsys):
  argv = ["mf", *AMPLIFIED, "--bands", "4", "--steps", "8", "--sampling-prob", "0.1", *privacy]
  assert console.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and flag in err[0], err


def test_cyclic_poisson_rate_is_one_decision():
  assert ftrl.cyclic_poisson_rate(dataset_size=1003, batch_size=50, bands=4) == 50 / 250
  assert ftrl.cyclic_poisson_rate(dataset_size=4, batch_size=1, bands=4) == 1.0
  with pytest.raises(ValueError, match=r"bands must be in \[1, dataset_size = 3\]"):
    ftrl.cyclic_poisson_rate(dataset_size=3, batch_size=1, bands=4)
  with pytest.raises(ValueError, match=r"batch_size must be in \[1, dataset_size // bands = 25\]"):
    ftrl.cyclic_poisson_rate(dataset_size=101, batch_size=26, bands=4)


def test_a_cyclic_poisson_plan_needs_only_the_rate_and_groups():
  """``dpfl mf --sampling-prob`` plans without N; the expected batch then needs N."""
  sampling = planning.SamplingPlan(scheme="cyclic_poisson", sampling_prob=0.1, num_groups=4)
  assert sampling.participation(10) == (math.ceil(10 / 4), 4)
  with pytest.raises(ValueError, match="population_size"):
    sampling.expected_batch_size
  with pytest.raises(ValueError, match="num_groups"):
    planning.SamplingPlan(scheme="cyclic_poisson", sampling_prob=0.1, num_groups=4,
                          population_size=3)
  with pytest.raises(ValueError, match="sampling_prob"):
    planning.SamplingPlan(scheme="cyclic_poisson", num_groups=4)
