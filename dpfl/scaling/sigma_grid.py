"""A precomputed table of DP-SGD noise multipliers σ(ε, T, q, δ), for fast planning.

The compute-optimal planner (``dpfl.scaling.planner``) needs the noise
multiplier of thousands of candidate configurations per query; calibrating
each one with ``accounting`` takes ~0.1–1 s. This module computes σ once, on a
grid, for example-level DP-SGD with Poisson sampling
(``accounting.PoissonDpSgd(σ, q, T)``, the PLD accountant at the calibration
grid Δ = 1e-3), ships it as package data (``data/sigma_grid.json``) and
answers queries by interpolation in microseconds, importing only numpy.

**Never under-estimated (never over-spends ε).**

* **Nodes are feasible.** Each stored σ had its ε computed by
  ``accounting.epsilons`` (one composed PLD answers every δ of a node
  column at once; one node per column is re-checked through
  ``accounting.epsilon``) and found <= the node's ε. Nodes sit at
  most ~0.5% above the least feasible σ (false-position refinement of a
  shared ladder of σ; ``_solve``).
* **δ** uses the largest δ node <= the query's δ (σ decreases with δ): a δ
  on a node (1e-10, 1e-8, 1e-7, 1e-6, 1e-5) is exact; one in between gets
  the smaller node's σ (up to ~5% more noise than needed).
* **(ε, T, q)**: multilinear interpolation of log σ in (ε^½, log T, log q).
  For a function convex along each axis, the multilinear interpolant of
  upper bounds at the nodes is an upper bound everywhere between them, and
  log σ is convex along each of these coordinates almost everywhere
  (``_coordinates``). Where a node sits above the chord of its neighbours
  (local concavity: integer steps at small T, the small-σ corner), it and
  its neighbours are raised by twice the excess; then running maxima make
  the nodes monotone (σ up with T and q, down with ε and δ), so every query
  is monotone in every argument (``effective_nodes``). A final factor
  ``INTERPOLATION_MARGIN`` (0.3%) covers concavity below the check's
  tolerance. This last part is an argument from smoothness, not a proof; it
  is checked at build time against ``accounting.calibrate_noise_multiplier``
  at random off-grid points (``grid["validation"]``: the ratio grid σ /
  calibrated σ) and in ``tests/dpfl/scaling/test_sigma_grid.py``, which also
  checks ``accounting.epsilon`` of the returned σ against the target.

Out of the grid (ε, T, q or δ beyond the axes) ``noise_multiplier`` calls
``accounting.calibrate_noise_multiplier`` for the point instead of
extrapolating: exact, ~1 s each.

Known limit of the accounting it is built on: at large T and large σ the
pessimistic PLD rounding accumulates (about T·Δ in the privacy loss), so the
PLD calibration over-estimates σ there and, for very small ε, fails to find
any σ; such nodes are calibrated with dp-accounting's RDP accountant (a valid,
looser bound), marked ``"rdp"`` in ``grid["accountant_used"]``.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
import time
from typing import Any

import numpy as np

FORMAT = "dpfl-sigma-grid"
VERSION = 1
DISCRETIZATION = 1e-3        # accounting.calibrate's final PLD grid
SIGMA_FLOOR = 0.2            # σ below this is never stored: a floor is still feasible
_LADDER_RATIO = 1.5
NODE_RTOL = 5e-3             # stored σ within 0.5% above the least feasible σ
# Node deviations from convexity below this (log σ) are within the nodes' own
# slack (<= NODE_RTOL above the least σ) and covered by the margin.
_CONVEXITY_TOL = 3e-3
# Multiplies every interpolated σ: covers concavity below _CONVEXITY_TOL and
# sub-grid bends a node-level check cannot see (integer T at small T).
INTERPOLATION_MARGIN = 1.003
EPSILON_POWER = 0.5          # ε is interpolated in ε^0.5 (see _coordinates)
_MAX_SIGMA = 1e4
_MU_HOPELESS = 50.0          # CLT μ far beyond any target (ε ~ μ²/2); the CLT overstates μ at small σ
_WORKER_MEMORY = 5 * 2 ** 30

# The shipped axes: 6 x 9 x 9 x 5 = 2430 nodes in 81 (T, q) columns; ~2000
# CPU-seconds (17 min on 2 cores; columns at small q cost the most).
DEFAULT_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
DEFAULT_STEPS = tuple(int(round(10 ** (k / 2))) for k in range(2, 11))    # 10 .. 1e5
DEFAULT_SAMPLING_PROBS = tuple(10 ** (k / 2) for k in range(-8, 1))      # 1e-4 .. 1
DEFAULT_DELTAS = (1e-10, 1e-8, 1e-7, 1e-6, 1e-5)


# --- building -------------------------------------------------------------------------

def _pld_epsilons(sigma: float, q: float, steps: int, deltas) -> np.ndarray:
  """ε at every δ of one composed PLD: ``accounting.epsilons`` at Δ = ``DISCRETIZATION``.

  One composition answers every δ of a node column at once, which is what
  makes a multi-δ grid affordable.
  """
  import accounting
  return np.array(accounting.epsilons(accounting.PoissonDpSgd(sigma, q, steps),
                                      deltas=[float(d) for d in deltas],
                                      discretization=DISCRETIZATION))


def _verified(sigma: float, q: float, steps: int, epsilon: float, delta: float) -> bool:
  import accounting
  mech = accounting.PoissonDpSgd(sigma, q, steps)
  return accounting.epsilon(mech, delta=delta, discretization=DISCRETIZATION) <= epsilon


def _rdp_sigma(epsilon: float, q: float, steps: int, delta: float) -> float:
  """σ calibrated with RDP, where PLD's rounding cannot reach ε."""
  import accounting
  # calibrate's bracket starts at σ=1 and grows super-geometrically, so a root
  # in the thousands can be stepped over (1009 -> 1.3e6 > its cap): start the
  # search higher by calibrating a scaled σ.
  for scale in (1.0, 100.0):
    try:
      return scale * accounting.calibrate_noise_multiplier(
          lambda s: accounting.PoissonDpSgd(scale * s, q, steps), target_epsilon=epsilon,
          delta=delta, accountant="rdp").value
    except ValueError:
      if scale != 1.0:
        raise
  raise AssertionError("unreachable")


