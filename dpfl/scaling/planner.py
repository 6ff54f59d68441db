"""Compute-optimal private training: which model, batch and steps for a budget.

McKenna et al. 2025 (arXiv 2501.18914), section "compute-optimal
configurations": given a compute budget C (FLOPs), a privacy budget (ε, δ)
and the number of privacy units N (users, or examples), enumerate

* model size n (the law's models),
* batch size B (expected; Poisson sampling rate q = B / N),
* steps T, from a fixed geometric ladder (``steps_per_octave`` per doubling)
  up to ``max_steps`` (default: 10x the most steps the law was fitted on),

keep the configurations with ``6 · n · B · T · seq_len <= C`` (the budget is
an upper limit: spending less is allowed, so the feasible set only grows with
C), take σ(ε, δ, T, q) from the precomputed grid (``sigma_grid``), the
noise-batch ratio σ/B, and the law's predicted loss (``fit.predict``); the
argmin is the plan. Because the candidates at C include those at every
smaller budget and σ never grows with ε, the best predicted loss never
increases with more compute or a larger ε.

Also reported, from the same table: the smallest compute whose best loss is
within 1% of the best at C (the cumulative minimum of loss over candidates
sorted by compute — an exact downward scan), and every (model, batch size)
whose best loss is within 2%.

JAX-free and scipy-free: ``dpfl plan`` imports numpy and reads two JSON files.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from accounting import validate as check
from dpfl.scaling import fit as _fit
from dpfl.scaling import sigma_grid as _sigma_grid

WITHIN_BEST = 0.01      # "smallest compute within 1% of the best loss"
WITHIN_CONFIGS = 0.02   # "configurations within 2%"
STEPS_EXTRAPOLATION = 10  # default max_steps: this times the law's most steps


def training_flops(params, batch_size, steps, seq_len):
  """6 · N · B · T · seq: forward + backward FLOPs of a dense transformer."""
  return 6.0 * np.asarray(params, float) * batch_size * steps * seq_len


def steps_ladder(low: int, high: int, per_octave: int = 16) -> np.ndarray:
  """Integer steps from ``low`` to ``high`` spaced ~2^(1/per_octave) apart (both ends kept)."""
  if high < low:
    return np.zeros(0, int)
  n = int(math.ceil(per_octave * math.log2(high / low))) + 1
  ladder = np.unique(np.round(np.geomspace(low, high, max(n, 1))).astype(int))
  return ladder[(ladder >= low) & (ladder <= high)]


def default_batch_sizes(users: int) -> list[int]:
  """Powers of two up to the number of users, and the full batch (q = 1)."""
  sizes = [2 ** k for k in range(0, 40) if 2 ** k <= users]
  if users not in sizes:
    sizes.append(users)
  return sizes


def candidates(*, compute: float, epsilon: float, delta: float, users: int,
               law: dict | str | None = None, seq_len: int | None = None,
               models: Sequence[str] | None = None,
               batch_sizes: Sequence[int] | None = None, grid=None,
               steps_per_octave: int = 16, max_steps: int | None = None) -> dict[str, Any]:
  """Every configuration within the budget, as arrays (see ``plan``)."""
  compute = check.positive("compute", compute)
  epsilon = check.positive("epsilon", epsilon)
  delta = check.open_unit("delta", delta)
  users = check.positive_int("users", users)
  law = law if isinstance(law, dict) else _fit.load_law(law)
  seq_len = seq_len if seq_len is not None else law.get("seq_len")
  if seq_len is None:
    raise ValueError("seq_len is required: the law does not record one")
  seq_len = check.positive_int("seq_len", seq_len)
  sizes = _fit.model_params(law)
  names = list(sizes) if models is None else list(models)
  unknown = [m for m in names if m not in sizes]
  if unknown or not names:
    raise ValueError(f"models must be names in the law ({', '.join(sizes)}); got "
                     f"{', '.join(unknown) or 'none'}")
  batches = default_batch_sizes(users) if batch_sizes is None else list(batch_sizes)
  if not batches:
    raise ValueError(f"batch_sizes must be integers in [1, users={users}], got none")
  batches = [check.integer("batch_sizes (each)", b, low=1, high=users) for b in batches]

  table = _sigma_grid._as_table(grid)
  eps_lo, eps_hi = float(table.eps[0]), float(table.eps[-1])
  if not eps_lo <= epsilon <= eps_hi:
    raise ValueError(f"epsilon={epsilon:g} is outside the σ grid's range [{eps_lo:g}, "
                     f"{eps_hi:g}] (build a wider one: python -m dpfl.scaling.sigma_grid)")
  if delta < table.delta[0]:
    raise ValueError(f"delta={delta:g} is below the σ grid's smallest δ {table.delta[0]:g} "
                     "(build a wider one: python -m dpfl.scaling.sigma_grid)")
  # Conservative clamps (σ decreases with δ and increases with q): an upper bound.
  delta_used = min(delta, float(table.delta[-1]))
  q_floor = float(table.q[0])

  law_steps = max(c["steps_range"][1] for m in law["models"] if m["model"] in names
                  for c in m["curves"])
  if max_steps is None:
    max_steps = STEPS_EXTRAPOLATION * law_steps
  max_steps = check.positive_int("max_steps", max_steps)
  top = int(min(max_steps, table.steps[-1]))
  if top < table.steps[0]:
    raise ValueError(f"max_steps={max_steps} is below the σ grid's fewest steps "
                     f"{int(table.steps[0])}")
  steps = steps_ladder(int(table.steps[0]), top, steps_per_octave)
  params = np.array([sizes[m] for m in names], float)
  mi, bi, ti = np.meshgrid(np.arange(len(names)), np.arange(len(batches)),
                           np.arange(len(steps)), indexing="ij")
  mi, bi, ti = mi.ravel(), bi.ravel(), ti.ravel()
  batch = np.array(batches, float)[bi]
  t = steps[ti].astype(float)
  flops = training_flops(params[mi], batch, t, seq_len)
  keep = flops <= compute * (1 + 1e-12)
  if not keep.any():
    smallest = training_flops(params.min(), min(batches), steps[0], seq_len)
    raise ValueError(f"compute={compute:g} FLOPs is below the smallest configuration "
                     f"({smallest:g} FLOPs: {steps[0]} steps of batch {min(batches)} on "
                     f"the smallest model)")
  mi, bi, t, batch, flops = mi[keep], bi[keep], t[keep], batch[keep], flops[keep]
  q = batch / users
  q_used = np.maximum(q, q_floor)
  sigma = _sigma_grid.noise_multiplier(epsilon, t, q_used, delta_used, grid=table)
  ratio = sigma / batch
  loss = _fit.predict(law, params[mi], t, ratio)
  return {"model_index": mi, "models": names, "params": params[mi], "batch_size": batch,
          "steps": t, "flops": flops, "sampling_prob": q, "noise_multiplier": sigma,
          "noise_batch_ratio": ratio, "predicted_loss": loss,
          "sigma_bound": (q < q_floor) | (delta_used != delta), "law": law,
          "seq_len": int(seq_len), "delta_used": delta_used, "q_floor": q_floor,
          "max_steps": int(steps[-1])}


def _row(c: dict, i: int) -> dict[str, Any]:
  return {"model": c["models"][int(c["model_index"][i])], "params": int(c["params"][i]),
          "batch_size": int(c["batch_size"][i]), "steps": int(c["steps"][i]),
          "sampling_prob": float(c["sampling_prob"][i]),
          "noise_multiplier": float(c["noise_multiplier"][i]),
          "noise_batch_ratio": float(c["noise_batch_ratio"][i]),
          "predicted_loss": float(c["predicted_loss"][i]), "compute": float(c["flops"][i])}


def _argmin(loss: np.ndarray, flops: np.ndarray, mask=None) -> int:
  """Index of the lowest loss (ties: the least compute)."""
  idx = np.arange(len(loss)) if mask is None else np.nonzero(mask)[0]
  order = np.lexsort((flops[idx], loss[idx]))
  return int(idx[order[0]])


def plan(*, compute: float, epsilon: float, delta: float, users: int,
         law: dict | str | None = None, seq_len: int | None = None,
         models: Sequence[str] | None = None, batch_sizes: Sequence[int] | None = None,
         grid=None, steps_per_octave: int = 16,
         max_steps: int | None = None) -> dict[str, Any]:
  """The compute-optimal private configuration for a budget.

  Args:
    compute: FLOPs budget C (an upper limit).
    epsilon, delta: the privacy budget, example-level Poisson DP-SGD over
      ``users`` privacy units (one example per unit, or ULS over users).
    users: N, number of privacy units; q = B / N.
    law: a law dict or path (default: the one shipped with dpfl).
    seq_len: tokens per example (default: the law's).
    models: restrict to these model names of the law.
    batch_sizes: candidate expected batch sizes (default: powers of two <= N,
      and N).
    grid: σ grid dict or path (default: the shipped one).
    steps_per_octave: resolution of the steps ladder (16: ~4.4% apart).
    max_steps: most steps considered (default: ``STEPS_EXTRAPOLATION`` times
      the most steps in the law's data — a power law fitted on a short range
      says little far beyond it; also capped by the σ grid).

  Returns:
    A JSON-serialisable dict: the plan's ``model``, ``params``,
    ``batch_size``, ``steps``, ``sampling_prob``, ``noise_multiplier``,
    ``noise_batch_ratio``, ``predicted_loss``, ``compute`` (used) and
    ``compute_budget``; ``smallest_compute_within_1pct`` (a config dict) and
    ``configs_within_2pct`` (best steps per (model, batch size), by loss);
    ``extrapolated`` (steps / ratio beyond the law's data); ``sigma_bound``
    (σ is a clamped upper bound: q below the grid, or δ above it); and the
    law's ``placeholder`` flag.
  """
  c = candidates(compute=compute, epsilon=epsilon, delta=delta, users=users, law=law,
                 seq_len=seq_len, models=models, batch_sizes=batch_sizes, grid=grid,
                 steps_per_octave=steps_per_octave, max_steps=max_steps)
  loss, flops = c["predicted_loss"], c["flops"]
  best = _argmin(loss, flops)
  out = _row(c, best)
  best_loss = out["predicted_loss"]
  # Smallest compute within 1%: cumulative minimum of loss in compute order.
  order = np.lexsort((loss, flops))
  running = np.minimum.accumulate(loss[order])
  first = int(np.argmax(running <= best_loss * (1 + WITHIN_BEST)))
  small = _row(c, int(order[first]))
  # Within 2%: the best steps of every (model, batch size).
  configs = []
  _, pairs = np.unique(np.stack([c["model_index"], c["batch_size"]]), axis=1,
                       return_inverse=True)
  pairs = pairs.ravel()
  for pair in np.unique(pairs):
    i = _argmin(loss, flops, pairs == pair)
    if loss[i] <= best_loss * (1 + WITHIN_CONFIGS):
      configs.append(_row(c, i))
  configs.sort(key=lambda r: (r["predicted_loss"], r["compute"]))
  law_ = c["law"]
  extra = _fit.extrapolation(law_, out["model"], out["steps"], out["noise_batch_ratio"])
  out.update({
      "compute_budget": float(compute), "epsilon": float(epsilon), "delta": float(delta),
      "users": int(users), "seq_len": c["seq_len"],
      "tokens": int(out["batch_size"] * out["steps"] * c["seq_len"]),
      "epochs": out["sampling_prob"] * out["steps"],
      "smallest_compute_within_1pct": small,
      "configs_within_2pct": configs,
      "extrapolated": {k: bool(v) for k, v in extra.items()},
      "sigma_bound": bool(c["sigma_bound"][best]),
      "sigma_source": "grid",
      "candidates": int(len(loss)), "max_steps": c["max_steps"],
      "law": {"placeholder": bool(law_.get("placeholder", False)),
              "description": law_.get("description", ""),
              "models": list(_fit.model_params(law_))},
  })
  return out
