"""Plots of a DP scaling law (PNG, matplotlib's Agg back end).

* ``plot_loss_vs_ratio``: predicted loss against the noise-batch ratio σ/B,
  one line per model size, at a few step counts (with the smoothed sweep
  data when given) — the paper's observation that σ/B drives utility.
* ``plot_compute_optimal``: the compute-optimal model size and batch size
  against compute, one line per ε — the paper's observation that private
  training wants smaller models and larger batches.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_loss_vs_ratio(law: dict, path: str, *, steps: Sequence[int] | None = None,
                       tables: dict | None = None) -> str:
  """Loss vs σ/B per fitted model size; writes ``path`` (PNG) and returns it.

  Solid: inside the law's support (``fit.support``); dotted: the same model's
  extrapolated prediction (``fit.predict(..., extrapolate=True)``) beyond it.

  Args:
    law: a fitted law (``dpfl.scaling.fit``).
    path: output PNG.
    steps: step counts to draw (default: the law's fewest and most steps).
    tables: ``fit.loss_tables(rows)`` to overlay the smoothed data.
  """
  from dpfl.scaling import fit
  plt = _pyplot()
  support = fit.support(law)
  sizes = fit.model_params(law)
  lo, hi = support["noise_batch_ratio"]
  hi = hi if hi > 0 else 1e-1
  lo = lo if lo > 0 else hi * 1e-3
  grid = np.geomspace(lo / 3, hi * 3, 200)
  if steps is None:
    steps = sorted({int(support["steps"][0]), int(support["steps"][1])})
  fig, axes = plt.subplots(1, len(steps), figsize=(5.5 * len(steps), 4.2), squeeze=False)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
  for ax, t in zip(axes[0], steps):
    for color, (name, params) in zip(colors, sizes.items()):
      ax.plot(grid, fit.predict(law, params, t, grid, extrapolate=True), ":", color=color)
      ax.plot(grid, fit.predict(law, params, t, grid), color=color,
              label=f"{name} ({params:,})")
      if tables and name in tables:
        tab = tables[name]
        j = np.argmin(np.abs(np.log(tab["steps"]) - math.log(t)))
        if abs(tab["steps"][j] - t) <= 0.1 * t:
          ok = (tab["ratios"] > 0) & ~np.isnan(tab["loss"][:, j])
          ax.scatter(tab["ratios"][ok], tab["loss"][ok, j], color=color, s=14)
    ax.set_xscale("log")
    ax.set_xlabel("noise-batch ratio σ/B")
    ax.set_ylabel(f"predicted {law.get('loss', 'loss')}")
    ax.set_title(f"T = {t} steps (dotted: extrapolated)")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  if law.get("placeholder"):
    fig.suptitle("PLACEHOLDER law (not fitted to a real sweep)", color="red")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def compute_optimal_curves(law: dict, *, epsilons: Sequence[float], delta: float, users: int,
                           computes: Sequence[float], seq_len: int | None = None,
                           grid=None, allow_extrapolation: bool = False, **plan_kw
                           ) -> dict[float, list[dict | None]]:
  """``{ε: [plan at each compute, or None where none is given]}`` (``planner.plans``:
  None where no configuration fits the budget or the plan is refused as
  outside the law's support; ``plan_kw``: further ``planner.plan`` arguments)."""
  from dpfl.scaling import planner
  out = {}
  for eps in epsilons:
    try:
      row = planner.plans(computes=[float(c) for c in computes], epsilon=float(eps), delta=delta,
                          users=users, law=law, seq_len=seq_len, grid=grid,
                          allow_extrapolation=allow_extrapolation, **plan_kw)
    except ValueError:
      row = [None] * len(computes)
    out[eps] = [None if isinstance(p, ValueError) else p for p in row]
  return out


def plot_compute_optimal(law: dict, path: str, *, epsilons: Sequence[float], delta: float,
                         users: int, computes: Sequence[float], seq_len: int | None = None,
                         grid=None, allow_extrapolation: bool = False, **plan_kw) -> str:
  """Compute-optimal model size, batch size and loss vs compute, per ε; writes ``path``.

  Plans refused as outside the law's support are left out unless
  ``allow_extrapolation`` (then extrapolated ones are drawn as open markers)."""
  plt = _pyplot()
  curves = compute_optimal_curves(law, epsilons=epsilons, delta=delta, users=users,
                                  computes=computes, seq_len=seq_len, grid=grid,
                                  allow_extrapolation=allow_extrapolation, **plan_kw)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colors = plt.cm.plasma(np.linspace(0, 0.85, len(epsilons)))
  for color, eps in zip(colors, epsilons):
    pts = [(c, p) for c, p in zip(computes, curves[eps]) if p is not None]
    if not pts:
      continue
    cs = [c for c, _ in pts]
    for ax, key in zip(axes, ("params", "batch_size", "predicted_loss")):
      ax.plot(cs, [p[key] for _, p in pts], "-", color=color, label=f"ε = {eps:g}")
      for filled in (True, False):
        sel = [(c, p[key]) for c, p in pts if bool(p["extrapolated"]) != filled]
        if sel:
          ax.plot(*zip(*sel), "o", ms=4, color=color, mfc=color if filled else "none")
  for ax, label in zip(axes, ("compute-optimal params", "compute-optimal batch size",
                              "best predicted loss")):
    ax.set_xscale("log")
    if label != "best predicted loss":
      ax.set_yscale("log")
    ax.set_xlabel("compute (FLOPs)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  if any(p is not None for row in curves.values() for p in row):
    axes[0].legend(fontsize=8)
  else:
    axes[1].text(0.5, 0.5, "no plan inside the law's support\n(dpfl plan --allow-extrapolation)",
                 ha="center", va="center", transform=axes[1].transAxes)
  title = f"δ = {delta:g}, {users:,} users"
  if law.get("placeholder"):
    title += " — PLACEHOLDER law"
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
