"""The compute-optimal planner (dpfl.scaling.planner) and `dpfl plan`.

Laws are fitted (``fit.fit_law``) from point rows of the known law in
``synthetic_law`` (the paper's scale: BERT sizes 29M–778M here, steps up to
128K, σ̄ from 2^-22 to 2^-6), so every expectation is checked against the
truth or against a brute-force enumeration written out here.
"""

import functools
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

import synthetic_law as known
from dpfl import cli
from dpfl.scaling import fit, planner, sigma_grid

SEQ = 256
USERS = 10 ** 7
MAX_EPOCHS = 4.0
MAX_Q = 0.5
SMALL_MODELS = {k: known.MODELS[k] for k in ("BertSmall", "BertBase", "BertLarge", "BertMega")}
SMALL_STEPS = tuple(125 * 2 ** k for k in range(11))                 # 125 ... 128K
SMALL_RATIOS = (0.0,) + tuple(2.0 ** -k for k in range(22, 5, -2))  # 0, 2^-22 ... 2^-6
# Coarser candidate axes than the defaults, for speed (the round trip uses both).
FAST = {"steps_per_octave": 8, "model_sizes": 40}


def fitted(*, models=SMALL_MODELS, steps=SMALL_STEPS, ratios=SMALL_RATIOS, **kw):
  rows = known.point_rows(models=models, steps=steps, ratios=ratios,
                          learning_rates={3e-4: 0.0, 1e-3: 0.1})
  args = dict(seq_len=SEQ, max_epochs=MAX_EPOCHS, max_sampling_prob=MAX_Q)
  args.update(kw)
  return fit.fit_law(rows, **args)


@functools.lru_cache(maxsize=None)
def law():
  return fitted()


@functools.lru_cache(maxsize=None)
def edge_law():
  """Measured to 1,000 steps (tail trusted to 8,000) and σ̄ >= 2^-12: budgets leave it."""
  return fitted(steps=(125, 250, 500, 1000), ratios=(0.0, 2.0 ** -12, 2.0 ** -9, 2.0 ** -6),
                tail_factor=8)


def plan(**kw):
  args = dict(compute=1e18, epsilon=8.0, delta=1e-10, users=USERS, law=law(), **FAST)
  args.update(kw)
  return planner.plan(**args)


def flops(cfg, seq=SEQ):
  return 6 * cfg["params"] * cfg["batch_size"] * cfg["steps"] * seq


def candidate_set(lw, *, compute, epsilon, delta, users, steps_per_octave, model_sizes,
                  batch_sizes=None):
  """The planner's candidates, enumerated here: (params, batch, steps, σ) inside the
  law's support, σ from the same σ grid."""
  s = fit.support(lw)
  table = sigma_grid._as_table(None)
  sizes = np.geomspace(*s["params"], model_sizes)
  ladder = planner.steps_ladder(int(table.steps[0]),
                                int(min(table.steps[-1], s["steps"][1])), steps_per_octave)
  ladder = ladder[ladder >= s["steps"][0]].astype(float)
  batches = batch_sizes or [2 ** k for k in range(64) if 2 ** k <= users] + [users]
  out = []
  for batch in sorted(set(batches)):
    q = batch / users
    sigma = sigma_grid.noise_multiplier(epsilon, ladder, max(q, table.q[0]), delta)
    ratio = sigma / batch
    for n in sizes:
      ok = ((6.0 * n * batch * ladder * SEQ <= compute * (1 + 1e-12)) & (q * ladder <= MAX_EPOCHS)
            & (q < 1) & (ratio >= s["noise_batch_ratio"][0] * (1 - 1e-9))
            & (ratio <= s["noise_batch_ratio"][1] * (1 + 1e-9)))
      out += [(n, batch, t, r) for t, r in zip(ladder[ok], ratio[ok])]
  return np.array(out)


def grid_index(values, grid):
  """Index of the nearest grid point, in log."""
  return np.argmin(np.abs(np.log(np.asarray(values, float))[..., None] - np.log(grid)), axis=-1)


# --- plans inside the support -------------------------------------------------------------

