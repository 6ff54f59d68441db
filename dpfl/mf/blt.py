"""Buffered linear Toeplitz (BLT) strategies and their optimizer.

A BLT (Dvijotham, McMahan, Pillutla, Steinke, Thakurta 2024, arXiv
2404.16706; McMahan et al. 2024, arXiv 2408.08868) is a lower-triangular
Toeplitz ``C`` with ``c_0 = 1`` and ``c_t = sum_i omega_i theta_i^(t-1)``
(``t >= 1``): buffer decays ``theta`` and output scales ``omega``. Its
generating function is rational,

    c(x) = prod_i (1 - hat_theta_i x) / prod_i (1 - theta_i x),

so ``C^{-1}`` is the BLT with decays ``hat_theta`` (the roles swap), and
multiplying by ``C^{-1}`` streams with one model-sized buffer per ``i``:
``x_t = y_t - sum_i omega_i s_i``, then ``s_i <- theta_i s_i + x_t``.

Optimizer. We optimize the pair ``(theta, hat_theta)`` (the "buffer decay
pair" of jax-privacy), constrained to interlace,
``1 > theta_1 > hat_theta_1 > theta_2 > ... > hat_theta_d > 0``, through a
chain of logits. Interlacing is exactly the condition for ``omega > 0`` (and
inverse output scales ``< 0``; arXiv 2504.21413, Thm. 1), so the Toeplitz
coefficients are positive and decreasing. That makes the O(n) worst-pattern
sensitivity rule exact (``toeplitz.sensitivity_squared``) and ``C^{-1}``
stable. ``C``, ``B = A C^{-1}`` and every partial derivative are first-order
IIR filters of an impulse (``scipy.signal``), so one loss-and-gradient costs
``O(n d)``; L-BFGS converges in tens of evaluations.
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
from dpfl.mf.participation import Participation, as_participation
from dpfl.mf.workload import Workload, as_workload

MAX_BUFFERS = 32


def output_scale_from_pair(buffer_decay: np.ndarray, zeros: np.ndarray) -> np.ndarray:
  """``omega`` of ``prod (1 - zeros x) / prod (1 - buffer_decay x)`` (partial fractions).

  ``omega_i = prod_j (theta_i - hat_theta_j) / prod_{j != i} (theta_i - theta_j)``
  (arXiv 2404.16706, Lemma 5.2). Needs distinct decays.
  """
  theta = np.asarray(buffer_decay, dtype=float)
  zeros = np.asarray(zeros, dtype=float)
  num = np.prod(theta[:, None] - zeros[None, :], axis=1)
  diff = theta[:, None] - theta[None, :]
  np.fill_diagonal(diff, 1.0)
  return num / np.prod(diff, axis=1)


def blt_coefs(buffer_decay: np.ndarray, output_scale: np.ndarray, num_steps: int) -> np.ndarray:
  """Toeplitz coefficients ``1, sum omega, sum omega theta, ...`` (``num_steps`` of them)."""
  theta = np.asarray(buffer_decay, dtype=float)
  omega = np.asarray(output_scale, dtype=float)
  powers = theta[:, None] ** np.arange(max(num_steps - 1, 0))[None, :]
  return np.concatenate([[1.0], omega @ powers])[:num_steps]


def inverse_parameters(buffer_decay: np.ndarray,
                       output_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(hat_theta, hat_omega)`` of the BLT ``C^{-1}``.

  The state recursion of ``C^{-1}`` has transition ``diag(theta) - omega 1^T``;
  its eigenvalues are the inverse's decays (arXiv 2404.16706, Lemma 5.2).
  """
  theta = np.asarray(buffer_decay, dtype=float)
  omega = np.asarray(output_scale, dtype=float)
  zeros = np.sort(np.linalg.eigvals(np.diag(theta) - np.outer(omega, np.ones_like(omega))).real)
  zeros = zeros[::-1]
  return zeros, output_scale_from_pair(zeros, theta)


def _float_vector(name: str, value) -> np.ndarray:
  try:
    arr = np.array(value, dtype=float)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be a real 1-D array, got {value!r}") from err
  if arr.ndim > 1:
    raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
  arr = arr.reshape(-1)
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite, got {arr.tolist()}")
  return arr


