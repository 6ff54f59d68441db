"""``dpfl mf --sampling cyclic-poisson``: amplified banded MF, its ε or calibrated σ.

  dpfl mf --strategy banded --bands M --sampling cyclic-poisson
          (--sampling-prob Q | --dataset-size N --batch-size B) --steps T
          (--noise-multiplier S | --target-epsilon E) --delta D [--objective max|mean] [--json]

Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorizations"
(arXiv 2306.08153): the examples are split once into ``M`` groups, step
``t`` Poisson-samples group ``t mod M`` at rate ``q``, and the noise is
correlated by a column-normalised ``M``-banded ``C``. The run is as private
as DP-SGD with rate ``q`` and noise multiplier ``S`` for ``ceil(T / M)``
steps (``accounting.AmplifiedBandedMatrixMechanism``). With ``--dataset-size
N --batch-size B``, ``q = B / (N // M)`` (``dpfl.ftrl.cyclic_poisson_rate``,
as ``make_private``'s ``CyclicPoissonSampler``: ``M`` groups of ``N // M``
examples, the remainder never sampled).

The strategy and the account are ``make_private``'s own: ``dpfl.ftrl.plan``
builds the banded ``C`` that ``make_private(strategy="banded",
sampling_scheme="poisson", strategy_options={"bands": M, ...})`` trains
with (for ``ceil(T / M) * M`` planned steps) and ``accounting.plan.plan_run``
gives ε or calibrates σ. The result has ``dpfl mf``'s keys; ``sensitivity``
is the largest column norm of ``C`` (what the noise is scaled by here, so
``noise_stddev = noise_multiplier * sensitivity``), and ``max_loss`` /
``mean_loss`` are ``sensitivity^2`` times the largest / mean squared row
norm of ``B = A C^{-1}`` over the planned steps.

Standard library only at import time, like ``dpfl.mf.cli``.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from typing import Any

SAMPLINGS = ("cyclic", "cyclic-poisson")
# Library argument names -> flags, for messages raised below the CLI.
_FLAG_OF = {"dataset_size": "--dataset-size", "batch_size": "--batch-size",
            "sampling_prob": "--sampling-prob", "bands": "--bands", "num_steps": "--steps",
            "objective": "--objective", "noise_multiplier": "--noise-multiplier",
            "target_epsilon": "--target-epsilon", "delta": "--delta"}
# Flags of the cyclic (k, b)-participation form that cyclic Poisson sampling fixes itself.
_CYCLIC_ONLY = (("epochs", "--participations"), ("min_sep", "--min-sep"),
                ("buffers", "--buffers"), ("participation", "--participation"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the sampling flags of ``dpfl mf`` (amplified banded MF) to ``parser``."""
  group = parser.add_argument_group(
      "sampling (amplified banded MF)",
      "--sampling cyclic-poisson: --strategy banded only; the examples are split once into\n"
      "M = --bands groups and step t samples group t mod M at rate q (DP-SGD-like\n"
      "amplification). Give the rate, or the data: q = B / (N // M), as make_private's\n"
      "cyclic Poisson sampler (M groups of N // M examples, the rest never sampled).\n"
      "Needs --noise-multiplier or --target-epsilon, with --delta.")
  group.add_argument("--sampling", choices=SAMPLINGS,
                     help="cyclic (default: one fixed order, the (k, b)-participation of "
                          "--participations/--min-sep) or cyclic-poisson (amplified banded MF)")
  rate = group.add_mutually_exclusive_group()
  rate.add_argument("--sampling-prob", type=float, metavar="Q",
                    help="cyclic-poisson: rate within the active group, in (0, 1]")
  rate.add_argument("--dataset-size", type=int, metavar="N",
                    help="cyclic-poisson: examples, >= --bands (with --batch-size)")
  group.add_argument("--batch-size", type=int, metavar="B",
                     help="cyclic-poisson: expected batch, in [1, N // M] (q = B / (N // M))")


