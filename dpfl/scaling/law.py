"""A fitted DP scaling law: its support, predictions, and its JSON file.

A law (``fit.fit_law`` makes one) holds, per model, the smoothed measured
loss curves (one per noise-batch ratio σ̄, σ̄ = 0 the non-private one) as
diagnostics, and its prediction ``grid``: every curve on the union of the
model's measured steps, non-decreasing in σ̄ at every step, with the tail
slopes ``m`` of ``L(T) = E + (L(T_n) - E)·(T/T_n)^m`` beyond the last step T_n
(made non-decreasing in σ̄ there by a running maximum). Only numpy is needed
here.

**Prediction** (``predict``), as the paper's ``construct_xent_fn`` (linear
interpolation of log loss over (log N, log T, log σ̄) on the measured grid
extended by the tail, ``RegularGridInterpolator`` on logs):

- along T: log L linear in log T between grid steps; the tail beyond;
- along σ̄: log L linear in log σ̄ between fitted ratios;
- along N: log L linear in log N between the fitted models — a continuous
  model-size axis between the smallest and largest.

Interpolation weights do not depend on the other coordinates, and the grid
and its tails are monotone, so predictions are non-increasing in T and
non-decreasing in σ̄ everywhere (the planner relies on it).

**Support** (``support``; ``predict`` is NaN outside it unless
``extrapolate=True``, as the paper's query returns NaN and drops the
configuration): params within the fitted models; steps from the first
measured (post-warm-up) step to ``tail_factor`` times the last measured step
(64 by default: the paper measures to 128K steps and trusts its tail to
8,192K, ``_MAX_ITERATIONS``); σ̄ between the smallest positive and the
largest fitted ratio (the paper's private loss function has no σ̄ = 0 and
no σ̄ beyond its grid). The box is the intersection over models and curves,
so every prediction inside it is interpolation or the trusted tail.

**Extrapolation** (``extrapolate=True``; finite everywhere, non-increasing in
T, non-decreasing in σ̄, never below the model's E):

- params beyond the fitted range: the nearest fitted model (no trend in N is
  assumed outside the data);
- steps before the first measured step: the loss at that step (a lower
  bound, i.e. optimistic: loss does not rise with steps, so fewer steps can
  only do worse — the planner never rests a plan on it); beyond the trusted tail: the same
  tail continued (it decays to E, never below); a law fitted without a tail
  (``tail_factor=1``, no E) keeps the last measured loss (an upper bound);
- σ̄ below the smallest positive ratio: linear in σ̄ between the non-private
  curve (σ̄ = 0) and the smallest private one — both measured, and loss is
  smooth in σ̄ at 0 (keeping the smallest ratio's loss instead would be an
  upper bound, but would let a plan gain nothing from a larger batch there);
  above the largest ratio: the last curve
  times (σ̄/σ̄_K)^α, with α >= 0 the steepest log-log slope between the last two
  fitted ratios over the measured steps (one α for all T keeps the order in
  T), capped at the largest loss the data saw.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os

import numpy as np

LAW_FORMAT = "dpfl-scaling-law"
LAW_VERSION = 2
DIMENSIONS = ("params", "steps", "noise_batch_ratio")
_REL = 1e-9  # relative slack at support edges (float round trips through JSON)


# --- file -------------------------------------------------------------------------------

def save_law(law: dict, path: str | os.PathLike) -> None:
  """Writes a law as JSON (validated first)."""
  validate_law(law)
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
  try:
    validate_law(law)
  except ValueError as err:
    raise ValueError(f"law file {os.fspath(path)!r}: {err}") from None
  return law


@functools.lru_cache(maxsize=1)
def _shipped_law() -> dict:
  ref = importlib.resources.files("dpfl.scaling") / "data" / "law.json"
  with ref.open("r", encoding="utf-8") as f:
    law = json.load(f)
  validate_law(law)
  return law


def validate_law(law: dict) -> None:
  """Raises ValueError unless ``law`` is a version-2 dpfl scaling law."""
  if not isinstance(law, dict) or law.get("format") != LAW_FORMAT:
    raise ValueError(f"not a {LAW_FORMAT} object "
                     f"(format={law.get('format') if isinstance(law, dict) else None!r})")
  if law.get("version") != LAW_VERSION:
    raise ValueError(f"law version {law.get('version')!r}; this dpfl reads version {LAW_VERSION} "
                     "(smoothed curves with a parametric tail only beyond the measured steps): "
                     "refit it from the sweep results with `dpfl fit`")
  if not law.get("models") or not isinstance(law.get("support"), dict):
    raise ValueError("law has no models or no support")
  for m in law["models"]:
    curves = m.get("curves") or []
    if not curves or not (m.get("params", 0) > 0):
      raise ValueError(f"law model {m.get('model')!r} has no curves or bad params")
    grid = m.get("grid") or {}
    shape = (len(grid.get("noise_batch_ratio") or []), len(grid.get("steps") or []))
    if (min(shape) < 1 or np.shape(grid.get("loss")) != shape
        or not any(r > 0 for r in grid["noise_batch_ratio"])):
      raise ValueError(f"law model {m.get('model')!r}: its prediction grid is missing or "
                       "malformed")


def model_params(law: dict) -> dict[str, int]:
  """``{model name: params}`` of the law, smallest first."""
  return {m["model"]: int(m["params"]) for m in sorted(law["models"], key=lambda m: m["params"])}


# --- support -------------------------------------------------------------------------------

def support(law: dict) -> dict:
  """Where the law predicts without extrapolating (the module docstring says why).

  Returns:
    ``{"params": [lo, hi], "steps": [lo, hi], "noise_batch_ratio": [lo, hi],
    "seq_len": int | None, "max_epochs": float | None,
    "max_sampling_prob": float | None}`` (None: unknown).
  """
  s = law["support"]
  return {"params": list(s["params"]), "steps": list(s["steps"]),
          "noise_batch_ratio": list(s["noise_batch_ratio"]), "seq_len": law.get("seq_len"),
          "max_epochs": law.get("max_epochs"), "max_sampling_prob": law.get("max_sampling_prob")}


def _check_query(params, steps, noise_batch_ratio):
  p, t, r = np.broadcast_arrays(np.asarray(params, float), np.asarray(steps, float),
                                np.asarray(noise_batch_ratio, float))
  for name, v, ok in (("params", p, p > 0), ("steps", t, t > 0),
                      ("noise_batch_ratio", r, r >= 0)):
    bad = ~(ok & np.isfinite(v))
    if np.any(bad):
      allowed = ">= 0" if name == "noise_batch_ratio" else "> 0"
      raise ValueError(f"{name} must be finite and {allowed}, got {v[bad].flat[0]!r}")
  return p, t, r


def outside(law: dict, params, steps, noise_batch_ratio) -> dict[str, np.ndarray]:
  """Where a query leaves the law's support, per dimension (arrays broadcast).

  Returns:
    ``{"params": bool array, "steps": ..., "noise_batch_ratio": ...}``, True
    where that coordinate is outside ``support(law)``.
  """
  p, t, r = _check_query(params, steps, noise_batch_ratio)
  s = law["support"]
  out = {}
  for name, v in zip(DIMENSIONS, (p, t, r)):
    lo, hi = s[name]
    out[name] = (v < lo * (1 - _REL)) | (v > hi * (1 + _REL))
  return out


def extrapolation(law: dict, model: str, steps, noise_batch_ratio) -> dict[str, np.ndarray]:
  """``outside`` for one of the law's models by name: ``{"steps", "noise_batch_ratio"}``."""
  sizes = model_params(law)
  if model not in sizes:
    raise ValueError(f"model {model!r} is not in the law ({', '.join(sizes)})")
  out = outside(law, sizes[model], steps, noise_batch_ratio)
  return {"steps": out["steps"], "noise_batch_ratio": out["noise_batch_ratio"]}


