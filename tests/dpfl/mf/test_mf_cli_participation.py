"""``dpfl mf --participation fixed-epoch|min-sep``: numbers, accounting, bad combinations."""

import argparse
import json

import numpy as np
import pytest

import accounting as A
import dpfl.mf as mf
from accounting.matrix import PARTICIPATIONS, MatrixMechanism
from dpfl.mf import cli


def _run(*argv):
  parser = argparse.ArgumentParser()
  cli.add_arguments(parser)
  return cli.run(parser.parse_args(list(argv)))


def _pattern_brute(C, b):
  n = C.shape[1]
  return max(float(np.sum(C[:, r::b].sum(axis=1) ** 2)) for r in range(b))


def test_names_match_accounting():
  assert cli.PARTICIPATIONS == PARTICIPATIONS


def test_default_is_min_separation():
  default = _run("--strategy", "tree", "--steps", "24", "--participations", "8")
  explicit = _run("--strategy", "tree", "--steps", "24", "--participations", "8",
                  "--participation", "min-sep")
  assert default["participation"] == explicit["participation"] == "min-sep"
  assert default["sensitivity"] == explicit["sensitivity"]


def test_fixed_epoch_is_the_b_patterns():
  fixed = _run("--strategy", "tree", "--steps", "24", "--participations", "8",
               "--participation", "fixed-epoch")
  minsep = _run("--strategy", "tree", "--steps", "24", "--participations", "8")
  assert (fixed["epochs"], fixed["min_sep"], fixed["participation"]) == (8, 3, "fixed-epoch")
  C = mf.tree(24).matrix  # same C; sensitivity by brute force over the 3 patterns
  assert fixed["sensitivity"] ** 2 == pytest.approx(_pattern_brute(C, 3), rel=1e-12)
  assert fixed["sensitivity"] < minsep["sensitivity"]
  assert "fixed-epoch order" in cli.format_table(fixed)


def test_fixed_epoch_where_b_does_not_divide_n():
  result = _run("--strategy", "sqrt", "--steps", "100", "--min-sep", "30",
                "--participation", "fixed-epoch")
  assert (result["epochs"], result["min_sep"]) == (4, 30)
  C = mf.sqrt_toeplitz(100).matrix
  assert result["sensitivity"] ** 2 == pytest.approx(_pattern_brute(C, 30), rel=1e-12)
  by_k = _run("--strategy", "sqrt", "--steps", "10", "--participations", "3",
              "--participation", "fixed-epoch")
  assert (by_k["epochs"], by_k["min_sep"]) == (3, 4)


def test_epsilon_is_the_mechanism_with_the_pattern_recorded():
  result = _run("--strategy", "sqrt", "--steps", "64", "--participations", "4",
                "--participation", "fixed-epoch", "--noise-multiplier", "1.5",
                "--delta", "1e-6")
  assert result["plan"]["noise"]["participation"] == "fixed-epoch"
  mechanism = MatrixMechanism(1.5, result["sensitivity"], 64, "sqrt", 4, 16,
                              participation="fixed-epoch")
  assert result["epsilon"] == pytest.approx(A.epsilon(mechanism, delta=1e-6), rel=1e-12)
  assert result["noise_stddev"] == pytest.approx(1.5 * result["sensitivity"])
  json.dumps(result)


@pytest.mark.parametrize("argv,flag", [
    # n = 10: no period gives exactly 6 participations.
    (["--steps", "10", "--participations", "6"], "--participations"),
    (["--steps", "12", "--participations", "3", "--min-sep", "3"], "--participations"),
    (["--steps", "12", "--min-sep", "13"], "--min-sep"),
])
def test_bad_fixed_epoch_combinations(argv, flag):
  with pytest.raises(ValueError, match=flag):
    _run("--strategy", "sqrt", "--participation", "fixed-epoch", *argv)


@pytest.mark.parametrize("argv", [
    ["--strategy", "sqrt", "--steps", "10", "--participations", "6",
     "--participation", "fixed-epoch"],
    ["--strategy", "banded", "--steps", "64", "--participations", "4", "--bands", "17",
     "--participation", "fixed-epoch"],
    ["--strategy", "sqrt", "--steps", "8", "--participation", "fixed"],
])
def test_console_exit_2_with_one_line(argv, capsys):
  from dpfl import cli as console
  assert console.main(["mf", *argv]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and "--" in err[0] and "Traceback" not in captured.err


def test_namespace_without_parser_is_validated():
  with pytest.raises(ValueError, match="--participation must be one of"):
    cli.run(argparse.Namespace(strategy="sqrt", steps=8, participation="cyclic"))
