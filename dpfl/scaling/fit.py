"""Fitting a DP scaling law to sweep results (McKenna et al. 2025, arXiv 2501.18914).

The method of the paper, step by step (``fit_law``):

1. **Drop warm-up.** A run's eval curve point at step t estimates a run of t
   steps only after the learning-rate warm-up (``dpfl sweep`` keeps the rate
   constant afterwards), so points with t <= ``warmup_steps`` are dropped.
2. **Tabulate.** Per (model, learning rate): a table of loss over
   (noise-batch ratio σ/B, steps T); runs that share a cell (e.g. other batch
   sizes at the same σ/B) keep their lowest loss.
3. **Smooth monotonically.** Loss cannot truly rise with more steps or fall
   with more noise, so each table is replaced by its least-squares
   projection onto tables that are non-increasing in T and non-decreasing in
   σ/B (isotonic regression on that partial order; Dykstra's alternating
   projections with the pool-adjacent-violators algorithm, ``smooth_monotone``).
4. **Minimum over learning rates**, cell by cell (then smoothed again: a
   minimum over partly filled tables can break monotonicity at the edges).
5. **Fit** per (model, σ/B) the curve ``L(T) = exp(m·log T + b) + E`` in
   loss space, with m <= 0 and one ``E`` per model: from the non-private
   curve (σ/B = 0) of that model when the sweep has one, else fitted jointly
   with the private curves (0 <= E < the smallest loss).
6. **Interpolate** (``predict``): between fitted σ/B linearly in log σ/B
   (linearly in σ/B between 0 and the smallest positive one), between model
   sizes linearly in log params. Curves are made monotone in σ/B at every T
   (running maximum), so predictions are non-increasing in T and
   non-decreasing in σ/B everywhere — the planner relies on it.

The law is a plain JSON-serialisable dict (``save_law``/``load_law``);
``load_law()`` with no path returns the one shipped with dpfl. Only numpy is
needed to predict; fitting imports scipy.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
from typing import Any, Iterable

import numpy as np

LAW_FORMAT = "dpfl-scaling-law"
LAW_VERSION = 1
FORM = "L(T) = exp(m*log(T) + b) + E"
_RATIO_DIGITS = 6  # σ/B values equal to 6 significant digits share a table row


# --- isotonic smoothing -------------------------------------------------------------

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


def _project_rows(table: np.ndarray, *, increasing: bool) -> np.ndarray:
  return np.array([isotonic(row, increasing=increasing) for row in table]).reshape(table.shape)


def smooth_monotone(table, *, max_iter: int = 200, tol: float = 1e-12) -> np.ndarray:
  """Projects a loss table onto: non-decreasing down rows, non-increasing along columns.

  Rows are noise-batch ratios in increasing order, columns are steps in
  increasing order; NaN marks an empty cell. The result is the least-squares
  closest table that is non-decreasing in the ratio and non-increasing in
  steps (Dykstra's algorithm alternating the two 1-D isotonic projections,
  followed by one pass of each to make the order exact).
  """
  x = np.asarray(table, float)
  if x.ndim != 2:
    raise ValueError(f"table must be 2-D (ratios x steps), got shape {x.shape}")
  p = np.zeros_like(x)
  r = np.zeros_like(x)
  for _ in range(max_iter):
    y = _project_rows(x + p, increasing=False)                 # steps: non-increasing
    p = x + p - y
    x_new = _project_rows((y + r).T, increasing=True).T         # ratio: non-decreasing
    r = y + r - x_new
    change = np.nanmax(np.abs(x_new - x)) if np.any(~np.isnan(x)) else 0.0
    x = x_new
    if change < tol:
      break
  # Exact order: a 1-D isotonic fit is order-preserving (larger data, larger
  # fit), so the ratio pass keeps the steps order of a complete table. With
  # holes, repeat until both hold.
  for _ in range(max_iter):
    x = _project_rows(x, increasing=False)
    x = _project_rows(x.T, increasing=True).T
    if is_monotone(x):
      break
  return x


def is_monotone(table, *, atol: float = 1e-12) -> bool:
  """True if present cells are non-increasing along rows and non-decreasing down columns."""
  x = np.asarray(table, float)
  for rows, sign in ((x, -1.0), (x.T, 1.0)):
    for row in rows:
      v = row[~np.isnan(row)]
      if np.any(sign * np.diff(v) < -atol):
        return False
  return True


# --- from results rows to smoothed tables -------------------------------------------

def _ratio_key(value: float) -> float:
  return float(f"{value:.{_RATIO_DIGITS}g}")


def _curve_points(row: dict, curve: str) -> list[tuple[int, float]]:
  warmup = int(row.get("warmup_steps") or 0)
  points = []
  for point in row.get(curve) or []:
    step, loss = point
    if loss is None or step is None:
      continue
    step, loss = int(step), float(loss)
    if step > warmup and step >= 1 and math.isfinite(loss):
      points.append((step, loss))
  return points


def loss_tables(rows: Iterable[dict], *, curve: str = "eval_loss") -> dict[str, dict]:
  """Steps 1–4 of the method: per model, the smoothed minimum-over-lr loss table.

  Returns:
    ``{model: {"params", "ratios", "steps", "loss", "raw_points", "runs"}}``;
    ``loss[i, j]`` is the loss at ``ratios[i]``, ``steps[j]`` (NaN: no data).
  """
  cells: dict[str, dict] = {}
  for row in rows:
    points = _curve_points(row, curve)
    if not points:
      continue
    model = row["model"]
    entry = cells.setdefault(model, {"params": int(row["params"]), "by_lr": {}, "runs": 0,
                                     "max_loss": -math.inf})
    if entry["params"] != int(row["params"]):
      raise ValueError(f"model {model!r} appears with two parameter counts: "
                       f"{entry['params']} and {row['params']}")
    entry["runs"] += 1
    ratio = _ratio_key(float(row.get("noise_batch_ratio") or 0.0))
    lr_cells = entry["by_lr"].setdefault(float(row["learning_rate"]), {})
    for step, loss in points:
      key = (ratio, step)
      lr_cells[key] = min(loss, lr_cells.get(key, math.inf))
    all_losses = [p[1] for p in row.get(curve) or [] if p[1] is not None]
    entry["max_loss"] = max([entry["max_loss"], *all_losses])
  tables = {}
  for model, entry in cells.items():
    keys = {k for lr_cells in entry["by_lr"].values() for k in lr_cells}
    ratios = sorted({k[0] for k in keys})
    steps = sorted({k[1] for k in keys})
    ri = {r: i for i, r in enumerate(ratios)}
    si = {s: j for j, s in enumerate(steps)}
    smoothed = []
    for lr_cells in entry["by_lr"].values():
      t = np.full((len(ratios), len(steps)), np.nan)
      for (r, s), loss in lr_cells.items():
        t[ri[r], si[s]] = loss
      smoothed.append(smooth_monotone(t))
    stack = np.array(smoothed)
    with np.errstate(all="ignore"):
      best = np.where(np.all(np.isnan(stack), axis=0), np.nan,
                      np.nanmin(np.where(np.isnan(stack), np.inf, stack), axis=0))
    tables[model] = {"params": entry["params"], "ratios": np.array(ratios),
                     "steps": np.array(steps, float), "loss": smooth_monotone(best),
                     "runs": entry["runs"], "max_loss": entry["max_loss"]}
  return tables


# --- curve fitting --------------------------------------------------------------------

def _curve(steps, m, b, e):
  return np.exp(m * np.log(steps) + b) + e


def _log_spacing(steps) -> np.ndarray:
  """Half the log-T distance to each neighbour (the ends: their one side), normalised to mean 1."""
  x = np.log(np.asarray(steps, float))
  if len(x) < 2:
    return np.ones_like(x)
  gaps = np.diff(x)
  w = np.concatenate([[gaps[0]], gaps]) / 2 + np.concatenate([gaps, [gaps[-1]]]) / 2
  return w / w.mean()


def _loglinear(steps, losses, e):
  """(m, b) of the line log(L - E) = m log T + b (least squares), m clipped to <= 0."""
  y = np.log(np.maximum(losses - e, 1e-9 * max(1.0, float(np.max(losses)))))
  x = np.log(steps)
  if len(x) < 2 or np.ptp(x) == 0:
    return 0.0, float(np.mean(y))
  m, b = np.polyfit(x, y, 1)
  if m > 0:
    return 0.0, float(np.mean(y))
  return float(m), float(b)


def fit_curves(curves: list[tuple[np.ndarray, np.ndarray]], *,
               asymptote: float | None = None) -> tuple[list[tuple[float, float]], float]:
  """Least-squares fit of ``L_k(T) = exp(m_k log T + b_k) + E`` sharing one E.

  Args:
    curves: ``[(steps, losses), ...]``, each with >= 2 distinct steps.
    asymptote: E if known (e.g. from the non-private curve); else fitted in
      ``[0, min loss)``.

  Returns:
    ``([(m_k, b_k), ...], E)`` with every ``m_k <= 0``.
  """
  from scipy import optimize
  curves = [(np.asarray(s, float), np.asarray(l, float)) for s, l in curves]
  floor = min(float(np.min(l)) for _, l in curves)
  if asymptote is None:
    # Profile E on a grid (m, b by log-space regression), then polish all jointly.
    def sse_at(e):
      return sum(float(np.sum(_log_spacing(s) * (_curve(s, *_loglinear(s, l, e), e) - l) ** 2))
                 for s, l in curves)
    candidates = floor * (1 - np.geomspace(1.0, 1e-3, 40))
    candidates = np.concatenate([[0.0], candidates[candidates < floor]])
    e0 = float(min(candidates, key=sse_at))
    fix_e = False
  else:
    e0, fix_e = float(asymptote), True
  init = [v for s, l in curves for v in _loglinear(s, l, e0)]
  lower = [v for _ in curves for v in (-np.inf, -np.inf)]
  upper = [v for _ in curves for v in (0.0, np.inf)]
  if not fix_e:
    init.append(min(e0, floor * (1 - 1e-6)))
    lower.append(0.0)
    upper.append(floor * (1 - 1e-9) if floor > 0 else 1e-12)
  init = np.clip(init, np.array(lower) + 1e-12, np.array(upper) - 1e-12)

  # Each curve's points are weighted by the span of log T they stand for, so
  # every decade of steps counts equally (evaluations are often evenly spaced
  # in T, which would otherwise let the flat tail decide the fit).
  weights = [np.sqrt(_log_spacing(s)) for s, _ in curves]

  def residuals(theta):
    e = e0 if fix_e else theta[-1]
    return np.concatenate([w * (_curve(s, theta[2 * k], theta[2 * k + 1], e) - l)
                           for k, ((s, l), w) in enumerate(zip(curves, weights))])

  sol = optimize.least_squares(residuals, init, bounds=(lower, upper), x_scale="jac",
                               xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=5000)
  theta = sol.x
  e = e0 if fix_e else float(theta[-1])
  return [(float(theta[2 * k]), float(theta[2 * k + 1])) for k in range(len(curves))], e


def fit_law(rows: Iterable[dict], *, curve: str = "eval_loss", min_points: int = 3,
            description: str = "", source: str | None = None) -> dict[str, Any]:
  """Fits the scaling law of a sweep (the module docstring gives the method).

  Args:
    rows: results rows (``dpfl.scaling.results.read_results``).
    curve: ``"eval_loss"`` (default) or ``"train_loss"``.
    min_points: fewest smoothed points (after warm-up) a (model, σ/B) curve
      needs to be fitted; sparser ones are left out.
    description: free text stored in the law.
    source: where the rows came from (stored).

  Returns:
    The law: a JSON-serialisable dict (see ``predict``).
  """
  if curve not in ("eval_loss", "train_loss"):
    raise ValueError(f"curve must be 'eval_loss' or 'train_loss', got {curve!r}")
  rows = list(rows)
  units = sorted({r.get("privacy_unit", "example") for r in rows if r.get("private")})
  if len(units) > 1:
    raise ValueError(f"rows mix privacy units {units}: σ/B counts examples in one and users "
                     "in the other; fit each unit's runs (with the non-private baseline) "
                     "separately")
  tables = loss_tables(rows, curve=curve)
  models = []
  for name, table in sorted(tables.items(), key=lambda kv: kv[1]["params"]):
    data = []
    for i, ratio in enumerate(table["ratios"]):
      ok = ~np.isnan(table["loss"][i])
      if ok.sum() >= max(2, min_points):
        data.append((float(ratio), table["steps"][ok], table["loss"][i][ok]))
    if not data:
      continue
    private = [d for d in data if d[0] > 0]
    if data[0][0] == 0:
      (np_mb,), e = fit_curves([(data[0][1], data[0][2])])
      e_source = "non-private"
      fitted = [(0.0, np_mb)]
      if private:
        mbs, _ = fit_curves([(s, l) for _, s, l in private], asymptote=e)
        fitted += [(r, mb) for (r, _, _), mb in zip(private, mbs)]
    else:
      mbs, e = fit_curves([(s, l) for _, s, l in private])
      e_source = "fitted"
      fitted = [(r, mb) for (r, _, _), mb in zip(private, mbs)]
    curves = []
    for (ratio, (m, b)), (_, s, l) in zip(fitted, data):
      rmse = float(np.sqrt(np.mean((_curve(s, m, b, e) - l) ** 2)))
      curves.append({"noise_batch_ratio": ratio, "m": m, "b": b,
                     "steps_range": [int(s.min()), int(s.max())], "points": int(len(s)),
                     "rmse": rmse})
    models.append({"model": name, "params": int(table["params"]), "E": float(e),
                   "E_source": e_source, "runs": int(table["runs"]), "curves": curves})
  if not models:
    raise ValueError(f"no (model, noise_batch_ratio) curve has {min_points} points after "
                     "warm-up: nothing to fit")
  seq_lens = {int(r["seq_len"]) for r in rows if "seq_len" in r}
  return {
      "format": LAW_FORMAT, "version": LAW_VERSION, "form": FORM,
      "interpolation": "linear in log(noise_batch_ratio) between fitted ratios (linear in "
                       "the ratio between 0 and the smallest); linear in log(params) "
                       "between models; monotone in the ratio by running maximum",
      "placeholder": False, "description": description, "source": source,
      "loss": curve, "seq_len": seq_lens.pop() if len(seq_lens) == 1 else None,
      "max_loss": float(max(t["max_loss"] for t in tables.values())),
      "runs": len(rows), "models": models,
      "privacy_unit": units[0] if units else "example",
  }


# --- the law: save, load, predict ------------------------------------------------------

def save_law(law: dict, path: str | os.PathLike) -> None:
  """Writes a law as JSON (validated first)."""
  _validate_law(law)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(law, f, indent=1, sort_keys=True)
    f.write("\n")


def load_law(path: str | os.PathLike | None = None) -> dict:
  """The law at ``path``, or the one shipped with dpfl (``data/law.json``)."""
  if path is None:
    return _shipped_law()
  with open(path, encoding="utf-8") as f:
    try:
      law = json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f"law file {os.fspath(path)!r} is not JSON: {err}") from None
  _validate_law(law)
  return law


@functools.lru_cache(maxsize=1)
def _shipped_law() -> dict:
  ref = importlib.resources.files("dpfl.scaling") / "data" / "law.json"
  with ref.open("r", encoding="utf-8") as f:
    law = json.load(f)
  _validate_law(law)
  return law


def _validate_law(law: dict) -> None:
  if not isinstance(law, dict) or law.get("format") != LAW_FORMAT:
    raise ValueError(f"not a {LAW_FORMAT} object (format={law.get('format') if isinstance(law, dict) else None!r})")
  if law.get("version") != LAW_VERSION:
    raise ValueError(f"law version {law.get('version')!r}; this dpfl reads {LAW_VERSION}")
  if not law.get("models"):
    raise ValueError("law has no models")
  for m in law["models"]:
    if not m.get("curves") or not (m["params"] > 0):
      raise ValueError(f"law model {m.get('model')!r} has no curves or bad params")


def model_params(law: dict) -> dict[str, int]:
  """``{model name: params}`` of the law, smallest first."""
  return {m["model"]: int(m["params"]) for m in sorted(law["models"], key=lambda m: m["params"])}


def _model_loss(model: dict, steps: np.ndarray, ratio: np.ndarray, max_loss: float):
  curves = sorted(model["curves"], key=lambda c: c["noise_batch_ratio"])
  r = np.array([c["noise_batch_ratio"] for c in curves])
  values = np.array([_curve(steps, c["m"], c["b"], model["E"]) for c in curves])
  values = np.maximum.accumulate(values, axis=0)           # monotone in the ratio
  out = np.empty(np.shape(steps))
  # Below the smallest ratio: the non-private curve is at r=0 if present.
  out[...] = values[0]
  for k in range(len(r) - 1):
    lo, hi = r[k], r[k + 1]
    mask = (ratio > lo) & (ratio <= hi)
    if lo == 0:
      w = ratio / hi
    else:
      w = (np.log(np.maximum(ratio, lo)) - math.log(lo)) / (math.log(hi) - math.log(lo))
    out = np.where(mask, (1 - w) * values[k] + w * values[k + 1], out)
  above = ratio > r[-1]
  if np.any(above):
    # Extend the last segment as a power of the ratio, L_K(T)·(ratio/r_K)^α,
    # with α >= 0 from the last two curves at the middle of the fitted steps:
    # one α for all T keeps the prediction monotone in both T and the ratio.
    alpha = 0.0
    if len(r) >= 2 and r[-2] > 0:
      lo = min(c["steps_range"][0] for c in curves)
      hi = max(c["steps_range"][1] for c in curves)
      t_mid = math.sqrt(lo * hi)
      last, before = (_curve(t_mid, c["m"], c["b"], model["E"]) for c in curves[-1:-3:-1])
      last = max(last, before)
      alpha = max(0.0, math.log(last / before) / (math.log(r[-1]) - math.log(r[-2])))
    extra = values[-1] * (np.maximum(ratio, r[-1]) / r[-1]) ** alpha
    out = np.where(above, extra, out)
  return np.minimum(out, max_loss) if math.isfinite(max_loss) else out


def predict(law: dict, params, steps, noise_batch_ratio) -> np.ndarray:
  """Predicted loss of a model of ``params`` trained ``steps`` steps at σ/B = ``noise_batch_ratio``.

  Arrays broadcast. Non-increasing in steps, non-decreasing in the ratio.
  Beyond the largest fitted ratio the last segment is extended (linear in
  log ratio, capped at the largest loss the sweep saw); ``params`` must lie
  within the law's model sizes (ValueError otherwise).
  """
  p, t, r = np.broadcast_arrays(np.asarray(params, float), np.asarray(steps, float),
                                np.asarray(noise_batch_ratio, float))
  if np.any(~(t >= 1)):
    raise ValueError(f"steps must be >= 1, got {t[~(t >= 1)].flat[0]:g}")
  if np.any(~(r >= 0)):
    raise ValueError(f"noise_batch_ratio must be >= 0, got {r[~(r >= 0)].flat[0]:g}")
  models = sorted(law["models"], key=lambda m: m["params"])
  sizes = np.array([m["params"] for m in models], float)
  if np.any((p < sizes[0] * (1 - 1e-9)) | (p > sizes[-1] * (1 + 1e-9))):
    bad = p[(p < sizes[0] * (1 - 1e-9)) | (p > sizes[-1] * (1 + 1e-9))].flat[0]
    raise ValueError(f"params={bad:g} is outside the law's model sizes "
                     f"[{sizes[0]:g}, {sizes[-1]:g}]")
  max_loss = float(law.get("max_loss", math.inf) or math.inf)
  per_model = [_model_loss(m, t, r, max_loss) for m in models]
  if len(models) == 1:
    return per_model[0]
  logp = np.log(np.clip(p, sizes[0], sizes[-1]))
  logs = np.log(sizes)
  i = np.clip(np.searchsorted(logs, logp, side="right") - 1, 0, len(models) - 2)
  w = (logp - logs[i]) / (logs[i + 1] - logs[i])
  stacked = np.array(per_model)
  lo = np.take_along_axis(stacked, i[None], 0)[0]
  hi = np.take_along_axis(stacked, (i + 1)[None], 0)[0]
  return (1 - w) * lo + w * hi


def extrapolation(law: dict, model: str, steps, noise_batch_ratio) -> dict[str, np.ndarray]:
  """Where a prediction for ``model`` leaves the data it was fitted on.

  Returns:
    ``{"steps": bool array, "noise_batch_ratio": bool array}``: True where
    steps fall outside the model's fitted step range, or the ratio above its
    largest fitted ratio.
  """
  entry = next((m for m in law["models"] if m["model"] == model), None)
  if entry is None:
    raise ValueError(f"model {model!r} is not in the law ({', '.join(model_params(law))})")
  t, r = np.broadcast_arrays(np.asarray(steps, float), np.asarray(noise_batch_ratio, float))
  lo = min(c["steps_range"][0] for c in entry["curves"])
  hi = max(c["steps_range"][1] for c in entry["curves"])
  top = max(c["noise_batch_ratio"] for c in entry["curves"])
  return {"steps": (t < lo) | (t > hi), "noise_batch_ratio": r > top}
