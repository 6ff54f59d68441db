"""Scaling-law fitting (dpfl.scaling.fit): isotonic smoothing and recovery of a known law."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfl import cli
from dpfl.scaling import fit

# A known law: per model (params, E); per noise-batch ratio r, m and b.
MODELS = {"tiny": (50_000, 2.0), "small": (400_000, 1.6), "mid": (3_000_000, 1.3)}
RATIOS = (0.0, 1e-3, 4e-3, 1.6e-2)
STEPS = np.unique(np.round(np.geomspace(1, 20_000, 60)).astype(int))


def true_mb(params, ratio):
  return -0.35 + 6 * ratio, 1.4 + 20 * ratio + 0.1 * math.log(params / 5e4)


def synthetic_rows(*, seed=0, noise=0.004, bumps=3, non_private=True):
  """Sweep rows from the known law: noise, upward bumps, and a worse learning rate."""
  rng = np.random.default_rng(seed)
  rows = []
  for name, (params, e) in MODELS.items():
    for ratio in RATIOS:
      if ratio == 0 and not non_private:
        continue
      m, b = true_mb(params, ratio)
      for lr, offset in ((1e-3, 0.0), (3e-3, 0.08)):
        loss = np.exp(m * np.log(STEPS) + b) + e + offset + rng.normal(0, noise, len(STEPS))
        for j in rng.choice(np.arange(10, len(STEPS)), bumps, replace=False):
          loss[j] += 0.05  # a non-monotone bump: loss rises for one evaluation
        rows.append({
            "model": name, "params": params, "learning_rate": lr, "batch_size": 64,
            "noise_multiplier": ratio * 64, "noise_batch_ratio": ratio, "warmup_steps": 10,
            "seq_len": 64, "private": ratio > 0,
            "eval_loss": [[0, 5.5]] + [[int(s), float(v)] for s, v in zip(STEPS, loss)],
            "final_eval_loss": float(loss[-1])})
  return rows


# --- isotonic smoothing ---------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=40), st.booleans())
def test_isotonic_matches_sklearn(values, increasing):
  from sklearn.isotonic import IsotonicRegression
  y = np.array(values)
  ours = fit.isotonic(y, increasing=increasing)
  ref = IsotonicRegression(increasing=increasing).fit_transform(np.arange(len(y)), y)
  np.testing.assert_allclose(ours, ref, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2 ** 31 - 1), st.floats(0, 0.4))
def test_smooth_monotone_is_monotone(rows, cols, seed, hole_fraction):
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(rows, cols))
  table[rng.random(table.shape) < hole_fraction] = np.nan
  out = fit.smooth_monotone(table)
  assert fit.is_monotone(out, atol=1e-9)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(table))  # holes stay holes


def test_smooth_monotone_is_the_least_squares_projection():
  """Against a generic constrained least-squares solver on the same partial order."""
  from scipy import optimize
  rng = np.random.default_rng(3)
  table = rng.normal(size=(3, 5)).cumsum(axis=0) - rng.normal(size=(3, 5)).cumsum(axis=1)
  shape = table.shape
  cons = []
  for i in range(shape[0]):
    for j in range(shape[1]):
      if j + 1 < shape[1]:   # non-increasing along steps
        cons.append({"type": "ineq", "fun": lambda x, i=i, j=j: x.reshape(shape)[i, j] - x.reshape(shape)[i, j + 1]})
      if i + 1 < shape[0]:   # non-decreasing in the ratio
        cons.append({"type": "ineq", "fun": lambda x, i=i, j=j: x.reshape(shape)[i + 1, j] - x.reshape(shape)[i, j]})
  ref = optimize.minimize(lambda x: np.sum((x - table.ravel()) ** 2), table.ravel(),
                          constraints=cons, method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
  np.testing.assert_allclose(fit.smooth_monotone(table), ref.x.reshape(shape), atol=1e-5)


def test_smoothing_removes_bumps():
  steps = np.arange(1, 50)
  truth = 3.0 / np.sqrt(steps) + 1.0
  bumped = truth.copy()
  bumped[[10, 25, 40]] += 0.2
  out = fit.smooth_monotone(bumped[None])[0]
  assert np.all(np.diff(out) <= 1e-12)
  # Projecting onto a convex set that holds the truth never moves away from it.
  assert np.linalg.norm(out - truth) < 0.8 * np.linalg.norm(bumped - truth)


# --- recovering a known law ---------------------------------------------------------------

@pytest.mark.parametrize("non_private", [True, False])
def test_fit_recovers_known_law(non_private):
  law = fit.fit_law(synthetic_rows(non_private=non_private))
  assert [m["model"] for m in law["models"]] == ["tiny", "small", "mid"]
  for entry in law["models"]:
    params, e = MODELS[entry["model"]]
    assert entry["E_source"] == ("non-private" if non_private else "fitted")
    assert entry["E"] == pytest.approx(e, abs=0.02)
    ratios = [c["noise_batch_ratio"] for c in entry["curves"]]
    assert ratios == [r for r in RATIOS if r > 0 or non_private]
    for c in entry["curves"]:
      m, b = true_mb(params, c["noise_batch_ratio"])
      assert c["m"] == pytest.approx(m, abs=0.02)
      assert c["b"] == pytest.approx(b, abs=0.06)
      assert c["steps_range"][0] > 10  # warm-up dropped


def test_predict_is_monotone_and_interpolates():
  law = fit.fit_law(synthetic_rows())
  t = np.geomspace(10, 1e5, 40)
  r = np.concatenate([[0.0], np.geomspace(1e-5, 1.0, 40)])
  for params in (50_000, 150_000, 3_000_000):
    grid = fit.predict(law, params, t[:, None], r[None, :])
    assert np.all(np.diff(grid, axis=0) <= 1e-12)   # non-increasing in steps
    assert np.all(np.diff(grid, axis=1) >= -1e-12)  # non-decreasing in σ/B
  # At a fitted (model, ratio) the law is that curve; between models, in between.
  m, b = true_mb(400_000, 4e-3)
  assert fit.predict(law, 400_000, 1000, 4e-3) == pytest.approx(math.exp(m * math.log(1000) + b) + 1.6, abs=0.02)
  mid = fit.predict(law, 1_000_000, 1000, 4e-3)
  assert fit.predict(law, 3_000_000, 1000, 4e-3) < mid < fit.predict(law, 400_000, 1000, 4e-3)
  with pytest.raises(ValueError, match="params"):
    fit.predict(law, 10, 1000, 0.0)


def test_law_round_trip(tmp_path):
  law = fit.fit_law(synthetic_rows())
  path = tmp_path / "law.json"
  fit.save_law(law, path)
  again = fit.load_law(path)
  assert json.loads(json.dumps(law)) == again
  assert fit.predict(again, 400_000, 500, 2e-3) == fit.predict(law, 400_000, 500, 2e-3)
  (tmp_path / "bad.json").write_text('{"format": "something-else"}')
  with pytest.raises(ValueError, match="dpfl-scaling-law"):
    fit.load_law(tmp_path / "bad.json")


def test_shipped_law_loads():
  law = fit.load_law()
  assert law["models"] and fit.predict(law, law["models"][0]["params"], 100, 0.01) > 0


def test_fit_cli(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(cli.COMMANDS, "fit", ("fit a law", "dpfl.scaling.fit_cli"))
  results = tmp_path / "results.jsonl"
  results.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
  out = tmp_path / "law.json"
  assert cli.main(["fit", "--results", str(results), "--out", str(out), "--json",
                   "--plots", str(tmp_path / "plots")]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["runs"] == len(synthetic_rows()) and len(summary["models"]) == 3
  assert fit.load_law(out)["models"][0]["model"] == "tiny"
  assert (tmp_path / "plots" / "loss_vs_noise_batch_ratio.png").stat().st_size > 1000
  assert cli.main(["fit", "--results", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--results" in err[0]
