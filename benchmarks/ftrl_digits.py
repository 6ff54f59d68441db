"""DP-FTRL vs DP-SGD utility at equal ε on the digits example (``examples/digits.py``).

For each mechanism, the learning rate is tuned at the middle ε on seed 0 (a
small public grid; tuning on held-out accuracy is itself not private, as in
most papers: say so when quoting), then every ε is run on seeds 1-3 with that
rate. Each run calibrates σ for its target ε through ``dpfl.make_private``,
so all rows spend the same (ε, δ).

Mechanisms (same model, clip norm, batch size and epochs):
  dp-sgd (adam)      Poisson sampling, iid noise, Adam (the example's default)
  dp-sgd (sgd-m)     Poisson sampling, iid noise, SGD with momentum 0.9
  dp-ftrl blt        cyclic order, BLT noise (4 buffers) optimized for momentum 0.9
  dp-ftrl dense      cyclic order, dense multi-epoch strategy for momentum 0.9
  dp-ftrl banded+amp cyclic Poisson sampling over 4 groups, 4-banded (amplified)

Prints a table and, as the last line, one JSON object with ``rows``.
Usage: python benchmarks/ftrl_digits.py [--quick] [--epsilons 1,3,8]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

_spec = importlib.util.spec_from_file_location(
    "digits_example", os.path.join(_HERE, os.pardir, "examples", "digits.py"))
digits = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = digits  # flax's dataclasses look their module up
_spec.loader.exec_module(digits)

MECHANISMS = {
    "dp-sgd (adam)": (["--optimizer", "adam"], [3e-3, 1e-2, 3e-2]),
    "dp-sgd (sgd-m)": (["--optimizer", "sgd"], [0.05, 0.1, 0.2]),
    "dp-ftrl blt": (["--strategy", "blt", "--buffers", "4"], [0.05, 0.1, 0.2]),
    "dp-ftrl dense": (["--strategy", "dense"], [0.05, 0.1, 0.2]),
    "dp-ftrl banded+amp": (["--strategy", "banded", "--bands", "4", "--sampling", "poisson"],
                           [0.05, 0.1, 0.2]),
}


def run(flags: list[str], *, epsilon: float, lr: float, seed: int, common: list[str]) -> dict:
  argv = ["--json", "--target-epsilon", str(epsilon), "--learning-rate", str(lr),
          "--seed", str(seed), *common, *flags]
  with contextlib.redirect_stdout(io.StringIO()):
    return digits.main(argv)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--epsilons", default="1,3,8")
  parser.add_argument("--seeds", default="1,2,3")
  parser.add_argument("--epochs", type=float, default=40)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--quick", action="store_true", help="one ε, one seed, no tuning")
  args = parser.parse_args(argv)
  epsilons = [float(e) for e in args.epsilons.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  common = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
  if args.quick:
    epsilons, seeds = [3.0], [1]
  tune_epsilon = epsilons[len(epsilons) // 2]
  rows = []
  for name, (flags, grid) in MECHANISMS.items():
    if args.quick:
      lr = grid[1]
    else:
      scores = {lr: run(flags, epsilon=tune_epsilon, lr=lr, seed=0, common=common)["accuracy"]
                for lr in grid}
      lr = max(scores, key=scores.get)
    for epsilon in epsilons:
      results = [run(flags, epsilon=epsilon, lr=lr, seed=s, common=common) for s in seeds]
      accs = [r["accuracy"] for r in results]
      rows.append({"mechanism": name, "target_epsilon": epsilon,
                   "epsilon": max(r["epsilon"] for r in results),
                   "noise_multiplier": results[0]["noise_multiplier"],
                   "learning_rate": lr, "steps": results[0]["steps"],
                   "accuracy": statistics.mean(accs), "accuracy_min": min(accs),
                   "accuracy_max": max(accs), "seeds": len(seeds)})
      print(f"{name:<20} ε={epsilon:<4g} σ={rows[-1]['noise_multiplier']:<7.3f} lr={lr:<6g} "
            f"acc {rows[-1]['accuracy']:.4f} ({min(accs):.3f}-{max(accs):.3f})",
            file=sys.stderr)
  print(f"{'mechanism':<20} {'target ε':>8} {'ε':>7} {'σ':>7} {'lr':>6} {'accuracy':>9} "
        f"{'min-max':>12}")
  for r in rows:
    print(f"{r['mechanism']:<20} {r['target_epsilon']:>8g} {r['epsilon']:>7.3f} "
          f"{r['noise_multiplier']:>7.3f} {r['learning_rate']:>6g} {r['accuracy']:>9.4f} "
          f"{r['accuracy_min']:>5.3f}-{r['accuracy_max']:.3f}")
  summary = {"benchmark": "ftrl_digits", "epochs": args.epochs, "batch_size": args.batch_size,
             "rows": rows}
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
