"""Builds the table of DP-SGD noise multipliers σ(ε, δ, T, q) the scaling planner reads.

The compute-optimal planner (``dpfl.scaling.planner``) needs σ for thousands
of candidate configurations per query; calibrating each costs seconds. This
module computes σ once, on a grid, for example-level DP-SGD with Poisson
sampling (``PoissonDpSgd(σ, q, T)``); ``dpfl.scaling.sigma_grid`` loads the
result (numpy only) and answers by interpolation. Building is accounting
work and stays here (no JAX).

**How a node is made.** Per sampling rate q, two ladders of σ:

* *PLD, T <= 2^PLD_LEVELS.* For each σ of a geometric ladder (ratio
  ``LADDER_RATIO``), dp-accounting's one-step PLD of the Poisson-subsampled
  Gaussian (pessimistic, connect-the-dots, built as ``accounting.epsilon``
  builds it, Δ = ``MIN_DISCRETIZATION`` or accounting's floor) is composed
  with itself by repeated squaring: T = 1, 2, 4, …, 2^PLD_LEVELS for the price
  of that many compositions, every δ of the axis read off every level. The
  tail mass dropped per composition is 2^-levels of ``accounting``'s
  self-composition bound (it is moved to infinite loss: pessimistic). A chain
  stops once ε exceeds the largest target or its PLD outgrows
  ``MAX_CHAIN_POINTS``.
* *RDP, every T.* dp-accounting's RDP of the subsampled Gaussian (its orders
  plus ``EXTRA_RDP_ORDERS``, which tiny ε at tiny q need) scales linearly in
  T, so one vector per σ answers every T; its RDP-to-DP conversion is
  dp-accounting's ``compute_epsilon`` evaluated on arrays. Ladder ratio
  ``RDP_LADDER_RATIO``.

A node (ε, δ, T) takes the two ladder σ whose ε bracket the target and, where
log ε is convex in log σ around them (checked on the four nearest ladder
points), the σ where the chord between them in (log σ, log ε) crosses the
target: for a convex decreasing curve that is at or above the exact crossing
(conservative). Elsewhere it takes the feasible (upper) ladder σ. PLD nodes
are multiplied by ``NODE_MARGIN`` (the chain's Δ and tail bound against the Δ
``accounting.calibrate_noise_multiplier`` settles on). A node is PLD where a
PLD chain reaches it (T <= 2^PLD_LEVELS and σ not too small for a chain),
else RDP: an upper bound on the needed σ, looser than PLD at small q.
``"accountant_used"`` records it per node: 0 PLD; 1 RDP; 2 the ladder's lowest
σ (``SIGMA_FLOOR``) already meets the target (a bound, not tight).

The resolution this buys is stated in the grid (``"resolution"``) and
measured against ``accounting.calibrate_noise_multiplier`` at random points at
build time (``"validation"``).

**Cache.** The grid shipped with dpfl (``dpfl/scaling/data/sigma_grid.json``)
is the cache for the default axes. ``cached_grid(**axes)`` returns the shipped
grid when the axes equal the default ones, else builds the grid once and
stores it under ``$XDG_CACHE_HOME/dpfl/`` (default ``~/.cache/dpfl/``) as
``sigma_grid-<hash of the axes>.json``; later calls load it.

Rebuild the shipped grid with ``python -m accounting.sigma_grid OUT.json``
(equivalently ``python -m dpfl.scaling.sigma_grid OUT.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

FORMAT = "dpfl-sigma-grid"
VERSION = 2
SIGMA_FLOOR = 0.1            # the ladder's lowest σ: below it a node stores this bound
LADDER_RATIO = 1.4           # of the PLD ladder
RDP_LADDER_RATIO = 1.15
# PLD chains run to T = 2^PLD_LEVELS; RDP (tight there: long runs at
# moderate q) makes the nodes beyond, and any node no PLD chain reaches.
PLD_LEVELS = 10
# A chain stops once its PLD has this many points (cost and memory).
MAX_CHAIN_POINTS = 2 ** 20
# RDP orders: dp-accounting's, and larger ones for tiny ε at tiny q.
EXTRA_RDP_ORDERS = (2048, 4096)
# Multiplies every chain node: the chain's Δ and tail bound against the
# (finer, converged) Δ accounting's calibration uses, and calibration's own
# 0.1% bracket.
NODE_MARGIN = 1.01
MIN_DISCRETIZATION = 1e-3    # the chain's finest Δ (calibration's own default grid) (accounting's floor may raise it)
_MAX_SIGMA = 1e8
# The convexity tolerance and final margin the query side applies (recorded in the grid).
INTERPOLATION_MARGIN = 1.003
EPSILON_POWER = 0.5
# The stated accuracy of PLD-made queries of the shipped build (measured at
# random points: max 3.49, median 1.35 over 13; checked by the tests): σ >= the PLD
# calibration (accounting.calibrate_noise_multiplier) and <= RESOLUTION x
# max(that σ, SIGMA_FLOOR), δ on an axis node. Coarse: ladder ratio 1.4, q by
# decades, chains cut at MAX_CHAIN_POINTS; a finer build tightens it.
RESOLUTION = 4.0

# The shipped axes: the paper's ε range (2^-7 .. 2^7, McKenna et al. 2025),
# T = 1 .. 2^24 (>= 1e7) in factors of 2 (free: the chain gives every power
# of 2), q = 1e-10 .. 1 per decade, δ = 1e-12 .. 1e-5 per decade.
DEFAULT_EPSILONS = tuple(2.0 ** (k / 2) for k in range(-14, 15))
DEFAULT_STEP_LEVELS = 24
DEFAULT_STEPS = tuple(2 ** k for k in range(DEFAULT_STEP_LEVELS + 1))
DEFAULT_SAMPLING_PROBS = tuple(10.0 ** k for k in range(-10, 1))
DEFAULT_DELTAS = tuple(10.0 ** k for k in range(-12, -4))


def _dense(one_step):
  from dp_accounting.pld import privacy_loss_distribution as pld
  # pylint: disable=protected-access
  remove = one_step._pmf_remove.to_dense_pmf()
  add = None if one_step._symmetric else one_step._pmf_add.to_dense_pmf()
  return pld.PrivacyLossDistribution(remove, add)


def chain_discretization(sigma: float, q: float) -> float:
  """The chain's Δ: ``MIN_DISCRETIZATION``, or accounting's one-step floor if coarser."""
  from accounting import accountants
  from accounting.mechanisms import PoissonDpSgd
  # pylint: disable=protected-access
  return max(MIN_DISCRETIZATION, accountants._span_floor(PoissonDpSgd(sigma, q, 1)))


def chain_epsilons(sigma: float, q: float, levels: int, deltas,
                   stop_above: float = math.inf) -> np.ndarray:
  """ε[k, d] of ``PoissonDpSgd(σ, q, 2^k)`` at ``deltas[d]``, k = 0..levels (PLD).

  The chain stops (inf from there on) once ε exceeds ``stop_above`` at every
  δ (ε only grows with T, so no target is met further up), or once the
  composition outgrows accounting's limit on composed points.
  """
  from accounting import accountants
  from dp_accounting.pld import privacy_loss_distribution as pld
  out = np.full((levels + 1, len(deltas)), np.inf)
  disc = chain_discretization(sigma, q)
  if disc > accountants.MAX_DISCRETIZATION:
    return out
  one = pld.from_gaussian_mechanism(standard_deviation=sigma, value_discretization_interval=disc,
                                    sampling_prob=q)
  composed = _dense(one)
  # pylint: disable=protected-access
  truncation = accountants._TAIL_MASS_TRUNCATION / 2 ** levels
  for k in range(levels + 1):
    if k:
      composed = composed.compose(composed, tail_mass_truncation=truncation)
      if max(composed._pmf_remove.size, composed._pmf_add.size) > MAX_CHAIN_POINTS:
        break
    out[k] = [composed.get_epsilon_for_delta(float(d)) for d in deltas]
    if out[k].min() > stop_above:
      break
  return out


def _rdp_sigma(epsilon: float, q: float, steps: int, delta: float) -> float:
  """σ calibrated with RDP (an upper bound on the needed σ)."""
  import accounting
  # calibrate's bracket gallops from σ=1 and can step over a root in the
  # thousands to its cap: start higher by calibrating a scaled σ.
  for scale in (1.0, 100.0, 1e4):
    try:
      return scale * accounting.calibrate_noise_multiplier(
          lambda s: accounting.PoissonDpSgd(scale * s, q, steps), target_epsilon=epsilon,
          delta=delta, accountant="rdp").value
    except ValueError:
      continue
  return math.inf


def rdp_epsilons(sigma: float, q: float, levels: int, deltas) -> np.ndarray:
  """ε[k, d] of ``PoissonDpSgd(σ, q, 2^k)`` by RDP.

  dp-accounting's RDP of the Poisson-subsampled Gaussian and its RDP-to-DP
  conversion (``compute_epsilon``: Proposition 12 of arXiv:2004.00010),
  evaluated on arrays over (T, δ, order) at once.
  """
  from dp_accounting.rdp import rdp_privacy_accountant as rdp
  orders = np.array(list(rdp.DEFAULT_RDP_ORDERS) + list(EXTRA_RDP_ORDERS), float)
  # pylint: disable=protected-access
  one = np.asarray(rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, list(orders)), float)
  keep = np.isfinite(one) & (orders > 1.01)
  a, one = orders[keep], one[keep]
  r = (2.0 ** np.arange(levels + 1))[:, None, None] * one[None, None, :]   # [k, 1, order]
  delta = np.asarray(deltas, float)[None, :, None]                            # [1, d, 1]
  with np.errstate(over="ignore", invalid="ignore"):
    eps = r + np.log1p(-1 / a) - np.log(delta * a) / (a - 1)
    eps = np.where(delta ** 2 + np.expm1(-r) > 0, 0.0, eps)
  eps = np.where(r < 0, 0.0, eps)
  return np.maximum(0.0, np.min(eps, axis=-1)) if a.size else np.full(
      (levels + 1, len(deltas)), np.inf)


def _ladder(evaluate, epsilons, ratio: float, top_level: int):
  """σ ladder and ε[j, k, d] (``evaluate(σ)``), wide enough for every target up to ``top_level``."""
  sigmas, table = [], []

  def at(sigma):
    sigmas.append(sigma)
    table.append(evaluate(sigma))
    return table[-1]

  # Up from σ=1 until the tightest target (smallest ε, smallest δ, largest T) is met,
  # down until the loosest one (largest ε, largest δ, T=1) is not (or the floor).
  sigma = 1.0
  e = at(sigma)
  while e[top_level, 0] > epsilons[0] and sigma < _MAX_SIGMA:
    sigma *= ratio
    e = at(sigma)
  sigma = 1.0
  e = table[0]
  while e[0, -1] <= epsilons[-1] and sigma > SIGMA_FLOOR:
    sigma = max(sigma / ratio, SIGMA_FLOOR)
    e = at(sigma)
  order = np.argsort(sigmas)
  return np.asarray(sigmas)[order], np.asarray(table)[order]


def _nodes_from_ladder(sigmas, eps, epsilons):
  """σ[d, i, k] (and code) from one q's ladder by the chord in (log ε, log σ)."""
  n_levels, n_deltas = eps.shape[1], eps.shape[2]
  # ε must not increase with σ: a running max from the top keeps every value an
  # upper bound (numerical wiggles of the pessimistic PLD only raise ε).
  eps = np.maximum.accumulate(eps[::-1], axis=0)[::-1]
  out = np.empty((n_deltas, len(epsilons), n_levels))
  code = np.zeros(out.shape, np.int8)
  log_s = np.log(sigmas)
  for d in range(n_deltas):
    for k in range(n_levels):
      col = eps[:, k, d]
      for i, target in enumerate(epsilons):
        ok = np.nonzero(col <= target)[0]
        if len(ok) == 0:
          out[d, i, k], code[d, i, k] = np.nan, 1  # filled by RDP
          continue
        j = ok[0]
        if j == 0:
          out[d, i, k], code[d, i, k] = sigmas[0], 2
          continue
        hi, lo = col[j], col[j - 1]
        if hi > 0 and math.isfinite(lo) and _locally_convex(log_s, col, j):
          x = (math.log(target) - math.log(lo)) / (math.log(hi) - math.log(lo))
          out[d, i, k] = math.exp(log_s[j - 1] + min(max(x, 0.0), 1.0) * (log_s[j] - log_s[j - 1]))
        else:  # ε = 0 or ∞ at a bracket end: the feasible end, certified as is
          out[d, i, k] = sigmas[j]
  return out, code


