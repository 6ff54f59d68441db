"""Optimized strategies are never worse than the fixed baselines, and are what they claim."""

import numpy as np
import pytest

import dpfl.mf as mf

CASES = [(64, 1), (64, 4), (96, 3)]


def _truncated_sqrt(n, bands, participation):
  """The in-family baseline: square-root coefficients cut to ``bands``, columns normalized."""
  from dpfl.mf import toeplitz
  C = toeplitz.materialize(toeplitz.sqrt_coefs(bands), n)
  C /= np.linalg.norm(C, axis=0)
  diagonals = np.stack([np.concatenate([np.diag(C, -d), np.zeros(d)]) for d in range(bands)])
  return mf.BandedStrategy(num_steps=n, participation=participation, workload=None,
                           diagonals=diagonals)


@pytest.mark.parametrize("n,k", CASES)
@pytest.mark.parametrize("objective", ["max", "mean"])
def test_never_worse_than_the_baselines(n, k, objective):
  p = (k, n // k)
  b = n // k
  sqrt = mf.sqrt_toeplitz(n, participation=p).loss(objective)
  identity = mf.identity(n, participation=p).loss(objective)
  blt = mf.optimize_blt(n, buffers=3, participation=p, objective=objective)
  banded_full = mf.optimize_banded(n, bands=b, participation=p, objective=objective)
  banded_8 = mf.optimize_banded(n, bands=8, participation=p, objective=objective)
  toeplitz_8 = mf.optimize_banded(n, bands=8, participation=p, objective=objective,
                                  toeplitz=True)
  dense = mf.optimize_dense(n, participation=p, objective=objective)
  for s in (blt, banded_full, banded_8, toeplitz_8, dense):
    assert s.loss(objective) <= identity, s.name
    assert s.objective == objective
  # Families that contain (a rescaling of) the square root, or its b-banded optimum.
  for s in (banded_full, dense):
    assert s.loss(objective) <= sqrt * (1 + 1e-9), (s.name, s.loss(objective), sqrt)
  # Fewer bands than the square root has: beat its truncation to those bands.
  truncated = _truncated_sqrt(n, 8, p).loss(objective)
  for s in (banded_8, toeplitz_8):
    assert s.loss(objective) <= truncated * (1 + 1e-9), (s.loss(objective), truncated)
  assert banded_8.loss(objective) <= toeplitz_8.loss(objective) * (1 + 1e-9)
  # A 3-buffer BLT is a restricted Toeplitz: the square root (optimal for single-
  # participation max loss up to lower-order terms, arXiv 2404.16706) may win there,
  # by well under 1%; everywhere else the BLT must win.
  slack = 5e-3 if (k == 1 and objective == "max") else 1e-9
  assert blt.loss(objective) <= sqrt * (1 + slack), (blt.loss(objective), sqrt)


def test_banded_with_one_band_is_identity():
  for n, k in [(32, 1), (32, 4)]:
    s = mf.optimize_banded(n, bands=1, participation=(k, n // k))
    ident = mf.identity(n, participation=(k, n // k))
    assert np.allclose(s.matrix, np.eye(n))
    assert s.max_loss == pytest.approx(ident.max_loss)
    assert s.mean_loss == pytest.approx(ident.mean_loss)


def test_banded_structure_and_unit_columns():
  n, bands = 48, 5
  s = mf.optimize_banded(n, bands=bands, participation=(4, 12))
  C = s.matrix
  i, j = np.indices(C.shape)
  assert np.all(C[(i - j >= bands) | (j > i)] == 0)
  assert np.allclose(np.linalg.norm(C, axis=0), 1.0)
  assert s.num_bands == bands
  assert s.sensitivity == pytest.approx(2.0)  # sqrt(k)


def test_general_banded_improves_on_banded_toeplitz():
  n, bands = 128, 8
  general = mf.optimize_banded(n, bands=bands)
  toeplitz = mf.optimize_banded(n, bands=bands, toeplitz=True)
  assert general.mean_loss < toeplitz.mean_loss
  assert general.info["toeplitz_coefs"][0] == 1.0


def test_blt_parameters_interlace_and_give_decreasing_coefficients():
  for k in (1, 4):
    s = mf.optimize_blt(128, buffers=3, participation=(k, 128 // k))
    theta = s.buffer_decay
    zeros = np.array(s.info["inverse_buffer_decay"])
    # The optimum may cancel a pole against its zero (fewer buffers), never add one.
    d = len(theta)
    assert 1 <= d <= 3 and s.info["buffers_requested"] == 3
    assert theta.shape == s.output_scale.shape == zeros.shape == (d,)
    assert np.all((theta > 0) & (theta < 1))
    assert np.all(s.output_scale > 0)
    merged = np.empty(2 * d)
    merged[0::2], merged[1::2] = theta, zeros
    assert np.all(np.diff(merged) < 0)
    c = s.matrix[:, 0]
    assert c[0] == 1.0 and np.all(np.diff(c) <= 0) and np.all(c > 0)


@pytest.mark.parametrize("objective", ["mean", "max"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_blt_with_more_buffers_than_the_optimum_needs(momentum, objective):
  # Short multi-epoch runs: L-BFGS collapses buffers onto each other or onto 0
  # (once a division by zero). The returned BLT drops the cancelled pairs and
  # is as good as the optimum with fewer buffers.
  from dpfl.mf.workload import Workload
  n, participation = 50, (5, 10)
  workload = Workload(n, momentum=momentum) if momentum else None
  many = mf.optimize_blt(n, buffers=4, participation=participation, workload=workload,
                         objective=objective)
  one = mf.optimize_blt(n, buffers=1, participation=participation, workload=workload,
                        objective=objective)
  assert np.all(np.isfinite(many.output_scale)) and many.num_buffers <= 4
  assert np.isfinite(many.loss(objective))
  assert many.loss(objective) <= one.loss(objective) * (1 + 1e-6)


def test_blt_max_loss_approaches_the_square_root():
  # The square root is optimal for single-participation max loss up to lower-order
  # terms; BLTs approach it as buffers grow (Dvijotham et al. 2024, arXiv 2404.16706).
  n = 512
  sqrt = mf.sqrt_toeplitz(n).max_loss
  losses = [mf.optimize_blt(n, buffers=d, objective="max").max_loss for d in (1, 2, 3, 4)]
  assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(losses, losses[1:]))
  assert losses[0] > 1.01 * sqrt
  assert losses[-1] < 1.002 * sqrt
  assert losses[-1] > 0.99 * sqrt


def test_dense_certificate_brackets_the_loss():
  n = 96
  s = mf.optimize_dense(n)
  lower = s.info["lower_bound"]
  assert lower <= s.mean_loss <= lower * (1 + 1e-4)
  for other in (mf.sqrt_toeplitz(n), mf.optimize_blt(n, buffers=3),
                mf.optimize_banded(n, bands=16)):
    assert other.mean_loss >= lower


def test_dense_multi_participation_is_banded_at_the_separation():
  n, k = 48, 4
  s = mf.optimize_dense(n, participation=(k, n // k))
  C = s.matrix
  i, j = np.indices(C.shape)
  assert np.all(C[i - j >= n // k] == 0)
  assert s.sensitivity_exact