def requested(args: argparse.Namespace) -> bool:
  """True for ``--sampling cyclic-poisson``; its flags without it are a ``ValueError``."""
  sampling = getattr(args, "sampling", None)
  if sampling not in (None, *SAMPLINGS):
    raise ValueError(f"--sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
  if sampling == "cyclic-poisson":
    return True
  for name in ("sampling_prob", "dataset_size", "batch_size"):
    if getattr(args, name, None) is not None:
      flag = "--" + name.replace("_", "-")
      raise ValueError(f"{flag} applies only with --sampling cyclic-poisson (amplified "
                       "banded MF); the cyclic default has one unit per step")
  return False


def _flagged(message: str) -> str:
  return re.sub(r"(?<![-\w])(" + "|".join(_FLAG_OF) + r")\b",
                lambda m: _FLAG_OF[m.group(1)], message)


def _sampling(args: argparse.Namespace, steps: int, bands: int | None):
  """``(bands, sampling_prob, dataset_size, batch_size)`` from the flags, checked."""
  from accounting import validate as check
  from dpfl import ftrl
  q, n, batch = (getattr(args, name, None) for name in
                 ("sampling_prob", "dataset_size", "batch_size"))
  if q is not None and (n is not None or batch is not None):
    raise ValueError("--sampling-prob excludes --dataset-size/--batch-size: give the rate, or "
                     "the data set and batch size (q = B / (N // M))")
  if q is None and (n is None or batch is None):
    missing = "--batch-size" if n is not None else "--dataset-size"
    if n is None and batch is None:
      raise ValueError("--sampling cyclic-poisson needs --sampling-prob Q (in (0, 1]) or "
                       "--dataset-size N with --batch-size B")
    raise ValueError(f"{missing} is required with "
                     f"{'--dataset-size' if n is not None else '--batch-size'} (an integer "
                     ">= 1; q = B / (N // M))")
  if n is not None:
    n = check.positive_int("--dataset-size", n)
  default = bands is None
  if default:  # make_private's default, from the one place that decides it
    bands = ftrl.bands_for({}, limit=steps, why=f"--steps={steps}")
  high, why = steps, f"at most --steps={steps}: more groups than steps are never sampled"
  if n is not None and n < steps:
    high, why = n, f"at most --dataset-size={n}: each band is a group of >= 1 example"
  try:
    bands = check.integer("--bands", bands, low=1, high=high)
  except ValueError as err:
    given = f"; {bands} is the default min({ftrl.DEFAULT_BANDS}, --steps)" if default else ""
    raise ValueError(f"{err} ({why}{given})") from None
  if q is not None:
    return bands, check.probability("--sampling-prob", q), None, None
  try:
    q = ftrl.cyclic_poisson_rate(dataset_size=n, batch_size=batch, bands=bands)
  except ValueError as err:
    raise ValueError(_flagged(str(err))) from None
  return bands, q, n, int(batch)


def _settings(args: argparse.Namespace, privacy: dict) -> dict[str, Any]:
  from accounting import validate as check
  strategy = getattr(args, "strategy", None)
  if strategy != "banded":
    raise ValueError(f"--sampling cyclic-poisson needs --strategy banded (amplified banded "
                     f"MF, Choquette-Choo et al. 2023), got --strategy {strategy}")
  for name, flag in _CYCLIC_ONLY:
    if getattr(args, name, None) is not None:
      raise ValueError(f"{flag} does not apply with --sampling cyclic-poisson: each example "
                       "is sampled at most ceil(T / M) times, M = --bands steps apart")
  if not privacy:
    raise ValueError("--sampling cyclic-poisson needs --noise-multiplier S (report epsilon) or "
                     "--target-epsilon E (calibrate the noise multiplier), with --delta in "
                     "(0, 1)")
  objective = getattr(args, "objective", None)
  objective = "mean" if objective is None else check.choice("--objective", objective,
                                                            ("max", "mean"))
  steps = check.num_steps("--steps", getattr(args, "steps", None))
  bands, q, n, batch = _sampling(args, steps, getattr(args, "bands", None))
  k = math.ceil(steps / bands)
  return {"strategy": "banded", "steps": steps, "epochs": k, "min_sep": bands,
          "bands": bands, "buffers": None, "objective": objective,
          # Each example at most once per M-step group, M steps apart: the
          # min-separation pattern the amplified analysis takes (as dpfl.ftrl).
          "participation": "min-sep", "sampling": "cyclic-poisson", "sampling_prob": q, "dataset_size": n,
          "batch_size": batch, "planned_steps": k * bands, **privacy}


def run(args: argparse.Namespace, *, privacy: dict) -> dict[str, Any]:
  """The amplified banded run ``args`` describe: its strategy's numbers and its ε (or σ).

  Args:
    args: the parsed ``dpfl mf`` flags, with ``--sampling cyclic-poisson``.
    privacy: ``dpfl.mf.cli``'s checked ``noise_multiplier`` or
      ``target_epsilon``, and ``delta`` (empty when none was given).

  Raises:
    ValueError: on bad flags, with a message naming the flag and its range.
  """
  settings = _settings(args, privacy)
  from accounting import plan as planning
  from dpfl import ftrl
  try:
    sampling = planning.SamplingPlan(
        scheme="cyclic_poisson", unit="example", population_size=settings["dataset_size"],
        sampling_prob=settings["sampling_prob"], num_groups=settings["bands"],
        batch_size=settings["batch_size"])
    start = time.perf_counter()
    # make_private's path: the same options build the same C (and its fingerprint).
    mf = ftrl.plan("banded", {"bands": settings["bands"], "objective": settings["objective"]},
                   sampling=sampling, num_steps=settings["steps"])
    seconds = time.perf_counter() - start
    # The clip norm does not enter ε (the noise is relative to it): 1 stands for C.
    plan = planning.plan_run(privacy_unit="example", sampling=sampling, l2_clip_norm=1.0,
                             delta=settings["delta"], num_steps=settings["steps"],
                             noise=mf.noise, noise_multiplier=settings.get("noise_multiplier"),
                             target_epsilon=settings.get("target_epsilon"))
    sensitivity = mf.noise.sensitivity
    row_errors = mf.strategy.row_errors()
    numbers = {"sensitivity": sensitivity, "sensitivity_exact": True,
               "max_loss": sensitivity ** 2 * float(row_errors.max()),
               "mean_loss": sensitivity ** 2 * float(row_errors.mean()),
               "noise_multiplier": plan.noise_multiplier, "epsilon": plan.epsilon(),
               "noise_stddev": plan.noise_multiplier * sensitivity, "plan": plan.to_dict()}
  except ValueError as err:
    raise ValueError(_flagged(str(err))) from None
  return {**settings, **numbers, "seconds": seconds}


def format_table(result: dict[str, Any]) -> str:
  """The human-readable report of ``run``'s result."""
  if result["dataset_size"] is not None:
    rate = (f"q = {result['sampling_prob']:.6g} (batch {result['batch_size']} of "
            f"{result['dataset_size']} // {result['bands']})")
  else:
    rate = f"q = {result['sampling_prob']:.6g}"
  lines = [f"dpfl mf: amplified banded MF, {result['bands']} bands, cyclic Poisson sampling "
           f"{rate}, {result['steps']} steps",
           f"  as DP-SGD over ceil({result['steps']} / {result['bands']}) = {result['epochs']} "
           "steps (accounting.AmplifiedBandedMatrixMechanism)"]
  label = ("noise_multiplier (calibrated)" if "target_epsilon" in result
           else "noise_multiplier")
  rows = [("objective", result["objective"]), ("planned_steps", result["planned_steps"]),
          ("sensitivity", f"{result['sensitivity']:.6g} (largest column norm)"),
          ("max_loss", f"{result['max_loss']:.6g}"),
          ("mean_loss", f"{result['mean_loss']:.6g}"), ("seconds", f"{result['seconds']:.3g}"),
          (label, f"{result['noise_multiplier']:.6g}"),
          ("noise_stddev", f"{result['noise_stddev']:.6g} (clip norms per step)"),
          ("epsilon", f"{result['epsilon']:.6g} at delta={result['delta']:g}")]
  lines += [f"  {name:<22} {value}" for name, value in rows]
  return "\n".join(lines)
