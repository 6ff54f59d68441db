"""User-level DP mean estimation: ELS vs ULS at fixed compute (issue 4, item 5).

Reproduces, in spirit, the synthetic study of Charles, Ganesh, McKenna et al.
2024, "Fine-Tuning Large Language Models with User-Level Differential Privacy"
(arXiv 2407.07737): which of the two user-level DP-SGD variants estimates a
mean better, for a user-level (ε, δ) guarantee and the same compute?

Data. ``num_users`` users; the global mean μ has norm ``mean_norm``. User u
has its own mean μ_u = μ + τ g_u and examples x_uj = μ_u + s h_uj
(g, h ~ N(0, I_d / d), so E‖μ_u − μ‖² = τ², E‖x_uj − μ_u‖² = s²). The total
per-example spread τ² + s² = ``spread``² is fixed; the *diversity*
ρ = s² / (τ² + s²) is the share of it inside a user (ρ→0: each user's
examples are near copies; ρ→1: users are alike, their examples are not).
Every user holds ``max(k)`` examples; the cap k keeps the first k.

Task. SGD on the squared loss ½‖θ − x‖² from θ₀ = 0 (gradient θ − x),
releasing every step a noisy sum of clipped gradients:

* ELS: each of the N·k examples is in the step with probability q; each
  example's gradient θ − x_uj is clipped to norm C; the user-level σ comes from
  ``accounting.ElsDpSgd(σ, q, T, k)`` (mixture of Gaussians, PLD; at q = 1
  ``ElsDpSgd`` itself states the equal Gaussian with sensitivity k·C).
* ULS: each user is in the step with probability q; each user contributes the
  gradient of their mean loss over their k examples, θ − x̄_u, clipped to C;
  σ from ``accounting.UlsDpSgd(σ, q, T)``. (With the squared loss, local SGD
  steps would only rescale this vector, so DP-FedAvg adds nothing here.)

Both: g_t = (clipped sum + N(0, σ²C² I)) / (expected number of units in the
step), θ_{t+1} = θ_t − η g_t; the estimate is the last iterate or the average
of the last half of the iterates (whichever the tuning picks).

Compute model. One unit of compute = one example-gradient evaluation. An ELS
step costs its sampled examples (q·N·k expected); a ULS step costs all k
examples of each sampled user (q·N·k expected). A budget of G evaluations and
a rate q therefore give the same T = G / (q N k) steps for both methods.
G = ``compute_per_user`` × N (the same G for every k: larger k, fewer epochs).

Hyper-parameters. For every (method, ε, k), a grid over the sampling rate q
(hence T), the clip norm C, the learning rate η and the averaging is run on
``tune_seeds`` seeds; the configuration with the lowest mean error is then
re-run on ``eval_seeds`` fresh seeds (new data, sampling and noise), and that
mean is reported, so the winner of a large grid is not flattered by the noise
that picked it. Error = ‖θ̂ − μ‖² against the true (population) mean μ; the
non-private empirical mean of the capped data is reported as a reference.

Prints a table and, with ``--json``, one JSON object as the last stdout line
(``rows``: one ``{"method", "epsilon", "k", "error", ...}`` per cell), and
writes a PNG plot (``--plot``).

Usage: python benchmarks/user_level_mean_estimation.py [--quick] [--json]
                                                      [--plot PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time

# A sibling script is named like the package (benchmarks/accounting.py); run
# as a script, this folder comes first on sys.path and would shadow the real
# `accounting`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

# Many small matrix products: a second BLAS thread only adds contention (and
# on a loaded 2-core machine slows them 50-100x); parallelism comes from processes.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import accounting  # noqa: E402

METHODS = ("ELS", "ULS")
DEFAULT_PLOT = os.path.join(_HERE, "out", "user_level_mean_estimation.png")


def _single_threaded_blas():
  """Limits BLAS to one thread where numpy was imported before this module."""
  try:
    import threadpoolctl
  except ImportError:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(1, user_api="blas")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything one study depends on (see the module docstring)."""

  num_users: int = 500
  dim: int = 128
  mean_norm: float = 1.0
  spread: float = 1.0
  diversity: float = 0.5
  compute_per_user: float = 64.0
  delta: float = 1e-6
  epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
  examples_per_user: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
  sampling_probs: tuple[float, ...] = (1.0, 1 / 4, 1 / 16, 1 / 64)
  clip_norms: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0)
  learning_rates: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
  tune_seeds: tuple[int, ...] = (0, 1, 2)
  eval_seeds: tuple[int, ...] = (100, 101, 102, 103, 104, 105)
  max_steps: int = 4096

  @property
  def compute(self) -> int:
    """Total example-gradient evaluations G of one run (both methods)."""
    return int(round(self.compute_per_user * self.num_users))


