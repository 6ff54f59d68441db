"""``dpfl fit``: fit a DP scaling law to a sweep's results (or anyone's point table).

  dpfl fit --results results.jsonl --out law.json [--curve eval_loss] [--plots DIR]
  dpfl fit --results runs.shard-*-of-4.jsonl --out law.json
  dpfl fit --results points.csv --seq-len 1024 --max-epochs 4 --out law.json

``--results`` takes one or more files and may be repeated (so a shell glob
works). A file ending in ``.csv`` is a point table (one row per evaluated
point, columns ``model,params,learning_rate,steps,noise_batch_ratio,loss``;
the format is documented in ``dpfl.scaling.results``); any other is the
JSON-lines file of ``dpfl sweep``. The shards of a ``dpfl sweep --shard I/N``
sweep are merged (a run in two files must have identical rows there). A
point table does not record its sequence length, largest epochs (q·T) or
sampling rate: ``--seq-len``, ``--max-epochs`` and ``--max-sampling-prob``
state them, and the law records them as its support (sweep rows carry their
own). The method is McKenna et al. 2025's (see ``dpfl.scaling.fit``). The
law is what ``dpfl plan --law`` reads.
"""

from __future__ import annotations

import os


EXAMPLES = """\
examples:
  dpfl fit --results runs.jsonl --out law.json
  dpfl fit --results runs.shard-*-of-4.jsonl --out law.json --plots plots/
  dpfl fit --results points.csv --seq-len 1024 --max-epochs 4 --out law.json"""

# Flags passed to fit.fit_law as the keyword of the same name (when given).
_LAW_FLAGS = {"seq_len": "--seq-len", "max_epochs": "--max-epochs",
              "max_sampling_prob": "--max-sampling-prob"}


def add_arguments(p) -> None:
  p.add_argument("--results", required=True, metavar="FILE", nargs="+", action="extend",
                 help="results files: JSON lines written by `dpfl sweep` (one per shard of a "
                      "sharded sweep: they are merged) or a .csv point table with columns "
                      "model,params,learning_rate,steps,noise_batch_ratio,loss; repeatable")
  p.add_argument("--out", required=True, metavar="LAW.json", help="where to write the law")
  p.add_argument("--curve", choices=("eval_loss", "train_loss"), default="eval_loss",
                 help="which loss curve of sweep rows to fit (default: eval_loss)")
  p.add_argument("--min-points", type=int, default=3, metavar="K",
                 help="fewest points after warm-up for a (model, σ/B) curve (default 3)")
  p.add_argument("--min-steps", type=int, default=1, metavar="T",
                 help="drop points at fewer steps (warm-up of a point table; sweep rows drop "
                      "their own warm-up); default 1")
  p.add_argument("--tail-factor", type=float, default=64.0, metavar="F",
                 help="trust the fitted tail L(T) = exp(m·log T + b) + E up to F times each "
                      "curve's last measured step (default 64, as the paper's 128K -> 8M); 1 "
                      "fits no tail and no E (for sweeps too short to flatten): the law's "
                      "support is then the measured steps")
  p.add_argument("--seq-len", type=int, default=None, metavar="L",
                 help="CSV input: tokens per example of the table's runs (recorded in the law)")
  p.add_argument("--max-epochs", type=float, default=None, metavar="E",
                 help="CSV input: the largest epochs q·T of the table's runs (recorded)")
  p.add_argument("--max-sampling-prob", type=float, default=None, metavar="Q",
                 help="CSV input: the largest sampling rate q of the table's runs, in (0, 1] "
                      "(recorded)")
  p.add_argument("--description", default="", help="free text stored in the law")
  p.add_argument("--plots", metavar="DIR",
                 help="also write loss_vs_noise_batch_ratio.png into DIR")


def _law_kwargs(args) -> dict:
  """The support flags, validated, as fit_law keywords (only those given)."""
  from accounting import validate as check
  values = {"seq_len": None if args.seq_len is None
            else check.integer("--seq-len", args.seq_len, low=1),
            "max_epochs": None if args.max_epochs is None
            else check.positive("--max-epochs", args.max_epochs),
            "max_sampling_prob": None if args.max_sampling_prob is None
            else check.probability("--max-sampling-prob", args.max_sampling_prob)}
  return {k: v for k, v in values.items() if v is not None}


