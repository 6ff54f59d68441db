"""The dpfl command line: numbers, JSON, start-up weight and every error path."""

import json
import os
import subprocess
import sys

import dp_accounting as dpa
import pytest
from dp_accounting import dp_event as dpe

from accounting import cli


def run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def last_json(out):
  return json.loads(out.strip().splitlines()[-1])


def _dpa(sigma, q, steps, delta, accountant="pld"):
  acc = dpa.pld.PLDAccountant() if accountant == "pld" else dpa.rdp.RdpAccountant()
  acc.compose(dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)),
                                      steps))
  return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_json_equals_dp_accounting(capsys, accountant):
  code, out, err = run(capsys, "epsilon", "--noise-multiplier", "1.1", "--sampling-prob", "0.01",
                       "--steps", "1000", "--delta", "1e-5", "--accountant", accountant, "--json")
  assert code == 0 and err == ""
  result = last_json(out)
  assert result["epsilon"] == _dpa(1.1, 0.01, 1000, 1e-5, accountant)
  assert result["delta"] == 1e-5 and result["accountant"] == accountant


def test_default_output_is_a_table(capsys):
  code, out, _ = run(capsys, "epsilon", "--noise-multiplier", "1.1", "--sampling-prob", "0.01",
                     "--steps", "1000", "--delta", "1e-5")
  assert code == 0
  assert "epsilon" in out and "{" not in out
  assert f"{_dpa(1.1, 0.01, 1000, 1e-5):.6g}" in out


def test_dataset_form_equals_rate_form(capsys):
  _, out, _ = run(capsys, "epsilon", "--noise-multiplier", "1.3", "--dataset-size", "60000",
                  "--batch-size", "150", "--epochs", "15", "--delta", "1e-5", "--accountant",
                  "rdp", "--json")
  result = last_json(out)
  assert result["steps"] == 6000 and result["sampling_prob"] == 0.0025
  assert result["epsilon"] == pytest.approx(0.7242234026, rel=1e-6)  # TF Privacy's vector


def test_uls_and_els(capsys):
  _, out, _ = run(capsys, "epsilon", "--noise-multiplier", "1.0", "--sampling-prob", "0.02",
                  "--steps", "300", "--delta", "1e-6", "--privacy-unit", "user",
                  "--sampling-unit", "user", "--json")
  uls = last_json(out)
  assert uls["epsilon"] == _dpa(1.0, 0.02, 300, 1e-6) and uls["privacy_unit"] == "user"
  _, out, _ = run(capsys, "epsilon", "--noise-multiplier", "1.0", "--sampling-prob", "0.02",
                  "--steps", "300", "--delta", "1e-6", "--privacy-unit", "user",
                  "--sampling-unit", "example", "--examples-per-user", "4", "--group-privacy",
                  "--json")
  els = last_json(out)
  assert els["examples_per_user"] == 4
  assert uls["epsilon"] < els["epsilon"] <= els["group_privacy_epsilon"]


def test_calibrate_json(capsys):
  code, out, _ = run(capsys, "calibrate", "--target-epsilon", "3", "--sampling-prob", "0.01",
                     "--steps", "1000", "--delta", "1e-5", "--json")
  assert code == 0
  result = last_json(out)
  assert result["epsilon"] <= 3.0
  assert _dpa(result["noise_multiplier"], 0.01, 1000, 1e-5) <= 3.0
  assert _dpa(result["noise_multiplier"] / 1.01, 0.01, 1000, 1e-5) > 3.0


def test_calibrate_steps_and_batch_size(capsys):
  _, out, _ = run(capsys, "calibrate", "--target-epsilon", "2", "--noise-multiplier", "1.0",
                  "--sampling-prob", "0.01", "--delta", "1e-5", "--json")
  steps = last_json(out)["steps"]
  assert _dpa(1.0, 0.01, steps, 1e-5) <= 2.0
  _, out, _ = run(capsys, "calibrate", "--target-epsilon", "2", "--noise-multiplier", "1.0",
                  "--dataset-size", "10000", "--steps", "500", "--delta", "1e-5", "--json")
  result = last_json(out)
  assert result["batch_size"] >= 1 and _dpa(1.0, result["batch_size"] / 10000, 500, 1e-5) <= 2.0