def test_plan_respects_budget_and_support_and_reports_consistent_fields():
  s = fit.support(law())
  for compute, eps in ((1e18, 8.0), (3e18, 2.0)):
    p = plan(compute=compute, epsilon=eps)
    assert p["extrapolated"] == [] and p["at_support_corner"] == []
    assert p["support"] == s
    # The accountant whose bound made σ (so the run's ledger can prove the target).
    assert p["sigma_accountant"] == str(sigma_grid.accountant(
        eps, p["steps"], p["sampling_prob"], 1e-10)) and p["sigma_accountant"] in ("pld", "rdp")
    assert s["params"][0] < p["params"] < s["params"][1]     # a continuous size, not a model
    assert p["model"] == min(fit.model_params(law()), key=lambda m: abs(math.log(
        fit.model_params(law())[m] / p["params"])))
    for cfg in [p, p["smallest_compute_within_1pct"], *p["configs_within_2pct"]]:
      assert flops(cfg) <= compute * (1 + 1e-12)
      assert cfg["compute"] == pytest.approx(flops(cfg))
      assert cfg["noise_batch_ratio"] == pytest.approx(cfg["noise_multiplier"] / cfg["batch_size"])
      assert cfg["sampling_prob"] == pytest.approx(cfg["batch_size"] / USERS)
      assert cfg["sampling_prob"] * cfg["steps"] <= MAX_EPOCHS
      loss = float(fit.predict(law(), cfg["params"], cfg["steps"], cfg["noise_batch_ratio"]))
      assert math.isfinite(loss)                              # inside the support
      assert cfg["predicted_loss"] == pytest.approx(loss, rel=1e-6)  # params rounded in JSON
      sigma = sigma_grid.noise_multiplier(eps, cfg["steps"], cfg["sampling_prob"], 1e-10)
      assert cfg["noise_multiplier"] == pytest.approx(float(sigma))


def test_plan_is_the_argmin_of_a_brute_force_enumeration():
  for compute, eps in ((1e18, 8.0), (3e18, 1.0)):
    p = plan(compute=compute, epsilon=eps)
    cands = candidate_set(law(), compute=compute, epsilon=eps, delta=1e-10, users=USERS, **FAST)
    losses = fit.predict(law(), cands[:, 0], cands[:, 2], cands[:, 3])
    assert p["predicted_loss"] == pytest.approx(float(np.min(losses)), rel=1e-9)
    assert p["candidates"] == len(cands)


def test_smallest_compute_within_one_percent_is_a_downward_scan():
  p = plan(compute=3e18, epsilon=2.0)
  small = p["smallest_compute_within_1pct"]
  assert small["predicted_loss"] <= p["predicted_loss"] * 1.01
  assert small["compute"] <= p["compute_budget"]
  cands = candidate_set(law(), compute=3e18, epsilon=2.0, delta=1e-10, users=USERS, **FAST)
  losses = fit.predict(law(), cands[:, 0], cands[:, 2], cands[:, 3])
  cost = 6 * cands[:, 0] * cands[:, 1] * cands[:, 2] * SEQ
  cheaper = cost < small["compute"] * (1 - 1e-9)
  assert not np.any(losses[cheaper] <= p["predicted_loss"] * 1.01)


def test_configs_within_two_percent():
  p = plan(compute=3e18, epsilon=2.0)
  configs = p["configs_within_2pct"]
  assert configs[0]["predicted_loss"] == p["predicted_loss"]
  assert all(c["predicted_loss"] <= p["predicted_loss"] * 1.02 for c in configs)
  pairs = [(c["params"], c["batch_size"]) for c in configs]
  assert len(pairs) == len(set(pairs))


def test_loss_is_monotone_in_compute_and_epsilon_on_dense_grids():
  """Where a plan is given, more compute or more ε never predicts a higher loss."""
  coarse = {"steps_per_octave": 4, "model_sizes": 20}
  by_compute = []
  for compute in np.geomspace(1e18, 1e19, 9):
    try:
      by_compute.append(plan(compute=float(compute), epsilon=2.0, **coarse)["predicted_loss"])
    except ValueError as err:
      assert str(err).startswith(planner.DIMENSIONS), err
  assert len(by_compute) >= 6 and np.all(np.diff(by_compute) <= 0), by_compute
  table = sigma_grid._as_table(None)
  by_eps = []
  for eps in np.geomspace(max(table.eps[0], 0.5), min(table.eps[-1], 16.0), 9):
    try:
      by_eps.append(plan(compute=3e18, epsilon=float(eps), **coarse)["predicted_loss"])
    except ValueError as err:
      assert str(err).startswith(planner.DIMENSIONS), err
  assert len(by_eps) >= 6 and np.all(np.diff(by_eps) <= 0), by_eps


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(st.floats(18.0, 19.0), st.floats(1.01, 3.0), st.floats(0.5, 16.0), st.floats(1.01, 4.0))
def test_more_compute_or_epsilon_never_hurts(log10_compute, more_compute, epsilon, more_eps):
  def loss(compute, eps):
    try:
      return plan(compute=compute, epsilon=min(eps, 16.0))["predicted_loss"]
    except ValueError:
      return None
  base = loss(10 ** log10_compute, epsilon)
  for other in (loss(10 ** log10_compute * more_compute, epsilon),
                loss(10 ** log10_compute, epsilon * more_eps)):
    if base is not None and other is not None:
      assert other <= base