def _column(args) -> tuple[np.ndarray, np.ndarray, float]:
  """σ[δ, ε] at one (T, q): a shared ladder of PLD evaluations, refined per node.

  Returns (σ, code (0 pld; 1 rdp; 2 the ladder's lowest σ is feasible), seconds).
  """
  steps, q, epsilons, deltas = args
  import absl.logging
  absl.logging.set_verbosity(absl.logging.ERROR)  # RDP's order warnings are noise here
  start = time.perf_counter()
  epsilons = np.asarray(epsilons, float)
  deltas = np.asarray(deltas, float)
  ladder: dict[float, np.ndarray] = {}

  def eps_at(sigma, only=None):
    """ε at every δ (or only at δ index ``only``: NaN elsewhere) of the PLD at σ."""
    row = ladder.get(sigma)
    wanted = slice(None) if only is None else slice(only, only + 1)
    if row is None or np.isnan(row[wanted]).any():
      row = np.full(len(deltas), np.nan) if row is None else row
      try:
        row[wanted] = _pld_epsilons(sigma, q, steps, deltas[wanted])
      except MemoryError:  # a PLD this wide has ε far above any target: infeasible
        row[wanted] = np.inf
      ladder[sigma] = row
    return row

  # A ladder of σ (ratio 1.5) from below the loosest target (largest ε and δ;
  # or the floor) to above the tightest (smallest ε and δ) — or to where the
  # PLD's accumulated rounding stops ε from falling (see module docstring).
  def hopeless(sigma):
    # Central-limit μ of the composition (Dong, Roth, Su 2019): far above the
    # loosest target's, so ε is too; skipping the PLD there matters because
    # its support (hence memory) grows with the privacy loss.
    with np.errstate(over="ignore"):
      mu = q * math.sqrt(steps * math.expm1(min(1 / sigma ** 2, 700.0)))
    return mu > _MU_HOPELESS

  low = 1.0
  while hopeless(low) and low < _MAX_SIGMA:
    low *= _LADDER_RATIO
  high = low
  while low > SIGMA_FLOOR and eps_at(low)[-1] <= epsilons[-1]:
    lower = max(low / _LADDER_RATIO, SIGMA_FLOOR)
    if hopeless(lower):
      break
    low = lower
  history = [eps_at(high)[0]]
  while history[-1] > epsilons[0] and high < _MAX_SIGMA:
    high *= _LADDER_RATIO
    history.append(eps_at(high)[0])
    if len(history) >= 4 and history[-1] > 0.99 * history[-4]:
      break  # stalled: PLD cannot reach the tightest targets here
  out = np.empty((len(deltas), len(epsilons)))
  code = np.zeros((len(deltas), len(epsilons)), np.int8)
  for j, delta in enumerate(deltas):
    for i, target in enumerate(epsilons):
      out[j, i], code[j, i] = _solve(ladder, eps_at, j, target, q, steps, delta)
  # One node per column re-verified through accounting's public path (the
  # ladder's PLDs are built as accounting builds them; this keeps it honest).
  j, i = len(deltas) // 2, len(epsilons) // 2
  if code[j, i] == 0 and not _verified(out[j, i], q, steps, epsilons[i], deltas[j]):
    raise RuntimeError(f"σ={out[j, i]} fails accounting.epsilon at "
                       f"{(steps, q, epsilons[i], deltas[j])}")
  return out, code, time.perf_counter() - start


