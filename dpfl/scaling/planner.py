"""Compute-optimal private training: which model size, batch and steps for a budget.

McKenna et al. 2025 (arXiv 2501.18914), section "compute-optimal
configurations": given a compute budget C (FLOPs), a privacy budget (ε, δ)
and the number of privacy units N (users, or examples), enumerate

* model size n on a log-spaced axis: ``MODEL_SIZES`` (100, as the paper)
  sizes from the law's smallest to its largest fitted model (``--models``:
  only the named models' sizes);
* batch size B (expected; Poisson sampling rate q = B / N);
* steps T, from a fixed geometric ladder (``steps_per_octave`` per doubling
  up to the law's most steps, a quarter of that beyond) up to ``max_steps``
  (default: 10x the law's most steps),

keep the configurations with ``6 · n · B · T · seq_len <= C`` (the budget is
an upper limit: spending less is allowed, so the feasible set only grows with
C), take σ(ε, δ, T, q) from the precomputed grid (``sigma_grid``), the
noise-batch ratio σ/B, and the law's predicted loss (``fit.predict``); the
argmin is the plan.

**Only inside the law's support** (``fit.support``), as the paper's query,
which returns NaN there and drops the configuration. A candidate is outside
in one of ``DIMENSIONS``:

* ``model size``, ``steps``, ``σ/B``: (n, T, σ/B) outside the fitted ranges
  (``fit.outside``);
* ``sequence length``: the plan's tokens per example differ from the law's
  (or the law records none);
* ``q = 1``: the whole data set as every batch, unless the law's
  ``max_sampling_prob`` is 1 (its runs trained that way);
* ``epochs``: q·T above the law's ``max_epochs``. A law that does not know
  (fitted from point rows without ``--max-epochs``) is taken to have seen
  each example at most once: 1 epoch, the assumption of the paper's and most
  scaling laws, which say nothing about repeated data.

The rule (``plan``), and why:

1. **Data limits are constraints.** q = 1 and epochs beyond the law's are
   limits of the user's data set, not of the budget: such candidates are
   dropped. When they bind (the best over every candidate needs them) the
   plan says so in ``data_limited``: it is the best the law knows for this
   data set, and may spend less than the budget. Nothing left: refused
   (``q = 1`` / ``epochs``).
2. **The budget's optimum must be inside.** Among the rest, the best
   configuration *under extrapolation* (``fit.predict(...,
   extrapolate=True)``) is found. If it lies outside the law (more steps,
   less or more noise than measured) the plan is refused, instead of
   returning the best point on the support's edge: that corner plan is what
   the law can say, but it is not compute-optimal for the budget, and a user
   spending 3e18 FLOPs on a law of 200K-parameter models, 200 steps, should
   be told so. If it is inside, it is also the in-support argmin (the two
   predictions agree there): that is the plan.
3. **Corners the extrapolation cannot see past are refused too.** The law
   holds the loss flat beyond its smallest and largest model, and below its
   first measured step (the loss there, a lower bound for fewer steps), so
   it can never show that a smaller or larger model would do better, and it
   would always favour fewer steps. Fewer steps than measured are therefore
   not candidates (unless nothing else fits), and a best configuration at
   the law's smallest or largest model (on the continuous axis; not with
   ``models``) or at its fewest steps is refused (``model size`` /
   ``steps``): the optimum may lie beyond.
4. The sequence length must be the law's (``sequence length``).

With ``allow_extrapolation`` every candidate is planned over and the plan
names the dimensions it lies outside of (``extrapolated``) and the corners it
sits on (``at_support_corner``).

Because the candidates at C include those at every smaller budget, σ never
grows with ε and the prediction never falls with σ/B, the best predicted
loss never increases with more compute or a larger ε (where a plan is given).

Also reported, from the same candidates: the smallest compute whose best loss
is within 1% of the best at C (the cumulative minimum of loss over candidates
sorted by compute — an exact downward scan), and every (model size, batch
size) whose best loss is within 2%.

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
MODEL_SIZES = 100       # log-spaced model sizes between the law's smallest and largest
UNKNOWN_MAX_EPOCHS = 1.0  # a law without max_epochs: each example seen at most once

# The dimensions a plan can lie outside the law's support in (refusal
# messages start with one; ``extrapolated`` lists them), in this order.
DIMENSIONS = ("model size", "steps", "σ/B", "sequence length", "q = 1", "epochs")
_FIT_DIMENSIONS = {"model size": "params", "steps": "steps", "σ/B": "noise_batch_ratio"}
_REL = 1e-9             # float slack on support bounds computed from the same numbers


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


def model_size_axis(low: float, high: float, *, sizes: int = MODEL_SIZES) -> np.ndarray:
  """``sizes`` log-spaced model sizes from ``low`` to ``high`` (both kept; one if equal)."""
  if high <= low:
    return np.array([float(low)])
  return np.geomspace(low, high, sizes)


def default_batch_sizes(users: int) -> list[int]:
  """Powers of two up to the number of users, and the full batch (q = 1)."""
  sizes = [2 ** k for k in range(0, 64) if 2 ** k <= users]
  if users not in sizes:
    sizes.append(users)
  return sizes


def law_support(law: dict) -> dict[str, Any]:
  """``fit.support(law)`` as plain JSON values."""
  def plain(v):
    if isinstance(v, (list, tuple, np.ndarray)):
      return [plain(x) for x in v]
    if isinstance(v, (np.integer,)):
      return int(v)
    if isinstance(v, (np.floating,)):
      return float(v)
    return v
  return {k: plain(v) for k, v in _fit.support(law).items()}


def _nearest_model(sizes: dict[str, int], params: np.ndarray) -> np.ndarray:
  """Index (into ``sizes``' order) of the fitted model nearest each size, in log params."""
  logs = np.log(np.array(list(sizes.values()), float))
  return np.argmin(np.abs(np.log(params)[:, None] - logs[None, :]), axis=1)


def candidates(*, compute: float, epsilon: float, delta: float, users: int,
               law: dict | str | None = None, seq_len: int | None = None,
               models: Sequence[str] | None = None,
               batch_sizes: Sequence[int] | None = None, grid=None,
               steps_per_octave: int = 16, max_steps: int | None = None,
               model_sizes: int = MODEL_SIZES) -> dict[str, Any]:
  """Every configuration within the budget, inside the law's support or not
  (but fewer steps than the law measured only when nothing else fits).

  Returns:
    Arrays over candidates: ``params``, ``model_index`` (the nearest fitted
    model, into ``models``), ``batch_size``, ``steps``, ``flops``,
    ``sampling_prob``, ``epochs``, ``noise_multiplier``, ``noise_batch_ratio``,
    ``predicted_loss`` (``fit.predict(..., extrapolate=True)``; inside the
    support it is the law's prediction), ``outside`` (``{dimension: bool
    array}`` for every one of ``DIMENSIONS``) and ``inside`` (outside in none);
    and ``support``, ``seq_len``, ``law``, ``sigma_bound``, ``max_steps``.
    See ``plan`` for the arguments.
  """
  compute = check.positive("compute", compute)
  epsilon = check.positive("epsilon", epsilon)
  delta = check.open_unit("delta", delta)
  users = check.positive_int("users", users)
  model_sizes = check.integer("model_sizes", model_sizes, low=2)
  law = law if isinstance(law, dict) else _fit.load_law(law)
  support = law_support(law)
  seq_len = seq_len if seq_len is not None else support.get("seq_len")
  if seq_len is None:
    raise ValueError("sequence length: seq_len is required: the law does not record one")
  seq_len = check.positive_int("seq_len", seq_len)
  sizes = _fit.model_params(law)
  if models is None:
    lo, hi = support["params"]
    params_axis = model_size_axis(float(lo), float(hi), sizes=model_sizes)
  else:
    names = list(models)
    unknown = [m for m in names if m not in sizes]
    if unknown or not names:
      raise ValueError(f"models must be names in the law ({', '.join(sizes)}); got "
                       f"{', '.join(unknown) or 'none'}")
    params_axis = np.array(sorted({float(sizes[m]) for m in names}))
  batches = default_batch_sizes(users) if batch_sizes is None else list(batch_sizes)
  if not batches:
    raise ValueError(f"batch_sizes must be integers in [1, users={users}], got none")
  batches = sorted({check.integer("batch_sizes (each)", b, low=1, high=users) for b in batches})

  table = _sigma_grid._as_table(grid)
  eps_lo, eps_hi = float(table.eps[0]), float(table.eps[-1])
  if not eps_lo <= epsilon <= eps_hi:
    raise ValueError(f"epsilon={epsilon:g} is outside the σ grid's range [{eps_lo:g}, "
                     f"{eps_hi:g}] (build a wider one: python -m dpfl.scaling.sigma_grid)")
  if delta < table.delta[0]:
    raise ValueError(f"delta={delta:g} is below the σ grid's smallest δ {table.delta[0]:g} "
                     "(build a wider one: python -m dpfl.scaling.sigma_grid)")
  # Conservative clamps (σ decreases with δ and increases with q): an upper
  # bound, flagged as ``sigma_bound``; out of the grid sigma_grid would call
  # the exact (slow) calibration per point instead.
  delta_used = min(delta, float(table.delta[-1]))
  q_floor = float(table.q[0])

  if max_steps is None:
    max_steps = STEPS_EXTRAPOLATION * int(support["steps"][1])
  max_steps = check.positive_int("max_steps", max_steps)
  top = int(min(max_steps, table.steps[-1]))
  if top < table.steps[0]:
    raise ValueError(f"max_steps={max_steps} is below the σ grid's fewest steps "
                     f"{int(table.steps[0])}")
  # Beyond the law's most steps the ladder is 4x coarser: those candidates only
  # tell whether the budget wants more steps than the law has seen (or are
  # extrapolated plans), and they would otherwise be half the work.
  edge = int(min(top, max(table.steps[0], support["steps"][1])))
  steps = steps_ladder(int(table.steps[0]), edge, steps_per_octave)
  beyond = steps_ladder(edge, top, max(1, steps_per_octave // 4))
  steps = np.union1d(steps, beyond[beyond > edge])

  # σ depends on (B, T) only: one grid query per pair, then all sizes that fit.
  bi, ti = np.meshgrid(np.arange(len(batches)), np.arange(len(steps)), indexing="ij")
  pair_b = np.array(batches, float)[bi.ravel()]
  pair_t = steps[ti.ravel()].astype(float)
  pair_flops = training_flops(1.0, pair_b, pair_t, seq_len)  # per parameter
  fits = pair_flops[None, :] * params_axis[:, None] <= compute * (1 + 1e-12)
  if not fits.any():
    smallest = training_flops(params_axis.min(), batches[0], steps[0], seq_len)
    raise ValueError(f"compute={compute:g} FLOPs is below the smallest configuration "
                     f"({smallest:g} FLOPs: {steps[0]} steps of batch {batches[0]} on "
                     f"{params_axis.min():.3g} parameters)")
  used = fits.any(axis=0)
  pair_b, pair_t, fits = pair_b[used], pair_t[used], fits[:, used]
  pair_q = pair_b / users
  pair_sigma = _sigma_grid.noise_multiplier(epsilon, pair_t, np.maximum(pair_q, q_floor),
                                            delta_used, grid=table)
  # Fewer steps than the law measured are dropped unless nothing else fits:
  # the law holds the loss flat there (the loss at its first step, a lower
  # bound), which would always favour them (see ``plan``).
  measured = pair_t >= float(support["steps"][0]) * (1 - _REL)
  below_support = bool((~measured).any())
  if (fits & measured[None, :]).any():
    fits = fits & measured[None, :]
  pi, ci = np.nonzero(fits)
  params = params_axis[pi]
  batch, t, q, sigma = pair_b[ci], pair_t[ci], pair_q[ci], pair_sigma[ci]
  ratio = sigma / batch
  epochs = q * t
  loss = np.asarray(_fit.predict(law, params, t, ratio, extrapolate=True), float)
  loss = np.where(np.isnan(loss), np.inf, loss)

  fit_out = _fit.outside(law, params, t, ratio)
  outside = {dim: np.asarray(fit_out[key], bool) for dim, key in _FIT_DIMENSIONS.items()}
  law_seq = support.get("seq_len")
  outside["sequence length"] = np.full(len(t), law_seq is None or int(law_seq) != seq_len)
  max_q = support.get("max_sampling_prob")
  full_batch_ok = max_q is not None and max_q >= 1
  outside["q = 1"] = (q >= 1) & (not full_batch_ok)
  max_epochs = support.get("max_epochs")
  max_epochs = UNKNOWN_MAX_EPOCHS if max_epochs is None else float(max_epochs)
  outside["epochs"] = epochs > max_epochs * (1 + _REL)
  inside = ~np.any([outside[d] for d in DIMENSIONS], axis=0)

  return {"params": params, "models": list(sizes),
          "model_index": _nearest_model(sizes, params), "batch_size": batch, "steps": t,
          "flops": training_flops(params, batch, t, seq_len), "sampling_prob": q,
          "epochs": epochs, "noise_multiplier": sigma, "noise_batch_ratio": ratio,
          "predicted_loss": loss, "outside": outside, "inside": inside,
          "sigma_bound": (q < q_floor) | (delta_used != delta), "law": law,
          "sigma_table": table,
          "support": support, "continuous_sizes": models is None,
          "ladder_below_support": below_support, "max_epochs_used": max_epochs,
          "seq_len": int(seq_len), "delta_used": delta_used, "q_floor": q_floor,
          "max_steps": int(steps[-1])}


def _subset(c: dict, keep: np.ndarray) -> dict[str, Any]:
  """The candidates where ``keep`` (the per-candidate arrays sliced, the rest shared)."""
  n = len(c["steps"])
  out = {k: (v[keep] if isinstance(v, np.ndarray) and v.shape == (n,) else v)
         for k, v in c.items()}
  out["outside"] = {d: v[keep] for d, v in c["outside"].items()}
  return out


def _row(c: dict, i: int) -> dict[str, Any]:
  return {"model": c["models"][int(c["model_index"][i])], "params": int(round(c["params"][i])),
          "batch_size": int(c["batch_size"][i]), "steps": int(c["steps"][i]),
          "sampling_prob": float(c["sampling_prob"][i]),
          "noise_multiplier": float(c["noise_multiplier"][i]),
          "noise_batch_ratio": float(c["noise_batch_ratio"][i]),
          "predicted_loss": float(c["predicted_loss"][i]), "compute": float(c["flops"][i])}


def _argmin(loss: np.ndarray, flops: np.ndarray, mask=None) -> int:
  """Index of the lowest loss (ties: the least compute)."""
  idx = np.arange(len(loss)) if mask is None else np.nonzero(mask)[0]
  ties = idx[loss[idx] == loss[idx].min()]
  return int(ties[np.argmin(flops[ties])])


def _outside_detail(c: dict, i: int, dim: str) -> str:
  """Why candidate ``i`` is outside the support in ``dim`` (a phrase)."""
  s = c["support"]
  if dim == "model size":
    p, (lo, hi) = c["params"][i], s["params"]
    return (f"model size {p:.3g} parameters {'>' if p > hi else '<'} the law's "
            f"{'largest' if p > hi else 'smallest'} model ({hi if p > hi else lo:.3g})")
  if dim == "steps":
    t, (lo, hi) = c["steps"][i], s["steps"]
    return f"steps {int(t)} outside the law's [{lo:g}, {hi:g}]"
  if dim == "σ/B":
    r, (lo, hi) = c["noise_batch_ratio"][i], s["noise_batch_ratio"]
    return f"σ/B {r:.3g} outside the law's [{lo:.3g}, {hi:.3g}]"
  if dim == "sequence length":
    law_seq = s.get("seq_len")
    return (f"sequence length {c['seq_len']} but the law records none" if law_seq is None
            else f"sequence length {c['seq_len']} != the law's {law_seq}")
  if dim == "q = 1":
    return "q = 1 (the whole data set in every batch; the law's runs never trained so)"
  # "epochs" only as the label: the CLI turns the bare word into its --epochs flag.
  return (f"q·T = {c['epochs'][i]:.3g} passes over the data > the law's most, "
          f"{c['max_epochs_used']:g}" + (" (unknown: taken as 1)" if s.get("max_epochs") is None
                                         else ""))


def dimensions_outside(c: dict, i: int) -> list[str]:
  """The ``DIMENSIONS`` candidate ``i`` lies outside the law's support in."""
  return [d for d in DIMENSIONS if bool(c["outside"][d][i])]


def support_corners(c: dict, i: int) -> list[tuple[str, str]]:
  """Where candidate ``i`` sits on a corner of the support that the law's
  extrapolation cannot see past: ``[(dimension, why), ...]``.

  * the smallest or largest model of the continuous size axis (the law holds
    the loss flat in size beyond its models, so it can never show that a
    smaller or larger one would do better; a best at the end says it would);
  * the fewest steps the law measured, when the steps ladder goes lower (the
    law's loss below its first step is a lower bound, so those candidates
    are not searched).
  """
  out = []
  lo, hi = c["support"]["params"]
  p = c["params"][i]
  if c["continuous_sizes"] and hi > lo:
    if p >= hi * (1 - _REL):
      out.append(("model size", f"uses its largest model ({p:.3g} parameters)"))
    elif p <= lo * (1 + _REL):
      out.append(("model size", f"uses its smallest model ({p:.3g} parameters)"))
  steps_lo = float(c["support"]["steps"][0]) * (1 - _REL)
  measured = c["steps"] >= steps_lo
  if c["ladder_below_support"] and measured[i] and c["steps"][i] == c["steps"][measured].min():
    out.append(("steps", f"trains its fewest steps ({int(c['steps'][i])})"))
  return out


def _refusal(c: dict, i: int, dims: list[str], compute: float) -> ValueError:
  details = "; ".join(_outside_detail(c, i, d) for d in dims)
  return ValueError(
      f"{dims[0]}: the compute-optimal configuration for {compute:.3g} FLOPs lies outside "
      f"the law's support ({details}): the law cannot say what is best at this budget; "
      "pass --allow-extrapolation (allow_extrapolation=True) to plan there anyway, or "
      "restrict the candidates (--models, --max-steps, --batch-sizes)")


def plan(*, compute: float, epsilon: float, delta: float, users: int,
         law: dict | str | None = None, seq_len: int | None = None,
         models: Sequence[str] | None = None, batch_sizes: Sequence[int] | None = None,
         grid=None, steps_per_octave: int = 16, max_steps: int | None = None,
         allow_extrapolation: bool = False,
         model_sizes: int = MODEL_SIZES) -> dict[str, Any]:
  """The compute-optimal private configuration for a budget, inside the law's support.

  Args:
    compute: FLOPs budget C (an upper limit).
    epsilon, delta: the privacy budget, example-level Poisson DP-SGD over
      ``users`` privacy units (one example per unit, or ULS over users).
    users: N, number of privacy units; q = B / N.
    law: a law dict or path (default: the one shipped with dpfl).
    seq_len: tokens per example (default: the law's; another one is outside
      the law's support).
    models: only these model names of the law (default: ``model_sizes``
      log-spaced sizes between the law's smallest and largest model).
    batch_sizes: candidate expected batch sizes (default: powers of two <= N,
      and N).
    grid: σ grid dict or path (default: the shipped one).
    steps_per_octave: resolution of the steps ladder (16: ~4.4% apart).
    max_steps: most steps considered (default: ``STEPS_EXTRAPOLATION`` times
      the law's most steps; also capped by the σ grid).
    allow_extrapolation: plan over every candidate, inside the law's support
      or not (the loss is then ``fit.predict(..., extrapolate=True)``).
    model_sizes: sizes on the model-size axis between the law's smallest and
      largest model.

  Returns:
    A JSON-serialisable dict: the plan's ``params`` (the model size),
    ``model`` (the law's fitted model nearest that size, in log params),
    ``batch_size``, ``steps``, ``sampling_prob``, ``epochs``,
    ``noise_multiplier``, ``noise_batch_ratio``, ``predicted_loss``,
    ``compute`` (used) and ``compute_budget``; ``smallest_compute_within_1pct``
    (a config dict) and ``configs_within_2pct`` (best steps per (model size,
    batch size), by loss); ``support`` (``fit.support(law)``);
    ``extrapolated`` (the ``DIMENSIONS`` the plan lies outside of; empty
    unless ``allow_extrapolation``); ``at_support_corner`` (the dimensions where the
    plan sits on a corner the optimum may lie beyond: the smallest or largest
    model, the fewest steps — ``support_corners``; refused unless
    ``allow_extrapolation``);
    ``data_limited`` (``q = 1`` / ``epochs``: the constraints that bind);
    ``sigma_bound`` (σ is a clamped upper
    bound: q below the grid, or δ above it); and the law's ``placeholder``
    flag.

  Raises:
    ValueError: bad arguments; or, without ``allow_extrapolation``, a
      message starting with one of ``DIMENSIONS`` when the plan would leave
      the law's support (the module docstring gives the rule).
  """
  law = law if isinstance(law, dict) else _fit.load_law(law)
  law_seq = _fit.support(law).get("seq_len")
  # Checked again by _choose; here before the enumeration, so it is refused at once.
  if not allow_extrapolation and seq_len is not None and law_seq is not None and (
      check.positive_int("seq_len", seq_len) != int(law_seq)):
    raise ValueError(
        f"sequence length: seq_len={seq_len} differs from the law's {law_seq} (a law predicts "
        "the loss at the sequence length it was fitted on); pass --allow-extrapolation "
        "(allow_extrapolation=True) to plan anyway")
  c = candidates(compute=compute, epsilon=epsilon, delta=delta, users=users, law=law,
                 seq_len=seq_len, models=models, batch_sizes=batch_sizes, grid=grid,
                 steps_per_octave=steps_per_octave, max_steps=max_steps,
                 model_sizes=model_sizes)
  return _choose(c, compute=float(compute), epsilon=float(epsilon), delta=float(delta),
                 users=int(users), allow_extrapolation=allow_extrapolation)


def plans(*, computes: Sequence[float], **kw) -> list[dict | ValueError]:
  """``plan`` at each of ``computes`` (other arguments as ``plan``'s): the plan, or the
  ValueError that refuses it. One enumeration, at the largest budget (the
  candidates at a smaller one are those within it).

  Raises:
    ValueError: bad arguments (as ``plan``), or the largest budget is below
      the smallest configuration.
  """
  computes = [check.positive("computes (each)", v) for v in computes]
  if not computes:
    return []
  law = kw.pop("law", None)
  kw["law"] = law if isinstance(law, dict) else _fit.load_law(law)
  allow = kw.pop("allow_extrapolation", False)
  c = candidates(compute=max(computes), **kw)
  steps_lo = float(c["support"]["steps"][0]) * (1 - _REL)
  out = []
  for compute in computes:
    sub = _subset(c, c["flops"] <= compute * (1 + 1e-12))
    try:
      if c["ladder_below_support"] and not (sub["steps"] >= steps_lo).any():
        # candidates() keeps fewer steps than measured only when nothing else fits.
        out.append(plan(compute=compute, allow_extrapolation=allow, **kw))
      else:
        out.append(_choose(sub, compute=compute, epsilon=float(kw["epsilon"]),
                           delta=float(kw["delta"]), users=int(kw["users"]),
                           allow_extrapolation=allow))
    except ValueError as err:
      out.append(err)
  return out


def _choose(c: dict, *, compute: float, epsilon: float, delta: float, users: int,
            allow_extrapolation: bool) -> dict[str, Any]:
  """The plan among candidates ``c`` (the module docstring gives the rule)."""
  if not len(c["steps"]):
    raise ValueError(f"compute={compute:g} FLOPs is below the smallest configuration")
  if not allow_extrapolation and c["outside"]["sequence length"][0]:
    law_seq = c["support"].get("seq_len")
    raise ValueError(
        f"sequence length: seq_len={c['seq_len']} " + (
            "but the law records none" if law_seq is None else
            f"differs from the law's {law_seq}") +
        " (a law predicts the loss at the sequence length it was fitted on); pass "
        "--allow-extrapolation (allow_extrapolation=True) to plan anyway")
  if not allow_extrapolation and c["ladder_below_support"] and not (
      c["steps"] >= float(c["support"]["steps"][0]) * (1 - _REL)).any():
    raise ValueError(
        f"steps: no configuration within {compute:.3g} FLOPs trains the law's fewest steps "
        f"({c['support']['steps'][0]:g}); pass --allow-extrapolation "
        "(allow_extrapolation=True) to plan anyway")
  loss, flops, outside = c["predicted_loss"], c["flops"], c["outside"]
  if allow_extrapolation:
    pool = np.ones(len(loss), bool)
  else:
    data_ok = ~outside["q = 1"] & ~outside["epochs"]
    if not data_ok.any():
      dim = "q = 1" if outside["q = 1"].all() else "epochs"
      i = _argmin(loss, flops, ~outside["q = 1"] if dim == "epochs" else None)
      raise ValueError(
          f"{dim}: every configuration within {compute:.3g} FLOPs on {users} users lies "
          f"outside the law's support (best: {_outside_detail(c, i, dim)}); pass "
          "--allow-extrapolation (allow_extrapolation=True) to plan anyway")
    best = _argmin(loss, flops, data_ok)
    dims = dimensions_outside(c, best)
    if dims or not math.isfinite(loss[best]):
      raise _refusal(c, best, dims or ["model size"], compute)
    corners = support_corners(c, best)
    if corners:
      dim, why = corners[0]
      raise ValueError(
          f"{dim}: the best configuration for {compute:.3g} FLOPs inside the law's support "
          f"{why}: the compute-optimal configuration for this budget may lie beyond it, where "
          "the law has measured nothing; pass --allow-extrapolation (allow_extrapolation=True) "
          "to plan anyway" + (", or --models to choose among the law's models"
                              if dim == "model size" else ""))
    pool = c["inside"]
  best = _argmin(loss, flops, pool)
  out = _row(c, best)
  best_loss = out["predicted_loss"]
  idx = np.nonzero(pool)[0]
  # Smallest compute within 1%: cumulative minimum of loss in compute order.
  order = idx[np.lexsort((loss[idx], flops[idx]))]
  running = np.minimum.accumulate(loss[order])
  first = int(np.argmax(running <= best_loss * (1 + WITHIN_BEST)))
  small = _row(c, int(order[first]))
  # Within 2%: the best steps of every (model size, batch size).
  near = idx[loss[idx] <= best_loss * (1 + WITHIN_CONFIGS)]
  _, pairs = np.unique(np.stack([c["params"][near], c["batch_size"][near]]), axis=1,
                       return_inverse=True)
  pairs = pairs.ravel()
  by_pair = np.lexsort((flops[near], loss[near], pairs))   # per pair: lowest loss first
  heads = by_pair[np.r_[True, np.diff(pairs[by_pair]) != 0]]
  configs = [_row(c, int(i)) for i in near[heads]]
  configs.sort(key=lambda r: (r["predicted_loss"], r["compute"]))
  # The data dimensions that bind: the best over every candidate (extrapolated)
  # trains on more data (q = 1 or more epochs) than the law has seen.
  data_limited = []
  if not allow_extrapolation:
    overall = _argmin(loss, flops)
    data_limited = [d for d in ("q = 1", "epochs") if outside[d][overall]]
  law_ = c["law"]
  out.update({
      "compute_budget": float(compute), "epsilon": float(epsilon), "delta": float(delta),
      "users": int(users), "seq_len": c["seq_len"],
      "tokens": int(out["batch_size"] * out["steps"] * c["seq_len"]),
      "epochs": out["sampling_prob"] * out["steps"],
      "smallest_compute_within_1pct": small,
      "configs_within_2pct": configs,
      "support": c["support"],
      "extrapolated": dimensions_outside(c, best),
      "at_support_corner": [dim for dim, _ in support_corners(c, best)],
      "data_limited": data_limited,
      "sigma_bound": bool(c["sigma_bound"][best]),
      "sigma_source": "grid",
      # The accountant whose bound made this σ: with "rdp", train with
      # make_private(..., accountant="rdp") so the ledger proves the target
      # (PLD's own bound can be looser at millions of steps).
      "sigma_accountant": str(_sigma_grid.accountant(
          float(epsilon), out["steps"], max(out["sampling_prob"], c["q_floor"]),
          c["delta_used"], grid=c["sigma_table"])),
      "candidates": int(len(idx)), "max_steps": c["max_steps"],
      "law": {"placeholder": bool(law_.get("placeholder", False)),
              "description": law_.get("description", ""),
              "models": list(_fit.model_params(law_))},
  })
  return out