def test_private_plans_prefer_big_batches():
  p = plan(compute=1e18, epsilon=1.0)
  assert p["batch_size"] >= 1024  # σ/B drives loss: large batches amortise the noise


def test_models_restricts_to_the_named_sizes():
  p = plan(compute=1e19, epsilon=2.0, models=["BertBase", "BertLarge"])
  assert p["params"] in (known.MODELS["BertBase"], known.MODELS["BertLarge"])
  assert p["at_support_corner"] == []


def test_bad_arguments():
  with pytest.raises(ValueError, match="compute"):
    plan(compute=1.0)               # below the smallest configuration
  with pytest.raises(ValueError, match="epsilon"):
    plan(epsilon=1000.0)            # outside the σ grid
  with pytest.raises(ValueError, match="models"):
    plan(models=["huge"])
  with pytest.raises(ValueError, match="users"):
    plan(users=0)


# --- the synthetic-law round trip ---------------------------------------------------------

def round_trip(lw, budgets, axes, models):
  """Plan with the fitted law; brute-force the KNOWN law over the same candidates.

  "One grid step": the law cannot resolve finer than the data it was fitted
  on, so model size and steps are compared on the sweep's own grid (its
  models, its measured steps: nearest point in log, indices at most 1 apart)
  and batch size on the planner's powers of two (at most a factor 2).
  """
  sizes = np.array(sorted(models.values()), float)
  measured = np.array(sorted({r["steps"] for r in known.point_rows(models=models)}), float)
  for compute, eps in budgets:
    p = plan(law=lw, compute=compute, epsilon=eps, **axes)
    cands = candidate_set(lw, compute=compute, epsilon=eps, delta=1e-10, users=USERS, **axes)
    truth = known.known_loss(cands[:, 0], cands[:, 2], cands[:, 3])
    cost = 6 * cands[:, 0] * cands[:, 1] * cands[:, 2] * SEQ
    n, b, t, _ = cands[np.lexsort((cost, truth))[0]]
    where = (f"{compute:g} FLOPs, ε={eps}: plan {p['params']:.3g}/{p['batch_size']}/"
             f"{p['steps']}, known optimum {n:.3g}/{b:g}/{t:g}")
    assert abs(int(grid_index(p["params"], sizes)) - int(grid_index(n, sizes))) <= 1, where
    assert abs(math.log2(p["batch_size"] / b)) <= 1 + 1e-9, where
    assert abs(int(grid_index(p["steps"], measured)) - int(grid_index(t, measured))) <= 1, where
    # And the plan's true loss is close to the true optimum's.
    true_plan = float(known.known_loss(p["params"], p["steps"], p["noise_batch_ratio"]))
    assert true_plan <= float(truth.min()) * 1.005, where


def test_synthetic_law_round_trip():
  round_trip(law(), [(1e18, 8.0), (3e18, 2.0)], FAST, SMALL_MODELS)


@pytest.mark.slow
def test_synthetic_law_round_trip_at_the_papers_scale():
  """All seven of the paper's sizes (4.5M–778M), every σ̄ 2^-23 ... 2^-6, steps 125 ... 128K,
  default candidate axes (100 sizes, 16 steps per octave)."""
  steps = tuple(int(round(125 * 2 ** (k / 2))) for k in range(21))
  lw = fitted(models=known.MODELS, steps=steps, ratios=known.RATIOS)
  axes = {"steps_per_octave": 16, "model_sizes": 100}
  round_trip(lw, [(1e17, 1.0), (1e17, 8.0), (1e18, 1.0), (1e18, 8.0), (3e18, 1.0), (3e18, 8.0), (1e19, 1.0)],
             axes, known.MODELS)


# --- refusals outside the support ---------------------------------------------------------

