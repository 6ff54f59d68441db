"""A fitted DP scaling law: its support, predictions, and its JSON file.

A law (``fit.fit_law`` makes one) holds, per model, the smoothed measured
loss curves (one per noise-batch ratio σ̄, σ̄ = 0 the non-private one), each
with the parametric tail ``L(T) = E + (L(T_n) - E)·(T/T_n)^m`` that extends it
beyond its last measured step T_n. Only numpy is needed here.

**Prediction** (``predict``), as the paper's ``construct_xent_fn`` (linear
interpolation of log loss over (log N, log T, log σ̄) on the measured grid
extended by the tail):

- along T, per curve: log L linear in log T between measured steps; the
  tail beyond the last one;
- along σ̄, at each T: the curves are made non-decreasing in σ̄ (running
  maximum, σ̄ = 0 first), then log L is linear in log σ̄ between fitted ratios;
- along N: log L linear in log N between the fitted models — a continuous
  model-size axis between the smallest and largest.

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
- steps before the first measured step: the loss at that step (an upper
  bound: loss does not rise with steps); beyond the trusted tail: the same
  tail continued (it decays to E, never below);
- σ̄ below the smallest positive ratio: linear in σ̄ between the non-private
  curve (σ̄ = 0) and the smallest private one — both measured, and loss is
  smooth in σ̄ at 0 (a law without a non-private curve keeps the smallest
  ratio's loss, an upper bound); above the largest ratio: the last curve
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
    for c in curves:
      if len(c.get("steps", [])) < 1 or len(c["steps"]) != len(c.get("loss", [])):
        raise ValueError(f"law model {m.get('model')!r}, noise_batch_ratio "
                         f"{c.get('noise_batch_ratio')!r}: steps and loss differ in length")


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

def _curve_loss(curve: dict, e: float | None, t: np.ndarray) -> np.ndarray:
  """One curve at steps ``t``: measured (log-log interpolation), constant before, tail after."""
  steps = np.asarray(curve["steps"], float)
  loss = np.asarray(curve["loss"], float)
  logt = np.log(t)
  out = np.exp(np.interp(logt, np.log(steps), np.log(loss)))  # flat beyond both ends
  tail = curve.get("tail")
  if tail is not None and e is not None:
    t_n, l_n = float(steps[-1]), float(loss[-1])
    beyond = t > t_n
    if np.any(beyond):
      ratio = np.maximum(t, t_n) / t_n
      out = np.where(beyond, e + (l_n - e) * ratio ** tail["m"], out)
  return out


def _model_loss(model: dict, t: np.ndarray, r: np.ndarray, max_loss: float) -> np.ndarray:
  curves = sorted(model["curves"], key=lambda c: c["noise_batch_ratio"])
  e = model.get("E")
  ratios = np.array([c["noise_batch_ratio"] for c in curves], float)
  values = np.array([_curve_loss(c, e, t) for c in curves])
  values = np.maximum.accumulate(values, axis=0)  # non-decreasing in σ̄ at every T
  private = ratios > 0
  pr, pv = ratios[private], values[private]
  logv = np.log(pv)
  out = np.empty_like(t)
  # Inside the fitted ratios: log L linear in log σ̄.
  logr = np.log(np.clip(r, pr[0], pr[-1]))
  if len(pr) == 1:
    out[...] = pv[0]
  else:
    j = np.clip(np.searchsorted(np.log(pr), logr, side="right") - 1, 0, len(pr) - 2)
    lo_r, hi_r = np.log(pr)[j], np.log(pr)[j + 1]
    w = (logr - lo_r) / (hi_r - lo_r)
    lo_v = np.take_along_axis(logv, j[None], 0)[0]
    hi_v = np.take_along_axis(logv, (j + 1)[None], 0)[0]
    out = np.exp((1 - w) * lo_v + w * hi_v)
  below = r < pr[0]
  if np.any(below) and not private[0]:
    w = r / pr[0]
    out = np.where(below, (1 - w) * values[0] + w * pv[0], out)
  above = r > pr[-1]
  if np.any(above):
    alpha = float(model.get("alpha_above", 0.0))
    grown = pv[-1] * (np.maximum(r, pr[-1]) / pr[-1]) ** alpha
    cap = np.maximum(pv[-1], max_loss)
    out = np.where(above, np.minimum(grown, cap), out)
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
  flat_t, flat_r = t.ravel(), r.ravel()
  per_model = np.array([np.log(_model_loss(m, flat_t, flat_r, max_loss)) for m in models])
  sizes = np.log(np.array([m["params"] for m in models], float))
  logp = np.log(np.clip(p.ravel(), math.exp(sizes[0]), math.exp(sizes[-1])))
  if len(models) == 1:
    out = per_model[0]
  else:
    i = np.clip(np.searchsorted(sizes, logp, side="right") - 1, 0, len(models) - 2)
    w = np.clip((logp - sizes[i]) / (sizes[i + 1] - sizes[i]), 0.0, 1.0)
    cols = np.arange(len(logp))
    out = (1 - w) * per_model[i, cols] + w * per_model[i + 1, cols]
  out = np.exp(out).reshape(p.shape)
  if not extrapolate:
    off = outside(law, p, t, r)
    out = np.where(off["params"] | off["steps"] | off["noise_batch_ratio"], np.nan, out)
  return out