# --- prediction ---------------------------------------------------------------------------

def _model_loss(model: dict, logt: np.ndarray, r: np.ndarray, max_loss: float) -> np.ndarray:
  """One model's loss at (log steps, ratio): interpolation on its grid (``fit`` made it monotone)."""
  grid = model["grid"]
  steps = np.log(np.asarray(grid["steps"], float))
  ratios = np.asarray(grid["noise_batch_ratio"], float)
  table = np.log(np.asarray(grid["loss"], float))            # curves x steps, σ̄ = 0 first
  e = model.get("E")
  tail_m = grid.get("tail_m")
  # Position along steps (flat before the first; the tail after the last).
  lt = np.clip(logt, steps[0], steps[-1])
  if len(steps) > 1:
    i = np.clip(np.searchsorted(steps, lt, side="right") - 1, 0, len(steps) - 2)
    wt = (lt - steps[i]) / (steps[i + 1] - steps[i])
  else:
    i, wt = np.zeros(lt.shape, int), np.zeros(lt.shape)
  i1 = np.minimum(i + 1, len(steps) - 1)
  beyond = logt > steps[-1]

  tails = None
  if e is not None and tail_m is not None and np.any(beyond):
    # Every curve's tail at the points beyond the grid, non-decreasing in σ̄ (running
    # maximum: independently fitted tails can cross).
    m = np.asarray(tail_m, float)[:, None]
    tails = e + (np.exp(table[:, -1:]) - e) * np.exp(m * (logt[beyond] - steps[-1])[None, :])
    tails = np.maximum.accumulate(tails, axis=0)
    columns = np.arange(tails.shape[1])

  def curve(k):
    v = np.exp((1 - wt) * table[k, i] + wt * table[k, i1])
    if tails is not None:
      v[beyond] = tails[k[beyond], columns]
    return v

  private = np.flatnonzero(ratios > 0)
  pr = np.log(ratios[private])
  logr = np.log(np.clip(r, ratios[private[0]], ratios[private[-1]]))
  if len(private) == 1:
    out = curve(np.full(r.shape, private[0]))
  else:
    j = np.clip(np.searchsorted(pr, logr, side="right") - 1, 0, len(pr) - 2)
    w = (logr - pr[j]) / (pr[j + 1] - pr[j])
    out = np.exp((1 - w) * np.log(curve(private[j])) + w * np.log(curve(private[j + 1])))
  below = r < ratios[private[0]]
  if np.any(below) and private[0] > 0:  # linear in σ̄ toward the non-private curve
    w = r / ratios[private[0]]
    out = np.where(below, (1 - w) * curve(np.zeros(r.shape, int))
                   + w * curve(np.full(r.shape, private[0])), out)
  above = r > ratios[private[-1]]
  if np.any(above):
    last = curve(np.full(r.shape, private[-1]))
    grown = last * (np.maximum(r, ratios[private[-1]]) / ratios[private[-1]]) ** float(
        model.get("alpha_above", 0.0))
    out = np.where(above, np.minimum(grown, np.maximum(last, max_loss)), out)
  return out


