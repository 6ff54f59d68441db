"""``dpfl sweep``: train a grid of DP (and non-private) language models, one JSON line per run.

  dpfl sweep --results runs.jsonl --models s50k,s200k --batch-sizes 64,256 \\
      --noise-multipliers 0,1,4 --steps 300 --learning-rates 1e-3,3e-3

Give the noise as ``--noise-multipliers`` (σ) or ``--noise-batch-ratios``
(σ/B); 0 in either is the non-private baseline. Finished runs (same run_id
in ``--results``) are skipped, so re-running the command resumes a sweep.
Without ``--seed`` every run draws its own seed from OS entropy and records
it in its line (``seed``); its run_id leaves the seed out, so re-running
resumes. ``--seed S`` makes every run use S (same init and data order across
the grid, reproducible; S is then part of the run_id).
``--dry-run`` lists the grid and what is already done without training.
The schema of the results file is documented in ``dpfl.scaling.results``.

Scaling out:

* ``--shard I/N`` (1-based: I in 1..N, e.g. a job array's task id + 1) runs
  only the I-th of N disjoint parts of the grid, balanced by estimated cost
  (``shards.shard_configs``: a function of the grid and N only, so every
  shard computes the same partition wherever and whenever it runs), into
  its own file: ``--results runs.jsonl`` becomes ``runs.shard-I-of-N.jsonl``
  (or put ``{shard}`` in the name: it becomes ``I-of-N``). A run has the
  seed and run id it has unsharded, so ``dpfl fit --results
  runs.shard-*-of-N.jsonl`` fits the law of the unsharded sweep.
* ``--devices all|N`` (default 1) trains each run data parallel over N local
  devices (``make_private(mesh=...)``; the non-private step splits its
  blocks over the same ``("data",)`` mesh): the same run to float rounding.
  One device is the default because its float sums are the reference and a
  private row's padded Poisson shape (``max_batch_size``) is then the one a
  one-device rerun records.
* ``--seq-len`` up to 1024 (``models.MAX_SEQ_LEN``): the corpus is cut into
  windows of that many bytes; a split left without one window, or fewer
  sequences than a batch, is refused naming ``--seq-len``.
"""

from __future__ import annotations

import argparse
import math
import os

_DEFAULT_NOISE_MULTIPLIERS = [1.0]


def _noise(args) -> tuple[str, list[float]]:
  """(the noise flag given, its values); ``--noise-multipliers 1`` by default."""
  if args.noise_batch_ratios is not None:
    return "--noise-batch-ratios", args.noise_batch_ratios
  return "--noise-multipliers", args.noise_multipliers or _DEFAULT_NOISE_MULTIPLIERS


def _csv(kind):
  """argparse type: a comma-separated list of ``kind`` (argparse names the flag)."""
  def parse(text: str):
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
      raise argparse.ArgumentTypeError(f"needs a comma-separated list, got {text!r}")
    values = []
    for item in items:
      try:
        value = kind(item)
      except ValueError:
        raise argparse.ArgumentTypeError(
            f"{item!r} is not {'an integer' if kind is int else 'a number'}") from None
      if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"values must be finite, got {item!r}")
      values.append(value)
    return values
  return parse