def _locally_convex(log_sigma, eps, j: int, tol: float = 1e-3) -> bool:
  """Whether log ε lies on or below its chords at the ladder points j-1 and j (neighbours known)."""
  if j < 2 or j + 1 >= len(eps):
    return False
  with np.errstate(divide="ignore"):
    y = np.log(eps[j - 2:j + 2])
  if not np.all(np.isfinite(y)):
    return False
  x = log_sigma[j - 2:j + 2]
  for m in (1, 2):
    w = (x[m] - x[m - 1]) / (x[m + 1] - x[m - 1])
    if y[m] - ((1 - w) * y[m - 1] + w * y[m + 1]) > tol:
      return False
  return True


def convexity_excess(sigmas, eps) -> float:
  """Largest rise of log ε above the chord of its neighbours along the ladder (0 = convex)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    y = np.log(eps)
  x = np.log(sigmas)[:, None, None]
  w = (x[1:-1] - x[:-2]) / (x[2:] - x[:-2])
  with np.errstate(invalid="ignore"):
    mid = y[1:-1] - ((1 - w) * y[:-2] + w * y[2:])
  good = np.isfinite(mid) & (y[2:] > np.log(1e-3))
  return float(mid[good].max()) if good.any() else 0.0


def _column(args):
  """One q: (σ[d, i, k], code, seconds, convexity excess, ladder sizes)."""
  q, levels, epsilons, deltas, ratio = args
  import absl.logging
  absl.logging.set_verbosity(absl.logging.ERROR)  # RDP's order warnings are noise here
  start = time.perf_counter()
  pld_levels = min(levels, PLD_LEVELS)
  sigmas, eps = _ladder(lambda s: chain_epsilons(s, q, pld_levels, deltas,
                                                 stop_above=epsilons[-1]),
                        epsilons, ratio, pld_levels)
  pld, code = _nodes_from_ladder(sigmas, eps, epsilons)
  rdp_sigmas, rdp_eps = _ladder(lambda s: rdp_epsilons(s, q, levels, deltas), epsilons,
                                RDP_LADDER_RATIO, levels)
  rdp, rdp_code = _nodes_from_ladder(rdp_sigmas, rdp_eps, epsilons)
  out = np.where(rdp_code == 1, np.inf, rdp)
  out_code = np.where(rdp_code == 2, 2, 1).astype(np.int8)
  # Both are upper bounds on the needed σ: the smaller wins (PLD unless its
  # chain was cut short or its ladder is coarser than RDP's bound there).
  pld = np.where(code == 1, np.inf, np.where(code == 0, pld * NODE_MARGIN, pld))
  head = out[..., :pld_levels + 1]
  use_pld = pld <= head
  out[..., :pld_levels + 1] = np.where(use_pld, pld, head)
  out_code[..., :pld_levels + 1] = np.where(use_pld, code, out_code[..., :pld_levels + 1])
  excess = max(convexity_excess(sigmas, eps), convexity_excess(rdp_sigmas, rdp_eps))
  return (out, out_code, time.perf_counter() - start, excess,
          (len(sigmas), len(rdp_sigmas)))


def build_grid(*, epsilons=DEFAULT_EPSILONS, step_levels: int = DEFAULT_STEP_LEVELS,
               sampling_probs=DEFAULT_SAMPLING_PROBS, deltas=DEFAULT_DELTAS,
               ladder_ratio: float = LADDER_RATIO, processes: int | None = None,
               validation_points: int = 0, seed: int = 0,
               progress: bool = True) -> dict[str, Any]:
  """Computes the σ table (minutes: run once, ship or cache the result).

  Args:
    epsilons, sampling_probs, deltas: the axes (any order; sorted here).
    step_levels: K; the steps axis is T = 1, 2, 4, …, 2^K.
    ladder_ratio: of the σ ladder per q (finer: tighter nodes, slower).
    processes: worker processes (default: all CPUs; 1: in this process).
    validation_points: random off-grid points compared with
      ``accounting.calibrate_noise_multiplier`` (stored in ``grid["validation"]``).
    seed: of the validation points.
    progress: a line per finished q to stderr.

  Returns:
    A JSON-serialisable dict (``save_grid`` writes it).
  """
  import multiprocessing
  epsilons, deltas = sorted(map(float, epsilons)), sorted(map(float, deltas))
  sampling_probs = sorted(map(float, sampling_probs))
  step_levels = int(step_levels)
  if not (epsilons[0] > 0 and 0 < deltas[0] and deltas[-1] < 1 and 0 <= step_levels <= 26
          and 0 < sampling_probs[0] and sampling_probs[-1] <= 1 and ladder_ratio > 1):
    raise ValueError("build_grid: axes out of range (ε > 0, δ in (0, 1), step_levels in "
                     "[0, 26], q in (0, 1], ladder_ratio > 1)")
  jobs = [(q, step_levels, epsilons, deltas, float(ladder_ratio)) for q in sampling_probs]
  start = time.perf_counter()
  processes = processes or os.cpu_count()
  pool = None
  if processes == 1:
    results = map(_column, jobs)
  else:
    pool = multiprocessing.get_context("spawn").Pool(processes)
    results = pool.imap(_column, jobs)
  columns = []
  try:
    for job, column in zip(jobs, results):
      columns.append(column)
      if progress:
        print(f"sigma grid: q={job[0]:.3g} ladders (PLD, RDP) {column[4]}, {column[2]:.1f}s",
              file=sys.stderr, flush=True)
  finally:
    if pool is not None:
      pool.terminate()
  grid = grid_from_columns(columns, epsilons=epsilons, step_levels=step_levels,
                           sampling_probs=sampling_probs, deltas=deltas,
                           ladder_ratio=ladder_ratio, seconds=time.perf_counter() - start,
                           processes=processes)
  if validation_points:
    grid["validation"] = validate_grid(grid, points=validation_points, seed=seed)
  return grid


def grid_from_columns(columns, *, epsilons, step_levels, sampling_probs, deltas, ladder_ratio,
                      seconds, processes) -> dict[str, Any]:
  """The grid dict from ``_column``'s results, one per q (in ``sampling_probs`` order)."""
  sigma = np.stack([c[0] for c in columns], axis=-1)
  code = np.stack([c[1] for c in columns], axis=-1)
  cpu = sum(c[2] for c in columns)
  excess = max(c[3] for c in columns)
  ladders = [c[4] for c in columns]
  from importlib import metadata
  grid = {
      "format": FORMAT, "version": VERSION,
      "mechanism": "accounting.PoissonDpSgd(noise_multiplier, sampling_prob, num_steps)",
      "accountant": "pld",
      "axes": {"epsilon": epsilons, "steps": [2 ** k for k in range(step_levels + 1)],
               "sampling_prob": sampling_probs, "delta": deltas},
      "layout": "noise_multiplier[delta][epsilon][steps][sampling_prob]",
      "noise_multiplier": sigma.tolist(),
      "accountant_used": code.tolist(),
      "accountant_codes": {"0": "pld (chain)", "1": "rdp", "2": "sigma_floor bound"},
      "resolution": {"factor": RESOLUTION, "pld_steps": [1, 2 ** min(step_levels, PLD_LEVELS)],
                     "statement": (
          "where PLD made the nodes (steps in pld_steps, or wherever accountant_used is 0 "
          "or 2): queried σ >= accounting.calibrate_noise_multiplier's PLD σ (within its "
          "0.1% bracket) and <= factor x max(that σ, sigma_floor), for δ on an axis node "
          "(a δ between nodes takes the smaller node's σ). Where RDP made them "
          "(accountant_used 1): σ is certified by RDP, an upper bound on the needed σ; "
          "validation's \"rdp\" summary measures its distance to the PLD calibration")},
      "sigma_floor": SIGMA_FLOOR, "ladder_ratio": float(ladder_ratio),
      "node_margin": NODE_MARGIN, "min_discretization": MIN_DISCRETIZATION,
      "interpolation_margin": INTERPOLATION_MARGIN, "epsilon_power": EPSILON_POWER,
      "build": {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                "processes": processes, "ladder_sizes": ladders,
                "max_convexity_excess": excess,
                "command": "python -m accounting.sigma_grid OUT.json",
                "dp_accounting_version": metadata.version("dp-accounting")},
  }
  return grid