def check_blt_parameters(buffer_decay, output_scale) -> tuple[np.ndarray, np.ndarray]:
  """``(theta, omega)`` as float arrays, or a ``ValueError`` naming the bad one.

  The one check of a BLT's parameters (``BltStrategy`` and the streaming
  ``dpfl.mf.blt_noise`` both call it). ``buffer_decay`` must lie in (-1, 1):
  the streamed recursion ``x_t = z_t - sum_i omega_i s_i``,
  ``s_i <- theta_i s_i + x_t`` solves ``C x = z`` for any real ``theta``
  (``s_i`` holds ``sum_{j<t} theta_i^(t-1-j) x_j``), and ``|theta| < 1`` keeps
  the buffers bounded (``|theta| >= 1`` would let them, and ``c_t``, grow
  without decay). Negative or zero decays are valid: the sensitivity code
  uses the O(n) rule only for non-negative, non-increasing coefficients and
  falls back to the dense computation (exact, or the valid Alg. 4 bound)
  otherwise; the optimizer produces decays in (0, 1).

  Args:
    buffer_decay: ``theta``, 1-D (or a scalar), each finite in (-1, 1), at
      least one.
    output_scale: ``omega``, the shape of ``buffer_decay``, finite.
  """
  theta = _float_vector("buffer_decay", buffer_decay)
  omega = _float_vector("output_scale", output_scale)
  if theta.size < 1:
    raise ValueError("buffer_decay must hold at least one buffer's decay, got shape (0,)")
  if omega.shape != theta.shape:
    raise ValueError(f"output_scale must have the shape of buffer_decay {theta.shape}, "
                     f"got {omega.shape}")
  if not np.all(np.abs(theta) < 1):
    raise ValueError(f"buffer_decay must lie in (-1, 1), got {theta.tolist()}")
  return theta, omega


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class BltStrategy(_strategies._ToeplitzLosses, _strategies.Strategy):
  """A BLT strategy: ``c_0 = 1, c_t = sum_i output_scale_i buffer_decay_i^(t-1)``.

  Attributes:
    buffer_decay: ``theta``, shape ``[buffers]``, in (-1, 1) (``check_blt_parameters``;
      optimized ones lie in (0, 1), decreasing).
    output_scale: ``omega``, shape ``[buffers]``.
  """

  name: ClassVar[str] = "blt"
  buffer_decay: np.ndarray
  output_scale: np.ndarray

  def __post_init__(self):
    super().__post_init__()
    theta, omega = check_blt_parameters(self.buffer_decay, self.output_scale)
    for arr in (theta, omega):
      arr.setflags(write=False)
    object.__setattr__(self, "buffer_decay", theta)
    object.__setattr__(self, "output_scale", omega)

  @property
  def num_buffers(self) -> int:
    """``m``, the number of buffers (model-sized arrays when streamed)."""
    return len(self.buffer_decay)

  def toeplitz_coefs(self) -> np.ndarray:
    """The ``n`` coefficients ``c_0 = 1, c_t = sum_i omega_i theta_i^(t-1)``."""
    return blt_coefs(self.buffer_decay, self.output_scale, self.num_steps)

  def inverse(self) -> tuple[np.ndarray, np.ndarray]:
    """``(buffer_decay, output_scale)`` of the BLT ``C^{-1}``."""
    return inverse_parameters(self.buffer_decay, self.output_scale)

  def inverse_toeplitz_coefs(self) -> np.ndarray:
    """The ``n`` coefficients of ``C^{-1}`` in ``O(n * buffers)``.

    ``C(x) = prod (1 - hat_theta_i x) / prod (1 - theta_i x)``, with
    ``hat_theta`` the eigenvalues of ``diag(theta) - omega 1^T`` (arXiv
    2404.16706, Lemma 5.2), so ``C^{-1}`` is a recursive filter of order
    ``buffers``; the generic reciprocal recursion divides by all ``n``
    coefficients of ``C`` (``O(n^2)``: 11 s at n = 1e5). Complex zeros
    (possible for BLTs that are not interlaced) are paired into real sections.
    """
    from scipy import signal
    theta, omega = self.buffer_decay, self.output_scale
    zeros = np.linalg.eigvals(np.diag(theta) - np.outer(omega, np.ones_like(omega)))
    impulse = np.zeros(self.num_steps)
    impulse[0] = 1.0
    return signal.sosfilt(signal.zpk2sos(theta, zeros, 1.0), impulse)

  def summary(self):
    out = super().summary()
    out["buffers"] = self.num_buffers
    return out


