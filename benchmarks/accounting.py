"""Accounting speed and accuracy against dp-accounting called directly, same run.

Measures (issue 2):
  1. ELS (k=8, q=0.01, σ=1, T=2000, δ=1e-6): dp-accounting's PLD at its
     default grid vs ``accounting.epsilon`` (cold caches); ε relative gap.
  2. σ calibration (PLD, q=0.01, T=1e4, ε=8, δ=1e-5): dp-accounting's
     ``calibrate_dp_mechanism`` vs ``accounting.calibrate_noise_multiplier``.
  3. ``dpfl epsilon`` for T=1e4, end to end (process start included), vs a
     bare script importing dp-accounting and computing the same ε; and
     ``dpfl --help``.

Prints a table of ratios and, as the last line, one JSON object.
Usage: python benchmarks/accounting.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# This file is named like the package it measures; run as a script, its own
# folder comes first on sys.path and would shadow the real `accounting`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import dp_accounting as dpa  # noqa: E402
from dp_accounting import dp_event as dpe

import accounting as A  # noqa: E402
from accounting import accountants, mechanisms  # noqa: E402
from accounting import plan as planning  # noqa: E402


def _timed(fn):
  start = time.perf_counter()
  value = fn()
  return value, time.perf_counter() - start


def _plan(*, privacy_unit: str, sampling, steps: int, delta: float, **noise):
  """dpfl's plan of the configuration (its one configuration -> mechanism map)."""
  return planning.plan_run(privacy_unit=privacy_unit, sampling=sampling, l2_clip_norm=1.0,
                           delta=delta, num_steps=steps, **noise)


def bench_els(quick: bool) -> dict:
  k, q, sigma, steps, delta = 8, 0.01, 1.0, 2000, 1e-6
  els = _plan(privacy_unit="user", delta=delta, steps=steps, noise_multiplier=sigma,
              sampling=planning.SamplingPlan(scheme="poisson", unit="example",
                                             sampling_prob=q, examples_per_user=k))
  sens, probs = mechanisms.ElsDpSgd(sigma, q, steps, k).mixture()
  event = dpe.SelfComposedDpEvent(dpe.MixtureOfGaussiansDpEvent(sigma, sens, probs), steps)

  def baseline():
    acc = dpa.pld.PLDAccountant()  # default grid, 1e-4
    acc.compose(event)
    return acc.get_epsilon(delta)

  if quick:  # the fine-grid value through our vectorised (value-identical) PLD
    accountants._ONE_STEP_CACHE.clear()
    fine, base_s = _timed(lambda: A.epsilon(els.mechanism(), delta=delta,
                                            discretization=1e-4))
    base_label = "dpfl fine grid (quick)"
  else:
    fine, base_s = _timed(baseline)
    base_label = "dp-accounting PLD default grid"
  accountants._ONE_STEP_CACHE.clear()
  ours, ours_s = _timed(els.epsilon)
  return {"baseline": base_label, "baseline_seconds": base_s, "dpfl_seconds": ours_s,
          "speedup": base_s / ours_s, "epsilon_fine": fine, "epsilon_dpfl": ours,
          "relative_gap": ours / fine - 1}


def bench_calibration() -> dict:
  q, steps, target, delta = 0.01, 10_000, 8.0, 1e-5

  def event(sigma):
    return dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)

  base_sigma, base_s = _timed(lambda: dpa.calibrate_dp_mechanism(
      dpa.pld.PLDAccountant, event, target, delta))
  accountants._ONE_STEP_CACHE.clear()
  ours, ours_s = _timed(lambda: _plan(
      privacy_unit="example", delta=delta, steps=steps, target_epsilon=target,
      sampling=planning.SamplingPlan(scheme="poisson", sampling_prob=q)).noise_multiplier)
  acc = dpa.pld.PLDAccountant()
  acc.compose(event(ours))
  return {"baseline_seconds": base_s, "dpfl_seconds": ours_s, "speedup": base_s / ours_s,
          "sigma_dp_accounting": base_sigma, "sigma_dpfl": ours,
          "sigma_relative_gap": ours / base_sigma - 1,
          "epsilon_dp_accounting_at_dpfl_sigma": acc.get_epsilon(delta)}


_BARE = """
import dp_accounting as dpa
acc = dpa.pld.PLDAccountant()
acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.0)), 10000))
print(acc.get_epsilon(1e-5))
"""


def bench_cli(repeats: int) -> dict:
  exe = os.path.join(os.path.dirname(sys.executable), "dpfl")
  cli = [exe, "epsilon", "--noise-multiplier", "1.0", "--sampling-prob", "0.01", "--steps",
         "10000", "--delta", "1e-5", "--json"]
  bare = [sys.executable, "-c", _BARE]
  helps = [exe, "--help"]
  times = {"cli": [], "bare": [], "help": []}
  outputs = {}
  subprocess.run(bare, capture_output=True, check=True)  # warm the file cache
  for _ in range(repeats):  # interleaved, so drifts hit both alike
    for name, cmd in (("cli", cli), ("bare", bare), ("help", helps)):
      proc, seconds = _timed(lambda: subprocess.run(cmd, capture_output=True, text=True,
                                                    check=True))
      times[name].append(seconds)
      outputs[name] = proc.stdout
  eps_cli = json.loads(outputs["cli"].strip().splitlines()[-1])["epsilon"]
  eps_bare = float(outputs["bare"].strip())
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"cli_seconds": med["cli"], "bare_seconds": med["bare"], "help_seconds": med["help"],
          "ratio": med["cli"] / med["bare"], "same_epsilon": eps_cli == eps_bare}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--quick", action="store_true",
                      help="skip the ~70 s dp-accounting fine-grid ELS baseline")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  els = bench_els(args.quick)
  cal = bench_calibration()
  cli = bench_cli(args.repeats)
  rows = [
      ("ELS k=8 epsilon", els["baseline_seconds"], els["dpfl_seconds"],
       f"{els['speedup']:.1f}x faster", f"eps gap {els['relative_gap']:+.3%}"),
      ("calibrate sigma (eps=8, T=1e4)", cal["baseline_seconds"], cal["dpfl_seconds"],
       f"{cal['speedup']:.1f}x faster", f"sigma gap {cal['sigma_relative_gap']:+.3%}"),
      ("dpfl epsilon T=1e4, end to end", cli["bare_seconds"], cli["cli_seconds"],
       f"{cli['ratio']:.2f}x of bare", f"same eps: {cli['same_epsilon']}"),
  ]
  print(f"{'case':34} {'baseline s':>11} {'dpfl s':>9}  {'ratio':>16}  accuracy")
  for name, base, ours, ratio, acc in rows:
    print(f"{name:34} {base:11.3f} {ours:9.3f}  {ratio:>16}  {acc}")
  print(f"{'dpfl --help':34} {'':11} {cli['help_seconds']:9.3f}")
  print(json.dumps({"els": els, "calibration": cal, "cli": cli}, sort_keys=True))


if __name__ == "__main__":
  main()
