"""``dpfl fit``: fit a DP scaling law to a sweep's results file.

  dpfl fit --results results.jsonl --out law.json [--curve eval_loss] [--plots DIR]

The method is McKenna et al. 2025's (see ``dpfl.scaling.fit``). The law is
what ``dpfl plan --law`` reads.
"""

from __future__ import annotations

import os


EXAMPLES = """\
examples:
  dpfl fit --results runs.jsonl --out law.json
  dpfl fit --results runs.jsonl --out law.json --plots plots/
  dpfl fit --results runs.jsonl --out law.json --curve train_loss --min-points 4"""


def add_arguments(p) -> None:
  p.add_argument("--results", required=True, metavar="FILE",
                 help="results file (JSON lines) written by `dpfl sweep`")
  p.add_argument("--out", required=True, metavar="LAW.json", help="where to write the law")
  p.add_argument("--curve", choices=("eval_loss", "train_loss"), default="eval_loss",
                 help="which loss curve to fit (default: eval_loss)")
  p.add_argument("--min-points", type=int, default=3, metavar="K",
                 help="fewest points after warm-up for a (model, σ/B) curve (default 3)")
  p.add_argument("--description", default="", help="free text stored in the law")
  p.add_argument("--plots", metavar="DIR",
                 help="also write loss_vs_noise_batch_ratio.png into DIR")


def run(args) -> dict:
  from accounting import validate as check  # deferred: numpy, not needed for --help
  check.integer("--min-points", args.min_points, low=2)
  if not os.path.exists(args.results):
    raise ValueError(f"--results: no such file {args.results!r}")
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    raise ValueError(f"--out: directory {out_dir!r} does not exist")
  from dpfl.scaling import fit, results
  try:
    rows = results.read_results(args.results)
  except ValueError as err:
    raise ValueError(f"--results: {err}") from None
  if not rows:
    raise ValueError(f"--results: {args.results!r} has no runs")
  missing = [k for k in ("model", "params", "learning_rate", "noise_batch_ratio")
             if any(k not in r for r in rows)]
  if missing:
    raise ValueError(f"--results: rows lack key(s) {', '.join(missing)} (not a sweep results file?)")
  law = fit.fit_law(rows, curve=args.curve, min_points=args.min_points,
                    description=args.description, source=os.path.basename(args.results))
  fit.save_law(law, args.out)
  out = {"out": args.out, "runs": len(rows), "models": law["models"], "seq_len": law["seq_len"]}
  if args.plots:
    os.makedirs(args.plots, exist_ok=True)
    from dpfl.scaling import plots
    tables = fit.loss_tables(rows, curve=args.curve)
    path = os.path.join(args.plots, "loss_vs_noise_batch_ratio.png")
    plots.plot_loss_vs_ratio(law, path, tables=tables)
    out["plots"] = [path]
  return out


def format_table(result: dict) -> str:
  lines = [f"dpfl fit: {result['runs']} runs -> {result['out']}  "
           f"(L(T) = exp(m·log T + b) + E per model and σ/B)"]
  lines.append(f"  {'model':<10} {'params':>10} {'E':>7} {'E from':<12} {'σ/B':>10} "
               f"{'m':>8} {'b':>8} {'points':>6} {'rmse':>8}")
  for m in result["models"]:
    for k, c in enumerate(m["curves"]):
      head = (f"  {m['model']:<10} {m['params']:>10,} {m['E']:>7.4f} {m['E_source']:<12}"
              if k == 0 else f"  {'':<10} {'':>10} {'':>7} {'':<12}")
      lines.append(f"{head} {c['noise_batch_ratio']:>10.4g} {c['m']:>8.4f} {c['b']:>8.4f} "
                   f"{c['points']:>6} {c['rmse']:>8.4f}")
  for p in result.get("plots", []):
    lines.append(f"  plot: {p}")
  return "\n".join(lines)