BASE = ["epsilon", "--noise-multiplier", "1", "--sampling-prob", "0.01", "--steps", "10",
        "--delta", "1e-5"]


def _replace(args, flag, value):
  args = list(args)
  args[args.index(flag) + 1] = value
  return args


@pytest.mark.parametrize("argv,flag", [
    (_replace(BASE, "--noise-multiplier", "0"), "--noise-multiplier"),
    (_replace(BASE, "--noise-multiplier", "-1"), "--noise-multiplier"),
    (_replace(BASE, "--sampling-prob", "0"), "--sampling-prob"),
    (_replace(BASE, "--sampling-prob", "1.5"), "--sampling-prob"),
    (_replace(BASE, "--delta", "0"), "--delta"),
    (_replace(BASE, "--delta", "1"), "--delta"),
    (_replace(BASE, "--steps", "0"), "--steps"),
    (_replace(BASE, "--steps", "ten"), "--steps"),
    (BASE + ["--privacy-unit", "user", "--sampling-unit", "example"], "--examples-per-user"),
    (BASE + ["--privacy-unit", "user", "--sampling-unit", "example", "--examples-per-user", "0"],
     "--examples-per-user"),
    (BASE + ["--examples-per-user", "3"], "--examples-per-user"),
    (BASE + ["--accountant", "moments"], "--accountant"),
    (BASE + ["--privacy-unit", "household"], "--privacy-unit"),
    (BASE + ["--privacy-unit", "example", "--sampling-unit", "user"], "--sampling-unit"),
    (BASE + ["--dataset-size", "100", "--batch-size", "10", "--epochs", "1"], "--sampling-prob"),
    (["epsilon", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "200",
      "--epochs", "1", "--delta", "1e-5"], "--batch-size"),
    (["epsilon", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10",
      "--epochs", "0", "--delta", "1e-5"], "--epochs"),
    (["epsilon", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "--sampling-prob"),
    (["epsilon", "--sampling-prob", "0.1", "--steps", "10", "--delta", "1e-5"], "--noise-multiplier"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-prob", "0.1", "--steps", "10"], "--delta"),
    (BASE + ["--privacy-unit", "user", "--sampling-unit", "example", "--examples-per-user", "2",
             "--accountant", "rdp"], "--accountant"),
    (["calibrate", "--sampling-prob", "0.1", "--steps", "10", "--delta", "1e-5"],
     "--target-epsilon"),
    (["calibrate", "--target-epsilon", "-1", "--sampling-prob", "0.1", "--steps", "10",
      "--delta", "1e-5"], "--target-epsilon"),
    (["calibrate", "--target-epsilon", "1", "--noise-multiplier", "1", "--sampling-prob", "0.1",
      "--steps", "10", "--delta", "1e-5"], "leave out exactly one"),
    (["frobnicate"], "frobnicate"),
    (_replace(BASE, "--steps", "1.5"), "integer in [1, 100000000]"),
    (_replace(BASE, "--noise-multiplier", "abc"), "> 0"),
    (_replace(BASE, "--noise-multiplier", "1e300"), "--noise-multiplier"),
    (_replace(BASE, "--delta", "-1e-5"), "(0, 1)"),
    (_replace(BASE, "--sampling-prob", "-0.5"), "(0, 1]"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-prob", "0.1", "--steps", "10"], "(0, 1)"),
    (BASE + ["--dataset-size", "100"], "--dataset-size"),
    # (ε = 0.01 became reachable, at q = 6.5e-6 — dp-accounting's PLD agrees — once
    # calibration's coarse stage stopped overshooting small targets.)
    (["calibrate", "--target-epsilon", "0.001", "--noise-multiplier", "0.5", "--steps", "1000",
      "--delta", "1e-5"], "--sampling-prob"),
    (["calibrate", "--target-epsilon", "0.01", "--noise-multiplier", "0.5",
      "--sampling-prob", "0.5", "--delta", "1e-5"], "--steps"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, flag):
  code, out, err = run(capsys, *argv)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert flag in lines[0] and "error" in lines[0]
  assert "Traceback" not in err


def test_integral_spellings_of_integers_are_accepted(capsys):
  code, out, _ = run(capsys, *_replace(BASE, "--steps", "1e1"), "--json")
  assert code == 0 and last_json(out)["steps"] == 10


def test_tiny_noise_answers_on_a_coarser_pessimistic_grid(capsys):
  # At Δ = 1e-4, σ = 1e-3 needs ~1e10 grid points (dp-accounting runs out of
  # memory); the floor on Δ keeps it finite, and the answer is exactly
  # dp-accounting's pessimistic PLD at the Δ reported.
  code, out, err = run(capsys, "epsilon", "--noise-multiplier", "1e-3", "--sampling-prob",
                       "0.01", "--steps", "3", "--delta", "1e-5", "--json")
  assert code == 0, err
  result = last_json(out)
  disc = result["discretization"]
  assert disc > 1e-4
  acc = dpa.pld.PLDAccountant(value_discretization_interval=disc)
  acc.compose(dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(0.01, dpe.GaussianDpEvent(1e-3)),
                                      3))
  assert result["epsilon"] == acc.get_epsilon(1e-5)


def test_console_script_and_light_start_up():
  env = dict(os.environ)
  # --help answers without importing dp-accounting (or jax).
  probe = ("import sys; from accounting import cli\n"
           "try:\n  cli.main(['--help'])\nexcept SystemExit:\n  pass\n"
           "assert 'dp_accounting' not in sys.modules and 'jax' not in sys.modules, "
           "sorted(m for m in sys.modules if m.startswith(('dp_acc', 'jax')))")
  subprocess.run([sys.executable, "-c", probe], check=True, env=env, capture_output=True)
  # Computing ε never imports jax.
  probe = ("import sys; from accounting import cli\n"
           "cli.main(['epsilon', '--noise-multiplier', '1', '--sampling-prob', '0.1', "
           "'--steps', '10', '--delta', '1e-5'])\n"
           "assert 'jax' not in sys.modules and 'optax' not in sys.modules")
  subprocess.run([sys.executable, "-c", probe], check=True, env=env, capture_output=True)
  # The installed console script.
  exe = os.path.join(os.path.dirname(sys.executable), "dpfl")
  proc = subprocess.run([exe, "epsilon", "--noise-multiplier", "1", "--sampling-prob", "0.1",
                         "--steps", "10", "--delta", "0", "--json"], capture_output=True,
                        text=True, env=env)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--delta" in proc.stderr


def test_a_reader_leaving_early_is_not_an_error():
  import subprocess
  import sys
  cmd = (f"{sys.executable} -m accounting.cli epsilon --noise-multiplier 1.1 "
         "--sampling-prob 0.01 --steps 1000 --delta 1e-5 | head -c 5")
  out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert "error" not in out.stderr and "Traceback" not in out.stderr


def test_els_calibrate_reports_the_grid_it_settled_on(capsys):
  import accounting
  code, out, err = run(capsys, "calibrate", "--target-epsilon", "4", "--sampling-prob", "0.01",
                       "--steps", "200", "--delta", "1e-6", "--privacy-unit", "user",
                       "--sampling-unit", "example", "--examples-per-user", "3", "--json")
  assert code == 0, err
  result = last_json(out)
  assert isinstance(result["discretization"], float)
  mechanism = accounting.ElsDpSgd(result["noise_multiplier"], 0.01, 200, 3)
  assert accounting.epsilon(mechanism, delta=1e-6,
                            discretization=result["discretization"]) == result["epsilon"]
  assert result["epsilon"] <= 4