REFUSALS = [  # (dimension, law, plan arguments)
    ("model size", law, dict(compute=1e16, epsilon=0.5)),             # smallest model
    ("model size", law, dict(compute=3e19, epsilon=2.0)),             # largest model
    ("steps", law, dict(compute=3e16, epsilon=8.0)),                  # fewest steps
    ("steps", edge_law, dict(compute=1e19, epsilon=16.0, models=["BertSmall"],
                             users=10 ** 8)),                         # beyond the last
    ("σ/B", edge_law, dict(compute=1e18, epsilon=2.0)),               # below the smallest
    ("sequence length", law, dict(compute=1e18, seq_len=128)),
    ("q = 1", law, dict(users=1000, batch_sizes=[1000], compute=1e18)),
    ("epochs", law, dict(users=100_000, batch_sizes=[50_000], compute=1e18)),
]


@pytest.mark.parametrize("dim, lw, kw", REFUSALS, ids=[f"{d}-{i}" for i, (d, _, _) in
                                                         enumerate(REFUSALS)])
def test_refused_outside_the_support_and_named_with_allow_extrapolation(dim, lw, kw):
  with pytest.raises(ValueError) as err:
    plan(law=lw(), **kw)
  assert str(err.value).startswith(dim + ":"), err.value
  p = plan(law=lw(), allow_extrapolation=True, **kw)
  named = p["extrapolated"] + p["at_support_corner"]
  assert dim in named, (dim, named)
  assert all(d in planner.DIMENSIONS for d in named)


@pytest.fixture
def plan_cmd(monkeypatch, tmp_path):
  monkeypatch.setitem(cli.COMMANDS, "plan", ("compute-optimal plan", "dpfl.scaling.plan_cli"))
  paths = {}
  for name, lw in (("law", law), ("edge", edge_law)):
    paths[name] = str(tmp_path / f"{name}.json")
    fit.save_law(lw(), paths[name])
  return paths


def _argv(kw, path, *extra):
  flags = {"compute": "--compute", "epsilon": "--target-epsilon", "seq_len": "--seq-len",
           "users": "--users", "batch_sizes": "--batch-sizes"}
  base = {"--compute": "1e18", "--target-epsilon": "8", "--delta": "1e-10", "--users": str(USERS),
          "--law": path}
  for k, v in kw.items():
    base[flags[k]] = ",".join(map(str, v)) if isinstance(v, list) else str(v)
  return ["plan"] + [x for kv in base.items() for x in kv] + list(extra)


CLI_REFUSALS = [r for r in REFUSALS if r[0] in ("σ/B", "sequence length", "q = 1", "epochs")]


@pytest.mark.parametrize("dim, lw, kw", CLI_REFUSALS, ids=[d for d, _, _ in CLI_REFUSALS])
def test_plan_cli_refusal_is_one_line_naming_the_dimension(plan_cmd, capsys, dim, lw, kw):
  path = plan_cmd["edge" if lw is edge_law else "law"]
  assert cli.main(_argv(kw, path)) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].split("error: ", 1)[-1].startswith(dim + ":"), err
  assert "--allow-extrapolation" in err[0]
  assert cli.main(_argv(kw, path, "--allow-extrapolation")) == 0
  table = capsys.readouterr().out
  line = [ln for ln in table.splitlines() if "EXTRAPOLATED" in ln or "CORNER" in ln]
  assert len(line) >= 1 and any(dim in ln for ln in line), table


# --- the command line ---------------------------------------------------------------------