def _solve(ladder: dict, eps_at, j: int, target: float, q: float, steps: int,
           delta: float) -> tuple[float, int]:
  """Smallest ladder σ with ε <= target at δ index j, refining the ladder to NODE_RTOL.

  Each round estimates σ from a quadratic through the nearest ladder points
  (log σ against log ε: smooth) and evaluates just above the estimate; it
  stops at a feasible σ whose ε is within NODE_RTOL below the target (or a
  bracket narrower than NODE_RTOL). A round that does not halve the bracket
  is followed by a bisection. Every evaluation joins the shared ladder, so
  later targets start from narrower brackets. Whatever is returned was
  evaluated feasible (or is RDP-calibrated, code 1).
  """
  half_width = NODE_RTOL / 2.5
  bisect_next = False
  while True:
    sigmas = np.array([s for s in sorted(ladder) if not np.isnan(ladder[s][j])])
    eps = np.array([ladder[s][j] for s in sigmas])
    feasible = np.nonzero(eps <= target)[0]
    if len(feasible) == 0:  # unreachable by PLD here: see the module docstring
      return _rdp_sigma(target, q, steps, delta), 1
    k = feasible[0]
    if k == 0:  # the bottom of the ladder (the floor) is feasible: a bound, not tight
      return float(sigmas[0]), 2
    lo, hi = float(sigmas[k - 1]), float(sigmas[k])
    if hi / lo <= 1 + NODE_RTOL:
      return hi, 0
    near = [n for n in range(k - 2, k + 2)
            if 0 <= n < len(sigmas) and math.isfinite(eps[n]) and eps[n] > 0]
    if bisect_next or len(near) < 2 or k - 1 not in near:
      guess = math.sqrt(lo * hi)
    else:
      x, y = np.log(eps[near]), np.log(sigmas[near])
      coef = np.polyfit(x, y, min(2, len(near) - 1))
      guess = float(np.exp(np.polyval(coef, math.log(target))))
      if not lo < guess < hi:
        guess = math.sqrt(lo * hi)
    width = math.log(hi / lo)
    probe = guess * (1 + half_width)
    if lo < probe < hi:
      value = eps_at(probe, j)[j]
      if value <= target:
        if value >= target * (1 - NODE_RTOL):
          # ε falls at least as fast as 1/σ, so ε this close below the target
          # puts σ within NODE_RTOL of the least feasible σ: done.
          return probe, 0
        hi = probe
      else:
        lo = probe
    bisect_next = math.log(hi / lo) > 0.5 * width


def _init_worker():
  import resource
  # A PLD with a huge privacy loss can ask for tens of GB: fail that one
  # evaluation (MemoryError, counted as infeasible) rather than the machine.
  resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY, _WORKER_MEMORY))


