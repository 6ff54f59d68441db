"""Dense strategies, optimized (Denisov et al. 2022; Choquette-Choo et al. 2023).

Single participation. ``sens(C)^2 = max_i X_ii`` for ``X = C^T C`` and the
loss is scale-free, so the problem is the convex

    min_X  tr(G X^{-1})   subject to  diag(X) = 1,   G = A^T W A

(``W = I / n`` for ``mean_loss``; Denisov et al. 2022, "Improved Differential
Privacy for SGD via Optimal Private Linear Operators on Adaptive Streams",
arXiv 2202.08312, Sec. 4). Its Lagrange dual is
``max_lambda 2 tr((L^{1/2} G L^{1/2})^{1/2}) - sum(lambda)`` with
``L = diag(lambda)``, whose maximizer gives ``X = L^{-1/2} (L^{1/2} G
L^{1/2})^{1/2} L^{-1/2}``. We run the fixed point ``lambda <- lambda *
diag(X)^2`` (stationary exactly when ``diag(X) = 1``), warm-started at the
dual point of the column-normalized square-root factorization, rescale each
iterate to unit diagonal (a feasible primal point) and stop when the best
primal value is within ``rel_gap`` of the dual value, a certified lower bound
on every dense strategy's loss. From that start two or three iterations (one
eigendecomposition each) reach a gap below 1e-4.

``max`` objective: the same solver on ``W = diag(w)``, with ``w`` moved
towards the worst rows (multiplicative weights), then L-BFGS on the
``p``-norm of the row errors (``banded``'s loss with ``n`` bands), keeping
the best of these and the normalized square root.

Multiple participations, b-min-separation. ``sens`` depends only on
``diag(X)`` exactly when ``X_ij = 0`` whenever ``i`` and ``j`` can share a
pattern, i.e. ``|i - j| >= b``; that makes ``X`` banded and its
lower-triangular factor ``b``-banded (Cholesky keeps the band). The optimum
under this structure (the min-separation analogue of the multi-epoch
orthogonality constraints of Choquette-Choo et al. 2023, arXiv 2211.06530)
is the ``b``-banded general strategy, optimized by ``banded.optimize_banded``.

Multiple participations, fixed-epoch order: only pairs in one of the ``b``
patterns ``r, r + b, ...`` must be orthogonal, a much weaker constraint;
``dense_fixed_epoch`` optimizes over it (Choquette-Choo et al. 2023).
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import numpy as np

from dpfl.mf import _checks as check
from dpfl.mf import _threads
from dpfl.mf import strategies as _strategies
from dpfl.mf import toeplitz as _toeplitz
from dpfl.mf.participation import as_participation
from dpfl.mf.workload import as_workload


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class DenseStrategy(_strategies.Strategy):
  """A dense lower-triangular ``C``, given by ``values`` (``n x n``).

  ``optimize_dense`` returns one; any invertible lower-triangular matrix can
  be wrapped to get its sensitivity and losses. Its sensitivity is computed
  from ``C^T C`` (``dpfl.mf.sensitivity``): exact, or a valid upper bound
  where ``sensitivity_exact`` is False.

  Attributes:
    values: ``C``, ``n x n``, lower-triangular (exactly zero above the
      diagonal) with a nonzero diagonal; stored as a read-only float copy.
    num_steps: ``n`` >= 1.
    participation: the pattern ``sensitivity`` is computed under, given as
      None (single participation), a ``(k, b)`` pair or ``Participation``
      (min-separation), or a ``FixedEpoch``; stored checked, as a
      ``Participation`` or ``FixedEpoch``.
    workload: ``A`` the losses are computed for, given as None (prefix sums)
      or a ``Workload`` of ``n`` steps; stored as a ``Workload``.
    objective: ``"max"`` / ``"mean"`` it was optimized for; None (the
      default) when not optimized.
    info: optimizer diagnostics, for reporting; empty by default.
  """

  name: ClassVar[str] = "dense"
  values: np.ndarray

  def __post_init__(self):
    super().__post_init__()
    values = np.array(self.values, dtype=float)
    n = self.num_steps
    if values.shape != (n, n) or np.any(np.triu(values, 1)) or np.any(np.diag(values) == 0):
      raise ValueError(
          f"values must be an invertible lower-triangular {n} x {n} matrix, got shape "
          f"{values.shape}")
    values.setflags(write=False)
    object.__setattr__(self, "values", values)

  def materialize(self) -> np.ndarray:
    return self.values


def lower_factor(gram: np.ndarray) -> np.ndarray:
  """The lower-triangular ``C`` with ``C^T C = X`` (Cholesky of the reversed ``X``)."""
  return np.linalg.cholesky(gram[::-1, ::-1]).T[::-1, ::-1]


class _DualSolver:
  """The fixed point on the dual of ``min tr(G X^{-1}) s.t. diag(X) = 1``."""

  def __init__(self, gram_workload: np.ndarray):
    self.G = gram_workload

  def primal(self, X: np.ndarray) -> float:
    """``tr(G X^{-1})``, via Cholesky (inf if ``X`` is not positive definite)."""
    import scipy.linalg as sla
    try:
      chol = sla.cholesky(X, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
      return np.inf
    Z = sla.solve_triangular(chol, self.G, lower=True, check_finite=False)
    Z = sla.solve_triangular(chol, Z.T, lower=True, check_finite=False)
    return float(np.trace(Z))

  def step(self, lam: np.ndarray):
    """``X(lambda)`` rescaled to unit diagonal, the dual value, and ``diag(X(lambda))``."""
    import scipy.linalg as sla
    root = np.sqrt(lam)
    w, U = sla.eigh(root[:, None] * self.G * root[None, :], check_finite=False)
    S = (U * np.sqrt(np.maximum(w, 0.0))) @ U.T
    dual = 2.0 * float(np.sum(np.sqrt(np.maximum(w, 0.0)))) - float(lam.sum())
    X = S / root[:, None] / root[None, :]
    d = np.diag(X).copy()
    scale = 1.0 / np.sqrt(d)
    return X * scale[:, None] * scale[None, :], dual, d

  def solve(self, X0: np.ndarray, lam0: np.ndarray, *, rel_gap: float, max_iterations: int):
    best_X, best = X0, self.primal(X0)
    lam, dual, iterations = lam0, -np.inf, 0
    for iterations in range(1, max_iterations + 1):
      X, value, d = self.step(lam)
      dual = max(dual, value)
      primal = self.primal(X)
      if primal < best:
        best_X, best = X, primal
      if best - dual <= rel_gap * best:
        break
      lam = lam * d * d
    return best_X, best, dual, iterations, lam


def _dual_start(C0: np.ndarray, weighted_workload: np.ndarray) -> np.ndarray:
  """``diag(X^{-1} G X^{-1})`` at ``X = C0^T C0``: the multiplier ``C0`` would have."""
  import scipy.linalg as sla
  Bt = sla.solve_triangular(C0, weighted_workload.T, lower=True, trans="T", check_finite=False)
  Z = sla.solve_triangular(C0, Bt, lower=True, check_finite=False)  # C0^{-1} C0^{-T} A^T W^{1/2}
  return np.einsum("ij,ij->i", Z, Z)


@_threads.blas_pinned
def optimize_dense(num_steps: int, *, participation=None, objective: str = "mean",
                   workload=None, rel_gap: float = 1e-4, max_iterations: int = 50,
                   max_rounds: int = 8, max_refine_iterations: int = 100):
  """Optimizes a dense strategy for ``n``, participation and objective.

  Args:
    num_steps: ``n`` >= 1.
    participation: None (single), a ``Participation`` or ``(k, b)``; with
      ``k > 1`` the optimum is ``b``-banded (module docstring) and this
      returns ``banded.optimize_banded(..., bands=b)`` as a ``DenseStrategy``.
      A ``FixedEpoch`` with ``k > 1``: ``dense_fixed_epoch.optimize``.
    objective: ``"max"`` or ``"mean"``.
    workload: None (prefix sums) or a ``Workload``.
    rel_gap: stop when the loss is certified within this relative gap of the
      dual lower bound (single participation).
    max_iterations: fixed-point iterations per solve (one ``n x n``
      eigendecomposition each).
    max_rounds: multiplicative-weights rounds for the ``max`` objective.
    max_refine_iterations: L-BFGS iterations refining the ``max`` objective
      (``p``-norm of row errors, as in ``banded``) after those rounds.

  Returns:
    A ``DenseStrategy``; ``info`` holds the certified ``lower_bound`` (single
    participation) and iteration counts.
  """
  n = check.integer("num_steps", num_steps)
  participation = as_participation(n, participation)
  objective = check.objective(objective)
  workload = as_workload(n, workload)
  if not _toeplitz.fits_dense(n):
    raise ValueError(f"num_steps must be small enough for n x n matrices, got {n}")
  start = time.perf_counter()
  if not participation.is_single and participation.kind == "fixed-epoch":
    from dpfl.mf import dense_fixed_epoch
    C, info = dense_fixed_epoch.optimize(workload, participation, objective)
    return DenseStrategy(num_steps=n, participation=participation, workload=workload,
                         objective=objective, values=C, info=info)
  if not participation.is_single:
    from dpfl.mf import banded
    inner = banded.optimize_banded(n, bands=participation.min_separation,
                                   participation=participation, objective=objective,
                                   workload=workload)
    info = dict(inner.info, bands=participation.min_separation,
                optimizer_seconds=time.perf_counter() - start)
    return DenseStrategy(num_steps=n, participation=participation, workload=workload,
                         objective=objective, values=inner.matrix, info=info)
  A = workload.matrix()
  C0 = _toeplitz.materialize(_toeplitz.sqrt_coefs(n), n)
  C0 = C0 / np.linalg.norm(C0, axis=0)
  X0 = C0.T @ C0
  weights = np.full(n, 1.0 / n)
  best = None
  iterations = 0
  for round_ in range(1 if objective == "mean" else max_rounds):
    weighted = np.sqrt(weights)[:, None] * A
    solver = _DualSolver(weighted.T @ weighted)
    lam0 = _dual_start(C0 if round_ == 0 else lower_factor(X0), weighted)
    # Weights move every round: a few warm-started iterations per round suffice.
    X, value, lower, its, _ = solver.solve(
        X0, lam0, rel_gap=rel_gap, max_iterations=max_iterations if objective == "mean" else 3)
    iterations += its
    C = lower_factor(X)
    if objective == "mean":
      best = (value, C, lower)
      break
    errors = _losses_row_errors(C, workload)
    worst = float(errors.max())
    if best is None or worst < best[0]:
      best = (worst, C, None)
    # Multiplicative weights towards the rows with the largest error.
    weights = weights * (errors / worst) ** 8
    weights /= weights.sum()
    X0 = X
  _, C, lower = best
  info = {"iterations": iterations, "optimizer_seconds": time.perf_counter() - start}
  if lower is not None:
    info["lower_bound"] = lower
  if objective == "max":
    C, refine_iterations = _refine_max(C, workload, max_iterations=max_refine_iterations)
    info.update(iterations=iterations + refine_iterations,
                optimizer_seconds=time.perf_counter() - start)
  return DenseStrategy(num_steps=n, participation=participation, workload=workload,
                       objective=objective, values=C, info=info)


def _refine_max(C: np.ndarray, workload, *, max_iterations: int):
  """L-BFGS on the p-norm of the row errors over all lower-triangular entries.

  A dense lower-triangular ``C`` with unit columns is the ``n``-banded
  strategy, so ``banded``'s loss applies; keeps ``C`` unless the true max
  improves. The square-root start is included as a candidate too.
  """
  from dpfl.mf import _lbfgs, banded
  n = C.shape[0]
  loss = banded._GeneralLoss(workload, n, "max")
  diagonals = np.stack([np.concatenate([np.diag(C, -d), np.zeros(d)]) for d in range(n)])
  params, _, iterations = _lbfgs.minimize(loss, diagonals[loss.valid],
                                          max_iterations=max_iterations, rel_tol=1e-7, memory=5)
  raw = loss.unpack(params)
  candidates = [C, banded.band_matrix(raw / np.sqrt(np.sum(np.square(raw), axis=0)))]
  sqrt_C = _toeplitz.materialize(_toeplitz.sqrt_coefs(n), n)
  candidates.append(sqrt_C / np.linalg.norm(sqrt_C, axis=0))
  worst = [float(_losses_row_errors(c, workload).max()) for c in candidates]
  return candidates[int(np.argmin(worst))], iterations


def _losses_row_errors(C, workload):
  from dpfl.mf import losses
  return losses.row_errors(C, workload)
