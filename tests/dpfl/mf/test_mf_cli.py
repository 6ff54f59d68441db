"""The ``dpfl mf`` logic: flags in, numbers out, flag-naming errors."""

import argparse
import json
import subprocess
import sys

import pytest

import dpfl.mf as mf
from dpfl.mf import cli


def _run(*argv):
  parser = argparse.ArgumentParser()
  cli.add_arguments(parser)
  return cli.run(parser.parse_args(list(argv)))


def test_identity_numbers_and_keys():
  result = _run("--strategy", "identity", "--steps", "100")
  assert result["max_loss"] == pytest.approx(100)
  assert result["mean_loss"] == pytest.approx(50.5)
  assert result["sensitivity"] == 1.0
  for key in ("sensitivity", "max_loss", "mean_loss", "seconds", "strategy", "steps", "epochs",
              "min_sep", "bands", "buffers", "objective"):
    assert key in result
  json.dumps(result)
  table = cli.format_table(result)
  assert "identity" in table and "mean_loss" in table and "50.5" in table


def test_epochs_and_min_sep_define_the_same_participation():
  by_epochs = _run("--strategy", "sqrt", "--steps", "64", "--participations", "4")
  by_sep = _run("--strategy", "sqrt", "--steps", "64", "--min-sep", "16")
  assert (by_epochs["epochs"], by_epochs["min_sep"]) == (by_sep["epochs"], by_sep["min_sep"]) == (4, 16)
  assert by_epochs["sensitivity"] == by_sep["sensitivity"]
  assert by_epochs["sensitivity"] == pytest.approx(
      mf.sqrt_toeplitz(64, participation=(4, 16)).sensitivity)


def test_optimized_strategies_report_what_the_library_computes():
  result = _run("--strategy", "blt", "--steps", "128", "--buffers", "2", "--objective", "max")
  direct = mf.optimize_blt(128, buffers=2, objective="max")
  assert result["max_loss"] == pytest.approx(direct.max_loss, rel=1e-9)
  assert result["buffers"] == 2 and result["bands"] is None
  result = _run("--strategy", "banded", "--steps", "64", "--participations", "2")
  assert result["bands"] == 32  # default min(32, b)
  assert result["sensitivity"] == pytest.approx(2 ** 0.5)
  assert "bands" in cli.format_table(result)


@pytest.mark.parametrize("argv,flag", [
    (["--strategy", "banded", "--steps", "64", "--participations", "4", "--bands", "17"], "--bands"),
    (["--strategy", "banded", "--steps", "64", "--bands", "0"], "--bands"),
    (["--strategy", "blt", "--steps", "64", "--buffers", "0"], "--buffers"),
    (["--strategy", "sqrt", "--steps", "0"], "--steps"),
    (["--strategy", "sqrt", "--steps", "10", "--participations", "3"], "--participations"),
    (["--strategy", "sqrt", "--steps", "10", "--min-sep", "4"], "--min-sep"),
    (["--strategy", "sqrt", "--steps", "12", "--participations", "3", "--min-sep", "3"], "--participations"),
    (["--strategy", "sqrt", "--steps", "12", "--bands", "3"], "--bands"),
    (["--strategy", "tree", "--steps", "12", "--buffers", "3"], "--buffers"),
    (["--strategy", "tree", "--steps", "100000"], "--steps"),
])
def test_bad_flags_name_the_flag(argv, flag):
  with pytest.raises(ValueError, match=flag):
    _run(*argv)


