"""How tight the one-run audit gets on the built-in model: claimed ε vs the lower bound.

For each target ε (default 2, 4, 8) and seed, trains the built-in model
(``dpfl.audit.builtin``: softmax regression, 1000 examples, q = 0.1, 100
steps, σ calibrated with PLD at δ = 1e-5) once with m canaries and reports
the ledger's ε next to the 95%-confidence lower bound of
``dpfl.audit.one_run`` — white-box with Dirac canaries (the default; the
paper's summed score, and ``score="likelihood"``), white-box with canaries
along random directions of the model's own parameters (84 of them here:
fewer than the canaries, so they overlap), and black-box (mislabeled
inputs scored by the final loss) —
and the bound of the two positive controls (``inject``) at the same σ.
The ceiling ``bound.max_epsilon_lower_bound`` (every guess right, with the
same Bonferroni split) is printed too: m canaries cannot certify more.

  python benchmarks/audit_tightness.py [--eps 2 4 8] [--seeds 3] [--canaries 1000] [--json]

Prints a table (means over seeds), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Run as a script, this folder comes first on sys.path, and its accounting.py
# would shadow the real `accounting` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402

from dpfl.audit import bound, builtin, one_run  # noqa: E402

N, BATCH, STEPS, DELTA = 1000, 100, 100, 1e-5


def audit(target, seed, m, **kwargs):
  private = builtin.make_run(target_epsilon=target, delta=DELTA, dataset_size=N,
                             batch_size=BATCH, num_steps=STEPS, key=2 * seed + 1,
                             seed=2 * seed + 2)
  if kwargs.get("mode") == "black-box":
    kwargs.update(canary_examples=builtin.canary_examples(m, seed=seed),
                  loss_fn=builtin.loss_fn)
  return one_run(private, builtin.init_params(), builtin.dataset(N), num_canaries=m,
                 seed=1000 + seed, **kwargs)


VARIANTS = {
    "white_box_dirac": {},
    "white_box_likelihood": {"score": "likelihood"},
    "white_box_params": {"canaries": "params"},
    "black_box": {"mode": "black-box"},
    "no_clipping": {"inject": "no-clipping"},
    "low_noise": {"inject": "low-noise"},
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--eps", type=float, nargs="+", default=[2.0, 4.0, 8.0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--canaries", type=int, default=1000)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  m = args.canaries
  ceiling = bound.epsilon_lower_bound(
      num_canaries=m, num_guesses=m, num_correct=m, delta=DELTA,
      confidence=1 - 0.05 / len(bound.default_guess_grid(m)))
  rows = {}
  print(f"m = {m} canaries, {args.seeds} seeds, 95% confidence; ceiling (all right) "
        f"{ceiling:.2f}")
  print(f"{'target':>6} {'claimed':>8} " + " ".join(f"{v[:17]:>17}" for v in VARIANTS))
  for target in args.eps:
    row = {}
    for name, kwargs in VARIANTS.items():
      results = [audit(target, seed, m, **kwargs) for seed in range(args.seeds)]
      row[name] = [r.epsilon_lower_bound for r in results]
      row["claimed"] = results[0].claimed_epsilon
    rows[str(target)] = row
    print(f"{target:>6g} {row['claimed']:>8.3f} "
          + " ".join(f"{np.mean(row[v]):>8.2f} (max {max(row[v]):.2f})" for v in VARIANTS),
          flush=True)
  print(json.dumps({"canaries": m, "seeds": args.seeds, "ceiling": ceiling, "rows": rows}))


if __name__ == "__main__":
  main()