def build_grid(*, epsilons=DEFAULT_EPSILONS, steps=DEFAULT_STEPS,
               sampling_probs=DEFAULT_SAMPLING_PROBS, deltas=DEFAULT_DELTAS,
               processes: int | None = None, validation_points: int = 24,
               seed: int = 0, progress: bool = True) -> dict[str, Any]:
  """Computes the σ table (minutes: run once, ship the result).

  Args:
    epsilons, steps, sampling_probs, deltas: the axes (each increasing).
    processes: worker processes (default: all CPUs).
    validation_points: random off-grid (ε, T, q) points (δ on a node)
      compared with ``accounting.calibrate_noise_multiplier``; stored in
      ``grid["validation"]`` (0 to skip).
    seed: of the validation points.
    progress: print a line per finished (T, q) column to stderr.

  Returns:
    A JSON-serialisable dict (``save_grid`` writes it).
  """
  import multiprocessing
  import sys

  epsilons, deltas = sorted(map(float, epsilons)), sorted(map(float, deltas))
  steps, sampling_probs = sorted(map(int, steps)), sorted(map(float, sampling_probs))
  if not (epsilons[0] > 0 and 0 < deltas[0] and deltas[-1] < 1 and steps[0] >= 1
          and 0 < sampling_probs[0] and sampling_probs[-1] <= 1):
    raise ValueError("build_grid: axes out of range (ε > 0, δ in (0,1), T >= 1, q in (0,1])")
  jobs = [(t, q, epsilons, deltas) for t in steps for q in sampling_probs]
  # Longest first (large T, small q) so the pool ends together.
  order = sorted(range(len(jobs)), key=lambda n: (-jobs[n][0], jobs[n][1]))
  start = time.perf_counter()
  sigma = np.empty((len(deltas), len(epsilons), len(steps), len(sampling_probs)))
  code = np.empty(sigma.shape, np.int8)
  column_seconds = 0.0
  processes = processes or os.cpu_count()
  if processes == 1:  # in this process (tests): no worker memory limit either
    pool = None
    results = map(_column, [jobs[n] for n in order])
  else:
    pool = multiprocessing.get_context("spawn").Pool(processes, initializer=_init_worker)
    results = pool.imap(_column, [jobs[n] for n in order])
  try:
    for done, (n, (col, col_code, secs)) in enumerate(zip(order, results)):
      it, iq = divmod(n, len(sampling_probs))
      sigma[:, :, it, iq], code[:, :, it, iq] = col, col_code
      column_seconds += secs
      if progress:
        print(f"sigma grid: {done + 1}/{len(jobs)} columns, T={jobs[n][0]} q={jobs[n][1]:.3g} "
              f"{secs:.1f}s", file=sys.stderr, flush=True)
  finally:
    if pool is not None:
      pool.terminate()
  from importlib import metadata
  grid = {
      "format": FORMAT, "version": VERSION,
      "mechanism": "accounting.PoissonDpSgd(noise_multiplier, sampling_prob, num_steps)",
      "accountant": "pld", "discretization": DISCRETIZATION,
      "axes": {"epsilon": epsilons, "steps": steps, "sampling_prob": sampling_probs,
               "delta": deltas},
      "layout": "noise_multiplier[delta][epsilon][steps][sampling_prob]",
      "noise_multiplier": sigma.tolist(),
      # 0: pld; 1: rdp (PLD cannot reach ε); 2: the ladder's lowest σ (the
      # floor, or where the CLT says lower σ is hopeless) is feasible: a bound.
      "accountant_used": code.tolist(),
      "sigma_floor": SIGMA_FLOOR,
      "interpolation_margin": INTERPOLATION_MARGIN,
      "epsilon_power": EPSILON_POWER,
      "build": {"seconds": round(time.perf_counter() - start, 1),
                "cpu_seconds": round(column_seconds, 1),
                "processes": processes,
                "dp_accounting_version": metadata.version("dp-accounting")},
  }
  if validation_points:
    grid["validation"] = validate_grid(grid, points=validation_points, seed=seed)
  return grid


def validate_grid(grid: dict, *, points: int = 24, seed: int = 0) -> dict[str, Any]:
  """Grid σ / calibrated σ at random off-grid points (log-uniform inside the axes)."""
  import accounting
  rng = np.random.default_rng(seed)
  ax = grid["axes"]
  rows = []
  for _ in range(points):
    eps = float(np.exp(rng.uniform(np.log(ax["epsilon"][0]), np.log(ax["epsilon"][-1]))))
    steps = int(round(np.exp(rng.uniform(np.log(ax["steps"][0]), np.log(ax["steps"][-1])))))
    q = float(np.exp(rng.uniform(np.log(ax["sampling_prob"][0]), np.log(ax["sampling_prob"][-1]))))
    delta = float(rng.choice(ax["delta"]))
    ours = float(interpolate(grid, eps, steps, q, delta))
    try:
      ref = accounting.calibrate_noise_multiplier(
          lambda s: accounting.PoissonDpSgd(s, q, steps), target_epsilon=eps, delta=delta).value
    except ValueError:  # PLD cannot reach ε here (see module docstring)
      continue
    rows.append([eps, steps, q, delta, ours, ref])
  ratios = np.array([r[4] / r[5] for r in rows])
  return {"points": rows, "columns": ["epsilon", "steps", "sampling_prob", "delta",
                                      "grid_sigma", "calibrated_sigma"],
          "min_ratio": float(ratios.min()), "median_ratio": float(np.median(ratios)),
          "max_ratio": float(ratios.max())}