def save_grid(grid: dict, path: str | os.PathLike) -> None:
  tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_rounded(grid), f, separators=(",", ":"))
    f.write("\n")
  os.replace(tmp, path)


def _rounded(value):
  """Floats to 7 significant digits, rounded *up* for σ nodes (keeps them upper bounds)."""
  if isinstance(value, dict):
    return {k: (_round_up(v) if k == "noise_multiplier" else _rounded(v))
            for k, v in value.items()}
  if isinstance(value, list):
    return [_rounded(v) for v in value]
  return value


def _round_up(nested):
  a = np.asarray(nested, float)
  exponent = np.floor(np.log10(np.where(a > 0, a, 1.0)))
  scale = 10.0 ** (exponent - 6)
  return (np.ceil(a / scale) * scale).tolist()


def calibrated_sigma(epsilon: float, steps: int, q: float, delta: float) -> tuple[float, str]:
  """(σ, accountant): ``accounting.calibrate_noise_multiplier`` with PLD, RDP if PLD fails."""
  import accounting
  try:
    return accounting.calibrate_noise_multiplier(
        lambda s: accounting.PoissonDpSgd(s, q, steps), target_epsilon=epsilon,
        delta=delta).value, "pld"
  except ValueError:
    return _rdp_sigma(epsilon, q, steps, delta), "rdp"


