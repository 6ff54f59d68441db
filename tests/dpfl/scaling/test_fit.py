"""Scaling-law fitting (dpfl.scaling.fit): smoothing, the paper-scale round trip, support."""

import functools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import synthetic_law as known
from dpfl import cli
from dpfl.scaling import fit

# A small known law as dpfl sweep rows: per model (params, E); per ratio r, m and b.
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
            "seq_len": 64, "private": ratio > 0, "sampling_prob": 64 / 10_000,
            "steps": int(STEPS[-1]),
            "eval_loss": [[0, 5.5]] + [[int(s), float(v)] for s, v in zip(STEPS, loss)],
            "final_eval_loss": float(loss[-1])})
  return rows


@functools.lru_cache(maxsize=1)
def _paper_law():
  return fit.fit_law(known.point_rows(noise=0.002, seed=1), seq_len=512, max_epochs=4.0,
                     max_sampling_prob=0.01)


@pytest.fixture
def paper_law():
  """The known paper-scale law's table (0.2 % noise, three learning rates) fitted back."""
  return _paper_law()


# --- smoothing --------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=40), st.booleans())
def test_isotonic_matches_sklearn(values, increasing):
  from sklearn.isotonic import IsotonicRegression
  y = np.array(values)
  ours = fit.isotonic(y, increasing=increasing)
  ref = IsotonicRegression(increasing=increasing).fit_transform(np.arange(len(y)), y)
  np.testing.assert_allclose(ours, ref, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2 ** 31 - 1))
def test_smooth_table_is_monotone_in_one_pass(rows, cols, seed):
  """On a complete table the steps pass then the ratio pass give both orders (as the paper's)."""
  table = np.random.default_rng(seed).normal(size=(rows, cols))
  out = fit.smoothing.smooth_ratios(fit.smoothing.smooth_steps(table))
  assert fit.is_monotone(out, atol=1e-9)
  np.testing.assert_array_equal(fit.smooth_table(table), out)


def _brute_force_isotonic(y, increasing):
  from scipy import optimize
  sign = 1.0 if increasing else -1.0
  cons = [{"type": "ineq", "fun": lambda x, i=i: sign * (x[i + 1] - x[i])} for i in range(len(y) - 1)]
  return optimize.minimize(lambda x: np.sum((x - y) ** 2), y, constraints=cons, method="SLSQP",
                           options={"ftol": 1e-14, "maxiter": 500}).x


def test_smoothing_is_the_papers_two_projections():
  """Against a generic constrained least-squares solver: each row along steps, then each column."""
  rng = np.random.default_rng(3)
  table = rng.normal(size=(3, 5)).cumsum(axis=0) - rng.normal(size=(3, 5)).cumsum(axis=1)
  by_steps = np.array([_brute_force_isotonic(row, increasing=False) for row in table])
  ref = np.array([_brute_force_isotonic(col, increasing=True) for col in by_steps.T]).T
  np.testing.assert_allclose(fit.smooth_table(table), ref, atol=1e-5)


def test_smoothing_removes_bumps():
  steps = np.arange(1, 50)
  truth = 3.0 / np.sqrt(steps) + 1.0
  bumped = truth.copy()
  bumped[[10, 25, 40]] += 0.2
  out = fit.smooth_table(bumped[None])[0]
  assert np.all(np.diff(out) <= 1e-12)
  # Projecting onto a convex set that holds the truth never moves away from it.
  assert np.linalg.norm(out - truth) < 0.8 * np.linalg.norm(bumped - truth)


# --- the paper-scale round trip -----------------------------------------------------------

def test_paper_scale_law_recovered(paper_law):
  support = fit.support(paper_law)
  assert support == {"params": [4_500_000, 778_000_000], "steps": [1000, 128_000 * 64],
                     "noise_batch_ratio": [2.0 ** -23, 2.0 ** -6], "seq_len": 512,
                     "max_epochs": 4.0, "max_sampling_prob": 0.01}
  for m in paper_law["models"]:
    assert m["E_source"] == "non-private"
    assert m["E"] == pytest.approx(float(known.known_E(m["params"])), rel=0.01)
    assert all(c["learning_rate"] == 3e-4 for c in m["curves"])  # the clearly best one
  # Inside the support: within 3 % of the truth, measured grid and trusted tail alike
  # (0.2 % noise, log-linear interpolation across half octaves of steps, octaves of σ̄ and
  # the gaps between the paper's model sizes).
  n = np.geomspace(4.5e6, 778e6, 13)[:, None, None]
  t = np.geomspace(1000, 128_000 * 64, 25)[None, :, None]
  r = np.geomspace(2.0 ** -23, 2.0 ** -6, 21)[None, None, :]
  pred = fit.predict(paper_law, n, t, r)
  assert not np.any(np.isnan(pred))
  np.testing.assert_allclose(pred, known.known_loss(n, t, r), rtol=0.03)
  # At a measured point of a fitted model: the smoothed data itself, within the noise.
  assert fit.predict(paper_law, 109e6, 8000, 2.0 ** -12) == pytest.approx(
      float(known.known_loss(109e6, 8000, 2.0 ** -12)), rel=0.01)


