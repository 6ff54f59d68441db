"""Queries the σ(ε, δ, T, q) table ``accounting.sigma_grid`` builds: numpy only, microseconds.

**Never under-estimated.** Every node is an upper bound on the σ that
``PoissonDpSgd(σ, q, T)`` needs for (ε, δ) (see ``accounting.sigma_grid``).
Between nodes:

* **δ** takes the largest δ node <= the query's δ (σ decreases with δ): exact
  on a node, conservative between (at most one δ decade's worth of extra σ).
* **(ε, T, q)**: multilinear interpolation of log σ in (ε^½, log T, log q).
  For a function convex along each axis, the multilinear interpolant of upper
  bounds at the nodes is an upper bound between them; log σ is convex along
  these coordinates almost everywhere (``coordinates``). Where a node sits
  above the chord of its neighbours (local concavity: integer steps at small
  T, the small-σ corner) it and its neighbours are raised by twice the excess;
  running maxima then make the nodes monotone (σ up with T and q, down with ε
  and δ), so every query is monotone in every argument (``effective_nodes``).
  A final factor (the grid's ``interpolation_margin``) covers concavity below
  the check's tolerance. This is an argument from smoothness, not a proof: it
  is measured at build time against ``accounting.calibrate_noise_multiplier``
  at random off-grid points (``grid["validation"]``) and in the tests.

Outside the axes a query is refused (``ValueError`` naming the argument, its
value and the grid's range): nothing is extrapolated or clamped.
"""

from __future__ import annotations

import math

import numpy as np

FORMAT = "dpfl-sigma-grid"
EPSILON_POWER = 0.5          # ε is interpolated in ε^0.5 (see coordinates)
# Node deviations from convexity below this (log σ) are within the nodes' own
# slack and covered by the interpolation margin.
CONVEXITY_TOL = 3e-3
_ARGS = ("epsilon", "steps", "sampling_prob", "delta")


def _epsilon_coordinate(epsilon, power: float):
  return np.log(epsilon) if power == 0 else np.asarray(epsilon, float) ** power


def coordinates(epsilons, steps, sampling_probs, epsilon_power: float) -> list[np.ndarray]:
  """Where the (ε, T, q) axes are interpolated: ε^p (p = ``epsilon_power``), log T, log q.

  log σ is convex in log T and log q (σ grows like T^a, q^b with exponents
  rising towards 1/2 and 1). Along ε it is convex in log ε where σ is large
  (σ ~ 1/ε) but concave where q and σ are small (σ ≈ (2 log(ε/q))^(-1/2));
  in ε^(1/2) it is nearly convex in both regimes (see ``effective_nodes`` for
  what is done where it is not).
  """
  return [_epsilon_coordinate(np.asarray(epsilons, float), epsilon_power),
          np.log(np.asarray(steps, float)), np.log(np.asarray(sampling_probs, float))]


def effective_nodes(grid: dict) -> tuple[np.ndarray, np.ndarray]:
  """log σ the queries interpolate: the stored nodes, lifted where not convex, made monotone.

  * **Lift.** At a node whose value lies above the chord of its two
    neighbours along an axis by d > ``CONVEXITY_TOL`` (log σ locally
    concave, where interpolation could fall below σ), the node and its two
    neighbours along that axis are raised by 2d: the interpolation error of
    a smooth function over a cell is of the order of that deviation. Only
    where one accountant made the three nodes (a PLD node next to an RDP
    node is a change of bound, not a bend of σ).
  * **Monotone envelope.** Running maxima towards larger T, larger q,
    smaller ε and smaller δ. Raising a node keeps it an upper bound; the
    envelope makes every query monotone in every argument.

  Returns:
    (log σ [δ, ε, T, q], lift applied in log units).
  """
  ax = grid["axes"]
  raw = np.log(np.asarray(grid["noise_multiplier"], float))
  codes = grid.get("accountant_used")
  codes = None if codes is None else np.asarray(codes, np.int8)
  lift = np.zeros_like(raw)
  coords = coordinates(ax["epsilon"], ax["steps"], ax["sampling_prob"],
                        float(grid.get("epsilon_power", EPSILON_POWER)))
  for axis, x in zip((1, 2, 3), coords):
    if len(x) < 3:
      continue
    y = np.moveaxis(raw, axis, -1)
    w = (x[1:-1] - x[:-2]) / (x[2:] - x[:-2])
    deviation = y[..., 1:-1] - ((1 - w) * y[..., :-2] + w * y[..., 2:])   # > 0: concave
    # Only where one accountant made all three nodes: a step between PLD and
    # RDP nodes is a change of bound, not a bend of σ (the chord between two
    # upper bounds of a convex function stays one).
    if codes is not None:
      c = np.moveaxis(codes, axis, -1)
      same = (c[..., 1:-1] == c[..., :-2]) & (c[..., 1:-1] == c[..., 2:])
      deviation = np.where(same, deviation, 0.0)
    bad = np.zeros_like(y)
    bad[..., 1:-1] = np.where(deviation > CONVEXITY_TOL, deviation, 0.0)
    spread = bad.copy()
    spread[..., 1:] = np.maximum(spread[..., 1:], bad[..., :-1])
    spread[..., :-1] = np.maximum(spread[..., :-1], bad[..., 1:])
    lift = np.maximum(lift, np.moveaxis(2 * spread, -1, axis))
  nodes = raw + lift
  for axis, towards_larger in ((0, False), (1, False), (2, True), (3, True)):
    if towards_larger:
      nodes = np.maximum.accumulate(nodes, axis=axis)
    else:
      nodes = np.flip(np.maximum.accumulate(np.flip(nodes, axis), axis=axis), axis)
  return nodes, lift


