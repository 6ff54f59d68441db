"""Row errors of ``B = A C^{-1}`` for banded ``C``, and their gradient, two ways.

Both return ``||B_i||^2`` (``B = A C^{-1}``, ``C`` lower triangular with
``m`` bands stored as ``diagonals[d, j] = C[j + d, j]``) and, for weights
``w``, the gradient of ``sum_i w_i ||B_i||^2`` with respect to the band.

* ``StateSpace``, ``O(n m^2)``: ``B z`` is the output of a linear
  time-varying system driven by white noise ``z``. ``y = C^{-1} z`` is an
  autoregression, ``y_t = (z_t - sum_d C[t, t-d] y_{t-d}) / C[t, t]``, and the
  workload accumulates it (momentum ``u_t = beta u_{t-1} + y_t``, then
  ``e_t = e_{t-1} + eta_t u_t``). With state ``s_t = (y_t .. y_{t-m+2}, u_t,
  e_t)``, ``s_t = F_t s_{t-1} + g_t z_t`` and the covariance obeys
  ``P_t = F_t P_{t-1} F_t^T + g_t g_t^T``; ``||B_t||^2 = P_t[e, e]``. The
  gradient is the adjoint (reverse-mode) recursion
  ``Lambda_{t-1} = F_t^T Lambda_t F_t + w_{t-1} E_ee``. Best for narrow bands.
* ``Blocks``, ``O(n^2 m)``: ``B^T = C^{-T} A^T`` by blocked banded
  triangular solves and the band of ``-2 B^T W B C^{-T}``, as BLAS-3 calls on
  ``m``-sized blocks. Best for wide bands (``m`` beyond about ``sqrt(n)``).
"""

from __future__ import annotations

import numpy as np

from dpfl.mf.workload import Workload

# Store every F_t (floats) up to this size: 32M floats, 256 MiB.
_MAX_STORED = 32 * 2**20


def use_state_space(num_steps: int, bands: int) -> bool:
  """The cheaper method: ~``8 n (m+2)^3`` small-matmul flops vs ~``10 n^2 m`` BLAS-3."""
  return 8 * (bands + 2) ** 3 <= 10 * num_steps * bands