def test_nan_outside_the_support_and_finite_when_extrapolating(paper_law):
  inside = (100e6, 20_000, 1e-4)
  assert np.isfinite(fit.predict(paper_law, *inside))
  for dim, value in (("params", 1e6), ("params", 2e9), ("steps", 500), ("steps", 1e7),
                     ("noise_batch_ratio", 1e-8), ("noise_batch_ratio", 0.0),
                     ("noise_batch_ratio", 0.1)):
    query = dict(zip(("params", "steps", "noise_batch_ratio"), inside), **{dim: value})
    assert np.isnan(fit.predict(paper_law, **query)), (dim, value)
    out = fit.outside(paper_law, **query)
    assert [k for k, v in out.items() if v] == [dim]
    assert np.isfinite(fit.predict(paper_law, **query, extrapolate=True))
  assert not any(fit.outside(paper_law, *inside).values())


def test_extrapolation_is_monotone_and_above_E(paper_law):
  """A dense grid reaching beyond the support in every dimension."""
  n = np.geomspace(1e6, 3e9, 9)[:, None, None]
  t = np.geomspace(10, 1e9, 40)[None, :, None]
  r = np.concatenate([[0.0], np.geomspace(1e-10, 1.0, 40)])[None, None, :]
  grid = fit.predict(paper_law, n, t, r, extrapolate=True)
  assert np.all(np.isfinite(grid))
  assert np.all(np.diff(grid, axis=1) <= 1e-12 * grid[:, 1:])   # non-increasing in steps
  assert np.all(np.diff(grid, axis=2) >= -1e-12 * grid[:, :, 1:])  # non-decreasing in σ̄
  e = {m["params"]: m["E"] for m in paper_law["models"]}
  for k, size in enumerate(n.ravel()):
    nearest = min(e, key=lambda p: abs(math.log(p / size)))
    if size <= min(e) or size >= max(e):
      assert np.all(grid[k] >= e[nearest] * (1 - 1e-12))
    assert np.all(grid[k] >= min(e.values()))
  assert np.all(grid <= paper_law["max_loss"] * (1 + 1e-12))


@settings(max_examples=40, deadline=None)
@given(st.floats(6.0, 9.5), st.floats(2.0, 9.0), st.floats(0.0, 3.0), st.floats(-11, 0),
       st.floats(0.0, 4.0), st.booleans())
def test_predict_monotone_property(log_n, log_t, dlog_t, log_r, dlog_r, extrapolate):
  law = _paper_law()
  n, t, r = 10 ** log_n, 10 ** log_t, 10 ** log_r
  t2, r2 = t * 10 ** dlog_t, r * 10 ** dlog_r
  a = fit.predict(law, n, [t, t2, t], [r, r, r2], extrapolate=extrapolate)
  if not np.isnan(a[0]):
    assert np.isnan(a[1]) or a[1] <= a[0] * (1 + 1e-12)
    assert np.isnan(a[2]) or a[2] >= a[0] * (1 - 1e-12)


# --- refusals ----------------------------------------------------------------------------

def _small_points(**kw):
  return known.point_rows(models={"a": 4_500_000, "b": 41_000_000}, steps=known.STEPS[::2],
                          ratios=known.RATIOS[::4], learning_rates={1e-3: 0.0}, **kw)


def test_degenerate_E_refused_and_fit_without_tail():
  """A non-private curve with no saturation (a pure power law) has E stuck at 0."""
  rows = [dict(r, loss=r["loss"] - float(known.known_E(r["params"])))
          if r["noise_batch_ratio"] == 0 else r for r in _small_points()]
  with pytest.raises(fit.DegenerateAsymptote, match=r"model 'a'.*E=.*degenerate"):
    fit.fit_law(rows)
  law = fit.fit_law(rows, tail_factor=1)
  assert fit.support(law)["steps"] == [1000, known.STEPS[::2][-1]]
  assert all(m["E"] is None for m in law["models"])
  t = np.geomspace(1000, 1e7, 30)
  pred = fit.predict(law, 1e7, t, 1e-4, extrapolate=True)
  assert np.all(np.isfinite(pred)) and np.all(np.diff(pred) <= 0)
  assert np.all(np.isnan(fit.predict(law, 1e7, t[t > known.STEPS[-1]], 1e-4)))