class _Table:
  """The loaded grid in the arrays queries need (built once per grid)."""

  def __init__(self, grid: dict):
    if not isinstance(grid, dict) or grid.get("format") != FORMAT:
      raise ValueError(f"not a {FORMAT} object")
    ax = grid["axes"]
    self.eps = np.asarray(ax["epsilon"], float)
    self.steps = np.asarray(ax["steps"], float)
    self.q = np.asarray(ax["sampling_prob"], float)
    self.delta = np.asarray(ax["delta"], float)
    self.epsilon_power = float(grid.get("epsilon_power", EPSILON_POWER))
    self.coords = coordinates(self.eps, self.steps, self.q, self.epsilon_power)
    self.log_sigma, _ = effective_nodes(grid)
    codes = grid.get("accountant_used")
    self.codes = None if codes is None else np.asarray(codes, np.int8)
    self.log_margin = math.log(float(grid.get("interpolation_margin", 1.0)))

  def inside(self, eps, steps, q, delta):
    return ((eps >= self.eps[0]) & (eps <= self.eps[-1]) & (steps >= self.steps[0])
            & (steps <= self.steps[-1]) & (q >= self.q[0]) & (q <= self.q[-1])
            & (delta >= self.delta[0]) & (delta <= self.delta[-1]))

  def _cell(self, eps, steps, q, delta):
    # δ: the largest node <= δ (σ decreases with δ: conservative).
    k = np.searchsorted(self.delta, delta * (1 + 1e-12), side="right") - 1
    idx, frac = [], []
    for value, x in zip((_epsilon_coordinate(eps, self.epsilon_power), np.log(steps), np.log(q)),
                        self.coords):
      if len(x) == 1:
        idx.append(np.zeros(np.shape(value), int))
        frac.append(np.zeros(np.shape(value)))
        continue
      i = np.clip(np.searchsorted(x, value, side="right") - 1, 0, len(x) - 2)
      idx.append(i)
      frac.append(np.clip((value - x[i]) / (x[i + 1] - x[i]), 0.0, 1.0))
    return k, idx, frac

  def accountant_codes(self, eps, steps, q, delta):
    """The largest accountant code among the nodes a query interpolates (1 = some RDP node)."""
    k, (ie, it, iq), _ = self._cell(eps, steps, q, delta)
    top = [len(x) - 1 for x in self.coords]
    out = np.zeros(np.shape(eps), np.int8)
    for de in (0, 1):
      for dt in (0, 1):
        for dq in (0, 1):
          c = self.codes[k, np.minimum(ie + de, top[0]), np.minimum(it + dt, top[1]),
                         np.minimum(iq + dq, top[2])]
          out = np.maximum(out, np.where(c == 1, 3, c))  # rdp ranks above the floor
    return np.where(out == 3, 1, out)

  def interpolate(self, eps, steps, q, delta):
    """log σ at in-grid points (arrays of one shape)."""
    k, (ie, it, iq), (fe, ft, fq) = self._cell(eps, steps, q, delta)
    top = [len(x) - 1 for x in self.coords]
    out = np.zeros(np.shape(eps))
    for de in (0, 1):
      for dt in (0, 1):
        for dq in (0, 1):
          v = self.log_sigma[k, np.minimum(ie + de, top[0]), np.minimum(it + dt, top[1]),
                             np.minimum(iq + dq, top[2])]
          out = out + (fe if de else 1 - fe) * (ft if dt else 1 - ft) * (fq if dq else 1 - fq) * v
    return out + self.log_margin