def validate_grid(grid: dict, *, points: int = 24, seed: int = 0) -> dict[str, Any]:
  """Grid σ / PLD-calibrated σ at random points (log-uniform inside the axes, δ on a node).

  Ratios are grid σ / max(calibrated σ, sigma_floor), summarised separately
  where the query's nodes are all PLD ("pld") and where some are RDP ("rdp").
  """
  import absl.logging
  from accounting import sigma_table
  absl.logging.set_verbosity(absl.logging.ERROR)
  table = sigma_table.Table(grid)
  rng = np.random.default_rng(seed)
  ax = grid["axes"]

  def draw(axis):
    return float(np.exp(rng.uniform(np.log(axis[0]), np.log(axis[-1]))))

  rows = []
  for _ in range(points):
    eps, q = draw(ax["epsilon"]), draw(ax["sampling_prob"])
    steps = int(round(draw(ax["steps"])))
    delta = float(rng.choice(ax["delta"]))
    point = tuple(np.array([v], float) for v in (eps, steps, q, delta))
    ours = float(np.exp(table.interpolate(*point))[0])
    node = ["pld", "rdp", "floor"][int(table.accountant_codes(*point)[0])]
    ref, accountant = calibrated_sigma(eps, steps, q, delta)
    rows.append([eps, steps, q, delta, ours, node, ref, accountant])
  summary = {}
  for name, nodes in (("pld", ("pld", "floor")), ("rdp", ("rdp",))):
    ratios = np.array([r[4] / max(r[6], grid.get("sigma_floor", 0.0)) for r in rows
                       if r[5] in nodes and r[7] == "pld"])
    if len(ratios):
      summary[name] = {"points": len(ratios), "min_ratio": float(ratios.min()),
                       "median_ratio": float(np.median(ratios)),
                       "max_ratio": float(ratios.max())}
  return {"points": rows, "columns": ["epsilon", "steps", "sampling_prob", "delta",
                                      "grid_sigma", "grid_accountant", "calibrated_sigma",
                                      "calibration_accountant"],
          "ratio": "grid σ / max(PLD-calibrated σ, sigma_floor)", **summary}


