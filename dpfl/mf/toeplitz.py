"""Lower-triangular Toeplitz matrices as coefficient sequences, in O(n) or O(n log n).

A lower-triangular Toeplitz ``n x n`` matrix is its first column ``c_0 ..
c_{n-1}``, i.e. the power series ``c(x) = sum_t c_t x^t`` truncated at
``x^n``: products of such matrices are products of series, inverses are
reciprocal series. For a Toeplitz workload ``a`` and strategy ``c``,
``B = A C^{-1}`` is Toeplitz with coefficients ``beta = a / c``, row ``i`` of
``B`` has squared norm ``sum_{t <= i} beta_t^2`` (non-decreasing in ``i``),
so

    max_i ||B_i||^2 = sum_t beta_t^2,
    ||B||_F^2 / n   = sum_t (n - t) beta_t^2 / n.
"""

from __future__ import annotations

import numpy as np

from dpfl.mf.participation import Participation
from dpfl.mf.workload import Workload


def sqrt_coefs(num_steps: int) -> np.ndarray:
  """Coefficients of ``(1 - x)^(-1/2)``: ``c_0 = 1, c_k = c_{k-1} (2k - 1) / (2k)``.

  The square-root factorization ``C = A^{1/2}`` of the prefix-sum matrix
  (Fichtenberger, Henzinger, Upadhyay, arXiv 2202.11205): ``C C = A``.
  """
  k = np.arange(1, num_steps)
  return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])


def sqrt_inverse_coefs(num_steps: int) -> np.ndarray:
  """Coefficients of ``(1 - x)^(1/2)``, the inverse of the square-root strategy:
  ``d_0 = 1, d_k = d_{k-1} (2k - 3) / (2k)``."""
  k = np.arange(1, num_steps)
  return np.concatenate([[1.0], np.cumprod((2 * k - 3) / (2 * k))])


def materialize(coefs: np.ndarray, num_steps: int) -> np.ndarray:
  """The dense lower-triangular Toeplitz matrix with first column ``coefs`` (padded)."""
  col = np.zeros(num_steps)
  coefs = np.asarray(coefs, dtype=float)[:num_steps]
  col[:len(coefs)] = coefs
  idx = np.arange(num_steps)
  diff = idx[:, None] - idx[None, :]
  return np.where(diff >= 0, col[np.clip(diff, 0, None)], 0.0)


def multiply(lhs: np.ndarray, rhs: np.ndarray, num_steps: int) -> np.ndarray:
  """Coefficients of the product of two lower-triangular Toeplitz matrices."""
  from scipy import signal  # deferred: scipy.signal is slow to import
  return signal.convolve(np.asarray(lhs, float), np.asarray(rhs, float))[:num_steps]


def inverse_coefs(coefs: np.ndarray, num_steps: int) -> np.ndarray:
  """Coefficients of ``C^{-1}`` (the reciprocal series), ``O(n len(coefs))``."""
  from scipy import signal
  coefs = np.asarray(coefs, dtype=float)
  if coefs[0] == 0:
    raise ValueError("coefs[0] must be nonzero for C to be invertible")
  impulse = np.zeros(num_steps)
  impulse[0] = 1.0
  return signal.lfilter([1.0], coefs[:num_steps], impulse)


def error_coefs(coefs: np.ndarray, workload: Workload) -> np.ndarray:
  """Coefficients ``beta`` of ``B = A C^{-1}`` for a Toeplitz workload."""
  return apply_workload(inverse_coefs(coefs, workload.num_steps), workload)


def apply_workload(inverse: np.ndarray, workload: Workload) -> np.ndarray:
  """``beta`` of ``B = A C^{-1}`` from the ``n`` coefficients of ``C^{-1}``."""
  from scipy import signal
  return signal.sosfilt(workload.filter_sections(), np.asarray(inverse, float))


def row_errors(beta: np.ndarray) -> np.ndarray:
  """Squared row norms of the Toeplitz ``B`` with coefficients ``beta``."""
  return np.cumsum(np.square(beta))


def error_weights(num_steps: int, objective: str) -> np.ndarray:
  """``w`` with ``error = sum_t w_t beta_t^2`` (see the module docstring)."""
  if objective == "max":
    return np.ones(num_steps)
  return (num_steps - np.arange(num_steps)) / num_steps