def predict(law: dict, params, steps, noise_batch_ratio, *, extrapolate: bool = False) -> np.ndarray:
  """Predicted loss of a model of ``params`` trained ``steps`` steps at σ̄ = ``noise_batch_ratio``.

  Arrays broadcast. Inside ``support(law)``: interpolation of the smoothed
  measured data, the parametric tail beyond the measured steps; NaN
  outside unless ``extrapolate=True`` (the module docstring gives the
  extrapolation). Non-increasing in steps, non-decreasing in the ratio.
  """
  p, t, r = _check_query(params, steps, noise_batch_ratio)
  models = sorted(law["models"], key=lambda m: m["params"])
  max_loss = float(law.get("max_loss") or math.inf)
  logt, flat_r = np.log(t.ravel()), r.ravel()
  sizes = np.log(np.array([m["params"] for m in models], float))
  logp = np.log(np.clip(p.ravel(), math.exp(sizes[0]), math.exp(sizes[-1])))
  if len(models) == 1:
    out = np.log(_model_loss(models[0], logt, flat_r, max_loss))
  else:
    # log L linear in log N between the two fitted models around each query; each model
    # is evaluated only where it is one of the two.
    i = np.clip(np.searchsorted(sizes, logp, side="right") - 1, 0, len(models) - 2)
    w = np.clip((logp - sizes[i]) / (sizes[i + 1] - sizes[i]), 0.0, 1.0)
    out = np.zeros(logp.shape)
    for k, model in enumerate(models):
      lower, upper = i == k, i == k - 1
      need = lower | upper
      if not np.any(need):
        continue
      v = np.log(_model_loss(model, logt[need], flat_r[need], max_loss))
      out[need] += np.where(lower[need], 1 - w[need], w[need]) * v
  out = np.exp(out).reshape(p.shape)
  if not extrapolate:
    off = outside(law, p, t, r)
    out = np.where(off["params"] | off["steps"] | off["noise_batch_ratio"], np.nan, out)
  return out
