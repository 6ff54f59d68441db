"""The compute-optimal planner (dpfl.scaling.planner) and `dpfl plan`."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl import cli
from dpfl.scaling import fit, planner, sigma_grid

SEQ = 64


def make_law():
  """A hand-written law (no fitting): bigger models have lower E but need more steps;
  more noise per example (σ/B) slows training."""
  models = []
  for name, params, e in (("tiny", 50_000, 2.2), ("small", 400_000, 1.8), ("mid", 3_000_000, 1.5)):
    curves = []
    for ratio in (0.0, 1e-3, 1e-2, 1e-1):
      m = -0.45 + 1.5 * ratio ** 0.5
      b = 1.6 + 0.15 * math.log(params / 5e4) + 8 * ratio ** 0.5
      curves.append({"noise_batch_ratio": ratio, "m": m, "b": b, "steps_range": [10, 20000],
                     "points": 30, "rmse": 0.0})
    models.append({"model": name, "params": params, "E": e, "E_source": "non-private",
                   "runs": 8, "curves": curves})
  return {"format": fit.LAW_FORMAT, "version": fit.LAW_VERSION, "form": fit.FORM,
          "placeholder": False, "description": "test law", "loss": "eval_loss",
          "seq_len": SEQ, "max_loss": 5.6, "models": models}


LAW = make_law()


def plan(**kw):
  args = dict(compute=1e14, epsilon=4.0, delta=1e-6, users=100_000, law=LAW)
  args.update(kw)
  return planner.plan(**args)


def flops(cfg, seq=SEQ):
  return 6 * cfg["params"] * cfg["batch_size"] * cfg["steps"] * seq


def test_plan_respects_budget_and_reports_consistent_fields():
  for compute in (3e11, 1e13, 1e15):
    p = plan(compute=compute)
    for cfg in [p, p["smallest_compute_within_1pct"], *p["configs_within_2pct"]]:
      assert flops(cfg) <= compute * (1 + 1e-12)
      assert cfg["compute"] == pytest.approx(flops(cfg))
      assert cfg["noise_batch_ratio"] == pytest.approx(cfg["noise_multiplier"] / cfg["batch_size"])
      assert cfg["sampling_prob"] == pytest.approx(cfg["batch_size"] / 100_000)
      assert cfg["predicted_loss"] == pytest.approx(
          float(fit.predict(LAW, cfg["params"], cfg["steps"], cfg["noise_batch_ratio"])))
      q = max(cfg["sampling_prob"], sigma_grid.load_grid()["axes"]["sampling_prob"][0])
      sigma = sigma_grid.noise_multiplier(4.0, cfg["steps"], q, 1e-6)
      assert cfg["noise_multiplier"] == pytest.approx(float(sigma))


def test_plan_is_the_argmin_of_a_brute_force_enumeration():
  compute = 2e13
  p = plan(compute=compute)
  table = sigma_grid._as_table(None)
  best = math.inf
  ladder = planner.steps_ladder(int(table.steps[0]), min(int(table.steps[-1]), p["max_steps"]))
  for name, params in fit.model_params(LAW).items():
    for batch in range(1, 100_001):
      if batch not in (100_000, *(2 ** k for k in range(17))):
        continue
      steps = ladder[6.0 * params * batch * ladder.astype(float) * SEQ <= compute]
      if len(steps) == 0:
        continue
      q = max(batch / 100_000, table.q[0])
      sigma = sigma_grid.noise_multiplier(4.0, steps, q, 1e-6)
      best = min(best, float(np.min(fit.predict(LAW, params, steps, sigma / batch))))
  assert p["predicted_loss"] == pytest.approx(best, rel=1e-12)


def test_smallest_compute_within_one_percent_is_a_downward_scan():
  p = plan(compute=1e15)
  small = p["smallest_compute_within_1pct"]
  assert small["predicted_loss"] <= p["predicted_loss"] * 1.01
  assert small["compute"] <= p["compute_budget"]
  # At that compute the best is within 1%; just below it, it is not (or nothing fits).
  assert plan(compute=small["compute"])["predicted_loss"] <= p["predicted_loss"] * 1.01
  try:
    below = plan(compute=small["compute"] * (1 - 1e-9))["predicted_loss"]
  except ValueError:
    below = math.inf
  assert below > p["predicted_loss"] * 1.01


def test_configs_within_two_percent():
  p = plan(compute=1e14)
  configs = p["configs_within_2pct"]
  assert configs[0]["predicted_loss"] == p["predicted_loss"]
  assert all(c["predicted_loss"] <= p["predicted_loss"] * 1.02 for c in configs)
  pairs = [(c["model"], c["batch_size"]) for c in configs]
  assert len(pairs) == len(set(pairs))


@settings(max_examples=12, deadline=None)
@given(st.floats(11.0, 16.0), st.floats(1.05, 30.0), st.sampled_from([1e-8, 1e-6, 1e-5]),
       st.sampled_from([2_000, 100_000, 10_000_000]))
def test_more_compute_never_hurts(log10_compute, factor, delta, users):
  compute = 10 ** log10_compute
  a = plan(compute=compute, delta=delta, users=users)
  b = plan(compute=compute * factor, delta=delta, users=users)
  assert b["predicted_loss"] <= a["predicted_loss"]


@settings(max_examples=12, deadline=None)
@given(st.floats(0.5, 15.0), st.floats(1.01, 3.0), st.floats(11.0, 16.0))
def test_more_epsilon_never_hurts(epsilon, factor, log10_compute):
  a = plan(compute=10 ** log10_compute, epsilon=epsilon)
  b = plan(compute=10 ** log10_compute, epsilon=min(epsilon * factor, 16.0))
  assert b["predicted_loss"] <= a["predicted_loss"]


def test_private_plans_prefer_big_batches():
  p = plan(compute=1e15, epsilon=1.0)
  assert p["batch_size"] >= 256  # σ/B drives loss: large batches amortise the noise


def test_bad_arguments():
  with pytest.raises(ValueError, match="compute"):
    plan(compute=1.0)               # below the smallest configuration
  with pytest.raises(ValueError, match="epsilon"):
    plan(epsilon=1000.0)            # outside the σ grid
  with pytest.raises(ValueError, match="models"):
    plan(models=["huge"])
  with pytest.raises(ValueError, match="users"):
    plan(users=0)


# --- the command line ---------------------------------------------------------------------

@pytest.fixture
def plan_cmd(monkeypatch, tmp_path):
  monkeypatch.setitem(cli.COMMANDS, "plan", ("compute-optimal plan", "dpfl.scaling.plan_cli"))
  path = tmp_path / "law.json"
  fit.save_law(LAW, path)
  return str(path)


def test_plan_cli_json(plan_cmd, capsys):
  assert cli.main(["plan", "--compute", "1e14", "--target-epsilon", "4", "--delta", "1e-6",
                   "--users", "100000", "--law", plan_cmd, "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ("model", "params", "batch_size", "steps", "noise_multiplier", "noise_batch_ratio",
              "predicted_loss", "smallest_compute_within_1pct", "configs_within_2pct"):
    assert key in out
  assert out["predicted_loss"] == pytest.approx(plan(compute=1e14)["predicted_loss"])
  assert cli.main(["plan", "--compute", "1e14", "--target-epsilon", "4", "--delta", "1e-6",
                   "--users", "100000", "--law", plan_cmd]) == 0
  table = capsys.readouterr().out
  assert "predicted loss" in table and out["model"] in table


@pytest.mark.parametrize("flags, named", [
    (["--compute", "-5"], "--compute"),
    (["--compute", "abc"], "--compute"),
    (["--compute", "10"], "--compute"),
    (["--target-epsilon", "0"], "--target-epsilon"),
    (["--target-epsilon", "200"], "--target-epsilon"),  # above the σ grid's 2^7
    (["--delta", "1.5"], "--delta"),
    (["--delta", "1e-14"], "--delta"),
    (["--users", "0"], "--users"),
    (["--users", "2.5"], "--users"),
    (["--seq-len", "0"], "--seq-len"),
    (["--models", "nope"], "--models"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--law", "/no/such/law.json"], "--law"),
    (["--plot", "/no/such/dir/plan.png"], "--plot"),
    (["--plot", "plan.jpg"], "--plot"),
])
def test_plan_cli_bad_flags(plan_cmd, capsys, flags, named):
  base = {"--compute": "1e14", "--target-epsilon": "4", "--delta": "1e-6", "--users": "100000",
          "--law": plan_cmd}
  base.update(dict(zip(flags[::2], flags[1::2])))
  argv = ["plan"] + [x for kv in base.items() for x in kv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and named in err[0], err


def test_plan_cli_plot(plan_cmd, capsys, tmp_path):
  png = tmp_path / "plan.png"
  assert cli.main(["plan", "--compute", "1e14", "--target-epsilon", "4", "--delta", "1e-6",
                   "--users", "100000", "--law", plan_cmd, "--plot", str(png), "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_cli_missing_flag(plan_cmd, capsys):
  assert cli.main(["plan", "--target-epsilon", "4", "--delta", "1e-6", "--users", "10"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--compute" in err[0]


def test_plan_cli_is_fast_and_light():
  """`dpfl plan` with the shipped law and grid, in a fresh interpreter: < 5 s
  (the target is 2 s; the loose bound avoids flakiness on a loaded machine)."""
  probe = ("import sys, time\nt = time.perf_counter()\nfrom dpfl import cli\n"
           "cli.COMMANDS['plan'] = ('plan', 'dpfl.scaling.plan_cli')\n"
           "code = cli.main(['plan', '--compute', '1e15', '--target-epsilon', '2', '--delta', '1e-6', "
           "'--users', '50000', '--json'])\n"
           "heavy = [m for m in ('jax', 'scipy', 'dp_accounting', 'matplotlib') if m in sys.modules]\n"
           "print(code, heavy, time.perf_counter() - t)\n")
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
  wall = time.perf_counter() - start
  code, heavy, _ = done.stdout.strip().splitlines()[-1].split(" ", 2)
  assert code == "0", done.stderr
  assert heavy == "[]", heavy
  assert wall < 5.0, f"dpfl plan took {wall:.2f} s"


def test_compute_optimal_plot(tmp_path):
  from dpfl.scaling import plots
  curves = plots.compute_optimal_curves(LAW, epsilons=[1.0, 8.0], delta=1e-6, users=100_000,
                                        computes=[1e12, 1e14])
  # More ε: never a worse best loss at the same compute.
  for lo, hi in zip(curves[1.0], curves[8.0]):
    assert hi["predicted_loss"] <= lo["predicted_loss"]
  path = plots.plot_compute_optimal(LAW, str(tmp_path / "opt.png"), epsilons=[1.0, 8.0],
                                    delta=1e-6, users=100_000, computes=[1e12, 1e14])
  assert (tmp_path / "opt.png").stat().st_size > 1000 and path.endswith("opt.png")


def test_plan_cli_target_epsilon_is_the_name_and_epsilon_an_alias(plan_cmd, capsys):
  """`--target-epsilon` as in `dpfl calibrate` / `dpfl mf`; the former `--epsilon` still works."""
  common = ["--compute", "1e14", "--delta", "1e-6", "--users", "100000", "--law", plan_cmd,
            "--json"]
  assert cli.main(["plan", "--target-epsilon", "4", *common]) == 0
  new = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert cli.main(["plan", "--epsilon", "4", *common]) == 0
  old = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert new == old and new["epsilon"] == 4
  assert new["predicted_loss"] == pytest.approx(plan(compute=1e14, epsilon=4)["predicted_loss"])
  # Required, and shown as required (not in brackets) in the usage line.
  assert cli.main(["plan", *common]) == 2
  assert "--target-epsilon" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_:
    cli.main(["plan", "--help"])
  assert exit_.value.code == 0
  usage = capsys.readouterr().out.split("\n\n")[0]
  assert "--target-epsilon E" in usage and "[--target-epsilon" not in usage
  assert "--epsilon" not in usage.replace("--target-epsilon", "")