# --- optimizer ----------------------------------------------------------------

def _unchain(z: np.ndarray) -> np.ndarray:
  """Logits of ``theta_1 > hat_theta_1 > theta_2 > ...`` from free parameters."""
  return z[0] - np.concatenate([[0.0], np.cumsum(np.exp(z[1:]))])


def _chain(values: np.ndarray) -> np.ndarray:
  from scipy import special
  logits = special.logit(values)
  return np.concatenate([[logits[0]], np.log(-np.diff(logits))])


class _BltLoss:
  """``log(sens^2 * error)`` and its gradient in the chain parameters."""

  def __init__(self, participation: Participation, workload: Workload, objective: str):
    n = workload.num_steps
    self.n, self.participation = n, participation
    self.weights = _toeplitz.error_weights(n, objective)
    self.workload_sections = workload.filter_sections()
    self.impulse = np.zeros(n)
    self.impulse[0] = 1.0

  def sens_and_grad(self, c: np.ndarray) -> tuple[float, np.ndarray]:
    if self.participation.is_single:
      return float(c @ c), 2 * c
    # Interlaced => c positive, decreasing: the worst pattern is 0, b, 2b, ...
    # (Also the worst fixed-epoch pattern, for any Toeplitz C: toeplitz.sensitivity_squared.)
    v = _toeplitz.pattern_column_sum(c, self.participation, self.n)
    return float(v @ v), _toeplitz.pattern_column_sum_grad(v, self.participation)

  def __call__(self, z: np.ndarray) -> tuple[float, np.ndarray]:
    from scipy import signal, special
    logits = _unchain(z)
    values = special.expit(logits)
    theta, zeros = values[0::2], values[1::2]
    ones, nil = np.ones_like(theta), np.zeros_like(theta)
    strategy_sos = np.stack([ones, -zeros, nil, ones, -theta, nil], axis=1)
    inverse_sos = np.stack([ones, -theta, nil, ones, -zeros, nil], axis=1)
    c = signal.sosfilt(strategy_sos, self.impulse)
    beta = signal.sosfilt(np.concatenate([self.workload_sections, inverse_sos]), self.impulse)
    error = float(self.weights @ np.square(beta))
    sens2, sens_grad = self.sens_and_grad(c)
    if not (np.isfinite(error) and error > 0 and sens2 > 0):
      return np.inf, np.zeros_like(z)
    # d log L = d sens2 / sens2 + d error / error.
    adj = np.concatenate([sens_grad / sens2, -2 * self.weights * beta / error])
    series = np.concatenate([c, beta])
    n = self.n
    # d c / d theta_i = x c / (1 - theta_i x);  d beta / d theta_i = -x beta / (1 - theta_i x);
    # the zeros hat_theta_i enter with the opposite signs.
    grad_values = np.empty_like(values)
    for i, root in enumerate(values):
      filtered = signal.lfilter([0.0, 1.0], [1.0, -root], series.reshape(2, n), axis=-1)
      grad_values[i] = (1 if i % 2 == 0 else -1) * (adj @ filtered.reshape(-1))
    grad_logits = grad_values * values * (1 - values)
    grad = np.empty_like(z)
    grad[0] = grad_logits.sum()
    grad[1:] = -np.exp(z[1:]) * np.cumsum(grad_logits[::-1])[::-1][1:]
    return float(np.log(sens2) + np.log(error)), grad


def _initial_pairs(num_steps: int, buffers: int, spread: float) -> np.ndarray:
  """Interlaced decays with timescales ``1/(1-theta)`` log-spaced up to ``~n^spread``.

  Poles and zeros of rational approximations of ``(1-x)^(-1/2)`` interlace on
  a geometric grid of timescales (arXiv 2404.16706, Prop. 4.5); this is a
  cheap version of that grid, a starting point for the optimizer.
  """
  j = np.arange(2 * buffers)
  timescale = 1.0 + float(num_steps) ** (spread * (2 * buffers - j) / (2 * buffers))
  return 1.0 - 1.0 / timescale


