"""Banded strategies (Toeplitz and general) and their optimizers.

A ``b``-banded ``C`` (nonzero only on its first ``bands`` diagonals) has
columns with disjoint supports once they are ``bands`` apart. Under
b-min-separation with ``bands <= b`` two participations are never closer than
``b``, so their columns are orthogonal and

    sens(C)^2 = max over patterns of the sum of squared column norms

(Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorizations",
arXiv 2306.08153, Thm. 2): with unit column norms, ``sens^2 = k``.

Two optimizers:

* banded Toeplitz (``toeplitz=True``): coefficients ``1, c_1 .. c_{bands-1}``;
  ``B = A C^{-1}`` is an all-pole filter of the workload, so a loss and its
  gradient cost ``O(n * bands)`` (see ``dpfl.mf.toeplitz``). The result is
  returned as is or with its columns normalized (the last ``bands - 1``
  columns are truncated, so normalizing rescales them), whichever has the
  lower loss.
* banded general (default): every band entry free, columns normalized to 1
  (the parametrization of jax-privacy's ``ColumnNormalizedBanded``),
  warm-started at the optimized banded Toeplitz. Row errors and gradient come
  from the noise's state-space covariance recursion, ``O(n bands^2)``, or for
  wide bands from blocked triangular solves, ``O(n^2 bands)`` (see
  ``_banded_ops``). L-BFGS from the Toeplitz start is within 0.1% of its
  limit after about ten iterations.

The ``max`` objective is not smooth for general banded ``C``; it is optimized
through the ``p``-norm of the row errors (``p = 32``) and the result kept only
where its true ``max_loss`` improves on the Toeplitz start.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import ClassVar

import numpy as np

from dpfl.mf import _banded_ops as _ops
from dpfl.mf import _checks as check
from dpfl.mf import _lbfgs
from dpfl.mf import _threads
from dpfl.mf import sensitivity as _sens
from dpfl.mf import strategies as _strategies
from dpfl.mf import toeplitz as _toeplitz
from dpfl.mf.participation import Participation, as_participation
from dpfl.mf.workload import Workload, as_workload

MAX_OBJECTIVE_P = 32.0


def check_bands(bands, num_steps: int, participation: Participation) -> int:
  """``1 <= bands <= n``, and ``bands <= b`` under multiple participations."""
  bands = check.integer("bands", bands, high=num_steps)
  k, b = participation
  if k > 1 and bands > b:
    raise ValueError(
        f"bands must be <= min_separation={b} under {k} participations (columns closer "
        f"than the separation would share a pattern), got {bands}")
  return bands


def band_matrix(diagonals: np.ndarray) -> np.ndarray:
  """Dense ``C`` from ``diagonals[d, j] = C[j + d, j]`` (LAPACK lower band layout)."""
  m, n = diagonals.shape
  C = np.zeros((n, n))
  for d in range(m):
    C[np.arange(d, n), np.arange(n - d)] = diagonals[d, :n - d]
  return C


def _valid(num_bands: int, num_steps: int) -> np.ndarray:
  d = np.arange(num_bands)[:, None]
  return d + np.arange(num_steps)[None, :] < num_steps


def banded_row_errors(diagonals: np.ndarray, workload: Workload) -> np.ndarray:
  """``||B_i||^2`` for ``B = A C^{-1}`` (``O(n m^2)`` or ``O(n^2 m)``, whichever is cheaper)."""
  return _ops.row_errors(diagonals, workload)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class BandedStrategy(_strategies.Strategy):
  """A lower-triangular ``C`` with ``num_bands`` nonzero diagonals.

  Attributes:
    diagonals: ``[num_bands, n]`` with ``diagonals[d, j] = C[j + d, j]``
      (zero where ``j + d >= n``). ``matrix`` is the dense ``C``.
  """

  name: ClassVar[str] = "banded"
  diagonals: np.ndarray

  def __post_init__(self):
    super().__post_init__()
    diagonals = np.array(self.diagonals, dtype=float)
    if diagonals.ndim != 2 or diagonals.shape[1] != self.num_steps:
      raise ValueError(
          f"diagonals must have shape [num_bands, num_steps={self.num_steps}], got "
          f"{diagonals.shape}")
    check.integer("num_bands", diagonals.shape[0], high=self.num_steps)
    diagonals = np.where(_valid(*diagonals.shape), diagonals, 0.0)
    if not np.all(np.isfinite(diagonals)) or np.any(diagonals[0] == 0):
      raise ValueError("diagonals must be finite with a nonzero main diagonal")
    diagonals.setflags(write=False)
    object.__setattr__(self, "diagonals", diagonals)

  @property
  def num_bands(self) -> int:
    """``b``, the number of nonzero diagonals kept (``diagonals.shape[0]``)."""
    return self.diagonals.shape[0]

  def materialize(self) -> np.ndarray:
    return band_matrix(self.diagonals)

  def column_norms(self) -> np.ndarray:
    """The ``n`` column norms ``||C[:, j]||_2``."""
    return np.sqrt(np.sum(np.square(self.diagonals), axis=0))

  def _sensitivity_squared(self) -> tuple[float, bool]:
    k, b = self.participation
    if k == 1 or self.num_bands <= b:
      norms2 = np.square(self.column_norms())
      if self.participation.kind == "fixed-epoch":
        return float(_sens.fixed_epoch_pattern_sums(norms2, b).max()), True
      return float(_sens.max_pattern_sum(norms2, self.participation)), True
    return super()._sensitivity_squared()

  def row_errors(self) -> np.ndarray:
    return banded_row_errors(self.diagonals, self.workload)

  def summary(self):
    out = super().summary()
    out["bands"] = self.num_bands
    return out


# --- banded Toeplitz ------------------------------------------------------------

class _ToeplitzLoss:
  """``log(||c||^2 * error)`` over ``c_1 .. c_{m-1}`` (``c_0 = 1``), O(n m)."""

  def __init__(self, workload: Workload, objective: str):
    n = workload.num_steps
    self.n = n
    self.weights = _toeplitz.error_weights(n, objective)
    impulse = np.zeros(n)
    impulse[0] = 1.0
    from scipy import signal
    self.workload_series = signal.sosfilt(workload.filter_sections(), impulse)

  def __call__(self, tail: np.ndarray) -> tuple[float, np.ndarray]:
    from scipy import signal
    c = np.concatenate([[1.0], tail])
    beta = signal.lfilter([1.0], c, self.workload_series)
    error = float(self.weights @ np.square(beta))
    if not (np.isfinite(error) and error > 0):
      return np.inf, np.zeros_like(tail)
    # d beta / d c_s = -x^s beta / c(x): correlate the adjoint with q = beta / c.
    q = signal.lfilter([1.0], c, beta)
    adjoint = 2 * self.weights * beta
    m = len(c)
    grad_error = -np.array([adjoint[s:] @ q[:self.n - s] for s in range(1, m)])
    norm2 = float(c @ c)
    return math.log(norm2) + math.log(error), 2 * tail / norm2 + grad_error / error


def _optimize_toeplitz_coefs(workload: Workload, bands: int, objective: str,
                             max_iterations: int) -> tuple[np.ndarray, int]:
  from scipy import optimize
  if bands == 1:
    return np.array([1.0]), 0
  # Truncated square-root coefficients: positive and decreasing, so c(x) has no
  # zeros in the unit disk (Enestrom-Kakeya) and 1 / c(x) is a stable filter.
  init = _toeplitz.sqrt_coefs(bands)[1:]
  result = optimize.minimize(_ToeplitzLoss(workload, objective), init, jac=True,
                             method="L-BFGS-B",
                             options={"maxiter": max_iterations, "ftol": 1e-13, "gtol": 1e-10,
                                      "maxcor": 20})
  return np.concatenate([[1.0], result.x]), int(result.nit)


def _toeplitz_diagonals(coefs: np.ndarray, num_steps: int) -> np.ndarray:
  diagonals = np.where(_valid(len(coefs), num_steps), coefs[:, None], 0.0)
  return diagonals / np.sqrt(np.sum(np.square(diagonals), axis=0))


# --- banded general ---------------------------------------------------------------

class _GeneralLoss:
  """``log(error)`` of a column-normalized banded ``C`` over its band entries."""

  def __init__(self, workload: Workload, bands: int, objective: str):
    self.n, self.m = workload.num_steps, bands
    self.objective = objective
    self.valid = _valid(bands, self.n)
    self.ops = (_ops.StateSpace(workload, bands) if _ops.use_state_space(self.n, bands)
                else _ops.BlockedErrors(workload, bands))

  def unpack(self, params: np.ndarray) -> np.ndarray:
    raw = np.zeros((self.m, self.n))
    raw[self.valid] = params
    return raw

  def _weights(self, errors):
    """Per-row weights of the objective's gradient: ``(weights, needs errors)``."""
    if self.objective == "mean":
      return np.full(self.n, 1.0 / self.n), False
    if errors is None:
      return None, True
    # p-norm of the row errors, a smooth stand-in for their max:
    # d ||e||_p / d e_i = (e_i / ||e||_p)^(p - 1).
    top = errors.max()
    norm = top * float(np.sum((errors / top) ** MAX_OBJECTIVE_P)) ** (1 / MAX_OBJECTIVE_P)
    return (errors / norm) ** (MAX_OBJECTIVE_P - 1), False

  def __call__(self, params: np.ndarray) -> tuple[float, np.ndarray]:
    raw = self.unpack(params)
    norms = np.sqrt(np.sum(np.square(raw), axis=0))
    band = raw / norms
    errors, weights, grad_band = self.ops.loss_and_grad(band, self._weights)
    # sum_i w_i e_i is the mean, or the p-norm (Euler: the p-norm is 1-homogeneous).
    error = float(weights @ errors)
    if not (np.isfinite(error) and error > 0):
      return np.inf, np.zeros_like(params)
    # Through the column normalization C = raw / ||raw||: project out the column.
    grad_raw = (grad_band - band * np.sum(band * grad_band, axis=0)) / norms
    return math.log(error), grad_raw[self.valid] / error