EXAMPLES = """\
examples:
  dpfl sweep --results runs.jsonl --models s50k,s100k --batch-sizes 64,256 \\
             --noise-batch-ratios 0,0.001,0.01 --steps 200 --learning-rates 3e-3,1e-2
  dpfl sweep --results runs.jsonl --models s50k --noise-multipliers 0,1,4 --shard 2/4 --devices all
  dpfl sweep --results users.jsonl --privacy-unit user --batch-sizes 64 --steps 100"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--results", required=True, metavar="FILE",
                 help="JSON-lines results file to append to (resumed if it exists)")
  p.add_argument("--models", type=_csv(str), default=["s50k"], metavar="M,...",
                 help="model sizes: s50k, s100k, s200k, s500k, s1m, s2m, s5m, s10m, s20m "
                 "(default: s50k)")
  p.add_argument("--batch-sizes", type=_csv(int), default=[256],
                 metavar="B,...", help="expected batch sizes (default: 256)")
  noise = p.add_mutually_exclusive_group()
  noise.add_argument("--noise-multipliers", type=_csv(float),
                     metavar="S,...", help="noise multipliers σ; 0 = non-private (default: 1)")
  noise.add_argument("--noise-batch-ratios", type=_csv(float),
                     metavar="R,...", help="noise-batch ratios σ/B (σ = R·B); 0 = non-private")
  p.add_argument("--steps", type=_csv(int), default=[300], metavar="T,...",
                 help="training steps (default: 300)")
  p.add_argument("--learning-rates", type=_csv(float), default=[3e-3],
                 metavar="LR,...", help="peak Adam learning rates (default: 3e-3)")
  p.add_argument("--delta", type=float, default=1e-6, metavar="D",
                 help="δ at which ε is reported, in (0, 1) (default: 1e-6)")
  p.add_argument("--seq-len", type=int, default=64, metavar="L",
                 help="tokens per example, 2..1024: the corpus is cut into windows of L bytes "
                      "(files shorter than L are left out) (default: 64)")
  p.add_argument("--l2-clip-norm", type=float, default=1.0, metavar="C",
                 help="per-example clip norm (default: 1)")
  p.add_argument("--warmup-steps", type=int, default=10, metavar="W",
                 help="linear learning-rate warm-up steps, then constant (default: 10)")
  p.add_argument("--eval-every", type=int, default=25, metavar="N",
                 help="steps between points of the loss curves (default: 25)")
  p.add_argument("--eval-examples", type=int, default=512, metavar="N",
                 help="held-out sequences per evaluation (default: 512)")
  p.add_argument("--examples-per-user", type=int, default=32, metavar="K",
                 help="corpus: sequences kept per source file (default: 32)")
  p.add_argument("--max-users", type=int, default=None, metavar="U",
                 help="corpus: use only the first U source files (default: all)")
  p.add_argument("--privacy-unit", choices=("example", "user"), default="example",
                 help="example: DP-SGD over sequences; user: ULS over source files "
                      "(--batch-sizes are then users per step; every run must be private)")
  p.add_argument("--seed", type=int, default=None, metavar="S",
                 help="seed of init, sampling and noise for every run, an integer >= 0 "
                      "(default: each run draws its own from OS entropy and records it in "
                      "its results line as 'seed'; rerun with --seed <that> to reproduce "
                      "it). Runs are identified without the seed when it is drawn, with it "
                      "when given, so re-running either way skips finished runs")
  p.add_argument("--devices", default="1", metavar="all|N",
                 help="local devices each run trains on, data parallel over the batch (dpfl's "
                      "mesh support); 'all' or N (default: 1, whose float sums are the "
                      "reference: N devices give the same run to float rounding, and a private "
                      "row records its max_batch_size rounded up to a multiple of N)")
  p.add_argument("--shard", default=None, metavar="I/N",
                 help="run only the I-th of N disjoint parts of the grid, I in 1..N (for job "
                      "arrays: e.g. --shard $((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT), "
                      "into its own results file: --results R.jsonl becomes R.shard-I-of-N.jsonl, "
                      "or name it with {shard} in --results (replaced by I-of-N). The parts "
                      "balance the estimated cost; each run has the seed and run id it has "
                      "unsharded; `dpfl fit --results R.shard-*-of-N.jsonl` merges the shards")
  p.add_argument("--dry-run", action="store_true",
                 help="list the runs and whether each is done; train nothing")
  p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def parse_shard(text: str | None) -> tuple[int, int] | None:
  """``"I/N"`` as (I, N) with 1 <= I <= N; None stays None; ValueError naming ``--shard``."""
  if text is None:
    return None
  parts = text.split("/")
  try:
    index, count = (int(p) for p in parts)
  except ValueError:
    index = count = None
  if len(parts) != 2 or count is None or count < 1 or not 1 <= index <= count:
    raise ValueError(f"--shard must be I/N with integers 1 <= I <= N (shards are numbered "
                     f"from 1), got {text!r}")
  return index, count


def shard_results_path(path: str, index: int, count: int) -> str:
  """The results file of shard I of N: ``{shard}`` in ``path`` replaced by ``I-of-N``,
  else ``.shard-I-of-N`` inserted before the extension (``runs.jsonl`` →
  ``runs.shard-2-of-4.jsonl``)."""
  tag = f"{index}-of-{count}"
  if "{shard}" in path:
    return path.replace("{shard}", tag)
  root, ext = os.path.splitext(path)
  return f"{root}.shard-{tag}{ext}"


def parse_devices(text: str) -> int:
  """``"all"`` or N as the number of local devices; ValueError naming ``--devices``."""
  import jax
  available = jax.local_device_count()
  if text == "all":
    return available
  try:
    count = int(text)
  except ValueError:
    count = 0
  if not 1 <= count <= available:
    raise ValueError(f"--devices must be 'all' or an integer in [1, {available}] (the local "
                     f"devices), got {text!r}")
  return count


def _check(args) -> None:
  """Flag-level validation: ValueError naming the flag, before anything is loaded."""
  from accounting import validate as check  # deferred: numpy, not needed for --help
  from dpfl.scaling import models
  for name in args.models:
    if name not in models.MODELS:
      raise ValueError(f"--models: unknown model {name!r}; choose from "
                       f"{', '.join(models.model_names())}")
  positive_ints = {"--batch-sizes": args.batch_sizes, "--steps": args.steps}
  for flag, values in positive_ints.items():
    bad = [v for v in values if v < 1]
    if bad:
      raise ValueError(f"{flag} must be integers >= 1, got {bad[0]}")
  noise_flag, noise = _noise(args)
  if any(v < 0 for v in noise):
    raise ValueError(f"{noise_flag} must be >= 0 (0 = non-private), got "
                     f"{min(noise):g}")
  if args.privacy_unit == "user" and any(v == 0 for v in noise):
    raise ValueError(f"{noise_flag} must be > 0 with --privacy-unit user (a non-private run "
                     "has no privacy unit: sweep the baseline at example level)")
  if any(v <= 0 for v in args.learning_rates):
    raise ValueError(f"--learning-rates must be > 0, got {min(args.learning_rates):g}")
  check.open_unit("--delta", args.delta)
  check.integer("--seq-len", args.seq_len, low=2, high=models.MAX_SEQ_LEN)
  parse_shard(args.shard)
  parse_devices(args.devices)
  check.positive("--l2-clip-norm", args.l2_clip_norm)
  for flag, value, low in (("--warmup-steps", args.warmup_steps, 0),
                           ("--eval-every", args.eval_every, 1),
                           ("--eval-examples", args.eval_examples, 1),
                           ("--examples-per-user", args.examples_per_user, 1),
                           ("--seed", args.seed, 0)):
    if value is not None:
      check.integer(flag, value, low=low)
  if args.max_users is not None:
    check.integer("--max-users", args.max_users, low=2)


def run(args) -> dict:
  """Builds the grid, checks it against the corpus, trains what is not done yet."""
  _check(args)
  from dpfl.scaling import results, shards, sweep
  common = dict(seq_len=args.seq_len, delta=args.delta, l2_clip_norm=args.l2_clip_norm,
                warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                eval_examples=args.eval_examples, seed=args.seed,
                examples_per_user=args.examples_per_user, max_users=args.max_users,
                privacy_unit=args.privacy_unit)
  flag, values = _noise(args)
  noise = {flag[2:].replace("-", "_"): values}
  configs = sweep.make_grid(models=args.models, batch_sizes=args.batch_sizes,
                            steps=args.steps, learning_rates=args.learning_rates,
                            **noise, **common)
  shard = parse_shard(args.shard)
  results_path = args.results if shard is None else shard_results_path(args.results, *shard)
  grid_runs = len(configs)
  try:  # every run of the grid has the same corpus
    corpus = sweep.corpus_for(configs[0])
  except ValueError as err:  # a split without one full window of --seq-len bytes
    raise ValueError(f"--seq-len {args.seq_len}: {err}") from None
  units = (len(corpus.train_users) if args.privacy_unit == "user"
           else corpus.num_train_examples)
  too_big = [c.batch_size for c in configs if c.batch_size > units]
  if too_big:
    what = "users (files)" if args.privacy_unit == "user" else "sequences"
    raise ValueError(f"--batch-sizes: {too_big[0]} exceeds the {units} training {what} of "
                     f"the corpus (windows of --seq-len {args.seq_len} bytes)")
  if shard is not None:  # after the grid-wide checks: every shard refuses a bad grid alike
    configs = shards.shard_configs(configs, *shard)
  directory = os.path.dirname(os.path.abspath(results_path))
  if not os.path.isdir(directory):
    raise ValueError(f"--results: directory {directory!r} does not exist")
  try:
    results.read_results(results_path)
  except (OSError, UnicodeDecodeError) as err:
    raise ValueError(f"--results: cannot read {results_path!r}: {err}") from None
  where = {"results": results_path, "runs": len(configs), "grid_runs": grid_runs,
           "shard": args.shard}
  if args.dry_run:
    done = results.completed_run_ids(results_path)
    rows = [dict(c.key(), run_id=(rid := sweep.run_id(c, corpus.fingerprint)),
                 status="done" if rid in done else "pending") for c in configs]
    return {**where, "done": sum(r["status"] == "done" for r in rows), "trained": 0,
            "dry_run": True, "corpus": corpus.summary(), "rows": rows}
  summary = sweep.run_sweep(configs, results_path, progress=not args.no_progress,
                            devices=parse_devices(args.devices))
  keys = ("run_id", "model", "params", "batch_size", "noise_multiplier", "noise_batch_ratio",
          "steps", "learning_rate", "epsilon", "final_eval_loss", "flops", "seconds",
          "tokens_per_second", "seed")
  return {**where, "trained": len(summary.trained),
          "skipped": len(summary.skipped), "dry_run": False, "corpus": corpus.summary(),
          "rows": [{k: row.get(k) for k in keys} for row in summary.rows]}


def _fmt(value, spec: str) -> str:
  if value is None:
    return "-"
  return format(value, spec)


def format_table(result: dict) -> str:
  corpus = result["corpus"]
  shard = (f" (shard {result['shard']} of a {result['grid_runs']}-run grid)"
           if result.get("shard") else "")
  lines = [f"dpfl sweep: {result['runs']} runs{shard} -> {result['results']}",
           f"  corpus: python-stdlib, {corpus['train_examples']} train / "
           f"{corpus['eval_examples']} eval sequences of {corpus['seq_len']} tokens"]
  if result["dry_run"]:
    lines.append(f"  dry run: {result['done']} done, {result['runs'] - result['done']} pending")
    header = f"  {'run_id':<16} {'model':<6} {'B':>5} {'σ':>8} {'T':>6} {'lr':>8}  status"
    lines.append(header)
    for r in result["rows"]:
      lines.append(f"  {r['run_id']:<16} {r['model']:<6} {r['batch_size']:>5} "
                   f"{r['noise_multiplier']:>8.4g} {r['steps']:>6} {r['learning_rate']:>8.2g}"
                   f"  {r['status']}")
    return "\n".join(lines)
  lines.append(f"  trained {result['trained']}, skipped {result['skipped']} (already done)")
  lines.append(f"  {'model':<6} {'B':>5} {'σ':>8} {'σ/B':>9} {'T':>6} {'lr':>8} {'ε':>9} "
               f"{'eval loss':>9} {'seconds':>8} {'tok/s':>8}")
  for r in result["rows"]:
    lines.append(
        f"  {r['model']:<6} {r['batch_size']:>5} {r['noise_multiplier']:>8.4g} "
        f"{r['noise_batch_ratio']:>9.3g} {r['steps']:>6} {r['learning_rate']:>8.2g} "
        f"{_fmt(r['epsilon'], '9.3g') if r['epsilon'] is not None else 'inf':>9} "
        f"{_fmt(r['final_eval_loss'], '9.4f')} {r['seconds']:>8.1f} "
        f"{r['tokens_per_second']:>8.0f}")
  return "\n".join(lines)