def run(args) -> dict:
  from accounting import validate as check  # deferred: numpy, not needed for --help
  check.integer("--min-points", args.min_points, low=2)
  check.integer("--min-steps", args.min_steps, low=1)
  check.real("--tail-factor", args.tail_factor, low=1.0)
  law_kwargs = _law_kwargs(args)
  for path in args.results:
    if not os.path.isfile(path):
      raise ValueError(f"--results: no such file {path!r}")
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    raise ValueError(f"--out: directory {out_dir!r} does not exist")
  from dpfl.scaling import fit, results
  csv_input = any(p.lower().endswith(".csv") for p in args.results)
  if law_kwargs and not csv_input:
    flags = ", ".join(_LAW_FLAGS[k] for k in law_kwargs)
    raise ValueError(f"{flags}: apply to .csv point tables; a sweep's rows record their own "
                     "sequence length, epochs and sampling rate")
  try:
    rows = results.read_inputs(args.results)
  except (ValueError, OSError, UnicodeDecodeError) as err:
    raise ValueError(f"--results: {err}") from None
  if not rows:
    raise ValueError(f"--results: {', '.join(map(repr, args.results))} has no runs")
  sweep_rows = [r for r in rows if set(r) != set(results.POINT_COLUMNS)]
  missing = [k for k in ("model", "params", "learning_rate", "noise_batch_ratio")
             if any(k not in r for r in sweep_rows)]
  if missing:
    raise ValueError(f"--results: rows lack key(s) {', '.join(missing)} (not a sweep results file?)")
  law = fit.fit_law(rows, curve=args.curve, min_points=args.min_points,
                    min_steps=args.min_steps, tail_factor=args.tail_factor,
                    description=args.description,
                    source=", ".join(os.path.basename(p) for p in args.results),
                    **law_kwargs)
  fit.save_law(law, args.out)
  out = {"out": args.out, "files": len(args.results), "runs": len(sweep_rows),
         "points": len(rows) - len(sweep_rows), "models": law["models"],
         "seq_len": law.get("seq_len"), "form": law.get("form"),
         "support": fit.support(law)}
  if args.plots:
    os.makedirs(args.plots, exist_ok=True)
    from dpfl.scaling import plots
    # The smoothed data is overlaid for sweep rows (a point table has no curves to smooth here).
    tables = fit.loss_tables(rows, curve=args.curve) if not csv_input else None
    path = os.path.join(args.plots, "loss_vs_noise_batch_ratio.png")
    plots.plot_loss_vs_ratio(law, path, tables=tables)
    out["plots"] = [path]
  return out


def _num(value, spec: str) -> str:
  return format(value, spec) if isinstance(value, (int, float)) else format("-", f">{spec.split('.')[0]}")


def format_table(result: dict) -> str:
  what = f"{result['runs']} runs" + (f", {result['points']} points" if result.get("points")
                                     else "")
  lines = [f"dpfl fit: {what} from {result.get('files', 1)} file(s) -> {result['out']}"]
  models = result["models"]
  if not all("curves" in m for m in models):  # a law form without per-ratio curves
    lines.append(f"  {'model':<10} {'params':>12}")
    lines += [f"  {m['model']:<10} {m['params']:>12,}" for m in models]
  else:
    lines.append(f"  {'model':<10} {'params':>10} {'E':>7} {'E from':<12} {'σ/B':>10} "
                 f"{'m':>8} {'b':>8} {'points':>6} {'rmse':>8}")
    for m in models:
      for k, c in enumerate(m["curves"]):
        e = m.get("E")
        e = f"{e:>7.4f}" if isinstance(e, (int, float)) else f"{'-':>7}"
        head = (f"  {m['model']:<10} {m['params']:>10,} {e} {m.get('E_source') or '-':<12}"
                if k == 0 else f"  {'':<10} {'':>10} {'':>7} {'':<12}")
        lines.append(f"{head} {c['noise_batch_ratio']:>10.4g} {_num(c.get('m'), '8.4f')} "
                     f"{_num(c.get('b'), '8.4f')} {c.get('points', '-'):>6} "
                     f"{_num(c.get('rmse'), '8.4f')}")
  if result.get("form"):
    lines.append(f"  form: {result['form']}")
  support = result.get("support")
  if support:
    ranges = ", ".join(f"{name} [{support[key][0]:.4g}, {support[key][1]:.4g}]"
                       for key, name in (("params", "params"), ("steps", "steps"),
                                         ("noise_batch_ratio", "σ/B")) if support.get(key))
    extra = ", ".join(f"{name} {support[key]:g}" for key, name in (
        ("seq_len", "seq_len"), ("max_epochs", "max epochs"),
        ("max_sampling_prob", "max q")) if support.get(key) is not None)
    lines.append(f"  support: {ranges}" + (f"; {extra}" if extra else ""))
  for p in result.get("plots", []):
    lines.append(f"  plot: {p}")
  return "\n".join(lines)
