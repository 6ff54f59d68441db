"""``dpfl plan``: the compute-optimal private configuration for a budget.

  dpfl plan --compute 1e15 --target-epsilon 4 --delta 1e-6 --users 20000 [--law LAW.json] [--json]

``--target-epsilon`` is named as in ``dpfl calibrate`` and ``dpfl mf``;
``--epsilon``, its former name, is still accepted.

Plans stay inside the law's support (``dpfl.scaling.planner`` gives the
rule): outside it the command exits 2 with one line starting with the
dimension (model size, steps, σ/B, sequence length, q = 1, epochs), unless
``--allow-extrapolation``, which plans anyway and names every extrapolated
dimension (a line of the table, ``extrapolated`` in the JSON).

Imports numpy and the scaling law / σ grid JSON files only (no JAX, no scipy,
no dp-accounting), so it answers in well under two seconds.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from accounting import validate as check


def _number(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _names(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


EXAMPLES = """\
examples:
  dpfl plan --compute 1e13 --target-epsilon 4 --delta 1e-6 --users 100000
  dpfl plan --compute 1e15 --target-epsilon 8 --delta 1e-6 --users 20000 --law law.json \\
            --json --plot plan.png
  dpfl plan --compute 3e18 --target-epsilon 8 --delta 1e-10 --users 1e8 --allow-extrapolation"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--compute", type=_number, required=True, metavar="FLOPS",
                 help="compute budget in FLOPs (6·params·batch·steps·seq), an upper limit")
  # One required flag, shown as such in the usage line; --epsilon (its former
  # name) is a hidden alias in the same group.
  epsilon = p.add_mutually_exclusive_group(required=True)
  epsilon.add_argument("--target-epsilon", type=_number, metavar="E", dest="target_epsilon",
                       help="privacy budget ε > 0 (formerly --epsilon, still accepted)")
  epsilon.add_argument("--epsilon", type=_number, dest="target_epsilon", help=argparse.SUPPRESS)
  p.add_argument("--delta", type=_number, required=True, metavar="D", help="δ in (0, 1)")
  p.add_argument("--users", type=_number, required=True, metavar="N",
                 help="privacy units (users, or examples): sampling rate q = batch/N")
  p.add_argument("--law", metavar="FILE", help="scaling law from `dpfl fit` (default: shipped)")
  p.add_argument("--seq-len", type=_number, metavar="S",
                 help="tokens per example (default: the law's)")
  p.add_argument("--models", type=_names, metavar="A,B,...",
                 help="only these model names of the law (default: 100 log-spaced sizes "
                      "between the law's smallest and largest model)")
  p.add_argument("--batch-sizes", type=_names, metavar="B1,B2,...",
                 help="candidate batch sizes (default: powers of two <= N, and N)")
  p.add_argument("--max-steps", type=_number, metavar="T",
                 help="most training steps considered (default: 10x the law's most steps; "
                      "steps beyond the law's are outside its support)")
  p.add_argument("--allow-extrapolation", action="store_true",
                 help="plan outside the law's support too (model size, steps, σ/B, sequence "
                      "length, q = 1, epochs) and name what is extrapolated; without it, a "
                      "plan outside is refused (exit 2)")
  p.add_argument("--sigma-grid", metavar="FILE", help="σ grid (default: shipped)")
  p.add_argument("--plot", metavar="FILE.png",
                 help="also write the compute-optimal model size, batch size and loss vs "
                      "compute (1/1000x to 1x the budget) for ε/4, ε/2, ε, 2ε, 4ε (those "
                      "inside the σ grid) to this PNG")


def _integer(flag: str, value: float) -> int:
  return check.positive_int(flag, value)


