"""Fitting a DP scaling law (McKenna et al. 2025, arXiv 2501.18914).

The method follows the paper and its released code (google-research
``dp_scaling_laws/``: ``nonparametric.py``, ``semiparametric.py``,
``smoothing.py``), step by step (``fit_law``):

1. **Points.** The input is one loss per (model, params, learning rate,
   steps T, noise-batch ratio σ̄ = σ/B) — the paper's results table
   (``points_from_rows`` turns dpfl sweep rows into such points: each eval
   curve point after the learning-rate warm-up is one). Points before
   ``min_steps`` are dropped (the paper drops T < 1000, its warm-up).
2. **Smooth** each (model, learning rate) table over (σ̄, T): isotonic
   regression along T, then along σ̄ (``smoothing.smooth_table``).
3. **Learning-rate minimum**, cell by cell.
4. **E** (irreducible loss) of each model from its non-private curve: the
   least-squares fit of ``L(T) = exp(m log T + b) + E`` on the whole smoothed
   curve (``_find_convergence_point``), with ``0 < E < min loss``.
5. **Tail**: per (model, σ̄), ``m, b`` of the same form with that E held fixed,
   fitted on the last three octaves of the measured steps (the paper: 16K to
   128K of 128K), used only beyond the last measured step and trusted to
   ``tail_factor`` (64) times it (the paper: to 8,192K).
6. **Predict** (``law.predict``): log-linear interpolation over (log N, log T,
   log σ̄) of the smoothed data extended by the tail; NaN outside the support.

Where dpfl differs, and why:

- A degenerate fit is refused (ValueError naming the model or curve and
  why) instead of used: E at or below 0 or stuck at ``min loss`` (a curve
  that shows no saturation cannot tell where it flattens), a curve with
  fewer than ``min_points`` points, a table that holes keep from being made
  monotone, a model without its non-private curve or without a private one.
  ``tail_factor=1`` fits a law without a tail (no E needed: the support ends
  at the measured steps) for sweeps too short to show saturation.
- The tail is anchored at the last smoothed measured point,
  ``E + (L(T_n) - E)·(T/T_n)^m``, using the fitted slope m: the paper's
  ``exp(m log T + b) + E`` can jump at T_n (up or down) by its fit residual,
  which would break monotonicity in T and in σ̄.
- dpfl's tables can have holes (curves evaluated at different steps); the
  paper's grid is complete. Holes are interpolated per curve (log-log along
  T, its tail beyond its last step), and the resulting grid is made
  non-decreasing in σ̄ at every T (running maximum).
- The paper's independent tails can cross beyond the measured steps (a
  noisier run predicted to do better); ``law.predict`` takes their running
  maximum over σ̄ there, as the grid does inside.
- Several runs at the same cell (another batch size at the same σ̄) keep
  their lowest loss, as the learning-rate minimum does.
- Extrapolation outside the support is available on request, documented in
  ``dpfl.scaling.law``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from dpfl.scaling.law import (LAW_FORMAT, LAW_VERSION, extrapolation, load_law,
                              model_params, outside, predict, save_law, support, validate_law)
from dpfl.scaling.smoothing import is_monotone, isotonic, smooth_table

# fit is the law's public face: the planner, CLI and plots import these from here.
__all__ = ["DegenerateAsymptote", "FORM", "LAW_FORMAT", "LAW_VERSION", "METHOD", "POINT_KEYS",
           "extrapolation", "fit_asymptote", "fit_law", "fit_tail", "is_monotone", "isotonic",
           "load_law", "loss_tables", "model_params", "outside", "points_from_rows", "predict",
           "save_law", "smooth_table", "support", "validate_law"]

POINT_KEYS = ("model", "params", "learning_rate", "steps", "noise_batch_ratio", "loss")
FORM = "L(T) = E + (L(T_n) - E) * (T/T_n)^m beyond the last measured step T_n"
METHOD = ("McKenna et al. 2025: isotonic smoothing along steps then noise_batch_ratio per "
          "(model, learning_rate); minimum over learning_rate; E per model from the "
          "non-private curve (exp(m log T + b) + E, 0 < E < min loss), held fixed for the "
          "private curves' tails (fitted on the last 3 octaves of steps, anchored at the last "
          "measured step); log-linear interpolation over (log params, log steps, "
          "log noise_batch_ratio)")
_RATIO_DIGITS = 6     # σ̄ equal to 6 significant digits share a table row
_TAIL_OCTAVES = 3     # the paper fits its tail on 16K..128K of 128K steps
_E_EDGE = 1e-3        # E within this fraction of min loss from 0 or min loss is at its bound


class DegenerateAsymptote(ValueError):
  """A non-private curve's fitted E is at its bound: no parametric tail can be fitted.

  Fitting again with ``tail_factor=1`` gives a law without a tail (its
  support ends at the measured steps).
  """


# --- rows -> points -------------------------------------------------------------------------

def _ratio_key(value: float) -> float:
  return float(f"{value:.{_RATIO_DIGITS}g}")


def _is_sweep_row(row: dict) -> bool:
  return "eval_loss" in row or "train_loss" in row


def points_from_rows(rows: Iterable[dict], *, curve: str = "eval_loss") -> list[dict]:
  """Point rows from dpfl sweep rows: one per eval curve point after warm-up.

  Args:
    rows: sweep rows (``results.read_results``), each with ``curve`` as
      ``[[step, loss], ...]``, ``warmup_steps``, ``model``, ``params``,
      ``learning_rate`` and ``noise_batch_ratio``.
    curve: ``"eval_loss"`` or ``"train_loss"``.

  Returns:
    ``[{"model", "params", "learning_rate", "steps", "noise_batch_ratio", "loss"}]``.
  """
  if curve not in ("eval_loss", "train_loss"):
    raise ValueError(f"curve must be 'eval_loss' or 'train_loss', got {curve!r}")
  points = []
  for k, row in enumerate(rows):
    missing = [key for key in ("model", "params", "learning_rate", "noise_batch_ratio")
               if key not in row]
    if missing:
      raise ValueError(f"rows[{k}]: sweep row lacks {', '.join(missing)}")
    warmup = int(row.get("warmup_steps") or 0)
    for point in row.get(curve) or []:
      step, loss = point
      if step is None or loss is None or not math.isfinite(float(loss)):
        continue
      if int(step) > warmup and int(step) >= 1:
        points.append({"model": row["model"], "params": int(row["params"]),
                       "learning_rate": float(row["learning_rate"]), "steps": int(step),
                       "noise_batch_ratio": float(row.get("noise_batch_ratio") or 0.0),
                       "loss": float(loss)})
  return points


def _check_point(k: int, row: dict) -> dict:
  keys = set(row)
  if keys != set(POINT_KEYS):
    extra, missing = sorted(keys - set(POINT_KEYS)), sorted(set(POINT_KEYS) - keys)
    raise ValueError(f"rows[{k}]: a point row has exactly the keys {', '.join(POINT_KEYS)}"
                     + (f"; missing {', '.join(missing)}" if missing else "")
                     + (f"; unknown {', '.join(extra)}" if extra else ""))
  checks = (("params", lambda v: v > 0 and float(v).is_integer(), "a positive integer"),
            ("learning_rate", lambda v: v > 0, "> 0"),
            ("steps", lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
            ("noise_batch_ratio", lambda v: v >= 0, ">= 0"),
            ("loss", lambda v: v > 0, "> 0"))
  for key, ok, allowed in checks:
    v = row[key]
    try:
      good = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) \
          and math.isfinite(float(v)) and ok(float(v))
    except (TypeError, ValueError):
      good = False
    if not good:
      raise ValueError(f"rows[{k}]: {key}={v!r} must be finite and {allowed}")
  if not isinstance(row["model"], str) or not row["model"]:
    raise ValueError(f"rows[{k}]: model={row['model']!r} must be a non-empty string")
  return {"model": row["model"], "params": int(row["params"]),
          "learning_rate": float(row["learning_rate"]), "steps": int(row["steps"]),
          "noise_batch_ratio": float(row["noise_batch_ratio"]), "loss": float(row["loss"])}


# --- points -> smoothed tables --------------------------------------------------------------

def loss_tables(rows: Iterable[dict], *, curve: str = "eval_loss", min_steps: int = 1) -> dict:
  """Steps 1-3 of the method: per model, the smoothed minimum-over-lr loss table.

  Args:
    rows: sweep rows and/or point rows (``fit_law``).
    curve: the sweep rows' curve.
    min_steps: points at fewer steps are dropped.

  Returns:
    ``{model: {"params", "ratios", "steps", "loss", "best_lr", "points",
    "monotone"}}``; ``loss[i, j]`` is at ``ratios[i]``, ``steps[j]`` (NaN: no
    data); ``best_lr[i, j]`` the learning rate of that minimum.
  """
  rows = list(rows)
  points = points_from_rows([r for r in rows if _is_sweep_row(r)], curve=curve)
  points += [_check_point(k, r) for k, r in enumerate(rows) if not _is_sweep_row(r)]
  cells: dict[str, dict] = {}
  for pt in points:
    if pt["steps"] < min_steps:
      continue
    entry = cells.setdefault(pt["model"], {"params": pt["params"], "by_lr": {}, "points": 0,
                                           "exact": {}})
    if entry["params"] != pt["params"]:
      raise ValueError(f"model {pt['model']!r} appears with two parameter counts: "
                       f"{entry['params']} and {pt['params']}")
    entry["points"] += 1
    lr_cells = entry["by_lr"].setdefault(pt["learning_rate"], {})
    key = (_ratio_key(pt["noise_batch_ratio"]), pt["steps"])
    entry["exact"].setdefault(key[0], pt["noise_batch_ratio"])  # the ratio as given, not rounded
    lr_cells[key] = min(pt["loss"], lr_cells.get(key, math.inf))
  tables = {}
  for model, entry in cells.items():
    keys = {k for lr_cells in entry["by_lr"].values() for k in lr_cells}
    ratios = sorted({k[0] for k in keys})
    steps = sorted({k[1] for k in keys})
    ri = {r: i for i, r in enumerate(ratios)}
    si = {s: j for j, s in enumerate(steps)}
    lrs = sorted(entry["by_lr"])
    stack = np.full((len(lrs), len(ratios), len(steps)), np.nan)
    for a, lr in enumerate(lrs):
      for (r, s), loss in entry["by_lr"][lr].items():
        stack[a, ri[r], si[s]] = loss
      stack[a] = smooth_table(stack[a])
    filled = np.where(np.isnan(stack), np.inf, stack)
    best = filled.min(axis=0)
    best_lr = np.array(lrs)[filled.argmin(axis=0)]
    empty = np.isinf(best)
    best[empty] = np.nan
    best_lr = np.where(empty, np.nan, best_lr)
    # The minimum of monotone tables is monotone where they share cells; holes
    # can break that, so smooth again (a no-op on a complete grid).
    best = smooth_table(best)
    tables[model] = {"params": entry["params"],
                     "ratios": np.array([entry["exact"][r] for r in ratios]),
                     "steps": np.array(steps, float), "loss": best, "best_lr": best_lr,
                     "points": entry["points"], "monotone": is_monotone(best, atol=1e-9)}
  return tables


# --- curve fits ---------------------------------------------------------------------------

def _power(t, m, b, e):
  return np.exp(m * np.log(t) + b) + e


def _loglinear(t, loss, e):
  """(m, b) of log(L - E) = m log T + b by least squares, m clipped to <= 0."""
  y = np.log(loss - e)
  x = np.log(t)
  if len(x) < 2 or np.ptp(x) == 0:
    return 0.0, float(np.mean(y))
  m, b = np.polyfit(x, y, 1)
  return (float(m), float(b)) if m <= 0 else (0.0, float(np.mean(y)))


def fit_tail(steps, loss, e: float) -> tuple[float, float, float]:
  """``m, b`` of ``L = exp(m log T + b) + E`` with E fixed (least squares in loss, m <= 0).

  Returns:
    ``(m, b, rmse)``.
  """
  from scipy import optimize
  t, y = np.asarray(steps, float), np.asarray(loss, float)
  m0, b0 = _loglinear(t, y, e)
  sol = optimize.least_squares(lambda th: _power(t, th[0], th[1], e) - y,
                               [min(m0, -1e-9), b0], bounds=([-np.inf, -np.inf], [0.0, np.inf]),
                               xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
  m, b = float(sol.x[0]), float(sol.x[1])
  return m, b, float(np.sqrt(np.mean((_power(t, m, b, e) - y) ** 2)))


def fit_asymptote(steps, loss) -> tuple[float, float, float, float]:
  """``m, b, E`` of ``L = exp(m log T + b) + E`` on a whole curve, ``0 <= E <= min loss``.

  E is profiled on a grid (m, b by regression in log space for each E), then
  all three are polished jointly.

  Returns:
    ``(m, b, E, rmse)``.
  """
  from scipy import optimize
  t, y = np.asarray(steps, float), np.asarray(loss, float)
  floor = float(y.min())

  def sse(e):
    m, b = _loglinear(t, y, e)
    return float(np.sum((_power(t, m, b, e) - y) ** 2))

  grid = np.concatenate([[0.0], floor * (1 - np.geomspace(1.0, 1e-4, 60))[1:]])
  e0 = float(min(grid, key=sse))
  m0, b0 = _loglinear(t, y, e0)
  sol = optimize.least_squares(lambda th: _power(t, *th) - y, [min(m0, -1e-9), b0, e0],
                               bounds=([-np.inf, -np.inf, 0.0], [0.0, np.inf, floor]),
                               xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=5000)
  m, b, e = (float(v) for v in sol.x)
  return m, b, e, float(np.sqrt(np.mean((_power(t, m, b, e) - y) ** 2)))


# --- the law --------------------------------------------------------------------------------

def _sweep_limits(rows: list[dict]):
  seq_lens = {int(r["seq_len"]) for r in rows if r.get("seq_len") is not None}
  if len(seq_lens) > 1:
    raise ValueError(f"rows mix sequence lengths {sorted(seq_lens)}: fit each separately")
  qs = [float(r["sampling_prob"]) for r in rows if r.get("sampling_prob") is not None]
  epochs = [float(r["sampling_prob"]) * int(r["steps"]) for r in rows
            if r.get("sampling_prob") is not None and r.get("steps") is not None]
  return (seq_lens.pop() if seq_lens else None, max(epochs) if epochs else None,
          max(qs) if qs else None)


def _merge_limit(name, given, from_rows, have_points):
  if given is not None and from_rows is not None and name == "seq_len" and given != from_rows:
    raise ValueError(f"seq_len={given} differs from the sweep rows' seq_len {from_rows}")
  if have_points and given is None:
    return None  # point rows carry no such column: unknown
  known = [v for v in (given, from_rows) if v is not None]
  return max(known) if known else None


def _fit_model(name: str, table: dict, *, min_points: int, tail_factor: float) -> dict:
  if not table["monotone"]:
    raise ValueError(f"model {name!r}: its loss table is not monotone after smoothing "
                     "(holes in the (noise_batch_ratio, steps) grid keep the isotonic passes "
                     "from agreeing); evaluate every curve at the same steps")
  curves = []
  for i, ratio in enumerate(table["ratios"]):
    ok = ~np.isnan(table["loss"][i])
    if ok.sum() < min_points:
      raise ValueError(f"model {name!r}, noise_batch_ratio {ratio:g}: {int(ok.sum())} "
                       f"point(s) after warm-up, the fit needs >= {min_points}")
    curves.append((float(ratio), table["steps"][ok], table["loss"][i][ok],
                   table["best_lr"][i][ok]))
  if curves[0][0] != 0.0:
    raise ValueError(f"model {name!r} has no non-private curve (noise_batch_ratio = 0): "
                     "its irreducible loss E comes from that curve")
  if len(curves) < 2:
    raise ValueError(f"model {name!r} has no private curve (noise_batch_ratio > 0)")
  e, e_fit = None, None
  if tail_factor > 1:
    _, s0, l0, _ = curves[0]
    m, b, e, rmse = fit_asymptote(s0, l0)
    floor = float(l0.min())
    if not (_E_EDGE * floor < e < (1 - _E_EDGE) * floor):
      why = ("the curve shows no saturation over its steps" if e <= _E_EDGE * floor else
             "the curve has stopped falling (its smoothed end is flat)")
      raise DegenerateAsymptote(
          f"model {name!r}: the non-private curve's irreducible loss E={e:.4g} is degenerate "
          f"(at a bound of (0, {floor:.4g}), the smallest measured loss): {why}, so the tail "
          "beyond the measured steps cannot be fitted; sweep longer, or fit without a tail "
          "(tail_factor=1; dpfl fit --tail-factor 1)")
    e_fit = {"m": m, "b": b, "rmse": rmse, "points": int(len(s0)), "bounds": [0.0, floor]}
  out = []
  for ratio, steps, loss, lrs in curves:
    entry = {"noise_batch_ratio": ratio, "steps": [int(s) for s in steps],
             "loss": [float(v) for v in loss], "points": int(len(steps)),
             "steps_range": [int(steps[0]), int(steps[-1])],
             "learning_rate": float(lrs[-1]), "m": None, "b": None, "rmse": None, "tail": None}
    if e is not None:
      start = steps[-1] / 2 ** _TAIL_OCTAVES
      sel = steps >= start * (1 - 1e-12)
      if sel.sum() < min_points:
        sel = np.arange(len(steps)) >= len(steps) - min_points
      m, b, rmse = fit_tail(steps[sel], loss[sel], e)
      entry.update(m=m, b=b, rmse=rmse,
                   tail={"m": m, "b": b, "fit_steps": [int(steps[sel][0]), int(steps[-1])],
                         "fit_points": int(sel.sum()), "rmse": rmse})
    out.append(entry)
  grid = _prediction_grid(out, e)
  return {"model": name, "params": int(table["params"]), "E": e,
          "E_source": "non-private" if e is not None else None, "E_fit": e_fit,
          "points": int(table["points"]), "curves": out, "grid": grid,
          "alpha_above": _alpha_above(grid)}


def _on_steps(steps, loss, t, e, m):
  """One curve at steps ``t``: log-log interpolation, flat before, tail (or flat) after."""
  steps, loss = np.asarray(steps, float), np.asarray(loss, float)
  out = np.exp(np.interp(np.log(t), np.log(steps), np.log(loss)))
  if e is not None and m is not None:
    out = np.where(t > steps[-1], e + (loss[-1] - e) * (np.maximum(t, steps[-1]) / steps[-1]) ** m,
                   out)
  return out


def _prediction_grid(curves: list[dict], e: float | None) -> dict:
  """The model's table for ``law.predict``: every curve on the union of the measured steps.

  Made non-decreasing in σ̄ at every step (running maximum; a curve measured
  at fewer steps is filled by interpolation and its tail). Beyond the grid,
  ``law.predict`` continues each curve by its tail from the grid's last step
  (the same power law) and takes the running maximum over σ̄ again.
  """
  t = np.unique(np.concatenate([c["steps"] for c in curves])).astype(float)
  m = None if e is None else np.array([c["tail"]["m"] for c in curves])
  loss = np.array([_on_steps(c["steps"], c["loss"], t, e, None if m is None else m[k])
                   for k, c in enumerate(curves)])
  loss = np.maximum.accumulate(loss, axis=0)
  return {"steps": [int(v) for v in t], "noise_batch_ratio": [c["noise_batch_ratio"] for c in curves],
          "loss": [[float(v) for v in row] for row in loss],
          "tail_m": None if m is None else [float(v) for v in m]}


def _alpha_above(grid: dict) -> float:
  """Steepest log-log slope in σ̄ between the last two private curves over the grid's steps."""
  ratios = grid["noise_batch_ratio"]
  if len(ratios) < 3:  # the non-private curve and one private one
    return 0.0
  last, before = np.asarray(grid["loss"][-1]), np.asarray(grid["loss"][-2])
  slope = np.log(last / before) / math.log(ratios[-1] / ratios[-2])
  return float(max(0.0, np.max(slope)))