def test_default_objective_is_jax_privacys():
  # BLT minimizes max loss unless told otherwise (jax-privacy's
  # buffered_toeplitz.optimize default); banded and dense the mean loss.
  from dpfl.mf import _checks
  assert cli.DEFAULT_OBJECTIVE == _checks.DEFAULT_OBJECTIVE
  assert cli.OBJECTIVES == _checks.OBJECTIVES
  blt = _run("--strategy", "blt", "--steps", "64", "--buffers", "2")
  assert blt["objective"] == "max"
  assert blt["max_loss"] == pytest.approx(mf.optimize_blt(64, buffers=2).max_loss, rel=1e-9)
  assert mf.optimize_blt(64, buffers=2).max_loss == pytest.approx(
      mf.optimize_blt(64, buffers=2, objective="max").max_loss, rel=1e-12)
  mean_blt = _run("--strategy", "blt", "--steps", "64", "--buffers", "2", "--objective", "mean")
  assert blt["max_loss"] < mean_blt["max_loss"] and mean_blt["mean_loss"] < blt["mean_loss"]
  assert mf.build("blt", 64, buffers=2).max_loss == pytest.approx(blt["max_loss"], rel=1e-9)
  for name, extra in (("banded", ["--bands", "4"]), ("dense", [])):
    assert _run("--strategy", name, "--steps", "32", *extra)["objective"] == "mean"


def test_epsilon_of_the_run_is_one_gaussian_mechanism():
  # Independent reference: dp-accounting's exact Gaussian ε (Balle & Wang
  # 2018) at the noise multiplier; the PLD answer is pessimistic and close.
  import dp_accounting as dpa
  result = _run("--strategy", "sqrt", "--steps", "256", "--participations", "4",
                "--noise-multiplier", "1.5", "--delta", "1e-6")
  exact = dpa.get_epsilon_gaussian(1.5, 1e-6)
  assert exact <= result["epsilon"] <= exact * 1.005
  assert result["noise_multiplier"] == 1.5 and result["delta"] == 1e-6
  assert result["noise_stddev"] == pytest.approx(1.5 * result["sensitivity"])
  assert "epsilon" in cli.format_table(result)
  json.dumps(result)
  # The strategy changes the noise per step, not ε at a given noise multiplier.
  blt = _run("--strategy", "blt", "--steps", "256", "--participations", "4", "--buffers", "2",
             "--noise-multiplier", "1.5", "--delta", "1e-6")
  assert blt["epsilon"] == pytest.approx(result["epsilon"], rel=1e-12)


def test_target_epsilon_calibrates_the_noise_multiplier():
  import dp_accounting as dpa
  result = _run("--strategy", "identity", "--steps", "100", "--participations", "4",
                "--target-epsilon", "3", "--delta", "1e-5")
  assert result["epsilon"] <= 3.0
  exact_sigma = dpa.get_sigma_gaussian(3.0, 1e-5)
  assert exact_sigma <= result["noise_multiplier"] <= exact_sigma * 1.01
  assert result["noise_stddev"] == pytest.approx(2.0 * result["noise_multiplier"])  # sens = sqrt(4)
  assert "calibrated" in cli.format_table(result)


@pytest.mark.parametrize("extra,flag", [
    (["--delta", "1e-5"], "--delta"),
    (["--noise-multiplier", "1"], "--delta"),
    (["--target-epsilon", "2"], "--delta"),
    (["--noise-multiplier", "-1", "--delta", "1e-5"], "--noise-multiplier"),
    (["--noise-multiplier", "inf", "--delta", "1e-5"], "--noise-multiplier"),
    (["--noise-multiplier", "1e300", "--delta", "1e-5"], "--noise-multiplier"),
    (["--target-epsilon", "0", "--delta", "1e-5"], "--target-epsilon"),
    (["--noise-multiplier", "1", "--delta", "1"], "--delta"),
])
def test_bad_privacy_flags_name_the_flag(extra, flag):
  with pytest.raises(ValueError, match=flag):
    _run("--strategy", "sqrt", "--steps", "16", *extra)