def test_too_few_points_and_missing_curves_refused():
  rows = _small_points()
  sparse = [r for r in rows if not (r["model"] == "b" and r["noise_batch_ratio"] == 2.0 ** -12
                                    and r["steps"] > 2000)]
  with pytest.raises(ValueError, match=r"model 'b', noise_batch_ratio 0\.000244141: 2 point"):
    fit.fit_law(sparse)
  with pytest.raises(ValueError, match="model 'a' has no non-private curve"):
    fit.fit_law([r for r in rows if not (r["model"] == "a" and r["noise_batch_ratio"] == 0)])
  with pytest.raises(ValueError, match="model 'a' has no private curve"):
    fit.fit_law([r for r in rows if r["model"] != "a" or r["noise_batch_ratio"] == 0])
  short = [r for r in rows if (r["model"] == "a") == (r["steps"] <= 4000)]
  with pytest.raises(ValueError, match="steps ranges do not overlap"):
    fit.fit_law(short, tail_factor=1)


def test_non_monotone_table_refused():
  """Holes can keep the isotonic passes from agreeing; such a table is reported, not fitted."""
  table = {"params": 10, "ratios": np.array([0.0, 1e-3]), "steps": np.array([1.0, 2.0, 3.0]),
           "loss": np.array([[3.0, np.nan, 2.0], [np.nan, 2.5, 1.0]]),
           "best_lr": np.full((2, 3), 1e-3), "points": 4, "monotone": False}
  with pytest.raises(ValueError, match="model 'm': its loss table is not monotone"):
    fit._fit_model("m", table, min_points=2, tail_factor=64.0)


def test_point_rows_checked():
  good = _small_points()
  with pytest.raises(ValueError, match=r"rows\[3\].*unknown batch_size"):
    fit.fit_law(good[:3] + [dict(good[3], batch_size=8)] + good[4:])
  with pytest.raises(ValueError, match=r"rows\[0\].*missing loss"):
    fit.fit_law([{k: v for k, v in good[0].items() if k != "loss"}] + good[1:])
  for key, bad in (("loss", float("nan")), ("steps", 2.5), ("noise_batch_ratio", -1.0),
                   ("params", 0), ("learning_rate", "x")):
    with pytest.raises(ValueError, match=rf"rows\[1\]: {key}="):
      fit.fit_law(good[:1] + [dict(good[1], **{key: bad})] + good[2:])


# --- sweep rows -----------------------------------------------------------------------------

def test_sweep_rows_fit_and_record_their_limits():
  rows = synthetic_rows()
  points = fit.points_from_rows(rows)
  assert min(p["steps"] for p in points) > 10  # warm-up dropped
  assert set(points[0]) == set(fit.POINT_KEYS)
  law = fit.fit_law(rows)
  assert [m["model"] for m in law["models"]] == ["tiny", "small", "mid"]
  for m in law["models"]:
    assert m["E"] == pytest.approx(MODELS[m["model"]][1], abs=0.03)
  s = fit.support(law)
  assert s["seq_len"] == 64 and s["max_sampling_prob"] == 64 / 10_000
  assert s["max_epochs"] == pytest.approx(64 / 10_000 * STEPS[-1])
  assert s["steps"] == [int(STEPS[STEPS > 10][0]), int(STEPS[-1]) * 64]
  # Mixed with point rows (no q or epochs of their own): unknown unless given.
  mixed = rows + [dict(p, model="tiny") for p in fit.points_from_rows(rows[:1])]
  assert fit.support(fit.fit_law(mixed))["max_epochs"] is None
  assert fit.support(fit.fit_law(mixed, max_epochs=500.0))["max_epochs"] == 500.0
  with pytest.raises(ValueError, match="seq_len=128 differs"):
    fit.fit_law(rows, seq_len=128)


def test_law_round_trip(tmp_path, paper_law):
  path = tmp_path / "law.json"
  fit.save_law(paper_law, path)
  again = fit.load_law(path)
  assert json.loads(json.dumps(paper_law)) == again
  q = (np.array([5e6, 3e8]), np.array([1500, 3e6]), np.array([1e-6, 1e-3]))
  np.testing.assert_array_equal(fit.predict(again, *q), fit.predict(paper_law, *q))
  (tmp_path / "bad.json").write_text('{"format": "something-else"}')
  with pytest.raises(ValueError, match="dpfl-scaling-law"):
    fit.load_law(tmp_path / "bad.json")
  (tmp_path / "v1.json").write_text(json.dumps(dict(again, version=1)))
  with pytest.raises(ValueError, match="version 1.*refit"):
    fit.load_law(tmp_path / "v1.json")


def test_shipped_law_loads():
  law = fit.load_law()
  s = fit.support(law)
  assert law["version"] == 2 and s["seq_len"] == 64
  lo = [v[0] for v in (s["params"], s["steps"], s["noise_batch_ratio"])]
  assert np.isfinite(fit.predict(law, *lo))


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