def _objective_value(diagonals, participation, workload, objective) -> float:
  strategy = BandedStrategy(num_steps=workload.num_steps, participation=participation,
                            workload=workload, diagonals=diagonals)
  return strategy.loss(objective)


@_threads.blas_pinned
def optimize_banded(num_steps: int, *, bands: int, participation=None,
                    objective: str = "mean", workload=None, toeplitz: bool = False,
                    max_iterations: int = 300, rel_tol: float = 1e-5) -> BandedStrategy:
  """Optimizes a column-normalized ``bands``-banded strategy.

  Args:
    num_steps: ``n`` >= 1.
    bands: number of nonzero diagonals, in ``[1, n]``; at most ``b`` under
      ``(k, b)``-participation with ``k > 1``.
    participation: None (single), a ``Participation`` or a ``(k, b)`` pair.
    objective: ``"max"`` or ``"mean"``.
    workload: None (prefix sums) or a ``Workload``.
    toeplitz: True for banded Toeplitz (O(n bands) per step, any ``n``;
      needs a Toeplitz workload), False for every band entry free
      (``O(n^2 bands)`` per step, warm-started at the banded Toeplitz).
    max_iterations: L-BFGS iteration cap (each stage).
    rel_tol: the general stage stops when an iteration lowers the loss by less
      than this fraction.

  Returns:
    A ``BandedStrategy``; unit column norms (``sens^2 = k``) unless the plain
    banded Toeplitz was better.
  """
  n = check.integer("num_steps", num_steps)
  participation = as_participation(n, participation)
  bands = check_bands(bands, n, participation)
  objective = check.objective(objective)
  workload = as_workload(n, workload)
  max_iterations = check.integer("max_iterations", max_iterations)
  start = time.perf_counter()
  # The Toeplitz stage runs on the Toeplitz part of the workload (prefix sums with
  # its momentum) even for a learning-rate schedule, as a starting point.
  toeplitz_workload = workload if workload.is_toeplitz else Workload(n, workload.momentum)
  if toeplitz and not workload.is_toeplitz:
    raise ValueError("toeplitz=True needs a Toeplitz workload (constant learning rate)")
  coefs, iterations = _optimize_toeplitz_coefs(toeplitz_workload, bands, objective,
                                               max_iterations)
  diagonals = _toeplitz_diagonals(coefs, n)
  info = {"toeplitz": bool(toeplitz), "toeplitz_coefs": coefs.tolist()}
  if toeplitz:
    plain = np.where(_valid(bands, n), coefs[:, None], 0.0)
    if _objective_value(plain, participation, workload, objective) < _objective_value(
        diagonals, participation, workload, objective):
      diagonals = plain
  if not toeplitz and bands > 1:
    if not (_ops.use_state_space(n, bands) or _toeplitz.fits_dense(n)):
      raise ValueError(
          f"bands={bands} is too wide for num_steps={n} (general banded optimization "
          "would need n x n intermediates); use toeplitz=True or fewer bands")
    loss = _GeneralLoss(workload, bands, objective)
    params, _, general_iterations = _lbfgs.minimize(loss, diagonals[loss.valid],
                                                    max_iterations=max_iterations,
                                                    rel_tol=rel_tol, memory=10)
    iterations += general_iterations
    raw = loss.unpack(params)
    candidate = raw / np.sqrt(np.sum(np.square(raw), axis=0))
    if objective == "mean" or (banded_row_errors(candidate, workload).max()
                               < banded_row_errors(diagonals, workload).max()):
      diagonals = candidate
  info.update(iterations=iterations, optimizer_seconds=time.perf_counter() - start)
  return BandedStrategy(num_steps=n, participation=participation, workload=workload,
                        objective=objective, diagonals=diagonals, info=info)