def save_grid(grid: dict, path: str | os.PathLike) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(grid, f, separators=(",", ":"))
    f.write("\n")


# --- querying -------------------------------------------------------------------------

def _epsilon_coordinate(epsilon, power: float):
  return np.log(epsilon) if power == 0 else np.asarray(epsilon, float) ** power


def _coordinates(epsilons, steps, sampling_probs, epsilon_power: float) -> list[np.ndarray]:
  """Where the (ε, T, q) axes are interpolated: ε^p (p = ``epsilon_power``), log T, log q.

  log σ is convex in log T and log q (σ grows like T^a, q^b with exponents
  rising towards 1/2 and 1). Along ε it is convex in log ε where σ is large
  (σ ~ 1/ε) but concave where q and σ are small (σ ≈ (2 log(ε/q))^(-1/2));
  in ε^(1/2) it is nearly convex in both regimes (the shipped grid: see
  ``effective_nodes`` for what is done where it is not).
  """
  return [_epsilon_coordinate(np.asarray(epsilons, float), epsilon_power),
          np.log(np.asarray(steps, float)), np.log(np.asarray(sampling_probs, float))]


def effective_nodes(grid: dict) -> tuple[np.ndarray, np.ndarray]:
  """log σ the queries interpolate: the stored nodes, lifted where not convex, made monotone.

  * **Lift.** At a node whose value lies above the chord of its two
    neighbours along an axis by d > ``_CONVEXITY_TOL`` (log σ locally
    concave, where interpolation could fall below σ), the node and its two
    neighbours along that axis are raised by 2d: the interpolation error of
    a smooth function over a cell is of the order of that deviation.
  * **Monotone envelope.** Running maxima towards larger T, larger q,
    smaller ε and smaller δ. Raising a node keeps it an upper bound; the
    envelope makes every query monotone in every argument.

  Returns:
    (log σ [δ, ε, T, q], lift applied in log units).
  """
  ax = grid["axes"]
  raw = np.log(np.asarray(grid["noise_multiplier"], float))
  lift = np.zeros_like(raw)
  coords = _coordinates(ax["epsilon"], ax["steps"], ax["sampling_prob"],
                        float(grid.get("epsilon_power", EPSILON_POWER)))
  for axis, x in zip((1, 2, 3), coords):
    if len(x) < 3:
      continue
    y = np.moveaxis(raw, axis, -1)
    w = (x[1:-1] - x[:-2]) / (x[2:] - x[:-2])
    deviation = y[..., 1:-1] - ((1 - w) * y[..., :-2] + w * y[..., 2:])   # > 0: concave
    bad = np.zeros_like(y)
    bad[..., 1:-1] = np.where(deviation > _CONVEXITY_TOL, deviation, 0.0)
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
    self.coords = _coordinates(self.eps, self.steps, self.q, self.epsilon_power)
    self.log_sigma, _ = effective_nodes(grid)
    self.log_margin = math.log(float(grid.get("interpolation_margin", 1.0)))

  def inside(self, eps, steps, q, delta):
    return ((eps >= self.eps[0]) & (eps <= self.eps[-1]) & (steps >= self.steps[0])
            & (steps <= self.steps[-1]) & (q >= self.q[0]) & (q <= self.q[-1])
            & (delta >= self.delta[0]) & (delta <= self.delta[-1]))

  def interpolate(self, eps, steps, q, delta):
    """log σ at in-grid points (arrays of one shape)."""
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
    (ie, it, iq), (fe, ft, fq) = idx, frac
    top = [len(x) - 1 for x in self.coords]
    out = np.zeros(np.shape(eps))
    for de in (0, 1):
      for dt in (0, 1):
        for dq in (0, 1):
          v = self.log_sigma[k, np.minimum(ie + de, top[0]), np.minimum(it + dt, top[1]),
                             np.minimum(iq + dq, top[2])]
          out = out + (fe if de else 1 - fe) * (ft if dt else 1 - ft) * (fq if dq else 1 - fq) * v
    return out + self.log_margin