@_threads.blas_pinned
def optimize_blt(num_steps: int, *, buffers: int = 3, participation=None,
                 objective: str = "max", workload=None,
                 max_iterations: int = 2000, restarts: int = 2) -> BltStrategy:
  """Optimizes a BLT with ``buffers`` buffers for ``n``, participation and objective.

  Minimizes ``sens(C)^2 * error`` (``max_loss`` or ``mean_loss``) over
  interlaced decay pairs with L-BFGS (see the module docstring), from
  ``restarts`` geometric initializations, and returns the best.

  Args:
    num_steps: ``n`` >= 1.
    buffers: number of buffers ``d``, in [1, 32].
    participation: None (single), a ``Participation`` or a ``(k, b)`` pair.
    objective: ``"max"`` (default, as jax-privacy's
      ``buffered_toeplitz.optimize`` and the BLT papers) or ``"mean"``.
    workload: None (prefix sums) or a Toeplitz ``Workload`` (constant
      learning rate, optional momentum).
    max_iterations: L-BFGS iteration cap per restart.
    restarts: number of initializations tried, in [1, 5].

  Returns:
    A ``BltStrategy``; its ``info`` has the optimizer's iterations and time.
  """
  from scipy import optimize, special
  n = check.integer("num_steps", num_steps)
  d = check.integer("buffers", buffers, high=MAX_BUFFERS)
  objective = check.objective(objective)
  participation = as_participation(n, participation)
  workload = as_workload(n, workload)
  restarts = check.integer("restarts", restarts, high=5)
  max_iterations = check.integer("max_iterations", max_iterations)
  if not workload.is_toeplitz:
    raise ValueError("workload must be Toeplitz (constant learning rate) to optimize a BLT; "
                     "use optimize_banded or optimize_dense for learning-rate schedules")
  start = time.perf_counter()
  loss = _BltLoss(participation, workload, objective)
  best, iterations = None, 0
  for spread in (1.0, 0.8, 1.2, 0.6, 1.4)[:restarts]:
    result = optimize.minimize(
        loss, _chain(_initial_pairs(n, d, spread)), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iterations, "ftol": 1e-13, "gtol": 1e-10, "maxcor": 20})
    iterations += int(result.nit)
    if best is None or result.fun < best.fun:
      best = result
  values = _cancel_degenerate_pairs(special.expit(_unchain(best.x)))
  theta, zeros = values[0::2], values[1::2]
  strategy = BltStrategy(
      num_steps=n, participation=participation, workload=workload, objective=objective,
      buffer_decay=theta, output_scale=output_scale_from_pair(theta, zeros),
      info={"iterations": iterations, "restarts": restarts,
            "optimizer_seconds": time.perf_counter() - start,
            "converged": bool(best.success), "inverse_buffer_decay": zeros.tolist(),
            "buffers_requested": d})
  return strategy


# Adjacent interlaced values closer than this (relative to the larger) are a
# pole cancelling a zero: the optimum needs fewer buffers.
_CANCEL_TOL = 1e-6


def _cancel_degenerate_pairs(values: np.ndarray) -> np.ndarray:
  """Drops pole/zero pairs that (numerically) cancel, keeping at least one pair.

  The optimum for short runs or few epochs can use fewer buffers than asked:
  L-BFGS then drives a decay onto its neighbouring zero (or two pairs onto 0),
  where the partial fractions divide by zero. The generating function
  ``prod (1 - hat_theta x) / prod (1 - theta x)`` is unchanged (to the
  tolerance) by removing a pole together with the zero next to it, and the
  remaining values still interlace, so the BLT is the same strategy with
  fewer buffers (its sensitivity and losses are computed from what is kept).
  """
  values = np.asarray(values, dtype=float)
  while len(values) > 2:
    gaps = -np.diff(values)
    scale = np.maximum(np.abs(values[:-1]), np.finfo(float).tiny)
    j = int(np.argmin(gaps / scale))
    if gaps[j] > _CANCEL_TOL * scale[j]:
      break
    values = np.delete(values, [j, j + 1])
  return values
