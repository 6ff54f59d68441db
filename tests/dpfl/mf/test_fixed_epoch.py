"""Fixed-epoch participation: unit r takes part at exactly r, r + b, r + 2b, ... < n.

References are brute force over the b patterns, written out here (not the
library's enumeration), and min-separation (a superset of patterns) as an
upper bound.
"""

import numpy as np
import pytest

import dpfl.mf as mf
from dpfl.mf import sensitivity as sens_lib

from mf_reference import brute_sensitivity


def fixed_epoch_brute(C, b, *, absolute=False):
  """max_r of ||sum_{t in pi_r} C[:, t]||^2 (or of sum |X| over the pattern)."""
  n = C.shape[1]
  best = 0.0
  for r in range(min(b, n)):
    steps = list(range(r, n, b))
    if absolute:
      X = C.T @ C
      best = max(best, float(sum(abs(X[i, j]) for i in steps for j in steps)))
    else:
      best = max(best, float(np.sum(C[:, steps].sum(axis=1) ** 2)))
  return best


def test_construction_and_counts():
  p = mf.fixed_epoch(10, min_separation=4)
  assert tuple(p) == (3, 4) and p.kind == "fixed-epoch"
  assert [list(q) for q in p.patterns(10)] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
  assert mf.fixed_epoch(12, num_participations=4) == mf.FixedEpoch(4, 3)
  assert mf.fixed_epoch(10, num_participations=3) == mf.FixedEpoch(3, 4)
  assert mf.fixed_epoch(7).is_single
  # Not the min-separation pattern with the same numbers.
  assert mf.FixedEpoch(4, 3) != mf.Participation(4, 3)
  assert mf.Participation(4, 3) != mf.FixedEpoch(4, 3)
  assert len({mf.FixedEpoch(4, 3), mf.Participation(4, 3)}) == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"num_participations": 6}, "num_participations=6"),   # n = 10: b = 2 gives 5
    ({"min_separation": 4, "num_participations": 2}, "ceil"),
    ({"min_separation": 11}, "min_separation"),
    ({"num_participations": 0}, "num_participations"),
])
def test_bad_fixed_epoch(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mf.fixed_epoch(10, **kwargs)


# (n, b), including b not dividing n.
SHAPES = [(6, 6), (6, 3), (8, 2), (9, 3), (10, 4), (11, 3), (12, 5), (7, 1)]


@pytest.mark.parametrize("n,b", SHAPES)
def test_gram_sensitivity_matches_brute_force(n, b):
  rng = np.random.default_rng(n * 100 + b)
  p = mf.fixed_epoch(n, min_separation=b)
  # Non-negative C: X >= 0, so sum over the pattern is exact (= ||C u_r||^2).
  C = np.tril(rng.uniform(0.1, 1.0, size=(n, n)))
  value, exact = sens_lib.gram_sensitivity_squared(C.T @ C, p)
  assert exact
  assert value == pytest.approx(fixed_epoch_brute(C, b), rel=1e-12)
  assert mf.brute_force_sensitivity(C, p) ** 2 == pytest.approx(value, rel=1e-12)
  # Mixed signs: the |X| bound, flagged not exact unless nothing shared is negative.
  C = np.tril(rng.normal(size=(n, n)))
  value, exact = sens_lib.gram_sensitivity_squared(C.T @ C, p)
  assert value == pytest.approx(fixed_epoch_brute(C, b, absolute=True), rel=1e-12)
  assert value >= fixed_epoch_brute(C, b) * (1 - 1e-12)
  if p.num_participations > 1:
    X = C.T @ C
    negative = any(X[i, j] < 0 for r in range(b) for i in range(r, n, b)
                   for j in range(r, n, b) if i != j)
    assert exact == (not negative)


@pytest.mark.parametrize("n,k", [(6, 1), (8, 2), (9, 3), (12, 4), (12, 3)])
@pytest.mark.parametrize("make", [mf.identity, mf.tree, mf.sqrt_toeplitz])
def test_fixed_strategies_below_min_separation(make, n, k):
  b = n // k
  fixed = make(n, participation=mf.FixedEpoch(k, b))
  minsep = make(n, participation=(k, b))
  assert fixed.sensitivity ** 2 == pytest.approx(fixed_epoch_brute(fixed.matrix, b), rel=1e-12)
  assert fixed.sensitivity_exact
  assert fixed.sensitivity <= minsep.sensitivity * (1 + 1e-12)
  assert minsep.sensitivity == pytest.approx(brute_sensitivity(minsep.matrix, k, b), rel=1e-12)
  if k == 1:
    assert fixed.sensitivity == pytest.approx(minsep.sensitivity, rel=1e-12)


def test_strictly_cheaper_than_min_separation():
  # Tree at n = 24, b = 3: its worst min-separated pattern is not a fixed-epoch one.
  n, b = 24, 3
  fixed = mf.tree(n, participation=mf.FixedEpoch(8, b))
  minsep = mf.tree(n, participation=(8, b))
  assert fixed.sensitivity ** 2 == pytest.approx(fixed_epoch_brute(fixed.matrix, b), rel=1e-12)
  assert fixed.sensitivity < minsep.sensitivity * (1 - 1e-6)
  # A small non-negative C where brute force over min-separated patterns is cheap.
  rng = np.random.default_rng(3)
  C = np.tril(rng.uniform(0, 1, size=(9, 9)))
  fixed = sens_lib.gram_sensitivity_squared(C.T @ C, mf.FixedEpoch(3, 3))[0]
  assert fixed < brute_sensitivity(C, 3, 3) ** 2 * (1 - 1e-6)


@pytest.mark.parametrize("n,b", [(10, 4), (11, 3), (12, 4), (9, 2)])
def test_toeplitz_and_banded_rules_match_dense(n, b):
  p = mf.fixed_epoch(n, min_separation=b)
  rng = np.random.default_rng(n + b)
  # Toeplitz with positive (not monotone) and with mixed-sign coefficients.
  for coefs in (rng.uniform(0.1, 1, size=n), np.concatenate([[1.0], rng.normal(size=n - 1)])):
    s = mf.ToeplitzStrategy(num_steps=n, participation=p, workload=None, coefs=coefs)
    ref, ref_exact = sens_lib.gram_sensitivity_squared(s.matrix.T @ s.matrix, p)
    assert s.sensitivity ** 2 == pytest.approx(ref, rel=1e-12)
    if np.all(coefs >= 0):
      assert s.sensitivity ** 2 == pytest.approx(fixed_epoch_brute(s.matrix, b), rel=1e-12)
  # Banded, bands <= b: orthogonal pattern columns, sum of squared column norms.
  diagonals = rng.normal(size=(b, n))
  diagonals[0] = np.abs(diagonals[0]) + 0.5
  s = mf.BandedStrategy(num_steps=n, participation=p, workload=None, diagonals=diagonals)
  assert s.sensitivity_exact
  assert s.sensitivity ** 2 == pytest.approx(fixed_epoch_brute(s.matrix, b), rel=1e-12)
  # Truncated banded Toeplitz (fewer coefficients than b).
  s = mf.ToeplitzStrategy(num_steps=n, participation=p, workload=None,
                          coefs=np.concatenate([[1.0], rng.normal(size=b - 2)]))
  assert s.sensitivity ** 2 == pytest.approx(fixed_epoch_brute(s.matrix, b), rel=1e-12)


# --- dense strategy optimized for fixed-epoch order -------------------------------

from dpfl.mf import dense_fixed_epoch  # noqa: E402
from dpfl.mf.workload import as_workload  # noqa: E402
from mf_reference import dense_losses, prefix_matrix  # noqa: E402


@pytest.mark.parametrize("n,b,objective", [(12, 4, "mean"), (10, 4, "mean"), (12, 3, "max")])
def test_dense_fixed_epoch_is_exact_and_beats_min_separation(n, b, objective):
  p = mf.fixed_epoch(n, min_separation=b)
  s = mf.optimize_dense(n, participation=p, objective=objective)
  C = s.matrix
  assert np.allclose(np.triu(C, 1), 0)
  # Sensitivity 1 by brute force over the b patterns, exact for vectors: the
  # pattern pairs are orthogonal.
  assert fixed_epoch_brute(C, b) == pytest.approx(1.0, rel=1e-9)
  assert fixed_epoch_brute(C, b, absolute=True) == pytest.approx(1.0, rel=1e-9)
  assert s.sensitivity == pytest.approx(1.0, rel=1e-9) and s.sensitivity_exact
  max_loss, mean_loss = dense_losses(C, prefix_matrix(n), 1.0)
  assert s.max_loss == pytest.approx(max_loss, rel=1e-8)
  assert s.mean_loss == pytest.approx(mean_loss, rel=1e-8)
  # The b-banded min-separation optimum is feasible here: never worse than it.
  if n % b == 0:
    minsep = mf.optimize_dense(n, participation=(n // b, b), objective=objective)
    assert s.loss(objective) <= minsep.loss(objective) * (1 + 1e-9)


def test_dense_fixed_epoch_with_one_epoch_meets_the_certified_single_optimum():
  # b = n: the parametrization is the whole single-participation problem, whose
  # dual value (optimize_dense's lower_bound) certifies the optimum.
  n = 24
  single = mf.optimize_dense(n, objective="mean", rel_gap=1e-8, max_iterations=200)
  C, _ = dense_fixed_epoch.optimize(as_workload(n, None), mf.FixedEpoch(1, n), "mean")
  mean_loss = dense_losses(C, prefix_matrix(n), np.linalg.norm(C, axis=0).max())[1]
  assert mean_loss == pytest.approx(single.info["lower_bound"], rel=1e-6)
  assert mean_loss >= single.info["lower_bound"] * (1 - 1e-9)


def test_dense_fixed_epoch_gradient_matches_finite_differences():
  n, b = 9, 3
  rng = np.random.default_rng(1)
  for objective in ("mean", "max"):
    loss = dense_fixed_epoch._FixedEpochLoss(as_workload(n, None), b, objective)
    C = np.tril(rng.uniform(0.1, 1, (n, n))) + 2 * np.eye(n)
    X = np.where(loss.free | loss.free.T, C.T @ C, 0.0) + 5 * np.eye(n)
    params = loss.pack(X)
    _, grad = loss(params)
    direction = rng.normal(size=params.shape)
    eps = 1e-6
    numeric = (loss(params + eps * direction)[0] - loss(params - eps * direction)[0]) / (2 * eps)
    assert grad @ direction == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.slow
def test_dense_fixed_epoch_target_256_steps_4_epochs():
  # Issue 15's target: jax-privacy's dense.optimize(256, epochs=4) reaches 27.16.
  s = mf.optimize_dense(256, participation=mf.FixedEpoch(4, 64), objective="mean")
  assert s.sensitivity_exact and s.sensitivity == pytest.approx(1.0, rel=1e-9)
  assert s.mean_loss <= 27.165


def test_strategies_keep_the_kind_and_report_it():
  s = mf.sqrt_toeplitz(12, participation=mf.FixedEpoch(3, 4))
  assert isinstance(s.participation, mf.FixedEpoch)
  assert s.summary()["participation"] == "fixed-epoch"
  assert mf.sqrt_toeplitz(12, participation=(3, 4)).summary()["participation"] == "min-sep"


def test_dense_fixed_epoch_optimum_is_stationary_for_the_non_negative_relaxation():
  # Allowing X >= 0 on pattern pairs (sensitivity u_r^T X u_r, still exact) cannot
  # help at the optimum: raising any such entry from 0 raises the normalized loss.
  import scipy.linalg as sla
  n, b = 16, 4
  s = mf.optimize_dense(n, participation=mf.FixedEpoch(4, b), objective="mean")
  X = s.matrix.T @ s.matrix
  A = prefix_matrix(n)

  def mean_loss(X):
    d = [X[r::b, r::b].sum() for r in range(b)]
    scale = np.sqrt(np.array(d)[np.arange(n) % b])
    Z = sla.solve_triangular(sla.cholesky(X / np.outer(scale, scale), lower=True), A.T,
                             lower=True)
    return np.mean(np.sum(Z * Z, axis=0))

  base = mean_loss(X)
  assert base == pytest.approx(s.mean_loss, rel=1e-9)
  for i in range(n):
    for j in range(i + b, n, b):
      E = np.zeros((n, n))
      E[i, j] = E[j, i] = 1e-6
      assert mean_loss(X + E) > base


@pytest.mark.parametrize("n,b", [(14, 4), (12, 4)])
def test_blt_and_banded_optimize_under_fixed_epoch(n, b):
  p = mf.fixed_epoch(n, min_separation=b)
  blt = mf.optimize_blt(n, buffers=2, participation=p, objective="mean")
  assert blt.sensitivity_exact
  assert blt.sensitivity ** 2 == pytest.approx(fixed_epoch_brute(blt.matrix, b), rel=1e-9)
  banded = mf.optimize_banded(n, bands=min(3, b), participation=p)
  assert banded.sensitivity ** 2 == pytest.approx(fixed_epoch_brute(banded.matrix, b), rel=1e-9)
  # The BLT optimizer's own sensitivity (with its gradient) is the exact one.
  from dpfl.mf import blt as blt_lib
  from dpfl.mf import toeplitz
  loss = blt_lib._BltLoss(p, as_workload(n, None), "mean")
  c = blt.toeplitz_coefs()
  value, grad = loss.sens_and_grad(c)
  assert value == pytest.approx(blt.sensitivity ** 2, rel=1e-12)
  direction = np.random.default_rng(0).normal(size=n)
  eps = 1e-7
  numeric = (loss.sens_and_grad(c + eps * direction)[0]
             - loss.sens_and_grad(c - eps * direction)[0]) / (2 * eps)
  assert grad @ direction == pytest.approx(numeric, rel=1e-6)
  assert toeplitz.pattern_column_sum(c, p, n).shape == (n,)