Table = _Table


def check_arguments(epsilon, steps, sampling_prob, delta):
  """The four query arguments, broadcast to float arrays; ValueError naming a bad one."""
  eps, t, q, d = np.broadcast_arrays(np.asarray(epsilon, float), np.asarray(steps, float),
                                     np.asarray(sampling_prob, float), np.asarray(delta, float))
  for name, value, ok in (("epsilon", eps, (eps > 0) & np.isfinite(eps)),
                          ("steps", t, (t >= 1) & np.isfinite(t) & (t == np.round(t))),
                          ("sampling_prob", q, (q > 0) & (q <= 1)),
                          ("delta", d, (d > 0) & (d < 1))):
    if not np.all(ok):
      bad = value[~ok].flat[0]
      allowed = {"epsilon": "a finite number > 0", "steps": "an integer >= 1",
                 "sampling_prob": "in (0, 1]", "delta": "in (0, 1)"}[name]
      raise ValueError(f"{name} must be {allowed}, got {bad:g}")
  return eps, t, q, d


def require_inside(table: _Table, eps, t, q, d) -> None:
  """ValueError naming the first argument outside the grid, its value and the grid's range."""
  for name, value, axis in zip(_ARGS, (eps, t, q, d), (table.eps, table.steps, table.q,
                                                       table.delta)):
    out = (value < axis[0]) | (value > axis[-1])
    if np.any(out):
      raise ValueError(
          f"{name}={value[out].flat[0]:g} is outside the σ grid's range [{axis[0]:g}, "
          f"{axis[-1]:g}]; build a grid that covers it with accounting.sigma_grid.cached_grid "
          "(or `python -m accounting.sigma_grid`) and pass it as grid=")


class Combined:
  """Two grids as one: the wide grid, tightened by a finer one wherever that one is a valid bound.

  Both grids' σ are upper bounds on the σ the mechanism needs, so their
  minimum is too. The fine grid covers a smaller box; a query outside it still
  has a valid fine bound after moving it *towards more noise*, since σ falls
  with ε and δ and rises with T and q: ε above the box is read at the box's
  largest ε, δ above it at its largest δ, T below it at its fewest steps, q
  below it at its smallest q. Beyond the box the other way (ε or δ below it, T
  above it) only the wide grid answers. The result stays monotone in every
  argument: where the fine bound drops out, σ can only rise, which is the
  direction σ moves there anyway.
  """

  def __init__(self, wide: _Table, fine: _Table):
    self.wide, self.fine = wide, fine
    self.eps, self.steps, self.q, self.delta = wide.eps, wide.steps, wide.q, wide.delta

  def inside(self, eps, steps, q, delta):
    return self.wide.inside(eps, steps, q, delta)

  def _fine(self, eps, steps, q, delta):
    f = self.fine
    usable = (eps >= f.eps[0]) & (steps <= f.steps[-1]) & (delta >= f.delta[0])
    at = (np.minimum(eps, f.eps[-1]), np.maximum(steps, f.steps[0]),
          np.clip(q, f.q[0], f.q[-1]), np.minimum(delta, f.delta[-1]))
    at = [np.where(usable, a, lo) for a, lo in zip(at, (f.eps[-1], f.steps[0], f.q[0],
                                                         f.delta[-1]))]
    return usable, f.interpolate(*at)

  def interpolate(self, eps, steps, q, delta):
    """log σ: the smaller of the two grids' bounds (the fine one where it is valid)."""
    wide = self.wide.interpolate(eps, steps, q, delta)
    usable, fine = self._fine(eps, steps, q, delta)
    return np.where(usable, np.minimum(wide, fine), wide)

  def accountant_codes(self, eps, steps, q, delta):
    """0 (PLD) where the fine grid's PLD bound is the answer, else the wide grid's code."""
    usable, fine = self._fine(eps, steps, q, delta)
    wide = self.wide.interpolate(eps, steps, q, delta)
    codes = self.wide.accountant_codes(eps, steps, q, delta)
    return np.where(usable & (fine < wide), 0, codes).astype(np.int8)