def run(args) -> dict:
  check.positive("--compute", args.compute)
  epsilon = check.positive("--target-epsilon", args.target_epsilon)
  check.open_unit("--delta", args.delta)
  users = _integer("--users", args.users)
  seq_len = None if args.seq_len is None else _integer("--seq-len", args.seq_len)
  max_steps = None if args.max_steps is None else _integer("--max-steps", args.max_steps)
  batch_sizes = None
  if args.batch_sizes is not None:
    try:
      batch_sizes = [_integer("--batch-sizes", float(b)) for b in args.batch_sizes]
    except ValueError:
      raise ValueError(f"--batch-sizes must be integers >= 1, got {','.join(args.batch_sizes)}") from None
    if not batch_sizes or max(batch_sizes) > users:
      raise ValueError(f"--batch-sizes must be non-empty and <= --users ({users})")
  from dpfl.scaling import fit, planner, sigma_grid
  try:
    law = fit.load_law(args.law)
  except OSError as err:
    raise ValueError(f"--law: cannot read {args.law!r}: {err.strerror}") from None
  except ValueError as err:
    raise ValueError(f"--law: {err}") from None
  if seq_len is None and fit.support(law).get("seq_len") is None:
    raise ValueError("sequence length: --seq-len is required: the law does not record one")
  names = fit.model_params(law)
  if args.models is not None:
    unknown = [m for m in args.models if m not in names]
    if unknown or not args.models:
      raise ValueError(f"--models must name models of the law ({', '.join(names)}); "
                       f"unknown: {', '.join(unknown) or 'none given'}")
  try:
    grid = sigma_grid._as_table(args.sigma_grid)
  except OSError as err:
    raise ValueError(f"--sigma-grid: cannot read {args.sigma_grid!r}: {err.strerror}") from None
  except (ValueError, KeyError) as err:
    raise ValueError(f"--sigma-grid: not a σ grid ({err})") from None
  if not grid.eps[0] <= epsilon <= grid.eps[-1]:
    raise ValueError(f"--target-epsilon must be in [{grid.eps[0]:g}, {grid.eps[-1]:g}] (the σ "
                     f"grid's range), got {epsilon:g}; build a wider grid with "
                     "`python -m dpfl.scaling.sigma_grid` and pass --sigma-grid")
  if args.delta < grid.delta[0]:
    raise ValueError(f"--delta must be >= {grid.delta[0]:g} (the σ grid's smallest δ), got "
                     f"{args.delta:g}; build a wider grid with `python -m "
                     "dpfl.scaling.sigma_grid` and pass --sigma-grid")
  if args.plot is not None:
    directory = os.path.dirname(os.path.abspath(args.plot))
    if not os.path.isdir(directory) or not args.plot.lower().endswith(".png"):
      raise ValueError(f"--plot must be a .png path in an existing directory, got {args.plot!r}")
  try:
    result = planner.plan(compute=args.compute, epsilon=epsilon, delta=args.delta,
                          users=users, law=law, seq_len=seq_len, models=args.models,
                          batch_sizes=batch_sizes, grid=grid, max_steps=max_steps,
                          allow_extrapolation=args.allow_extrapolation)
  except ValueError as err:
    message = str(err)
    for name, flag in (("compute=", "--compute"), ("max_steps=", "--max-steps")):
      if message.startswith(name):
        message = flag + message[len(name) - 1:]
    raise ValueError(message) from None
  if args.plot is not None:
    from dpfl.scaling import plots
    epsilons = [e for e in (epsilon * f for f in (0.25, 0.5, 1.0, 2.0, 4.0))
                if grid.eps[0] <= e <= grid.eps[-1]]
    computes = [float(c) for c in np.geomspace(args.compute / 1000, args.compute, 7)]
    result["plot"] = plots.plot_compute_optimal(
        law, args.plot, epsilons=epsilons, delta=args.delta, users=users, computes=computes,
        seq_len=seq_len, grid=grid, allow_extrapolation=args.allow_extrapolation,
        models=args.models, batch_sizes=batch_sizes, max_steps=max_steps)
  return result


def _fmt_flops(x: float) -> str:
  return f"{x:.3g}"


def _fmt_range(lo: float, hi: float, fmt: str = ".3g") -> str:
  return f"{lo:{fmt}}–{hi:{fmt}}"