class StateSpace:
  """Covariance recursion of ``B z`` (see the module docstring).

  The adjoint recursion runs first (it needs only ``F_t`` and the weights)
  and leaves one vector per step, which the forward covariance pass turns
  into the gradient, so no ``P_t`` is stored. Each step is two
  ``(bands + 1)``-sized matmuls per pass.
  """

  def __init__(self, workload: Workload, bands: int):
    n = workload.num_steps
    self.n, self.m = n, bands
    lags = bands - 1
    self.dim = lags + 2
    self.iu, self.ie = lags, lags + 1
    self.beta = workload.momentum
    self.eta = (np.ones(n) if workload.learning_rates is None
                else np.asarray(workload.learning_rates, dtype=float))
    # g_t = gamma_t q_t with q_t = e_y + e_u + eta_t e_e (no e_y without lags).
    q = np.zeros((n, self.dim))
    if lags:
      q[:, 0] = 1.0
    q[:, self.iu] = 1.0
    q[:, self.ie] = self.eta
    self.q = q
    # F_t = T_t + q_t h_t^T, with T_t the lag shift and the workload's
    # accumulators. q_t is nonzero only at y, u and e, so each call rewrites just
    # those three rows of a stored [n, dim, dim] buffer; past _MAX_STORED floats
    # F_t is rebuilt at every step instead (memory O(n * bands)).
    T = np.zeros((self.dim, self.dim))
    for i in range(1, lags):
      T[i, i - 1] = 1.0
    T[self.iu, self.iu] = self.beta
    T[self.ie, self.ie] = 1.0
    self.T = T
    self._F = None
    if n * self.dim**2 <= _MAX_STORED:
      self._F = np.broadcast_to(T, (n, self.dim, self.dim)).copy()
      self._F[:, self.ie, self.iu] = self.eta * self.beta
    constant_rate = bool(np.all(self.eta == self.eta[0]))
    self._qq = np.outer(q[0], q[0]) if constant_rate else None

  def _coefficients(self, diagonals: np.ndarray):
    """``h_t`` (``h_t[d-1] = -C[t, t-d] / C[t, t]``), ``gamma_t = 1 / C[t, t]``, and ``F_t``."""
    n, m, lags = self.n, self.m, self.m - 1
    gamma = 1.0 / diagonals[0]
    h = np.zeros((n, lags))
    for d in range(1, m):
      h[d:, d - 1] = -diagonals[d, :n - d] * gamma[d:]
    if self._F is None:
      return h, gamma, _Transitions(self, h)
    F = self._F
    if lags:
      F[:, 0, :lags] = h
    F[:, self.iu, :lags] = h
    F[:, self.ie, :lags] = self.eta[:, None] * h
    return h, gamma, F

  def _noise(self, t: int) -> np.ndarray:
    """``q_t q_t^T`` (``g_t g_t^T = gamma_t^2 q_t q_t^T``)."""
    return self._qq if self._qq is not None else np.outer(self.q[t], self.q[t])

  def forward(self, diagonals: np.ndarray, *, adjoint: np.ndarray | None = None,
              coefficients=None):
    """Row errors; with ``adjoint`` (from ``_adjoint``) also ``dL/dh``."""
    h, gamma, F = self._coefficients(diagonals) if coefficients is None else coefficients
    noise_scale = gamma * gamma
    P = np.zeros((self.dim, self.dim))
    errors = np.empty(self.n)
    grad = None if adjoint is None else np.empty((self.n, self.dim))
    ie = self.ie
    for t in range(self.n):
      if grad is not None:  # dL/dh_t = 2 P_{t-1} F_t^T Lambda_t q_t
        grad[t] = P @ adjoint[t]
      P = F[t] @ P @ F[t].T
      P += noise_scale[t] * self._noise(t)
      errors[t] = P[ie, ie]
    return errors, grad

  def _adjoint(self, F: np.ndarray, weights: np.ndarray):
    """``2 F_t^T Lambda_t q_t`` and ``q_t^T Lambda_t q_t`` for every step."""
    lam = np.zeros((self.dim, self.dim))
    left = np.empty((self.n, self.dim))
    quad = np.empty(self.n)
    q, ie = self.q, self.ie
    for t in range(self.n - 1, -1, -1):
      lam[ie, ie] += weights[t]
      lam_q = lam @ q[t]
      left[t] = lam_q @ F[t]
      quad[t] = lam_q @ q[t]
      lam = F[t].T @ lam @ F[t]
    return 2 * left, quad

  def loss_and_grad(self, diagonals: np.ndarray, weights_fn):
    """Row errors, and the gradient of ``sum_t w_t ||B_t||^2`` for ``w = weights_fn(errors)``.

    ``weights_fn`` returns ``(weights, depends_on_errors)``; fixed weights skip a pass.
    """
    coefficients = self._coefficients(diagonals)
    h, gamma, F = coefficients
    weights, needs_errors = weights_fn(None)
    if needs_errors:
      errors, _ = self.forward(diagonals, coefficients=coefficients)
      weights, _ = weights_fn(errors)
    left, quad = self._adjoint(F, weights)
    errors, grad = self.forward(diagonals, adjoint=left, coefficients=coefficients)
    n, m = self.n, self.m
    grad_h = grad[:, :m - 1]
    grad_gamma = 2 * gamma * quad
    out = np.zeros_like(diagonals)
    for d in range(1, m):
      out[d, :n - d] = -grad_h[d:, d - 1] * gamma[d:]
    # h = -C[t, t-d] / C[t, t] and gamma = 1 / C[t, t] both scale with 1 / C[t, t].
    out[0] = -(np.sum(grad_h * h, axis=1) + grad_gamma * gamma) * gamma
    return errors, weights, out


class _Transitions:
  """``F_t`` built on demand (``F[t]``), when storing all of them would not fit."""

  def __init__(self, space: StateSpace, h: np.ndarray):
    self.space, self.h = space, h

  def __getitem__(self, t: int) -> np.ndarray:
    space, lags = self.space, self.space.m - 1
    F = space.T.copy()
    F[space.ie, space.iu] = space.eta[t] * space.beta
    F[:, :lags] += np.outer(space.q[t], self.h[t])
    return F


