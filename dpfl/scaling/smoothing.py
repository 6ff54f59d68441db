"""Monotone smoothing of measured loss tables, as McKenna et al. 2025 smooth theirs.

The authors' released code (google-research ``dp_scaling_laws/nonparametric.py``,
``_smooth`` with ``smoothing.isotonic``) smooths each (model, learning rate)
table of cross entropy over (steps T, noise-batch ratio σ̄) in one pass:
first an isotonic regression along T for every σ̄ (loss non-increasing in
T), then an isotonic regression along σ̄ for every T (loss non-decreasing in
σ̄, the non-private σ̄ = 0 column included). The learning-rate minimum is
taken afterwards, cell by cell.

One pass suffices on a complete table: isotonic regression is order
preserving (pointwise larger data give a pointwise larger fit), so the σ̄ pass
keeps the T order the first pass made. dpfl's tables can have holes (a run
evaluated at other steps, a curve stopped early); there the two passes are
repeated until both orders hold (``smooth_table``), and a table that still
breaks them is reported by ``is_monotone`` (``fit_law`` refuses it).
"""

from __future__ import annotations

import numpy as np


def isotonic(y, weights=None, *, increasing: bool = True) -> np.ndarray:
  """Least-squares monotone fit of a sequence (pool-adjacent-violators).

  Args:
    y: values in order; NaN marks a missing entry (kept NaN, and skipped:
      the order applies to the present entries).
    weights: positive weights (default 1).
    increasing: non-decreasing if True, else non-increasing.

  Returns:
    The fitted sequence, same shape as ``y``.
  """
  y = np.asarray(y, float)
  out = y.copy()
  present = ~np.isnan(y)
  values = y[present] if increasing else -y[present]
  w = np.ones_like(values) if weights is None else np.asarray(weights, float)[present]
  # Blocks: (mean, weight, length). Merge while the last two violate the order.
  means, wts, lens = [], [], []
  for v, wi in zip(values, w):
    means.append(v)
    wts.append(wi)
    lens.append(1)
    while len(means) > 1 and means[-2] > means[-1]:
      m2, w2, l2 = means.pop(), wts.pop(), lens.pop()
      total = wts[-1] + w2
      means[-1] = (means[-1] * wts[-1] + m2 * w2) / total
      wts[-1] = total
      lens[-1] += l2
  fitted = np.repeat(means, lens) if means else np.empty(0)
  out[present] = fitted if increasing else -fitted
  return out


def smooth_steps(table) -> np.ndarray:
  """Isotonic (non-increasing) fit along steps: every row of a (ratios x steps) table."""
  x = np.asarray(table, float)
  return np.array([isotonic(row, increasing=False) for row in x]).reshape(x.shape)


def smooth_ratios(table) -> np.ndarray:
  """Isotonic (non-decreasing) fit along the ratio: every column of a (ratios x steps) table."""
  x = np.asarray(table, float)
  return np.array([isotonic(col, increasing=True) for col in x.T]).reshape(x.T.shape).T


def is_monotone(table, *, atol: float = 1e-12) -> bool:
  """True if present cells are non-increasing along rows and non-decreasing down columns."""
  x = np.asarray(table, float)
  for rows, sign in ((x, -1.0), (x.T, 1.0)):
    for row in rows:
      v = row[~np.isnan(row)]
      if np.any(sign * np.diff(v) < -atol):
        return False
  return True


def smooth_table(table, *, max_passes: int = 50) -> np.ndarray:
  """The paper's smoothing of one loss table: isotonic along steps, then along the ratio.

  Args:
    table: 2-D array, rows = noise-batch ratios in increasing order (σ̄ = 0
      first when present), columns = steps in increasing order; NaN marks an
      empty cell (it stays empty).
    max_passes: passes to repeat while holes leave an order broken (one pass
      is exact on a complete table).

  Returns:
    The smoothed table. Check ``is_monotone`` on it when the input had holes.
  """
  x = np.asarray(table, float)
  if x.ndim != 2:
    raise ValueError(f"table must be 2-D (ratios x steps), got shape {x.shape}")
  for _ in range(max(1, max_passes)):
    x = smooth_ratios(smooth_steps(x))
    if is_monotone(x, atol=1e-12):
      break
  return x
