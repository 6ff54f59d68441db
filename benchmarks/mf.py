"""Matrix-factorization strategy optimization: dpfl vs jax-privacy, same problems, same run.

Each case optimizes the same problem with both libraries (same ``n``, number
of bands or buffers, participation and objective) and evaluates both results
with the same code (``dpfl.mf`` losses, which the tests check against dense
computation), so "loss" columns compare like with like:

  blt      3-buffer BLT, single participation, max loss (jax-privacy:
           ``buffered_toeplitz.optimize(n, min_buffers=3, max_buffers=3)``)
  blt      3-buffer BLT, 4 participations (b-min-separation), mean loss
           (``buffered_toeplitz.optimize(n, min_sep=b, max_participations=4,
           error="mean", ...)``)
  dense    dense, single participation, mean loss (``dense.optimize(n)``)
  banded   32-band general banded, single participation, mean loss
           (``banded.optimize(n, bands=32)``)
  fixed-epoch rows (issue 15): dense, banded (32 bands) and BLT (3 buffers)
           at n = 256 .. 2048, k = 4, mean loss, under fixed-epoch order
           (dense: jax-privacy's ``dense.optimize(n, epochs=4)``)

Timing. dpfl: one warm-up, then the median of ``--repeats`` runs. jax-privacy:
``--jp-repeats`` runs (default 1; each call jit-compiles its own closures, so
a warm-up would not remove compilation, and one call takes minutes on 2 CPU
cores). Both run in this process with their libraries' defaults (dpfl pins
BLAS to one thread during optimization when threadpoolctl is installed;
jax-privacy runs XLA as configured). Absolute seconds on a shared CPU are
noise; the speedup and the relative loss difference (``dpfl / jax-privacy -
1``, negative = dpfl better) are the figures to quote. Target: speedup >= 10
at rel diff <= +0.5%.

If ``benchmarks/_mf_streaming.py`` defines ``bench_streaming(quick)``, its
result is included under "streaming".

Usage: python benchmarks/mf.py [--quick] [--repeats N] [--jp-repeats N] [--json]
(``--json``: one JSON object as the last stdout line).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

# Run as a script, this folder comes first on sys.path and its accounting.py
# would shadow the real `accounting` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402

import dpfl.mf as mf  # noqa: E402


def _timed(fn, repeats: int, warmup: bool):
  if warmup:
    fn()
  times, value = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return value, statistics.median(times)


def _jax_privacy():
  try:
    import jax
    from jax_privacy import matrix_factorization as jpmf
  except ImportError:
    return None
  # jax-privacy's optimizers expect float64 (its docs: enable x64); dpfl is numpy.
  jax.config.update("jax_enable_x64", True)
  return jpmf


def _cases(quick: bool) -> list[dict]:
  if quick:
    return [
        {"name": "blt", "n": 128, "buffers": 3, "k": 1, "objective": "max"},
        {"name": "blt", "n": 128, "buffers": 3, "k": 4, "objective": "mean"},
        {"name": "dense", "n": 128, "k": 1, "objective": "mean"},
        {"name": "banded", "n": 256, "bands": 8, "k": 1, "objective": "mean"},
    ]
  return [
      {"name": "blt", "n": 256, "buffers": 3, "k": 1, "objective": "max"},
      {"name": "blt", "n": 2048, "buffers": 3, "k": 1, "objective": "max"},
      {"name": "blt", "n": 1024, "buffers": 3, "k": 4, "objective": "mean"},
      {"name": "dense", "n": 1024, "k": 1, "objective": "mean"},
      {"name": "banded", "n": 2048, "bands": 32, "k": 1, "objective": "mean"},
      *_fixed_epoch_cases(),
  ]


def _fixed_epoch_cases() -> list[dict]:
  """Issue 15: fixed-epoch order (what cyclic training has), k = 4, n = 256 .. 2048.

  jax-privacy's counterparts: ``dense.optimize(n, epochs=k)`` (optimized for
  the fixed-epoch pattern), and its banded / BLT optimizers, whose strategies
  (column-normalized bands <= b; non-negative Toeplitz) have the same
  sensitivity under fixed-epoch as under min-separation.
  """
  fixed = {"k": 4, "objective": "mean", "participation": "fixed-epoch"}
  return ([{"name": "dense", "n": n, **fixed} for n in (256, 512, 1024)]
          + [{"name": "banded", "n": n, "bands": 32, **fixed} for n in (256, 512, 1024, 2048)]
          + [{"name": "blt", "n": n, "buffers": 3, **fixed} for n in (256, 512, 1024, 2048)])


def _participation(case: dict):
  n, k = case["n"], case["k"]
  if case.get("participation") == "fixed-epoch":
    return mf.FixedEpoch(k, n // k)
  return (k, n // k)


def _label(case: dict) -> str:
  extra = (f", {case['buffers']} buffers" if "buffers" in case else
           f", {case['bands']} bands" if "bands" in case else "")
  part = "single" if case["k"] == 1 else f"k={case['k']}"
  if case.get("participation") == "fixed-epoch":
    part += " fixed-epoch"
  return f"{case['name']} n={case['n']}{extra}, {part}, {case['objective']}"


def _dpfl_fn(case: dict):
  n, p = case["n"], _participation(case)
  objective = case["objective"]
  if case["name"] == "blt":
    return lambda: mf.optimize_blt(n, buffers=case["buffers"], participation=p,
                                   objective=objective)
  if case["name"] == "dense":
    return lambda: mf.optimize_dense(n, participation=p, objective=objective)
  return lambda: mf.optimize_banded(n, bands=case["bands"], participation=p, objective=objective)


def _jp_fn(jpmf, case: dict):
  """A jax-privacy call for the case, and how to turn its result into a dpfl strategy."""
  import jax.numpy as jnp
  n, k = case["n"], case["k"]
  p = _participation(case)
  if case["name"] == "blt":
    def run():
      return jpmf.buffered_toeplitz.optimize(
          n=n, min_sep=n // k, max_participations=k, error=case["objective"],
          min_buffers=case["buffers"], max_buffers=case["buffers"])

    def convert(blt):
      return mf.BltStrategy(num_steps=n, participation=p, workload=None,
                            buffer_decay=np.asarray(blt.buf_decay),
                            output_scale=np.asarray(blt.output_scale))
    return run, convert
  if case["name"] == "dense":
    def run():
      if case.get("participation") == "fixed-epoch":
        return jpmf.dense.optimize(n, epochs=k, reduction_fn=jnp.mean)
      return jpmf.dense.optimize(n, reduction_fn=jnp.mean)

    def convert(C):
      return mf.DenseStrategy(num_steps=n, participation=p, workload=None,
                              values=np.asarray(C, dtype=float))
    return run, convert

  def run():
    return jpmf.banded.optimize(n, bands=case["bands"], reduction_fn=jnp.mean)

  def convert(strategy):
    C = np.asarray(strategy.materialize(), dtype=float)
    diagonals = np.stack([np.concatenate([np.diag(C, -d), np.zeros(d)])
                          for d in range(case["bands"])])
    return mf.BandedStrategy(num_steps=n, participation=p, workload=None, diagonals=diagonals)
  return run, convert


def bench_case(case: dict, jpmf, repeats: int, jp_repeats: int) -> dict:
  objective = case["objective"]
  ours, ours_s = _timed(_dpfl_fn(case), repeats, warmup=True)
  row = {"case": _label(case), **case, "dpfl_seconds": ours_s,
         "loss_dpfl": ours.loss(objective), "sensitivity_dpfl": ours.sensitivity}
  if jpmf is None:
    return row
  run, convert = _jp_fn(jpmf, case)
  result, jp_s = _timed(run, jp_repeats, warmup=False)
  theirs = convert(result)
  row.update(jax_privacy_seconds=jp_s, speedup=jp_s / ours_s,
             loss_jax_privacy=theirs.loss(objective),
             sensitivity_jax_privacy=theirs.sensitivity)
  row["rel_diff"] = row["loss_dpfl"] / row["loss_jax_privacy"] - 1
  return row


def _streaming(quick: bool):
  path = os.path.join(_HERE, "_mf_streaming.py")
  if not os.path.exists(path):
    return None
  spec = importlib.util.spec_from_file_location("_mf_streaming", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "bench_streaming"):
    return None
  return module.bench_streaming(quick)


def _table(rows: list[dict]) -> str:
  head = (f"{'case':<44} {'jax-privacy s':>13} {'dpfl s':>8} {'speedup':>8} "
          f"{'loss jp':>11} {'loss dpfl':>11} {'rel diff':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if "speedup" in r:
      lines.append(f"{r['case']:<44} {r['jax_privacy_seconds']:>13.2f} {r['dpfl_seconds']:>8.3f} "
                   f"{r['speedup']:>7.0f}x {r['loss_jax_privacy']:>11.6g} {r['loss_dpfl']:>11.6g} "
                   f"{100 * r['rel_diff']:>+8.3f}%")
    else:
      lines.append(f"{r['case']:<44} {'(not installed)':>13} {r['dpfl_seconds']:>8.3f} {'':>8} "
                   f"{'':>11} {r['loss_dpfl']:>11.6g}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--quick", action="store_true", help="small n (CI-sized)")
  parser.add_argument("--repeats", type=int, default=5, help="timed dpfl runs (median)")
  parser.add_argument("--jp-repeats", type=int, default=1, help="timed jax-privacy runs (median)")
  parser.add_argument("--json", action="store_true", help="one JSON object as the last line")
  args = parser.parse_args()
  jpmf = _jax_privacy()
  rows = []
  for case in _cases(args.quick):
    rows.append(bench_case(case, jpmf, args.repeats, args.jp_repeats))
    print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
  print(_table(rows))
  out = {"benchmark": "mf", "quick": args.quick, "jax_privacy": jpmf is not None, "cases": rows}
  streaming = _streaming(args.quick)
  if streaming is not None:
    out["streaming"] = streaming
    print(f"streaming BLT noise per step vs iid: {json.dumps(streaming)}")
  compared = [r for r in rows if "speedup" in r]
  if compared:
    out["min_speedup"] = min(r["speedup"] for r in compared)
    out["max_rel_diff"] = max(r["rel_diff"] for r in compared)
    out["target_met"] = out["min_speedup"] >= 10 and out["max_rel_diff"] <= 0.005
  if args.json:
    print(json.dumps(out))


if __name__ == "__main__":
  main()
