"""examples/digits_nnx.py: examples/digits.py's JSON, plan and accuracy, with an NNX loop."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name):
  spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _run(name, capsys, *flags):
  _load(name).main(["--json", *flags])
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_json_has_the_keys_of_digits(capsys):
  # Non-private: a private run's calibration costs ~8 s of CPU (the slow tests run it).
  result = _run("digits_nnx", capsys, "--non-private", "--epochs", "0.5", "--seed", "0")
  digits = _load("digits")
  args = digits.build_parser("").parse_args(["--json"])
  keys = digits.report(args, epsilon=1.0, sigma=1.0, steps=1, lr=1.0, accuracy=1.0, n=1,
                       n_test=1, seconds=0.0)
  capsys.readouterr()
  assert set(result) == set(keys)
  assert result["epsilon"] is None and result["mechanism"] == "non-private"
  assert 0 < result["accuracy"] <= 1.0


@pytest.mark.slow
def test_same_plan_and_epsilon_as_digits(capsys):
  flags = ("--target-epsilon", "3", "--epochs", "0.5", "--seed", "0")
  nnx_result, linen_result = _run("digits_nnx", capsys, *flags), _run("digits", capsys, *flags)
  assert set(nnx_result) == set(linen_result)
  for key in ("epsilon", "delta", "noise_multiplier", "steps", "mechanism"):
    assert nnx_result[key] == linen_result[key], key  # one plan, one ε


@pytest.mark.slow
def test_accuracy_at_epsilon_3_mean_of_three_seeds(capsys):
  accuracies = [_run("digits_nnx", capsys, "--target-epsilon", "3", "--seed", str(seed))["accuracy"]
                for seed in (1, 2, 3)]
  assert np.mean(accuracies) >= 0.93, accuracies