def fit_law(rows: Iterable[dict], *, curve: str = "eval_loss", seq_len: int | None = None,
            max_epochs: float | None = None, max_sampling_prob: float | None = None,
            description: str = "", source: str | None = None, min_points: int = 3,
            min_steps: int = 1, tail_factor: float = 64.0) -> dict[str, Any]:
  """Fits the scaling law of a sweep (the module docstring gives the method).

  Args:
    rows: dpfl sweep rows (``results.read_results``) and/or point rows
      (dicts with exactly ``model, params, learning_rate, steps,
      noise_batch_ratio, loss``; σ̄ = 0 marks non-private).
    curve: the sweep rows' curve, ``"eval_loss"`` or ``"train_loss"``.
    seq_len, max_epochs, max_sampling_prob: the sequence length, largest
      epochs (q·T) and largest sampling probability q the data was measured
      at; taken from sweep rows, and needed for point rows (None: unknown).
    description, source: stored in the law.
    min_points: fewest points a (model, σ̄) curve needs (fewer: refused).
    min_steps: points at fewer steps are dropped (warm-up of point rows).
    tail_factor: how far beyond each curve's last measured step the
      parametric tail is trusted (the support's largest steps); 1 fits no
      tail and no E.

  Returns:
    The law: a JSON-serialisable dict (``law.predict``, ``law.support``).

  Raises:
    ValueError: bad rows, or a degenerate fit (the message names the model
      or curve and why).
  """
  from accounting import validate as check
  if curve not in ("eval_loss", "train_loss"):
    raise ValueError(f"curve must be 'eval_loss' or 'train_loss', got {curve!r}")
  check.integer("min_points", min_points, low=2)
  check.integer("min_steps", min_steps, low=1)
  check.real("tail_factor", tail_factor, low=1.0)
  for name, v in (("max_epochs", max_epochs), ("max_sampling_prob", max_sampling_prob)):
    if v is not None:
      check.positive(name, v)
  if max_sampling_prob is not None:
    check.probability("max_sampling_prob", max_sampling_prob)
  if seq_len is not None:
    check.positive_int("seq_len", seq_len)
  rows = list(rows)
  sweep = [r for r in rows if _is_sweep_row(r)]
  units = sorted({r.get("privacy_unit", "example") for r in sweep if r.get("private")})
  if len(units) > 1:
    raise ValueError(f"rows mix privacy units {units}: σ/B counts examples in one and users "
                     "in the other; fit each unit's runs (with the non-private baseline) "
                     "separately")
  have_points = len(sweep) < len(rows)
  limits = _sweep_limits(sweep)
  seq_len = _merge_limit("seq_len", seq_len, limits[0], have_points)
  max_epochs = _merge_limit("max_epochs", max_epochs, limits[1], have_points)
  max_sampling_prob = _merge_limit("max_sampling_prob", max_sampling_prob, limits[2],
                                   have_points)
  tables = loss_tables(rows, curve=curve, min_steps=min_steps)
  if not tables:
    raise ValueError(f"no points at >= {min_steps} steps (after warm-up): nothing to fit")
  models = [_fit_model(name, t, min_points=min_points, tail_factor=float(tail_factor))
            for name, t in sorted(tables.items(), key=lambda kv: kv[1]["params"])]
  all_curves = [c for m in models for c in m["curves"]]
  private = [[c["noise_batch_ratio"] for c in m["curves"] if c["noise_batch_ratio"] > 0]
             for m in models]
  box = {"params": [models[0]["params"], models[-1]["params"]],
         "steps": [max(c["steps"][0] for c in all_curves),
                   int(min(c["steps"][-1] for c in all_curves) * float(tail_factor))],
         "noise_batch_ratio": [max(p[0] for p in private), min(p[-1] for p in private)]}
  for dim, (lo, hi) in box.items():
    if lo > hi:
      raise ValueError(f"the models' {dim} ranges do not overlap (common range would be "
                       f"[{lo:g}, {hi:g}]): fit models measured on a common grid")
  # The cap of the extrapolation in σ̄: the largest loss seen, warm-up and step 0 included.
  max_loss = max([float(r["loss"]) for r in rows if not _is_sweep_row(r)]
                 + [float(v) for r in sweep for _, v in r.get(curve) or []
                    if v is not None and math.isfinite(float(v))])
  return {
      "format": LAW_FORMAT, "version": LAW_VERSION, "form": FORM, "method": METHOD,
      "tail_factor": float(tail_factor), "support": box, "description": description,
      "source": source, "loss": curve, "seq_len": seq_len, "max_epochs": max_epochs,
      "max_sampling_prob": max_sampling_prob, "max_loss": float(max_loss),
      "rows": len(rows), "models": models,
      "privacy_unit": units[0] if units else "example",
  }
