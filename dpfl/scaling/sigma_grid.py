"""σ(ε, δ, T, q) of Poisson DP-SGD for the planner: the shipped grid, queried in microseconds.

The table is built by ``accounting.sigma_grid`` (PLD chains per sampling rate,
RDP where PLD cannot reach; every node records its accountant) and queried by
``accounting.sigma_table`` (numpy only); this module ships the default grid
(``data/sigma_grid.json``) and is what ``dpfl plan`` reads.

**Range** (the shipped grid): ε from 2^-7 to 2^7 (McKenna et al. 2025's
range), T from 1 to 2^24 (>= 1e7) steps, q from 1e-10 to 1, δ from 1e-12 to
1e-5. A query outside it is a ``ValueError`` naming the argument, its value and
the range (nothing is clamped or extrapolated); build a wider grid with
``accounting.sigma_grid.cached_grid(...)`` (cached under
``$XDG_CACHE_HOME/dpfl``) and pass it as ``grid=``.

**Resolution** (stated in the grid file, ``grid["resolution"]``).
``accountant(...)`` says which accountant made a query's nodes.

* *PLD-made* (most queries with T <= 1024): σ >= the σ
  ``accounting.calibrate_noise_multiplier`` (PLD, the project's default
  accountant) finds for the point, and <= ``RESOLUTION`` x max(that σ,
  ``SIGMA_FLOOR``) for δ on an axis node (a δ between nodes takes the smaller
  node: up to one decade of δ more noise). Coarse: the shipped build's PLD
  ladder steps σ by 1.4 and q by decades.
* *RDP-made* (T > 1024, and wherever RDP's bound was the smaller one): σ is
  certified by dp-accounting's RDP accountant, an upper bound on the σ the
  mechanism needs. Measured against PLD's calibration it ranges from below it
  (long runs, where PLD's pessimistic discretisation dominates: PLD then
  reports more than ε for this σ) to several times above it (tiny q).

**Tightened by a finer grid** (the default, ``grid=None``): the shipped wide
grid is combined with dpfl's earlier, finer grid (``data/sigma_grid_fine.json``:
ε 0.5-16, T 10-1e5, q 1e-4-1, δ 1e-10-1e-5; PLD-verified nodes at most ~0.5%
above the least feasible σ, 0.3% interpolation margin). Both are upper bounds,
so the smaller is (``accounting.sigma_table.Combined`` says how queries outside
the fine box still use it): inside that box the planner's σ is at most ~15%
above the PLD calibration (the fine grid's own build-time validation: median
1.03x, max 1.09x; an independent review measured up to 1.10x between nodes and
1.14x near its σ floor, for δ on a node) instead of the wide grid's 4x.

Both are measured at random points at build time (``grid["validation"]``) and
checked in ``tests/dpfl/scaling/test_sigma_grid.py`` (including the range's
corners, ``-m slow``).

Rebuild: ``python -m dpfl.scaling.sigma_grid OUT.json`` (= ``python -m
accounting.sigma_grid OUT.json``); the build time and command are recorded in
``grid["build"]``.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os

import numpy as np

from accounting.sigma_grid import (DEFAULT_DELTAS, DEFAULT_EPSILONS, DEFAULT_SAMPLING_PROBS,
                                   DEFAULT_STEPS, RESOLUTION, SIGMA_FLOOR, build_grid,
                                   cache_path, cached_grid, save_grid, validate_grid)
from accounting.sigma_table import FORMAT, coordinates, effective_nodes
from accounting import sigma_table as _sigma_table

__all__ = ["DEFAULT_DELTAS", "DEFAULT_EPSILONS", "DEFAULT_SAMPLING_PROBS", "DEFAULT_STEPS",
           "FORMAT", "RESOLUTION", "SIGMA_FLOOR", "accountant", "build_grid", "cache_path", "cached_grid",
           "coordinates", "effective_nodes", "inside", "interpolate", "load_grid",
           "noise_multiplier", "save_grid", "shipped_path", "validate_grid"]

def shipped_path() -> str:
  """Path of the grid shipped with dpfl (the cache for the default axes)."""
  return os.fspath(importlib.resources.files("dpfl.scaling") / "data" / "sigma_grid.json")


def fine_path() -> str:
  """Path of the finer grid shipped with dpfl (ε 0.5-16, T 10-1e5, q >= 1e-4, δ 1e-10-1e-5)."""
  return os.fspath(importlib.resources.files("dpfl.scaling") / "data" / "sigma_grid_fine.json")


def load_fine_grid() -> dict:
  """The finer grid: PLD-verified nodes ~0.5% above the least feasible σ.

  dpfl's previous shipped grid (format version 1). Its validated
  interpolation lifts every node where log σ is locally concave, floor nodes
  included, so it is loaded with every node marked PLD-made (its
  ``accountant_used`` then only tells the floor nodes apart, which the
  combined table reports as PLD: a bound either way).
  """
  with open(fine_path(), encoding="utf-8") as f:
    grid = json.load(f)
  grid["accountant_used"] = np.zeros(np.shape(grid["accountant_used"]), np.int8).tolist()
  return grid


@functools.lru_cache(maxsize=4)
def _table_for(path: str | None):
  if path is None:
    return _sigma_table.Combined(_sigma_table.Table(load_grid(None)),
                                 _sigma_table.Table(load_fine_grid()))
  return _sigma_table.Table(load_grid(path))


def load_grid(path: str | os.PathLike | None = None) -> dict:
  """The grid at ``path``, or the one shipped with dpfl (``data/sigma_grid.json``)."""
  with open(shipped_path() if path is None else path, encoding="utf-8") as f:
    return json.load(f)


def _as_table(grid) -> _sigma_table.Table:
  if grid is None or isinstance(grid, (str, os.PathLike)):
    return _table_for(None if grid is None else os.fspath(grid))
  if isinstance(grid, (_sigma_table.Table, _sigma_table.Combined)):
    return grid
  return _sigma_table.Table(grid)


def interpolate(grid, epsilon, steps, sampling_prob, delta) -> np.ndarray:
  """σ from the grid (a dict, path or None for the shipped one); ValueError outside it."""
  return noise_multiplier(epsilon, steps, sampling_prob, delta, grid=grid)


def inside(epsilon, steps, sampling_prob, delta, *, grid=None) -> np.ndarray:
  """True where the point lies inside the grid's axes (where the grid answers)."""
  table = _as_table(grid)
  return table.inside(*_sigma_table.check_arguments(epsilon, steps, sampling_prob, delta))


