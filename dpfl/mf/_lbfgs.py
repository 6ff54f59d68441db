"""A small unconstrained L-BFGS for many-parameter strategy problems.

scipy's L-BFGS-B spends tens of milliseconds per iteration on its bound
machinery once there are ~10^5 variables; banded strategies have ``n * bands``
of them and need no bounds. This is the textbook method (Nocedal & Wright,
"Numerical Optimization", Alg. 7.4 two-loop recursion) with a backtracking
Armijo line search; pairs with non-positive curvature are skipped, which keeps
the inverse-Hessian estimate positive definite.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np


def minimize(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, *,
             max_iterations: int, memory: int = 10,
             rel_tol: float = 1e-10) -> tuple[np.ndarray, float, int]:
  """Minimizes ``fun`` (returning value and gradient) from ``x0``.

  Stops after ``max_iterations``, when a step lowers ``f`` by less than
  ``rel_tol * max(|f|, 1)`` (scipy's ``ftol`` rule), or when no descent step
  is found.

  Returns:
    ``(x, f(x), iterations)``.
  """
  x = np.array(x0, dtype=float)
  f, g = fun(x)
  pairs: deque = deque(maxlen=memory)
  iterations = 0
  for iterations in range(1, max_iterations + 1):
    direction = -g
    alphas = []
    for s, y, rho in reversed(pairs):
      alpha = rho * (s @ direction)
      direction = direction - alpha * y
      alphas.append(alpha)
    if pairs:
      s, y, _ = pairs[-1]
      direction = direction * ((s @ y) / (y @ y))
      for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
        direction = direction + (alpha - rho * (y @ direction)) * s
    else:
      direction = direction / max(np.linalg.norm(g), 1e-300)
    slope = g @ direction
    if not slope < 0:
      break
    step, accepted = 1.0, False
    for _ in range(40):
      x_new = x + step * direction
      f_new, g_new = fun(x_new)
      if np.isfinite(f_new) and f_new <= f + 1e-4 * step * slope:
        accepted = True
        break
      step *= 0.3
    if not accepted:
      break
    s, y = x_new - x, g_new - g
    if s @ y > 1e-12 * np.linalg.norm(s) * np.linalg.norm(y):
      pairs.append((s, y, 1.0 / (s @ y)))
    improvement = f - f_new
    x, f, g = x_new, f_new, g_new
    if improvement <= rel_tol * max(abs(f), 1.0):
      break
  return x, f, iterations
