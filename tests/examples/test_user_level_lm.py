"""examples/user_level_lm.py runs end to end (tiny settings) for ULS and ELS."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
  spec = importlib.util.spec_from_file_location("user_level_lm_example",
                                                ROOT / "examples" / "user_level_lm.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_users_are_stdlib_modules_in_a_fixed_order():
  example = _load()
  paths = example.stdlib_modules()
  assert len(paths) >= 200 and paths == sorted(paths)
  assert not any("site-packages" in p.parts or "test" in p.parts for p in paths)
  train, held_out = example.load_users(64, 4)
  again, _ = example.load_users(64, 4)
  assert train.user_ids.tolist() == again.user_ids.tolist()
  assert not set(train.user_ids.tolist()) & set(held_out.user_ids.tolist())
  assert train.data["tokens"].shape[1:] == (4, example.SEQ_LEN + 1)


# ~20 s each on an idle 2-core CPU, nearly all of it XLA compiling the
# transformer's clipped step and noise: run with `-m slow`.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["uls", "els"])
def test_json_last_line(method, capsys):
  example = _load()
  example.main(["--method", method, "--max-users", "48", "--steps", "3",
                "--users-per-step", "6", "--examples-per-user", "4", "--target-epsilon", "4",
                "--seed", "0", "--json"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["method"] == method
  assert 0 < result["epsilon"] <= 4.0 and result["delta"] == 1e-5
  assert 0 < result["eval_loss"] < 1.2 * result["initial_eval_loss"]


@pytest.mark.slow
def test_federated_dp_ftrl_json_last_line(capsys):
  example = _load()
  example.main(["--method", "uls", "--strategy", "blt", "--max-users", "48", "--steps", "8",
                "--users-per-step", "6", "--examples-per-user", "4", "--target-epsilon", "4",
                "--seed", "0", "--json"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["strategy"] == "blt" and result["sampling_prob"] is None
  assert 3.9 < result["epsilon"] <= 4.0
  assert 0 < result["eval_loss"] < 1.2 * result["initial_eval_loss"]
