"""Sensitivity of a strategy ``C`` under (k, b)-participation.

Definition. One unit contributes a vector ``g_i`` with ``||g_i|| <= 1`` at
each step ``i`` of a participation pattern ``pi`` (see ``participation``), so
``C x`` moves by ``sum_{i in pi} C[:, i] g_i^T`` and

    sens(C)^2 = max_pi max_g  sum_{i, j in pi} X_ij <g_i, g_j>,   X = C^T C.

For ``X >= 0`` elementwise, or when ``X_ij = 0`` for every ``i != j`` that can
share a pattern, the inner max is at ``g_i`` all equal, so ``sens(C)`` is the
max over 0/1 participation vectors ``u`` of ``||C u||_2``; in general
``sum_{i,j in pi} |X_ij|`` bounds it (Choquette-Choo et al. 2023, "Multi-Epoch
Matrix Factorization Mechanisms", arXiv 2211.06530, Sec. 2; "(Amplified)
Banded Matrix Factorizations", arXiv 2306.08153, Eq. 5). Functions here
return squared sensitivities with a flag saying whether the value is exact.

Exact methods, fastest first:

* single participation: the largest column norm of ``C``;
* columns that can share a pattern are orthogonal (a ``b``-banded ``C`` under
  b-min-separation): the sum over the pattern of squared column norms, a 1-D
  dynamic program (arXiv 2306.08153, Alg. 3, "VecSens");
* Toeplitz ``C`` with non-negative, non-increasing coefficients: the pattern
  ``0, b, 2b, ...`` (``toeplitz.sensitivity_squared``);
* otherwise: every pattern enumerated (when there are few enough), else the
  row-wise dynamic-program upper bound of arXiv 2306.08153, Alg. 4, reported
  as not exact unless a pattern attains it.

Fixed-epoch order (``participation.FixedEpoch``) has only the ``b`` patterns
``r, r + b, ...``, so every one is evaluated: ``sum_{i,j in pi} |X_ij|``,
``O(n^2)`` from ``X``. It is exact (for vector contributions) when ``X`` is
non-negative on the pairs that share a pattern (then it is ``||C u_r||^2``;
orthogonal columns are the special case), and a valid upper bound otherwise.
With mixed-sign ``X`` the 0/1 value ``max_r ||C u_r||^2`` can understate sens^2,
for vectors and scalars alike (a contribution can flip its direction, or
sign, between the steps joined by a negative entry), which is why the
absolute values are used.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from dpfl.mf.participation import Participation

# Enumerate patterns when there are at most this many (a few seconds of numpy).
MAX_ENUMERATED_PATTERNS = 300_000
# Relative tolerance for "this entry of X is zero / non-negative": X comes from
# floating-point products of C, so structural zeros carry rounding noise.
_ZERO_RTOL = 1e-12


def max_pattern_sum(values: np.ndarray, participation: Participation) -> float:
  """``max_pi sum_{i in pi} values[i]`` over b-min-separated patterns.

  The dynamic program of arXiv 2306.08153, Alg. 3: ``f[i]`` is the best sum
  over patterns inside ``i..n-1``; each of the ``k`` rounds adds one more
  participation. ``O(n k)``. Works row-wise on a 2-D array (last axis = steps).
  """
  values = np.asarray(values, dtype=float)
  k, b = participation
  n = values.shape[-1]
  f = np.zeros(values.shape[:-1] + (n + b,))
  for _ in range(k):
    f[..., :n] = values + f[..., b:b + n]
    f = np.maximum.accumulate(f[..., ::-1], axis=-1)[..., ::-1]
  return f[..., 0]


def fixed_epoch_pattern_sums(values: np.ndarray, period: int) -> np.ndarray:
  """``sum_{i in pi_r} values[i]`` for each fixed-epoch pattern ``r = 0 .. b - 1``.

  Row-wise on a 2-D array (last axis = steps); ``n`` need not be a multiple of ``b``.
  """
  values = np.asarray(values, dtype=float)
  n = values.shape[-1]
  k = -(-n // period)
  padded = np.zeros(values.shape[:-1] + (k * period,))
  padded[..., :n] = values
  return padded.reshape(values.shape[:-1] + (k, period)).sum(axis=-2)[..., :min(period, n)]


def fixed_epoch_gram_sensitivity_squared(gram: np.ndarray, period: int) -> tuple[float, bool]:
  """Squared sensitivity under fixed-epoch order with ``b = period``, and whether exact.

  ``max_r sum_{i, j in pi_r} |X_ij|``: exact when no entry shared by a
  pattern is negative (module docstring), else a valid upper bound.
  """
  X = np.asarray(gram, dtype=float)
  n = X.shape[0]
  b = min(period, n)
  k = -(-n // b)
  padded = np.zeros((k * b, k * b))
  padded[:n, :n] = X
  blocks = padded.reshape(k, b, k, b)
  # blocks[i, r, j, r] = X[i b + r, j b + r]: the entries pattern r shares.
  shared = np.einsum("irjr->rij", blocks)
  scale = _ZERO_RTOL * max(float(np.abs(X).max()), 1.0)
  off = ~np.eye(k, dtype=bool)
  exact = bool(np.all(shared[:, off] >= -scale)) if k > 1 else True
  return float(np.abs(shared).sum(axis=(1, 2)).max()), exact


def count_patterns(num_steps: int, participation: Participation) -> int:
  """Number of non-empty b-min-separated patterns of at most ``k`` steps."""
  k, b = participation
  return sum(math.comb(num_steps - (m - 1) * (b - 1), m) for m in range(1, k + 1)
             if num_steps - (m - 1) * (b - 1) >= m)


def patterns(num_steps: int, participation: Participation, size: int) -> np.ndarray:
  """All b-min-separated patterns with exactly ``size`` steps, one per row.

  Bijection with ``size``-subsets ``q`` of ``range(n - (size-1)(b-1))``:
  ``p_j = q_j + j (b - 1)`` spreads consecutive picks at least ``b`` apart.
  """
  _, b = participation
  slots = num_steps - (size - 1) * (b - 1)
  if slots < size:
    return np.zeros((0, size), dtype=np.int64)
  flat = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(slots), size)),
                     dtype=np.int64)
  return flat.reshape(-1, size) + np.arange(size) * (b - 1)


def _pattern_mask(num_steps: int, participation: Participation) -> np.ndarray:
  """``M_ij`` true when ``i != j`` can both be in one pattern (``|i - j| >= b``)."""
  _, b = participation
  idx = np.arange(num_steps)
  return np.abs(idx[:, None] - idx[None, :]) >= b


def gram_sensitivity_squared(gram: np.ndarray, participation: Participation, *,
                             max_patterns: int = MAX_ENUMERATED_PATTERNS) -> tuple[float, bool]:
  """Squared sensitivity from ``X = C^T C``, and whether it is exact.

  Returns the exact value when any of the exact methods in the module
  docstring applies; otherwise the absolute-value upper bound of arXiv
  2306.08153, Alg. 4 (then ``exact`` is False unless a pattern attains it).
  A value flagged exact is exact for vector-valued contributions.
  """
  X = np.asarray(gram, dtype=float)
  n = X.shape[0]
  diag = np.diag(X)
  if participation.is_single:
    return float(diag.max()), True
  if participation.kind == "fixed-epoch":
    return fixed_epoch_gram_sensitivity_squared(X, participation.min_separation)
  scale = _ZERO_RTOL * max(float(np.abs(X).max()), 1.0)
  shared = _pattern_mask(n, participation)
  if np.all(np.abs(X[shared]) <= scale):
    return float(max_pattern_sum(diag, participation)), True
  absX = np.abs(X)
  # Exact for vector contributions only when no entry that can share a pattern is negative.
  nonneg = bool(np.all(X[shared] >= -scale))
  if count_patterns(n, participation) <= max_patterns:
    best = float(diag.max())
    for size in range(2, participation.num_participations + 1):
      pats = patterns(n, participation, size)
      for chunk in range(0, len(pats), 20_000):
        p = pats[chunk:chunk + 20_000]
        sums = absX[p[:, :, None], p[:, None, :]].sum(axis=(1, 2))
        best = max(best, float(sums.max(initial=0.0)))
    return best, nonneg
  # Alg. 4: best pattern per row, then the best pattern of those row maxima.
  row_best = max_pattern_sum(absX, participation)
  bound = float(max_pattern_sum(row_best, participation))
  # A cyclic pattern r, r + b, ... attaining the bound certifies it.
  k, b = participation
  cyclic = max(float(absX[np.ix_(r + b * np.arange(k), r + b * np.arange(k))].sum())
               for r in range(b))
  return bound, nonneg and cyclic >= bound * (1 - 1e-12)


def matrix_sensitivity(matrix: np.ndarray, participation: Participation) -> float:
  """``sens(C)`` of a strategy matrix: exact, or a valid upper bound (below: which).

  Computed from ``X = C^T C`` for vector-valued contributions of L2 norm at
  most 1 per participation, and never below the true sensitivity (up to
  floating-point rounding in ``X``). Exact for single participation, when
  the columns that can share a pattern are orthogonal, or when ``X`` is
  non-negative on those pairs (under min-separation: and the patterns are
  few enough to enumerate); otherwise an upper bound (``sum |X_ij|`` over
  the worst pattern, or arXiv 2306.08153, Alg. 4). A strategy's
  ``sensitivity_exact`` says which; this function does not.

  Args:
    matrix: ``C``, any ``[rows, n]`` real array (``n`` steps; e.g. a square
      strategy matrix or the node-by-leaf ``tree_matrix(n)``).
    participation: a ``Participation`` or ``FixedEpoch`` for the ``n`` steps
      (from ``participation`` or ``fixed_epoch``; a plain tuple is not
      accepted).

  Returns:
    ``sens(C)`` as a float, in units of the clip norm.
  """
  C = np.asarray(matrix, dtype=float)
  return math.sqrt(gram_sensitivity_squared(C.T @ C, participation)[0])


def brute_force_sensitivity(matrix: np.ndarray, participation: Participation) -> float:
  """``max_u ||C u||_2`` over every 0/1 vector ``u`` that respects the pattern.

  Enumerates all ``2^n`` vectors (fixed-epoch: its ``b`` patterns): for
  tests and small ``n`` (at most 20).

  A 0/1 ``u`` is one contribution of norm 1 repeated at each step of a
  pattern, so this is always a lower bound on the sensitivity for
  vector-valued contributions, and equals it when ``X = C^T C`` has no
  negative entry between two steps a pattern can hold; with such negative
  entries contributions of opposite directions can do worse, and the true
  sensitivity may be larger (``matrix_sensitivity`` bounds it from above).

  Args:
    matrix: ``C``, any ``[rows, n]`` real array with ``n <= 20`` steps.
    participation: a ``Participation`` (at most ``k`` steps, any two at
      least ``b`` apart) or a ``FixedEpoch`` (the ``b`` patterns
      ``r, r + b, ...``) for the ``n`` steps; not a plain tuple.

  Returns:
    ``max_u ||C u||_2`` as a float.

  Raises:
    ValueError: if ``n > 20``.
  """
  C = np.asarray(matrix, dtype=float)
  n = C.shape[1]
  if n > 20:
    raise ValueError(f"brute_force_sensitivity needs at most 20 steps, got {n}")
  k, b = participation
  best = 0.0
  if participation.kind == "fixed-epoch":
    return max(float(np.linalg.norm(C[:, r::b].sum(axis=1))) for r in range(min(b, n)))
  for bits in itertools.product((0, 1), repeat=n):
    steps = [i for i, bit in enumerate(bits) if bit]
    if len(steps) > k or any(j - i < b for i, j in zip(steps, steps[1:])):
      continue
    best = max(best, float(np.linalg.norm(C[:, steps].sum(axis=1))))
  return best