# ---------------------------------------------------------------------------
# Data.


def make_population(*, num_users: int, examples_per_user: int, dim: int, mean_norm: float,
                    spread: float, diversity: float, seed: int):
  """(examples [num_users, examples_per_user, dim], true mean [dim]).

  Between-user variance τ² = (1 − diversity)·spread², within-user
  s² = diversity·spread² (squared norms, in expectation).
  """
  if not 0.0 <= diversity <= 1.0:
    raise ValueError(f"diversity must be in [0, 1], got {diversity}")
  rng = np.random.default_rng([seed, 7919])
  direction = rng.standard_normal(dim)
  true_mean = mean_norm * direction / np.linalg.norm(direction)
  between = math.sqrt((1.0 - diversity) / dim) * spread
  within = math.sqrt(diversity / dim) * spread
  user_means = true_mean + between * rng.standard_normal((num_users, dim))
  examples = user_means[:, None, :] + within * rng.standard_normal(
      (num_users, examples_per_user, dim))
  return examples, true_mean


def clipping_units(method: str, examples: np.ndarray) -> np.ndarray:
  """The vectors whose gradient θ − x is clipped: examples (ELS) or user means (ULS)."""
  if method == "ELS":
    return examples.reshape(-1, examples.shape[-1])
  if method == "ULS":
    return examples.mean(axis=1)
  raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------------------
# Schedules and noise calibration.


def schedule(*, compute: int, num_users: int, examples_per_user: int,
             sampling_prob: float, max_steps: int) -> tuple[float, int] | None:
  """(q, T) with q·N·k·T = compute exactly, T the nearest integer; None if T > max_steps.

  T is rounded to an integer ≥ 1 and q recomputed so both methods spend the
  same expected compute; q is capped at 1 (then a smaller budget is spent,
  which only happens when even full batches cannot use it in one step).
  """
  per_full_step = num_users * examples_per_user
  steps = max(1, round(compute / (sampling_prob * per_full_step)))
  if steps > max_steps:
    return None
  return min(1.0, compute / (steps * per_full_step)), steps


def _sampling(method: str, sampling_prob: float, examples_per_user: int):
  from accounting import plan as planning
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  # ELS Poisson-samples examples (user-level ε depends on the cap k); ULS users.
  return planning.SamplingPlan(scheme="poisson", unit="example" if method == "ELS" else "user",
                               sampling_prob=sampling_prob,
                               examples_per_user=examples_per_user)


def mechanism(method: str, noise_multiplier: float, sampling_prob: float, num_steps: int,
              examples_per_user: int) -> accounting.Mechanism:
  """The user-level mechanism that accounts one run, from its plan (dpfl's one mapping)."""
  # δ is the plan's reporting δ; it does not enter the mechanism.
  return plan(method, sampling_prob, num_steps, examples_per_user, delta=1e-6,
              noise_multiplier=noise_multiplier).mechanism()


def plan(method: str, sampling_prob: float, num_steps: int, examples_per_user: int, *,
         delta: float, noise_multiplier: float | None = None,
         target_epsilon: float | None = None):
  """The run's ``accounting.plan.PrivacyPlan`` (σ given, or calibrated for ``target_epsilon``)."""
  from accounting import plan as planning
  # The clip norm does not enter ε (the noise is relative to it): 1 stands for C.
  return planning.plan_run(privacy_unit="user",
                           sampling=_sampling(method, sampling_prob, examples_per_user),
                           l2_clip_norm=1.0, delta=delta, num_steps=num_steps,
                           noise_multiplier=noise_multiplier, target_epsilon=target_epsilon)