def test_plan_cli_json(plan_cmd, capsys):
  argv = _argv({"compute": "1e18", "epsilon": "8"}, plan_cmd["law"])
  assert cli.main(argv + ["--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ("model", "params", "batch_size", "steps", "noise_multiplier", "noise_batch_ratio",
              "predicted_loss", "smallest_compute_within_1pct", "configs_within_2pct",
              "support", "extrapolated", "at_support_corner", "data_limited"):
    assert key in out
  assert out["extrapolated"] == [] and out["support"] == fit.support(law())
  want = planner.plan(compute=1e18, epsilon=8.0, delta=1e-10, users=USERS, law=law())
  assert out["predicted_loss"] == pytest.approx(want["predicted_loss"])
  assert cli.main(argv) == 0
  table = capsys.readouterr().out
  assert "predicted loss" in table and "law's support" in table and "EXTRAPOLATED" not in table


def test_shipped_law_at_the_issues_budget(monkeypatch, capsys):
  """Issue 16's example: 3e18 FLOPs with the shipped laptop law (<= 215K params,
  200 steps) is refused, and with --allow-extrapolation says what it extrapolates."""
  monkeypatch.setitem(cli.COMMANDS, "plan", ("compute-optimal plan", "dpfl.scaling.plan_cli"))
  argv = ["plan", "--compute", "3e18", "--target-epsilon", "8", "--delta", "1e-10",
          "--users", "1e8"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].split("error: ", 1)[-1].startswith(planner.DIMENSIONS), err
  assert cli.main(argv + ["--allow-extrapolation", "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["extrapolated"] and set(out["extrapolated"]) <= set(planner.DIMENSIONS)


@pytest.mark.parametrize("flags, named", [
    (["--compute", "-5"], "--compute"),
    (["--compute", "abc"], "--compute"),
    (["--compute", "10"], "--compute"),
    (["--target-epsilon", "0"], "--target-epsilon"),
    (["--target-epsilon", "200"], "--target-epsilon"),  # above the σ grid's 2^7
    (["--delta", "1.5"], "--delta"),
    (["--delta", "1e-300"], "--delta"),
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
  base = {"--compute": "1e19", "--target-epsilon": "2", "--delta": "1e-10", "--users": str(USERS),
          "--law": plan_cmd["law"]}
  base.update(dict(zip(flags[::2], flags[1::2])))
  argv = ["plan"] + [x for kv in base.items() for x in kv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and named in err[0], err


def test_plan_cli_plot(plan_cmd, capsys, tmp_path):
  png = tmp_path / "plan.png"
  assert cli.main(_argv({"compute": "1e19", "epsilon": "2"}, plan_cmd["law"], "--plot", str(png),
                        "--models", "BertBase,BertLarge", "--json")) == 0
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
           "'--users', '50000', '--allow-extrapolation', '--json'])\n"
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
  curves = plots.compute_optimal_curves(law(), epsilons=[1.0, 8.0], delta=1e-10, users=USERS,
                                        computes=[1e18, 1e19], **FAST)
  # More ε: never a worse best loss at the same compute (where both are planned).
  for lo, hi in zip(curves[1.0], curves[8.0]):
    if lo is not None and hi is not None:
      assert hi["predicted_loss"] <= lo["predicted_loss"]
  assert any(p is not None for p in curves[8.0])
  path = plots.plot_compute_optimal(law(), str(tmp_path / "opt.png"), epsilons=[1.0, 8.0],
                                    delta=1e-10, users=USERS, computes=[1e18, 1e19], **FAST)
  assert (tmp_path / "opt.png").stat().st_size > 1000 and path.endswith("opt.png")
  path = plots.plot_loss_vs_ratio(law(), str(tmp_path / "ratio.png"))
  assert (tmp_path / "ratio.png").stat().st_size > 1000


def test_plan_cli_target_epsilon_is_the_name_and_epsilon_an_alias(plan_cmd, capsys):
  """`--target-epsilon` as in `dpfl calibrate` / `dpfl mf`; the former `--epsilon` still works."""
  common = ["--compute", "1e19", "--delta", "1e-10", "--users", str(USERS), "--law",
            plan_cmd["law"], "--models", "BertBase,BertLarge", "--json"]
  assert cli.main(["plan", "--target-epsilon", "2", *common]) == 0
  new = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert cli.main(["plan", "--epsilon", "2", *common]) == 0
  old = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert new == old and new["epsilon"] == 2
  # Required, and shown as required (not in brackets) in the usage line.
  assert cli.main(["plan", *common]) == 2
  assert "--target-epsilon" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_:
    cli.main(["plan", "--help"])
  assert exit_.value.code == 0
  usage = capsys.readouterr().out.split("\n\n")[0]
  assert "--target-epsilon E" in usage and "[--target-epsilon" not in usage
  assert "--epsilon" not in usage.replace("--target-epsilon", "")


def test_plans_at_many_budgets_equal_plan_at_each():
  computes = [3e16, 1e18, 1e19, 3e19]
  many = planner.plans(computes=computes, epsilon=2.0, delta=1e-10, users=USERS, law=law(), **FAST)
  for compute, got in zip(computes, many):
    try:
      want = plan(compute=compute, epsilon=2.0)
    except ValueError as err:
      assert isinstance(got, ValueError) and str(got) == str(err)
    else:
      assert got == want
  assert sum(isinstance(p, dict) for p in many) >= 2
