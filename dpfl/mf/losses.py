"""Error of a factorization ``A = B C``, from dense matrices.

For a strategy ``C`` (``m x n``, full column rank) the least-squares decoder
``B = A C^+`` is the optimal linear estimator (Honaker 2015, "Efficient use of
differentially private binary trees"; for square ``C``, ``B = A C^{-1}``). Its
squared row norms are ``diag(A X^{-1} A^T)`` with ``X = C^T C``, so every
quantity here depends on ``C`` only through ``X``. With unit-variance noise
scaled to the sensitivity:

    max_loss  = sens(C)^2 * max_i ||B_i||^2
    mean_loss = sens(C)^2 * ||B||_F^2 / n

E.g. DP-SGD (``C = I``) on prefix sums: ``max_loss = n``,
``mean_loss = (n + 1) / 2``.
"""

from __future__ import annotations

import numpy as np

from dpfl.mf.workload import Workload


def row_errors(matrix: np.ndarray, workload: Workload) -> np.ndarray:
  """``||B_i||^2`` for ``B = A C^+`` (``A C^{-1}`` for square ``C``)."""
  import scipy.linalg as sla  # deferred: keeps `import dpfl.mf` light
  C = np.asarray(matrix, dtype=float)
  A = workload.matrix()
  if C.shape[0] == C.shape[1] and not np.any(np.triu(C, 1)):
    # B^T = C^{-T} A^T: one triangular solve.
    Bt = sla.solve_triangular(C, A.T, lower=True, trans="T", check_finite=False)
    return np.einsum("ji,ji->i", Bt, Bt)
  return gram_row_errors(C.T @ C, workload)


def gram_row_errors(gram: np.ndarray, workload: Workload) -> np.ndarray:
  """``diag(A X^{-1} A^T)`` from the Gram matrix ``X = C^T C`` (Cholesky)."""
  import scipy.linalg as sla
  A = workload.matrix()
  chol = sla.cholesky(np.asarray(gram, dtype=float), lower=True, check_finite=False)
  Z = sla.solve_triangular(chol, A.T, lower=True, check_finite=False)
  return np.einsum("ji,ji->i", Z, Z)


def max_and_mean(row_err: np.ndarray, sens_squared: float) -> tuple[float, float]:
  """``(max_loss, mean_loss)`` from squared row norms of ``B`` and ``sens^2``."""
  return sens_squared * float(np.max(row_err)), sens_squared * float(np.mean(row_err))