def is_nonneg_nonincreasing(coefs: np.ndarray) -> bool:
  coefs = np.asarray(coefs, dtype=float)
  return bool(np.all(coefs >= 0) and np.all(np.diff(coefs) <= 0))


def pattern_column_sum(coefs: np.ndarray, participation: Participation,
                       num_steps: int) -> np.ndarray:
  """``C u`` for ``u`` = steps ``0, b, 2b, .. < n`` (``b`` need not divide ``n``)."""
  _, b = participation
  k = -(-num_steps // b)
  col = np.zeros(k * b)
  coefs = np.asarray(coefs, dtype=float)[:num_steps]
  col[:len(coefs)] = coefs
  return np.cumsum(col.reshape(k, b), axis=0).reshape(-1)[:num_steps]


def pattern_column_sum_grad(v: np.ndarray, participation: Participation) -> np.ndarray:
  """Gradient of ``||v||^2`` in ``coefs`` for ``v = pattern_column_sum(coefs, ...)``."""
  _, b = participation
  n = len(v)
  k = -(-n // b)
  padded = np.zeros(k * b)
  padded[:n] = v
  return 2 * np.cumsum(padded.reshape(k, b)[::-1], axis=0)[::-1].reshape(-1)[:n]


def sensitivity_squared(coefs: np.ndarray, participation: Participation,
                        num_steps: int) -> float | None:
  """Exact ``sens(C)^2`` of a Toeplitz ``C``, or None when no O(n) rule applies.

  * Single participation: every column is a truncation of the first, so
    ``sens^2 = ||c||^2``.
  * ``len(coefs) <= b`` (banded, b-min-separation): columns of one pattern are
    orthogonal and the first ``k`` full columns fit, so ``sens^2 = k ||c||^2``.
  * Non-negative, non-increasing coefficients: the worst pattern is
    ``0, b, 2b, ...`` (arXiv 2405.13763, Thm. 2), ``||C u||^2``.
  * Fixed-epoch order: ``C u_r`` is ``C u_0`` shifted down by ``r`` and
    truncated (Toeplitz), so ``u_0 = 0, b, 2b, ...`` is the worst of the ``b``
    patterns for any coefficients; exact for vector contributions when the
    coefficients are non-negative (``X >= 0``), and with fewer than ``b`` of
    them (orthogonal columns of a pattern) ``max_r sum ||c_i||^2``.

  None means: compute it from the dense matrix (``sensitivity``).
  """
  coefs = np.asarray(coefs, dtype=float)[:num_steps]
  if participation.is_single:
    return float(coefs @ coefs)
  k, b = participation
  if participation.kind == "fixed-epoch":
    nonzero = np.flatnonzero(coefs)
    if len(nonzero) and nonzero[-1] < b:
      from dpfl.mf.sensitivity import fixed_epoch_pattern_sums
      # ||c_i||^2 of column i: the first n - i coefficients.
      norms2 = np.cumsum(np.square(np.pad(coefs, (0, num_steps - len(coefs)))))[::-1]
      return float(fixed_epoch_pattern_sums(norms2, b).max())
    if np.all(coefs >= 0):
      v = pattern_column_sum(coefs, participation, num_steps)
      return float(v @ v)
    return None
  nonzero = np.flatnonzero(coefs)
  if len(nonzero) and nonzero[-1] < b:
    return float(k * (coefs @ coefs))
  if is_nonneg_nonincreasing(coefs):
    v = pattern_column_sum(coefs, participation, num_steps)
    return float(v @ v)
  return None


def losses(coefs: np.ndarray, workload: Workload, sens_squared: float) -> tuple[float, float]:
  """``(max_loss, mean_loss)`` of a Toeplitz strategy on a Toeplitz workload."""
  beta = error_coefs(coefs, workload)
  n = workload.num_steps
  sq = np.square(beta)
  return (sens_squared * float(sq.sum()),
          sens_squared * float((n - np.arange(n)) @ sq) / n)


def fits_dense(num_steps: int) -> bool:
  """Whether an ``n x n`` float64 matrix is small enough to build (<= 512 MiB)."""
  return num_steps * num_steps * 8 <= 512 * 2**20