def format_support(support: dict) -> str:
  """The law's support in one line."""
  parts = [f"params {_fmt_range(*support['params'])}",
           f"steps {_fmt_range(*support['steps'], 'g')}",
           f"σ/B {_fmt_range(*support['noise_batch_ratio'])}",
           f"seq {support.get('seq_len') or 'unknown'}"]
  max_q = support.get("max_sampling_prob")
  parts.append("q <= 1" if max_q is not None and max_q >= 1 else "q < 1")
  max_epochs = support.get("max_epochs")
  parts.append(f"<= {max_epochs:.3g} epochs" if max_epochs is not None
               else "<= 1 epoch (the law's is unknown)")
  return ", ".join(parts)


def format_table(result: dict) -> str:
  top = 5
  r = result
  lines = [f"dpfl plan: compute-optimal DP-SGD for {_fmt_flops(r['compute_budget'])} FLOPs, "
           f"ε={r['epsilon']:g}, δ={r['delta']:g}, {r['users']} users, seq {r['seq_len']}"]
  if r["law"]["placeholder"]:
    lines.append("  WARNING: the law is a placeholder, not fitted to a real sweep: "
                 + r["law"]["description"])
  if r["extrapolated"]:
    lines.append("  EXTRAPOLATED: the plan lies outside the law's support in "
                 + ", ".join(r["extrapolated"]) + " (--allow-extrapolation); its loss is a guess")
  if r.get("at_support_corner"):
    lines.append("  AT A CORNER OF THE LAW'S SUPPORT (" + ", ".join(r["at_support_corner"])
                 + "): the compute-optimal configuration may lie beyond what the law measured")
  if r.get("data_limited"):
    lines.append("  data-limited: more data (" + ", ".join(r["data_limited"]) + ") than the "
                 "law has seen would predict lower loss; this plan stays within it")
  small = r["smallest_compute_within_1pct"]
  rows = [("model size", f"{r['params']:,} params (nearest fitted model: {r['model']})"),
          ("batch size", f"{r['batch_size']} (q = {r['sampling_prob']:.4g})"),
          ("steps", f"{r['steps']} ({r['epochs']:.3g} epochs, {r['tokens']:,} tokens)"),
          ("noise multiplier", f"{r['noise_multiplier']:.4g}"
           + ("  (upper bound: q or δ outside the σ grid)" if r["sigma_bound"] else "")
           + ("  (certified by RDP: train with accountant='rdp')"
              if r.get("sigma_accountant") == "rdp" else "")),
          ("noise-batch ratio", f"{r['noise_batch_ratio']:.4g}"),
          ("predicted loss", f"{r['predicted_loss']:.4f}"),
          ("compute used", _fmt_flops(r["compute"])
           + (f"  (steps capped at {r['max_steps']}: --max-steps)"
              if r["steps"] * 1.05 >= r["max_steps"] else "")),
          ("within 1% at", f"{_fmt_flops(small['compute'])} FLOPs ({small['params']:,} params, "
           f"batch {small['batch_size']}, {small['steps']} steps)"),
          ("law's support", format_support(r["support"]))]
  width = max(len(k) for k, _ in rows)
  lines += [f"  {k:<{width}}  {v}" for k, v in rows]
  configs = r["configs_within_2pct"]
  lines.append(f"  within 2% of the best ({len(configs)} size/batch pairs; best "
               f"{min(top, len(configs))}):")
  lines.append(f"    {'params':>12} {'batch':>10} {'steps':>8} {'σ':>8} {'σ/B':>10} {'loss':>8} "
               f"{'FLOPs':>9}")
  for c in configs[:top]:
    lines.append(f"    {c['params']:>12,} {c['batch_size']:>10} {c['steps']:>8} "
                 f"{c['noise_multiplier']:>8.3g} {c['noise_batch_ratio']:>10.3g} "
                 f"{c['predicted_loss']:>8.4f} {_fmt_flops(c['compute']):>9}")
  return "\n".join(lines)