def calibrate(key: tuple[str, float, float, int, int, float]) -> float:
  """σ for key = (method, ε, q, T, k, δ): the smallest meeting user-level (ε, δ)."""
  method, epsilon, sampling_prob, num_steps, examples_per_user, delta = key
  return plan(method, sampling_prob, num_steps, examples_per_user, delta=delta,
              target_epsilon=epsilon).noise_multiplier


def _accounting_key(method, epsilon, sampling_prob, num_steps, examples_per_user, delta):
  # ULS's privacy does not depend on k. ELS keeps its own key even at k = 1
  # (where it is ULS): for q < 1 it is accounted by ElsDpSgd, as run.
  return (method, float(epsilon), float(sampling_prob), int(num_steps),
          int(examples_per_user) if method == "ELS" else 1, float(delta))


def load_sigma_cache(path: str | None) -> dict:
  """Calibrations saved by an earlier run (``--sigma-cache``), {} if none."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    return {tuple(key): sigma for key, sigma in json.load(f)}


def save_sigma_cache(path: str | None, cache: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(sorted([list(key), sigma] for key, sigma in cache.items()), f)


def calibrate_all(keys, *, workers: int, cache: dict | None = None) -> dict:
  """{key: σ} for every key, computed in ``workers`` processes (cached)."""
  cache = {} if cache is None else cache
  todo = sorted({k for k in keys if k not in cache}, key=lambda k: (k[0] != "ELS", k))
  if todo and workers > 1:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
      for key, sigma in zip(todo, pool.map(calibrate, todo)):
        cache[key] = sigma
  else:
    for key in todo:
      cache[key] = calibrate(key)
  return cache


# ---------------------------------------------------------------------------
# The private estimator, vectorised over configurations.


def private_sgd(units: np.ndarray, *, sampling_prob: float, num_steps: int,
                clip_norms: np.ndarray, learning_rates: np.ndarray,
                noise_multipliers: np.ndarray, rng: np.random.Generator):
  """DP-SGD on ½‖θ − x‖² over the rows of ``units``, for M configurations at once.

  Each step includes every unit independently with probability
  ``sampling_prob`` (one Poisson sample shared by the M configurations), clips
  each included unit's gradient θ_m − x to norm ``clip_norms[m]``, sums, adds
  N(0, (noise_multipliers[m]·clip_norms[m])² I) and divides by the expected
  number of units. Sensitivity of each released sum to one unit: clip_norms[m].

  Args:
    units: [U, d] clipping units (examples for ELS, user means for ULS).
    sampling_prob: Poisson rate q in (0, 1].
    num_steps: T.
    clip_norms, learning_rates, noise_multipliers: [M] per configuration.
    rng: randomness for sampling and noise.

  Returns:
    (last iterate [M, d], average of iterates T//2+1..T [M, d]).
  """
  num_units, dim = units.shape
  clip = np.asarray(clip_norms, float)
  lr = np.asarray(learning_rates, float)[:, None]
  noise_std = (np.asarray(noise_multipliers, float) * clip)[:, None]
  expected_batch = sampling_prob * num_units
  sq_norms = np.einsum("ud,ud->u", units, units)
  theta = np.zeros((clip.size, dim))
  tail = np.zeros_like(theta)
  tail_start = num_steps // 2
  for step in range(num_steps):
    if sampling_prob >= 1.0:
      batch, batch_sq = units, sq_norms
    else:
      mask = rng.random(num_units) < sampling_prob
      batch, batch_sq = units[mask], sq_norms[mask]
    # ‖θ_m − x_b‖² by expansion: an [M, B] matrix, never an [M, B, d] tensor.
    theta_sq = np.einsum("md,md->m", theta, theta)
    dist_sq = theta_sq[:, None] - 2.0 * theta @ batch.T + batch_sq[None, :]
    factor = np.minimum(1.0, clip[:, None] / np.sqrt(np.maximum(dist_sq, 1e-30)))
    # Σ_b f_mb (θ_m − x_b) = θ_m Σ_b f_mb − (f @ X)_m.
    clipped_sum = theta * factor.sum(axis=1, keepdims=True) - factor @ batch
    noise = noise_std * rng.standard_normal(theta.shape)
    theta = theta - lr * (clipped_sum + noise) / expected_batch
    if step >= tail_start:
      tail += theta
  return theta, tail / (num_steps - tail_start)


# ---------------------------------------------------------------------------
# The study.


def population(config: StudyConfig, seed: int, k: int):
  """(examples capped at k [N, k, d], true mean [d]) of one seed.

  Generated with ``max(config.examples_per_user)`` examples per user and cut,
  so the caps are nested: k = 4 keeps the first 4 of the same examples.
  """
  examples, true_mean = make_population(
      num_users=config.num_users, examples_per_user=max(config.examples_per_user),
      dim=config.dim, mean_norm=config.mean_norm, spread=config.spread,
      diversity=config.diversity, seed=seed)
  return np.ascontiguousarray(examples[:, :k]), true_mean


def plans_for(config: StudyConfig, k: int) -> list[tuple[float, int]]:
  """The distinct (q, T) schedules of the sampling-rate grid for cap k."""
  plans = []
  for q in config.sampling_probs:
    plan = schedule(compute=config.compute, num_users=config.num_users, examples_per_user=k,
                    sampling_prob=q, max_steps=config.max_steps)
    if plan is not None and plan not in plans:
      plans.append(plan)
  return plans


def accounting_keys(config: StudyConfig) -> list[tuple]:
  """Every calibration the study needs."""
  return [_accounting_key(m, e, q, t, k, config.delta)
          for m in METHODS for k in config.examples_per_user for (q, t) in plans_for(config, k)
          for e in config.epsilons]


def _squared_errors(estimates: np.ndarray, true_mean: np.ndarray) -> np.ndarray:
  return ((estimates - true_mean) ** 2).sum(axis=-1)


def study_cell(config: StudyConfig, method: str, k: int, sigmas: dict) -> list[dict]:
  """Rows for one (method, k), one per ε: tuned on tune_seeds, scored on eval_seeds."""
  plans = plans_for(config, k)
  if not plans:
    raise ValueError(f"no sampling rate of {config.sampling_probs} gives <= {config.max_steps} "
                     f"steps for k={k}")
  num_eps, num_clip, num_lr = (len(config.epsilons), len(config.clip_norms),
                               len(config.learning_rates))
  eps_idx, clips, lrs = (np.array(c) for c in zip(*itertools.product(
      range(num_eps), config.clip_norms, config.learning_rates)))

  def sigma(e, plan):
    return sigmas[_accounting_key(method, config.epsilons[e], *plan, k, config.delta)]

  # Tuning: every (q, T) × ε × C × η × averaging, mean error over the tuning seeds.
  tune = np.zeros((len(plans), num_eps, num_clip, num_lr, 2))
  for seed in config.tune_seeds:
    examples, true_mean = population(config, seed, k)
    units = clipping_units(method, examples)
    for p, plan in enumerate(plans):
      # Same stream for both methods: at k = 1 ELS and ULS make the same draws.
      rng = np.random.default_rng([seed, k, p, 104729])
      last, avg = private_sgd(units, sampling_prob=plan[0], num_steps=plan[1], clip_norms=clips,
                              learning_rates=lrs,
                              noise_multipliers=np.array([sigma(e, plan) for e in eps_idx]),
                              rng=rng)
      errors = np.stack([_squared_errors(last, true_mean), _squared_errors(avg, true_mean)], 1)
      tune[p] += errors.reshape(num_eps, num_clip, num_lr, 2) / len(config.tune_seeds)
  choices = [np.unravel_index(np.argmin(tune[:, e]), tune[:, e].shape) for e in range(num_eps)]

  # Evaluation: each ε's chosen configuration on fresh seeds.
  scores = np.zeros((num_eps, len(config.eval_seeds)))
  reference = []
  for j, seed in enumerate(config.eval_seeds):
    examples, true_mean = population(config, seed, k)
    reference.append(float(_squared_errors(examples.mean(axis=(0, 1)), true_mean)))
    units = clipping_units(method, examples)
    for p, plan in enumerate(plans):
      chosen = [e for e in range(num_eps) if choices[e][0] == p]
      if not chosen:
        continue
      rng = np.random.default_rng([seed, k, p, 15485863])
      last, avg = private_sgd(
          units, sampling_prob=plan[0], num_steps=plan[1],
          clip_norms=np.array([config.clip_norms[choices[e][1]] for e in chosen]),
          learning_rates=np.array([config.learning_rates[choices[e][2]] for e in chosen]),
          noise_multipliers=np.array([sigma(e, plan) for e in chosen]), rng=rng)
      for i, e in enumerate(chosen):
        scores[e, j] = _squared_errors((last, avg)[choices[e][3]][i], true_mean)

  rows = []
  for e, epsilon in enumerate(config.epsilons):
    p, c, l, a = choices[e]
    clip, lr = config.clip_norms[c], config.learning_rates[l]
    rows.append({
        "method": method, "epsilon": float(epsilon), "k": int(k),
        "error": float(scores[e].mean()),
        "error_stderr": (float(scores[e].std(ddof=1) / math.sqrt(scores.shape[1]))
                         if scores.shape[1] > 1 else None),
        "tuning_error": float(tune[p, e, c, l, a]),
        "non_private_error": float(np.mean(reference)),
        # Paired with the same eval populations: the cost of privacy alone.
        "excess_error": float(np.mean(scores[e] - np.array(reference))),
        "sampling_prob": float(plans[p][0]), "num_steps": int(plans[p][1]),
        "clip_norm": float(clip), "learning_rate": float(lr),
        "averaging": ("last", "tail_average")[a],
        "noise_multiplier": float(sigma(e, plans[p])),
        "diversity": config.diversity, "compute_per_user": config.compute_per_user,
    })
  return rows


def _cell_task(args):
  config, method, k, sigmas = args
  with _single_threaded_blas():
    return study_cell(config, method, k, sigmas)


def run_study(configs: list[StudyConfig], sigmas: dict, *, workers: int = 1) -> list[list[dict]]:
  """Rows of each config, its (method, k) cells run in ``workers`` processes."""
  tasks = []
  for ci, config in enumerate(configs):
    needed = set(accounting_keys(config))
    sub = {key: sigmas[key] for key in needed}
    tasks += [(ci, (config, method, k, sub)) for k in config.examples_per_user
              for method in METHODS]
  # Longest first (ELS with large k), so the pool's two lanes finish together.
  order = sorted(range(len(tasks)), key=lambda i: (tasks[i][1][1] != "ELS", -tasks[i][1][2]))
  results: list = [None] * len(tasks)
  if workers > 1:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
      for i, rows in zip(order, pool.map(_cell_task, [tasks[i][1] for i in order])):
        results[i] = rows
  else:
    for i in order:
      results[i] = _cell_task(tasks[i][1])
  out: list[list[dict]] = [[] for _ in configs]
  for (ci, _), rows in zip(tasks, results):
    out[ci].extend(rows)
  return out


# ---------------------------------------------------------------------------
# Output.


def format_table(rows: list[dict], title: str) -> str:
  """ε × k table of errors, ELS / ULS / ratio per cell."""
  epsilons = sorted({r["epsilon"] for r in rows})
  ks = sorted({r["k"] for r in rows})
  cell = {(r["method"], r["epsilon"], r["k"]): r for r in rows}
  lines = [title, "error ‖θ̂−μ‖² (mean over eval seeds), ELS / ULS, and ELS÷ULS "
           "(>1: ULS better)", "   ε " + "".join(f"| k={k:<24d}" for k in ks)]
  for e in epsilons:
    parts = []
    for k in ks:
      els, uls = cell.get(("ELS", e, k)), cell.get(("ULS", e, k))
      if els and uls:
        ratio = els["error"] / uls["error"]
        parts.append(f"| {els['error']:.2e} {uls['error']:.2e} {ratio:5.2f}x ")
      else:
        parts.append("| " + " " * 25)
    lines.append(f"{e:4g} " + "".join(parts))
  ref = {r["k"]: r["non_private_error"] for r in rows}
  lines.append("np.  " + "".join(f"| {ref[k]:.2e} (non-private mean) " for k in ks))
  return "\n".join(lines)


def format_choices(rows: list[dict]) -> str:
  """The tuned hyper-parameters of every cell."""
  lines = ["chosen hyper-parameters (q, T, C, η, averaging, σ):"]
  for r in sorted(rows, key=lambda r: (r["k"], r["epsilon"], r["method"])):
    lines.append(f"  k={r['k']:<3d} ε={r['epsilon']:<4g} {r['method']}: "
                 f"q={r['sampling_prob']:.4g} "
                 f"T={r['num_steps']:<5d} C={r['clip_norm']:<6g} η={r['learning_rate']:<6g} "
                 f"{r['averaging']:<12s} σ={r['noise_multiplier']:.4g}")
  return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: str) -> None:
  """Error vs ε per k (ELS dashed, ULS solid), and the ELS÷ULS ratio of each sweep."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  main = results["main"]
  sweeps = {name: rows for name, rows in results.items() if name != "main" and rows}
  panels = 2 + len(sweeps)
  ncols = 2
  nrows = -(-panels // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.6 * nrows), squeeze=False)
  axes = axes.ravel()
  for ax in axes[panels:]:
    ax.set_visible(False)
  ks = sorted({r["k"] for r in main})
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(ks)))

  def series(rows, method, k):
    pts = sorted((r["epsilon"], r["error"]) for r in rows if r["method"] == method and r["k"] == k)
    return [p[0] for p in pts], [p[1] for p in pts]

  for k, color in zip(ks, colors):
    for method, style in (("ELS", "--"), ("ULS", "-")):
      x, y = series(main, method, k)
      axes[0].plot(x, y, style, color=color, marker="o", ms=3,
                   label=f"k={k}" if method == "ULS" else None)
  floor = sorted({(r["k"], r["non_private_error"]) for r in main})
  axes[0].set(xscale="log", yscale="log", xlabel="user-level ε", ylabel="‖θ̂ − μ‖²",
              title=f"error, ρ={main[0]['diversity']:g}, G={main[0]['compute_per_user']:g}·N "
                    "(ULS solid, ELS dashed)")
  axes[0].axhline(min(v for _, v in floor), color="gray", lw=0.8, ls=":")
  axes[0].legend(fontsize=8, ncol=2, title="dotted: non-private floor, largest k",
                 title_fontsize=7)

  def ratio_panel(ax, rows, title):
    groups = sorted({(r["k"], r["diversity"], r["compute_per_user"]) for r in rows})
    for i, (k, div, comp) in enumerate(groups):
      sub = [r for r in rows if (r["k"], r["diversity"], r["compute_per_user"]) == (k, div, comp)]
      xe, ye = series(sub, "ELS", k)
      xu, yu = series(sub, "ULS", k)
      ax.plot(xe, np.array(ye) / np.array(yu), marker="o", ms=3,
              color=plt.cm.tab10(i % 10), label=f"k={k} ρ={div:g} G={comp:g}·N")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="user-level ε", ylabel="error ELS ÷ ULS", title=title)
    ax.legend(fontsize=8)

  ratio_panel(axes[1], main, "ELS ÷ ULS (> 1: ULS better)")
  for ax, (name, rows) in zip(axes[2:], sweeps.items()):
    ratio_panel(ax, rows, f"{name} sweep: ELS ÷ ULS")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def configs_for(args) -> dict[str, list[StudyConfig]]:
  """The main study and the sweeps, {name: [configs]}."""
  if args.quick:
    main = StudyConfig(num_users=500, dim=128, epsilons=(1.0, 4.0, 16.0),
                       examples_per_user=(1, 4, 16), sampling_probs=(1.0, 1 / 8, 1 / 64),
                       clip_norms=(1 / 16, 1 / 4, 1.0, 4.0),
                       learning_rates=(1 / 16, 1 / 4, 1 / 2, 1.0),
                       tune_seeds=(0, 1), eval_seeds=(100, 101, 102), max_steps=2048)
    sweep_ks = (16,)
  else:
    main = StudyConfig()
    sweep_ks = (4, 16)
  overrides = {"diversity": args.diversity, "compute_per_user": args.compute_per_user}
  for name in ("num_users", "dim"):
    if getattr(args, name) is not None:
      overrides[name] = getattr(args, name)
  for name, cast in (("epsilons", float), ("examples_per_user", int),
                     ("sampling_probs", float)):
    if getattr(args, name):
      overrides[name] = tuple(cast(v) for v in getattr(args, name).split(","))
  if args.tune_seeds:
    overrides["tune_seeds"] = tuple(range(args.tune_seeds))
  if args.eval_seeds:
    overrides["eval_seeds"] = tuple(range(100, 100 + args.eval_seeds))
  main = dataclasses.replace(main, **overrides)
  if "examples_per_user" in overrides:
    sweep_ks = tuple(k for k in sweep_ks if k in main.examples_per_user) or (
        max(main.examples_per_user),)
  out = {"main": [main], "diversity": [], "compute": []}
  if not args.no_sweeps:
    for div in (0.1, 0.9):
      out["diversity"].append(dataclasses.replace(main, diversity=div, examples_per_user=sweep_ks))
    if not args.quick:
      for comp in (main.compute_per_user / 4, main.compute_per_user * 4):
        out["compute"].append(dataclasses.replace(main, compute_per_user=comp,
                                                  examples_per_user=sweep_ks))
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--quick", action="store_true",
                      help="smaller grids: 3 ε, k ∈ {1,4,16}, 2 tuning + 3 eval seeds")
  parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
  parser.add_argument("--plot", default=DEFAULT_PLOT, help="PNG path ('' to skip)")
  parser.add_argument("--diversity", type=float, default=0.5,
                      help="within-user share of the example spread, in [0, 1]")
  parser.add_argument("--compute-per-user", type=float, default=64.0,
                      help="example-gradient evaluations per user in the budget G")
  parser.add_argument("--num-users", type=int, help="N (default 500)")
  parser.add_argument("--dim", type=int, help="d (default 128)")
  parser.add_argument("--epsilons", help="comma-separated user-level ε values")
  parser.add_argument("--examples-per-user", help="comma-separated caps k")
  parser.add_argument("--sampling-probs", help="comma-separated sampling-rate grid")
  parser.add_argument("--tune-seeds", type=int, help="number of tuning seeds")
  parser.add_argument("--eval-seeds", type=int, help="number of evaluation seeds")
  parser.add_argument("--no-sweeps", action="store_true",
                      help="skip the diversity and compute sweeps")
  parser.add_argument("--sigma-cache", help="JSON file of calibrated σ to reuse and extend "
                      "(off by default; delete it when accounting/ changes)")
  parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                      help="processes for calibration and simulation")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  studies = configs_for(args)
  all_configs = [c for cs in studies.values() for c in cs]
  keys = [key for c in all_configs for key in accounting_keys(c)]
  cached = load_sigma_cache(args.sigma_cache)
  sigmas = calibrate_all(keys, workers=args.workers, cache=dict(cached))
  if len(sigmas) > len(cached):
    save_sigma_cache(args.sigma_cache, sigmas)
  calibration_s = time.perf_counter() - start

  names = [name for name, cs in studies.items() for _ in cs]
  per_config = run_study(all_configs, sigmas, workers=args.workers)
  results: dict[str, list[dict]] = {name: [] for name in studies}
  for name, rows in zip(names, per_config):
    results[name].extend(rows)
  total_s = time.perf_counter() - start

  main_config = studies["main"][0]
  print(f"ELS vs ULS mean estimation: N={main_config.num_users} users, d={main_config.dim}, "
        f"‖μ‖={main_config.mean_norm}, spread={main_config.spread}, δ={main_config.delta:g}, "
        f"compute G={main_config.compute_per_user:g}·N example-gradients")
  print(format_table(results["main"], f"\nmain study (diversity ρ={main_config.diversity:g})"))
  for name in ("diversity", "compute"):
    for c in studies[name]:
      sub = [r for r in results[name] if r["diversity"] == c.diversity
             and r["compute_per_user"] == c.compute_per_user]
      print(format_table(sub, f"\n{name} sweep: ρ={c.diversity:g}, G={c.compute_per_user:g}·N"))
  print("\n" + format_choices(results["main"]))
  print(f"\n{len(set(keys))} calibrations in {calibration_s:.1f} s; total {total_s:.1f} s")
  if args.plot:
    plot(results, args.plot)
    print(f"plot: {args.plot}")
  summary = {
      "rows": results["main"], "diversity_rows": results["diversity"],
      "compute_rows": results["compute"],
      "config": {k: v for k, v in dataclasses.asdict(main_config).items()},
      "calibration_seconds": round(calibration_s, 2), "total_seconds": round(total_s, 2),
      "plot": args.plot or None,
  }
  if args.json:
    print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