def _axes_key(epsilons, step_levels, sampling_probs, deltas, ladder_ratio) -> dict:
  return {"epsilon": sorted(map(float, epsilons)), "step_levels": int(step_levels),
          "sampling_prob": sorted(map(float, sampling_probs)),
          "delta": sorted(map(float, deltas)), "ladder_ratio": float(ladder_ratio),
          "version": VERSION}


def cache_path(*, epsilons=DEFAULT_EPSILONS, step_levels: int = DEFAULT_STEP_LEVELS,
               sampling_probs=DEFAULT_SAMPLING_PROBS, deltas=DEFAULT_DELTAS,
               ladder_ratio: float = LADDER_RATIO) -> str:
  """Where ``cached_grid`` keeps the grid of these axes.

  ``$XDG_CACHE_HOME/dpfl/sigma_grid-<16 hex digits of the axes' SHA-256>.json``
  (``~/.cache`` when ``XDG_CACHE_HOME`` is unset).
  """
  key = json.dumps(_axes_key(epsilons, step_levels, sampling_probs, deltas, ladder_ratio),
                   sort_keys=True)
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(root, "dpfl", f"sigma_grid-{digest}.json")


def cached_grid(*, epsilons=DEFAULT_EPSILONS, step_levels: int = DEFAULT_STEP_LEVELS,
                sampling_probs=DEFAULT_SAMPLING_PROBS, deltas=DEFAULT_DELTAS,
                ladder_ratio: float = LADDER_RATIO, shipped: str | None = None,
                processes: int | None = None, progress: bool = True) -> dict:
  """The grid of these axes: ``shipped`` if it has them, else the cache, else built and cached.

  Args:
    epsilons, step_levels, sampling_probs, deltas, ladder_ratio: as ``build_grid``.
    shipped: a grid file to use when its axes are exactly these (dpfl passes
      its shipped grid: the cache for the default axes).
    processes, progress: for a build (minutes to hours: see ``build_grid``).
  """
  want = _axes_key(epsilons, step_levels, sampling_probs, deltas, ladder_ratio)
  for path in ([shipped] if shipped else []) + [cache_path(
      epsilons=epsilons, step_levels=step_levels, sampling_probs=sampling_probs, deltas=deltas,
      ladder_ratio=ladder_ratio)]:
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        grid = json.load(f)
      if _grid_key(grid) == want:
        return grid
  grid = build_grid(epsilons=epsilons, step_levels=step_levels, sampling_probs=sampling_probs,
                    deltas=deltas, ladder_ratio=ladder_ratio, processes=processes,
                    progress=progress)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_grid(grid, path)
  return grid


