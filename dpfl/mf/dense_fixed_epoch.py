"""Dense strategies optimized for fixed-epoch participation.

Fixed-epoch order (``participation.FixedEpoch``; Choquette-Choo et al. 2023,
"Multi-Epoch Matrix Factorization Mechanisms", arXiv 2211.06530, Sec. 3)
has the ``b`` patterns ``pi_r = {r, r + b, ...}``. With ``X = C^T C`` we
impose their orthogonality constraints, ``X_ij = 0`` for ``i != j`` in one
pattern, so the sensitivity depends only on the diagonal and is exact for
vector contributions (``sens^2 = max_r sum_{i in pi_r} X_ii``), and minimize

    error(X') over X,   X' = D X D,   D_ii = (sum_{j in pi_r(i)} X_jj)^(-1/2)

(``error`` the mean, or for ``max`` the ``p``-norm, of ``diag(A X'^{-1}
A^T)``): ``X'`` has every pattern's diagonal sum equal to 1 (``sens = 1``)
and the constraints hold by construction, so L-BFGS runs unconstrained on the
free entries of ``X`` (the lower triangle less the pattern pairs). One loss
and gradient is a Cholesky factorization and two ``n x n`` triangular solves.
The start is the ``b``-banded optimum (``banded.optimize_banded``), which
satisfies the constraints (its ``X`` is zero beyond the band) and is dpfl's
min-separation strategy; the result is kept only where it improves on it.
"""

from __future__ import annotations

import math
import time

import numpy as np

from dpfl.mf import _lbfgs


class _FixedEpochLoss:
  """``log(error(X'))`` and its gradient over the free entries of ``X``."""

  def __init__(self, workload, period: int, objective: str):
    n = workload.num_steps
    self.n, self.b, self.objective = n, period, objective
    self.A = workload.matrix()
    steps = np.arange(n)
    residue = steps % period
    lower = steps[:, None] >= steps[None, :]
    self.free = lower & ((residue[:, None] != residue[None, :]) | (steps[:, None] == steps[None, :]))
    self.residue = residue

  def pack(self, X: np.ndarray) -> np.ndarray:
    return X[self.free]

  def unpack(self, params: np.ndarray) -> np.ndarray:
    X = np.zeros((self.n, self.n))
    X[self.free] = params
    return X + np.tril(X, -1).T

  def normalized(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X'``, the per-step scale ``s`` (``X' = X / s s^T``) and the pattern sums ``d``."""
    d = np.bincount(self.residue, weights=np.diag(X), minlength=self.b)
    s = np.sqrt(d[self.residue])
    return X / s[:, None] / s[None, :], s, d

  def _weights(self, errors: np.ndarray) -> np.ndarray:
    if self.objective == "mean":
      return np.full(self.n, 1.0 / self.n)
    from dpfl.mf.banded import MAX_OBJECTIVE_P as p
    top = errors.max()
    norm = top * float(np.sum((errors / top) ** p)) ** (1 / p)
    return (errors / norm) ** (p - 1)

  def __call__(self, params: np.ndarray) -> tuple[float, np.ndarray]:
    import scipy.linalg as sla
    X = self.unpack(params)
    if np.any(np.diag(X) <= 0):
      return np.inf, np.zeros_like(params)
    Xn, s, d = self.normalized(X)
    try:
      chol = sla.cholesky(Xn, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
      return np.inf, np.zeros_like(params)
    Z = sla.solve_triangular(chol, self.A.T, lower=True, check_finite=False)
    errors = np.einsum("ji,ji->i", Z, Z)
    weights = self._weights(errors)
    error = float(weights @ errors)  # the mean, or the p-norm (1-homogeneous)
    if not (np.isfinite(error) and error > 0):
      return np.inf, np.zeros_like(params)
    # d error / d X' = -H, H = Y A^T W A Y with Y = X'^{-1}.
    M = sla.solve_triangular(chol, Z * np.sqrt(weights)[None, :], lower=True, trans="T",
                             check_finite=False)
    H = M @ M.T
    grad = -H / s[:, None] / s[None, :]
    # Through the pattern sums d_r (X' = X_ij / (s_i s_j), s_i = sqrt(d_r(i))).
    through = np.bincount(self.residue, weights=np.sum(H * Xn, axis=1), minlength=self.b) / d
    grad[np.diag_indices(self.n)] += through[self.residue]
    grad = 2 * grad - np.diag(np.diag(grad))  # symmetric X: off-diagonal entries count twice
    return math.log(error), grad[self.free] / error


def optimize(workload, participation, objective: str, *, max_iterations: int = 2000,
             rel_tol: float = 1e-9) -> tuple[np.ndarray, dict]:
  """``C`` (lower-triangular, ``sens = 1`` under ``participation``) and diagnostics."""
  from dpfl.mf import banded, dense
  start = time.perf_counter()
  n, b = workload.num_steps, participation.min_separation
  warm = banded.optimize_banded(n, bands=b, participation=participation, objective=objective,
                                workload=workload)
  loss = _FixedEpochLoss(workload, b, objective)
  X0 = warm.matrix.T @ warm.matrix
  X0 = loss.normalized(np.where(loss.free | loss.free.T, X0, 0.0))[0]
  params, _, iterations = _lbfgs.minimize(loss, loss.pack(X0), max_iterations=max_iterations,
                                          rel_tol=rel_tol, memory=20)
  X = loss.normalized(loss.unpack(params))[0]
  C = dense.lower_factor(X)
  candidates = [C, warm.matrix / math.sqrt(warm.sensitivity ** 2)]
  info = {"iterations": iterations + int(warm.info.get("iterations", 0)),
          "warm_start": "banded", "bands_of_start": b}
  if objective == "max":
    from dpfl.mf import losses
    worst = [float(losses.row_errors(c, workload).max()) for c in candidates]
    C = candidates[int(np.argmin(worst))]
  info["optimizer_seconds"] = time.perf_counter() - start
  return C, info