class Blocks:
  """Dense ``s x s`` blocks of a banded lower-triangular ``C`` (``s >= m``).

  Row block ``i`` touches only column blocks ``i - 1`` and ``i``, so
  triangular solves and band-restricted products run as BLAS-3 calls on
  blocks instead of one level-2 call per right-hand side.
  """

  def __init__(self, diagonals: np.ndarray):
    m, n = diagonals.shape
    self.n, self.m = n, m
    self.size = s = max(m, 16)
    self.starts = list(range(0, n, s))
    self.diag, self.below = [], []
    for lo in self.starts:
      hi = min(lo + s, n)
      self.diag.append(self._block(diagonals, lo, hi, lo, hi))
      self.below.append(self._block(diagonals, lo, hi, lo - s, lo) if lo else None)

  @staticmethod
  def _block(diagonals, r0, r1, c0, c1):
    m = diagonals.shape[0]
    rows = np.arange(r0, r1)[:, None]
    cols = np.arange(c0, c1)[None, :]
    offset = rows - cols
    inside = (offset >= 0) & (offset < m)
    return np.where(inside, diagonals[np.clip(offset, 0, m - 1), cols], 0.0)

  def solve(self, rhs: np.ndarray) -> np.ndarray:
    """``C^{-1} rhs``."""
    from scipy.linalg import solve_triangular
    out = np.empty_like(rhs)
    for i, lo in enumerate(self.starts):
      hi = min(lo + self.size, self.n)
      r = rhs[lo:hi]
      if lo:
        r = r - self.below[i] @ out[lo - self.size:lo]
      out[lo:hi] = solve_triangular(self.diag[i], r, lower=True, check_finite=False)
    return out

  def solve_transposed(self, rhs: np.ndarray) -> np.ndarray:
    """``C^{-T} rhs``."""
    from scipy.linalg import solve_triangular
    out = np.empty_like(rhs)
    for i in reversed(range(len(self.starts))):
      lo = self.starts[i]
      hi = min(lo + self.size, self.n)
      r = rhs[lo:hi]
      if i + 1 < len(self.starts):
        r = r - self.below[i + 1].T @ out[hi:min(hi + self.size, self.n)]
      out[lo:hi] = solve_triangular(self.diag[i], r, lower=True, trans="T", check_finite=False)
    return out

  def band_of_product(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``P[d, j] = (left @ right^T)[j + d, j]`` for ``d < m``."""
    n, m, s = self.n, self.m, self.size
    out = np.zeros((m, n))
    d = np.arange(m)[:, None]
    for lo in self.starts:
      hi = min(lo + s, n)
      top = min(hi + s, n)
      block = left[lo:top] @ right[lo:hi].T  # rows lo..top, columns lo..hi
      j = np.arange(hi - lo)[None, :]
      rows = j + d
      inside = rows < top - lo
      out[:, lo:hi] = np.where(inside, block[np.clip(rows, 0, top - lo - 1), j], 0.0)
    return out


class BlockedErrors:
  """Row errors and gradient through ``Blocks`` (same interface as ``StateSpace``)."""

  def __init__(self, workload: Workload, bands: int):
    self.workload_t = np.ascontiguousarray(workload.matrix().T)

  def forward(self, diagonals: np.ndarray):
    blocks = Blocks(diagonals)
    Bt = blocks.solve_transposed(self.workload_t)  # column i of B^T is row i of B
    return np.einsum("ji,ji->i", Bt, Bt), (blocks, Bt)

  def loss_and_grad(self, diagonals: np.ndarray, weights_fn):
    errors, (blocks, Bt) = self.forward(diagonals)
    weights, _ = weights_fn(errors)
    # d/dC sum_i w_i ||B_i||^2 = -2 B^T W B C^{-T}; on the band:
    # (W-weighted B^T)[j + d] . (C^{-1} B^T)[j].
    grad = -2 * blocks.band_of_product(Bt * weights[None, :], blocks.solve(Bt))
    return errors, weights, grad


def row_errors(diagonals: np.ndarray, workload: Workload) -> np.ndarray:
  """``||B_i||^2`` for ``B = A C^{-1}`` with the cheaper method."""
  m, n = diagonals.shape
  ops = StateSpace(workload, m) if use_state_space(n, m) else BlockedErrors(workload, m)
  return ops.forward(diagonals)[0]