def _grid_key(grid: dict) -> dict | None:
  try:
    ax = grid["axes"]
    return _axes_key(ax["epsilon"], round(math.log2(ax["steps"][-1])), ax["sampling_prob"],
                     ax["delta"], grid["ladder_ratio"]) | {"version": grid["version"]}
  except (KeyError, TypeError, ValueError, IndexError):
    return None


def main(argv=None) -> int:
  """``python -m accounting.sigma_grid [OUT.json]``: builds the σ grid (default axes: dpfl's shipped grid)."""
  import argparse
  p = argparse.ArgumentParser(description=main.__doc__, allow_abbrev=False)
  p.add_argument("out", nargs="?", default=None,
                 help="output file (default: the cache path of these axes)")
  p.add_argument("--processes", type=int, default=None)
  p.add_argument("--validation-points", type=int, default=32)
  p.add_argument("--ladder-ratio", type=float, default=LADDER_RATIO)
  p.add_argument("--step-levels", type=int, default=DEFAULT_STEP_LEVELS,
                 help="K: steps axis 1, 2, 4, ..., 2^K")
  p.add_argument("--quick", action="store_true", help="a tiny grid (a smoke test)")
  args = p.parse_args(argv)
  kwargs = dict(step_levels=args.step_levels, ladder_ratio=args.ladder_ratio)
  if args.quick:
    kwargs.update(epsilons=(1.0, 4.0), step_levels=4, sampling_probs=(0.01, 0.1),
                  deltas=(1e-6,))
  out = args.out or cache_path(**kwargs)
  grid = build_grid(processes=args.processes, validation_points=args.validation_points,
                    **kwargs)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  save_grid(grid, out)
  print(json.dumps({"out": out, "build": grid["build"], "validation": {
      k: v for k, v in grid.get("validation", {}).items() if k != "points"}}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