def test_noise_multiplier_and_target_epsilon_exclude_each_other(capsys):
  """Exclusive in the parser (so `--help` shows it) and in `run` (a Namespace built by hand)."""
  from dpfl import cli as console
  assert console.main(["mf", "--strategy", "sqrt", "--steps", "16", "--noise-multiplier", "1",
                       "--target-epsilon", "2", "--delta", "1e-5"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--target-epsilon" in err[0] and "--noise-multiplier" in err[0]
  args = argparse.Namespace(strategy="sqrt", steps=16, noise_multiplier=1.0, target_epsilon=2.0,
                            delta=1e-5)
  with pytest.raises(ValueError, match="--target-epsilon"):
    cli.run(args)


def test_namespace_without_parser_is_validated():
  with pytest.raises(ValueError, match="--strategy"):
    cli.run(argparse.Namespace(strategy="svd", steps=8))
  with pytest.raises(ValueError, match="--objective"):
    cli.run(argparse.Namespace(strategy="blt", steps=8, objective="median"))


def test_module_imports_no_numerics():
  # The command's module must not pull numpy/scipy/jax by itself (dpfl's own
  # package __init__ is another module's business, so import the file directly).
  code = ("import importlib.util, sys; "
          f"spec = importlib.util.spec_from_file_location('mfcli', {cli.__file__!r}); "
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
          "print(sorted(x for x in ('numpy', 'scipy', 'jax') if x in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [
    ["--strategy", "sqrt", "--steps", "0"],
    ["--strategy", "svd", "--steps", "8"],
    ["--strategy", "sqrt", "--steps", "1.5"],
    ["--strategy", "sqrt", "--steps", "8", "--participations", "3"],
    ["--strategy", "banded", "--steps", "8", "--bands", "9"],
    ["--strategy", "blt", "--steps", "8", "--buffers", "0"],
    ["--strategy", "sqrt", "--steps", "8", "--noise-multiplier", "abc", "--delta", "1e-5"],
    ["--strategy", "sqrt", "--steps", "8", "--noise-multiplier", "1", "--delta", "-1e-5"],
    ["--strategy", "sqrt", "--steps", "8", "--delta", "1e-5"],
    ["--steps", "8"],
])
def test_console_bad_flags_exit_2_with_one_line(argv, capsys):
  from dpfl import cli as console
  assert console.main(["mf", *argv]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and "--" in err[0] and "Traceback" not in captured.err


def test_console_json_last_line(capsys):
  from dpfl import cli as console
  assert console.main(["mf", "--strategy", "sqrt", "--steps", "64", "--participations", "2",
                       "--noise-multiplier", "2", "--delta", "1e-6", "--json"]) == 0
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {"sensitivity", "max_loss", "mean_loss", "seconds", "epsilon"} <= set(last)


def test_epochs_is_a_deprecated_alias_of_participations(capsys):
  """mf's --epochs (participations, not `dpfl epsilon`'s passes) is now --participations."""
  new = _run("--strategy", "sqrt", "--steps", "64", "--participations", "4")
  old = _run("--strategy", "sqrt", "--steps", "64", "--epochs", "4")
  assert (new["epochs"], new["min_sep"]) == (old["epochs"], old["min_sep"]) == (4, 16)
  assert new["sensitivity"] == old["sensitivity"]
  from dpfl import cli as console
  assert console.main(["mf", "--strategy", "sqrt", "--steps", "64", "--participations", "2",
                       "--epochs", "2"]) == 2
  assert "not allowed" in capsys.readouterr().err


def test_the_reported_epsilon_is_the_plans():
  """dpfl mf plans its run (accounting.plan): ε and σ are the plan's, the plan is in the JSON."""
  from accounting import plan as planning
  for extra in (["--noise-multiplier", "1.5"], ["--target-epsilon", "3"]):
    result = _run("--strategy", "sqrt", "--steps", "16", "--participations", "4", "--delta",
                 "1e-5", *extra)
    plan = planning.PrivacyPlan.from_dict(result["plan"])
    assert plan.noise_multiplier == result["noise_multiplier"]
    assert plan.noise.sensitivity == result["sensitivity"]
    assert (plan.noise.max_participations, plan.noise.min_separation) == (4, 4)
    assert plan.epsilon() == result["epsilon"]
    json.dumps(result)  # the --json line