@functools.lru_cache(maxsize=4)
def _table_for(path: str | None) -> _Table:
  return _Table(load_grid(path))


def load_grid(path: str | os.PathLike | None = None) -> dict:
  """The grid at ``path``, or the one shipped with dpfl (``data/sigma_grid.json``)."""
  if path is None:
    ref = importlib.resources.files("dpfl.scaling") / "data" / "sigma_grid.json"
    with ref.open("r", encoding="utf-8") as f:
      return json.load(f)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _as_table(grid) -> _Table:
  if grid is None or isinstance(grid, (str, os.PathLike)):
    return _table_for(None if grid is None else os.fspath(grid))
  if isinstance(grid, _Table):
    return grid
  return _Table(grid)


def _check(epsilon, steps, sampling_prob, delta):
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


def interpolate(grid, epsilon, steps, sampling_prob, delta) -> np.ndarray:
  """σ from the grid alone, for points inside it (ValueError outside)."""
  table = _as_table(grid)
  eps, t, q, d = _check(epsilon, steps, sampling_prob, delta)
  if not np.all(table.inside(eps, t, q, d)):
    raise ValueError("interpolate: a point lies outside the σ grid")
  return np.exp(table.interpolate(eps, t, q, d))


def inside(epsilon, steps, sampling_prob, delta, *, grid=None) -> np.ndarray:
  """True where the grid answers without calling ``accounting``."""
  table = _as_table(grid)
  eps, t, q, d = _check(epsilon, steps, sampling_prob, delta)
  return table.inside(eps, t, q, d)


@functools.lru_cache(maxsize=4096)
def _calibrated(epsilon: float, steps: int, q: float, delta: float) -> float:
  import accounting
  try:
    return accounting.calibrate_noise_multiplier(
        lambda s: accounting.PoissonDpSgd(s, q, steps), target_epsilon=epsilon,
        delta=delta).value
  except ValueError:  # PLD's rounding cannot reach ε (large T): RDP is a valid bound
    return _rdp_sigma(epsilon, q, steps, delta)


def noise_multiplier(epsilon, steps, sampling_prob, delta, *, grid=None) -> np.ndarray:
  """The noise multiplier σ that makes Poisson DP-SGD (ε, δ)-DP; never too small.

  Args:
    epsilon: target ε (> 0); arrays broadcast.
    steps: T, integers >= 1.
    sampling_prob: q in (0, 1].
    delta: δ in (0, 1).
    grid: a grid dict or path (default: the shipped one).

  Returns:
    σ (float array of the broadcast shape): from the grid where the point is
    inside it (see the module docstring for the bound), else from
    ``accounting.calibrate_noise_multiplier`` (slow, cached per point).
  """
  table = _as_table(grid)
  eps, t, q, d = _check(epsilon, steps, sampling_prob, delta)
  shape = eps.shape
  eps, t, q, d = (np.atleast_1d(a).ravel() for a in (eps, t, q, d))
  inside_ = table.inside(eps, t, q, d)
  out = np.empty(eps.shape)
  if inside_.any():
    out[inside_] = np.exp(table.interpolate(eps[inside_], t[inside_], q[inside_], d[inside_]))
  for n in np.nonzero(~inside_)[0]:
    out[n] = _calibrated(float(eps[n]), int(t[n]), float(q[n]), float(d[n]))
  return out.reshape(shape)


def main(argv=None) -> int:
  """``python -m dpfl.scaling.sigma_grid OUT.json [--quick]``: (re)builds the grid."""
  import argparse
  p = argparse.ArgumentParser(description=main.__doc__, allow_abbrev=False)
  p.add_argument("out")
  p.add_argument("--processes", type=int, default=None)
  p.add_argument("--validation-points", type=int, default=24)
  p.add_argument("--quick", action="store_true", help="a tiny grid (a smoke test)")
  args = p.parse_args(argv)
  kwargs = {}
  if args.quick:
    kwargs = dict(epsilons=(1.0, 4.0), steps=(10, 100), sampling_probs=(0.01, 0.1),
                  deltas=(1e-6,))
  grid = build_grid(processes=args.processes, validation_points=args.validation_points,
                    **kwargs)
  save_grid(grid, args.out)
  print(json.dumps({"build": grid["build"], "validation": {
      k: v for k, v in grid.get("validation", {}).items() if k != "points"}}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
