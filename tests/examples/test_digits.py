"""examples/digits.py runs end to end and reports what the issue promises."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
  spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_private_run_json_last_line(capsys):
  digits = _load()
  digits.main(["--target-epsilon", "3", "--epochs", "3", "--json", "--seed", "0"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {"epsilon", "delta", "accuracy"} <= set(result)
  assert 0 < result["epsilon"] <= 3.0 and result["delta"] == 1e-5
  assert 0.5 < result["accuracy"] <= 1.0  # 3 epochs already beats chance (0.1) by far


def test_non_private_baseline(capsys):
  digits = _load()
  digits.main(["--non-private", "--epochs", "3", "--json", "--seed", "0"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["epsilon"] is None and result["accuracy"] > 0.8


@pytest.mark.parametrize("flags", [["--strategy", "blt"],
                                   ["--strategy", "banded", "--bands", "4",
                                    "--sampling", "poisson"]])
def test_dp_ftrl_run(capsys, flags):
  digits = _load()
  digits.main(["--target-epsilon", "3", "--epochs", "3", "--json", "--seed", "0", *flags])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["mechanism"] == f"dp-ftrl-{flags[1]}"
  assert 2.9 < result["epsilon"] <= 3.0
  assert 0.3 < result["accuracy"] <= 1.0