def noise_multiplier(epsilon, steps, sampling_prob, delta, *, grid=None) -> np.ndarray:
  """The noise multiplier σ that makes Poisson DP-SGD (ε, δ)-DP; never too small.

  Args:
    epsilon: target ε (> 0); arrays broadcast.
    steps: T, integers >= 1.
    sampling_prob: q in (0, 1].
    delta: δ in (0, 1).
    grid: a grid dict or path (default: the shipped one).

  Returns:
    σ (float array of the broadcast shape), at or above the PLD calibration
    and within the grid's stated resolution of it (module docstring).

  Raises:
    ValueError: an argument is invalid or outside the grid (the message names
      it, its value and the grid's range).
  """
  table = _as_table(grid)
  eps, t, q, d = _sigma_table.check_arguments(epsilon, steps, sampling_prob, delta)
  _sigma_table.require_inside(table, eps, t, q, d)
  return np.exp(table.interpolate(eps, t, q, d))


def accountant(epsilon, steps, sampling_prob, delta, *, grid=None) -> np.ndarray:
  """Which accountant made the σ a query returns: "pld", "rdp" or "floor" (per point).

  "rdp" if any node the query interpolates was made by RDP; "floor" if one is
  the grid's σ floor (a bound, not tight) and none is RDP; else "pld".
  """
  table = _as_table(grid)
  eps, t, q, d = _sigma_table.check_arguments(epsilon, steps, sampling_prob, delta)
  _sigma_table.require_inside(table, eps, t, q, d)
  codes = table.accountant_codes(eps, t, q, d)
  return np.array(["pld", "rdp", "floor"], dtype=object)[codes]


def main(argv=None) -> int:
  """``python -m dpfl.scaling.sigma_grid OUT.json``: (re)builds the grid (accounting's CLI)."""
  from accounting import sigma_grid
  return sigma_grid.main(argv)


if __name__ == "__main__":
  raise SystemExit(main())
