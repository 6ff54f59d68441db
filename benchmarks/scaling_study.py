"""A DP scaling-law study at laptop scale: sweep, fit, plan, and an honest report.

Reproduces the method of McKenna et al. 2025, "Scaling Laws for
Differentially Private Language Models" (arXiv 2501.18914), on the
offline Python-stdlib corpus with the ``dpfl.scaling`` model family:

1. **Sweep** (``dpfl.scaling.sweep``): model size × batch size × noise-batch
   ratio σ/B (0 = non-private) with DP-SGD from ``dpfl.make_private``; one
   results line per run, resumable (re-running the script continues).
2. **Fit** (``dpfl.scaling.fit.fit_law``) and **plan**
   (``dpfl.scaling.planner.plan``) over a range of compute and ε.
3. **Speed**: tokens/s of a DP-SGD step (``make_private``'s step) against the
   plain optax step of the same model and batch, same process, interleaved,
   median of >= 5 timed repetitions after compilation.
4. **Report** (``REPORT.md`` + PNG plots in ``--out``): which of the paper's
   findings hold at this scale, with the numbers that decide it:
   (a) σ/B drives utility; (b) compute-optimal private models are smaller,
   with larger batches, than non-private ones; (c) more ε alone gives
   diminishing returns.

The full study takes about an hour on 2 CPU cores; ``--quick`` (CI) takes a
few minutes and only checks that the pipeline works: its grid is too small
for its verdicts to mean much.

``--preset accelerator``: 18 runs of models up to 19M parameters and up to
2000 steps (``ACCELERATOR``), sized by a cost model (``estimate_seconds``:
an assumed 100 TFLOP/s sustained on one H100, DP-SGD at 2x the FLOPs of a
plain step, per-step and per-run floors) to finish in <= 8 minutes on one
H100; at this scale finding (b) is testable, where the CPU study could not
show it. Its report adds the estimate and the device the run used. With
``--quick`` it runs a CPU-sized copy of the same grid (``tiny``).

Prints a table and, as the last line, one JSON object.
Usage: python benchmarks/scaling_study.py [--preset {full,accelerator}] [--quick]
[--out DIR] [--no-progress]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

# benchmarks/accounting.py is named like the package it measures; run as a
# script, this folder comes first on sys.path and would shadow `accounting`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402

from dpfl.scaling import corpus as corpus_lib  # noqa: E402
from dpfl.scaling import models, sweep  # noqa: E402

# The analysis and report helper of this script, loaded by path (this folder
# is off sys.path, see above).
_spec = importlib.util.spec_from_file_location(
    "_scaling_report", os.path.join(_HERE, "_scaling_report.py"))
report_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_lib)

# --- the study's grid ----------------------------------------------------------------

# Noise-batch ratios 2^-10 .. 2^-4 span "noise negligible" to "noise dominates"
# for these models: the noise added to the mean gradient has norm about
# (σ/B)·C·sqrt(params), i.e. ~0.2 to ~15 times the clipped signal (<= C).
RATIOS = (2.0 ** -10, 2.0 ** -7, 2.0 ** -4)
MODELS = ("s50k", "s100k", "s200k")
FULL = dict(
    # Non-private at lr 3e-3 (and 1e-2 at B = 64 for the smallest and largest
    # model); private at both 3e-3 and 1e-2 (noisy Adam wants the larger
    # rate at high σ/B): the fit takes the minimum over learning rates.
    runs=[(m, b, 0.0, 3e-3) for m in MODELS for b in (64, 256)]
    + [(m, 64, 0.0, 1e-2) for m in ("s50k", "s200k")]
    + [(m, b, r, lr) for m in MODELS for b in (64, 256) for r in RATIOS
       for lr in (3e-3, 1e-2)],
    steps=200,
    common=dict(seq_len=64, eval_every=20, warmup_steps=10, eval_examples=512, delta=1e-6,
                seed=0),
    speed=dict(models=["s50k", "s200k"], batch_size=256, repeats=7, naive=True),
    computes=np.geomspace(1e11, 4e12, 7), epsilons=[0.5, 1, 2, 4, 8, 16])
# Quick (CI): 7 runs of 30 steps, 4 of them private. Enough to exercise every
# stage, not to test the paper.
QUICK = dict(
    runs=[("s50k", 32, 0.0, 3e-3), ("s50k", 32, 2.0 ** -7, 3e-3), ("s50k", 128, 0.0, 3e-3),
          ("s50k", 128, 2.0 ** -7, 3e-3), ("s50k", 128, 2.0 ** -4, 3e-3),
          ("s100k", 128, 0.0, 3e-3), ("s100k", 128, 2.0 ** -4, 3e-3)],
    steps=30,
    common=dict(seq_len=64, eval_every=5, warmup_steps=5, eval_examples=128, delta=1e-6,
                seed=0),
    speed=dict(models=["s50k"], batch_size=128, repeats=5, naive=False),
    computes=np.geomspace(3e9, 3e11, 5), epsilons=[1, 4, 16])


# Accelerator (one H100, <= 8 minutes by the cost model of
# ``estimate_seconds``): the study at the scale where McKenna et al.'s
# finding (b) can show. Models of 1M, 5M and 19M parameters; 64-byte
# sequences from every window of every stdlib file (~447K training
# sequences, so the largest run sees each about once: the models learn the
# language, not the rows). Non-private at batch 64 and 256 for 2000 steps:
# their eval curves are the measured non-private frontier over compute.
# Private at batch 256 for 500 steps and batch 1024 for 125 (the same
# compute: the fit sees a 4x larger batch at matched cost), each at σ/B =
# 2^-11 and 2^-7. With this corpus (q = B / 447K) the σ grid puts the
# configurations the planner weighs at ε = 1 .. 16 between σ/B = 2^-11.6
# (batch 1024, ε = 16) and 2^-6.9 (batch 64, ε = 1), so the fitted law
# covers the small batches the private optimum could choose, not only the
# large ones. One learning rate per model, smaller for larger models.
ACCEL_MODELS = {"s1m": 3e-3, "s5m": 2e-3, "s20m": 1e-3}
ACCEL_RATIOS = (2.0 ** -11, 2.0 ** -7)
ACCELERATOR = dict(
    runs=[(m, b, 0.0, lr, 2000) for m, lr in ACCEL_MODELS.items() for b in (64, 256)]
    + [(m, b, r, lr, steps) for m, lr in ACCEL_MODELS.items()
       for b, steps in ((256, 500), (1024, 125)) for r in ACCEL_RATIOS],
    steps=2000,
    common=dict(seq_len=64, eval_every=50, warmup_steps=25, eval_examples=512, delta=1e-6,
                seed=0, examples_per_user=100_000),
    speed=dict(models=["s5m", "s20m"], batch_size=256, repeats=7, naive=True),
    computes=np.geomspace(1e14, 2e15, 6), epsilons=[0.5, 1, 2, 4, 8, 16])

# The cost model of ``estimate_seconds``: an H100 (SXM, 80 GB) runs these
# float32 models' matmuls as TF32 (JAX's default precision on GPUs), whose
# dense peak is ~495 TFLOP/s; at 16-64K tokens per step and d_model <= 512,
# with LayerNorm, softmax, GELU and Adam memory-bound, we assume 100 TFLOP/s
# sustained on the 6·N·B·seq training FLOPs (~20% of peak). DP-SGD costs
# 2x the FLOPs of a plain step (per-example norms, then the clipped sum:
# benchmarks/accelerator.py's tokens section measures the real figure). No
# step is faster than its launch-and-host floor (5 ms plain, 10 ms private:
# Poisson sampling and the padded batch are built on the host). Each run
# also pays a fixed overhead (compiling the train and eval steps, and for a
# private run the ε of its ledger) and its evaluations; the speed comparison
# and the fit, plan and report a fixed time each.
H100_FLOPS_PER_SECOND = 100e12
DP_FLOPS_FACTOR = 2.0
STEP_FLOOR_SECONDS = {False: 0.005, True: 0.010}
RUN_OVERHEAD_SECONDS = {False: 8.0, True: 12.0}
EVAL_CHUNK_FLOOR_SECONDS = 0.005
SPEED_SECONDS_PER_MODEL = 20.0
ANALYSIS_SECONDS = 30.0
ACCELERATOR_LIMITS = dict(max_params=20_000_000, max_steps=2000, max_seconds=480.0)


def run_steps(spec: dict, run: tuple) -> int:
  """A run's steps: its fifth entry where given, else the spec's ``steps``."""
  return run[4] if len(run) > 4 else spec["steps"]


def steps_text(spec: dict) -> str:
  """"200 steps each", or "125-2000 steps" when runs differ."""
  steps = sorted({run_steps(spec, run) for run in spec["runs"]})
  return f"{steps[0]} steps each" if len(steps) == 1 else f"{steps[0]}-{steps[-1]} steps"


def study_configs(spec: dict) -> list[sweep.RunConfig]:
  """The study's runs: (model, batch size, σ/B, learning rate[, steps])."""
  return [sweep.RunConfig(model=run[0], batch_size=run[1], noise_multiplier=run[2] * run[1],
                          steps=run_steps(spec, run), learning_rate=run[3], **spec["common"])
          for run in spec["runs"]]


def estimate_seconds(spec: dict, *, flops_per_second: float = H100_FLOPS_PER_SECOND) -> dict:
  """Estimated wall time of a preset on one H100, by the cost model above.

  Returns ``{"runs": [seconds per run], "sweep", "speed", "analysis",
  "total"}`` (seconds) and the assumptions used.
  """
  per_run = []
  for c in study_configs(spec):
    n = models.params_count(c.model)
    flops = models.training_flops(params=n, num_steps=c.steps, batch_size=c.batch_size,
                                  seq_len=c.seq_len)
    train = max(c.steps * STEP_FLOOR_SECONDS[c.private],
                flops * (DP_FLOPS_FACTOR if c.private else 1.0) / flops_per_second)
    evals = math.ceil(c.steps / c.eval_every) + 1  # every eval_every steps, the last, and 0
    chunks = evals * math.ceil(c.eval_examples / sweep.EVAL_CHUNK)
    eval_s = max(chunks * EVAL_CHUNK_FLOOR_SECONDS,
                 evals * 2.0 * n * c.eval_examples * c.seq_len / flops_per_second)
    per_run.append(RUN_OVERHEAD_SECONDS[c.private] + train + eval_s)
  speed = SPEED_SECONDS_PER_MODEL * len(spec["speed"]["models"])
  total = sum(per_run) + speed + ANALYSIS_SECONDS
  return {"runs": per_run, "sweep": sum(per_run), "speed": speed,
          "analysis": ANALYSIS_SECONDS, "total": total,
          "assumptions": {"flops_per_second": flops_per_second,
                          "dp_flops_factor": DP_FLOPS_FACTOR,
                          "step_floor_seconds": dict(STEP_FLOOR_SECONDS),
                          "run_overhead_seconds": dict(RUN_OVERHEAD_SECONDS)}}


def tiny(spec: dict) -> dict:
  """A CPU-sized copy of a preset (``--quick`` with ``--preset accelerator``).

  Same structure (non-private and private runs, two batches per kind, the
  same σ/B, per-run steps in the same proportions), with the three smallest
  models, batches / 16, steps / 50 (at least 3) and a small eval: a check
  that the preset's pipeline runs, not evidence.
  """
  names = sorted({run[0] for run in spec["runs"]}, key=models.params_count)
  small = dict(zip(names, models.model_names()))
  runs = [(small[run[0]], max(run[1] // 16, 2), run[2], run[3],
           max(round(run_steps(spec, run) / 50), 3)) for run in spec["runs"]]
  return dict(spec, runs=runs, steps=max(round(spec["steps"] / 50), 3),
              common=dict(spec["common"], eval_every=5, warmup_steps=2, eval_examples=64,
                          examples_per_user=32),
              speed=dict(models=[small[m] for m in spec["speed"]["models"]][:1], batch_size=16,
                         repeats=5, naive=False),
              computes=np.geomspace(1e9, 1e11, 4), epsilons=[1, 4, 16])


def study_sigma_grid(spec: dict, out: str, quick: bool):
  """The shipped σ grid, else one built for this study (full mode only) and cached in ``out``."""
  from dpfl.scaling import sigma_grid
  try:
    sigma_grid.load_grid()
    return None, None  # the planner's default
  except FileNotFoundError:
    pass
  path = os.path.join(out, "sigma_grid.json")
  if os.path.exists(path):
    return path, f"σ grid: none shipped; used this study's {path}"
  if quick:
    raise FileNotFoundError("no σ grid shipped with dpfl (the full study builds its own)")
  grid = sigma_grid.build_grid(epsilons=spec["epsilons"], deltas=(spec["common"]["delta"],),
                               validation_points=0, progress=False)
  sigma_grid.save_grid(grid, path)
  return path, f"σ grid: none shipped; built one for this study ({grid['build']['seconds']} s)"


PRESETS = {"full": FULL, "accelerator": ACCELERATOR}


def fit_study_law(rows: list[dict], **kwargs) -> tuple[dict, str | None]:
  """The study's law, and a note when it has no parametric tail.

  Sweeps this short rarely show the non-private curve saturating, so its
  irreducible loss E (which the paper's tail needs) is often unidentifiable;
  then the law is fitted without a tail and its support ends at the measured
  steps (``fit.DegenerateAsymptote``).
  """
  from dpfl.scaling import fit
  try:
    return fit.fit_law(rows, **kwargs), None
  except fit.DegenerateAsymptote as err:
    return (fit.fit_law(rows, tail_factor=1, **kwargs),
            f"law fitted without a parametric tail (its support ends at the measured steps): {err}")


def preset_spec(preset: str, quick: bool) -> dict:
  """The grid of ``--preset`` (``--quick``: QUICK for full, ``tiny`` for the others)."""
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
  if not quick:
    return PRESETS[preset]
  return QUICK if preset == "full" else tiny(PRESETS[preset])


def device_kind() -> str:
  import jax
  return jax.devices()[0].device_kind


def accelerator_notes(spec: dict, *, quick: bool) -> list[str]:
  """The report's account of the accelerator preset: its cost estimate and the device."""
  full = estimate_seconds(ACCELERATOR)
  notes = [f"accelerator preset: {len(ACCELERATOR['runs'])} runs, estimated "
           f"{full['total'] / 60:.1f} min on one H100 ({full['sweep']:.0f} s sweep) at an "
           f"assumed {H100_FLOPS_PER_SECOND / 1e12:.0f} TFLOP/s sustained, DP-SGD at "
           f"{DP_FLOPS_FACTOR:g}x the FLOPs of a plain step; this run: {device_kind()}"]
  if quick:
    notes.append("--quick: a CPU-sized copy of the accelerator grid (models "
                 + ", ".join(sorted({r[0] for r in spec["runs"]}, key=models.params_count))
                 + f", at most {max(run_steps(spec, r) for r in spec['runs'])} steps); the "
                 "verdicts above test the pipeline, not the paper")
  return notes


# --- speed: DP step vs plain step, same model and batch ---------------------------------

def measure_speed(model: str, batch_size: int, *, seq_len: int, repeats: int,
                  corpus: corpus_lib.Corpus, naive: bool = True) -> dict:
  """tokens/s of make_private's DP-SGD step vs the plain optax step (interleaved medians)."""
  import jax
  import optax

  import dpfl
  train = np.asarray(corpus.train_tokens)
  loss_fn = models.make_loss_fn(model)
  params = models.init_params(model, 0, seq_len=seq_len)
  private = dpfl.make_private(loss_fn, optax.adam(1e-3), l2_clip_norm=1.0,
                              dataset_size=len(train), batch_size=batch_size, delta=1e-6,
                              num_steps=1000, noise_multiplier=1.0, seed=0, key=1)
  dp_step = private.make_step()
  dp_state = private.init(params)
  draws = private.batches(train, dp_state, num_steps=repeats + 1)
  dp_batches = list(draws)
  # The sweep's non-private step (gradient accumulated over blocks of <= 32
  # sequences), and a naive one-pass jax.grad step for reference.
  optimizer, plain_step = sweep.plain_step(model, 1e-3, 0)
  plain_state = optimizer.init(params)

  @jax.jit
  def naive_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  plain_batches = [train[rng.choice(len(train), batch_size, replace=False)]
                   for _ in range(repeats + 1)]

  dp_states = [dp_state]

  def run_dp(i):
    # Each DP step continues from the last state: stepping one state twice
    # would release its noise twice, which the run refuses.
    batch, mask = dp_batches[i]
    dp_states[0], aux = jax.block_until_ready(dp_step(dp_states[0], batch, mask))
    return aux

  def run_plain(i):
    return jax.block_until_ready(plain_step(params, plain_state, plain_batches[i]))

  def run_naive(i):
    return jax.block_until_ready(naive_step(params, plain_state, plain_batches[i]))

  runners = {"dp": run_dp, "plain": run_plain}
  if naive:
    runners["naive"] = run_naive
  compile_seconds = {}
  for name, fn in runners.items():
    start = time.perf_counter()
    fn(0)  # compile + warm up
    compile_seconds[name] = time.perf_counter() - start
  times = {name: [] for name in runners}
  for i in range(1, repeats + 1):  # interleaved: all see the same machine load
    for name, fn in runners.items():
      start = time.perf_counter()
      fn(i)
      times[name].append(time.perf_counter() - start)
  tokens = batch_size * seq_len  # expected real tokens per step (DP pads to max_batch_size)
  med = {name: statistics.median(t) for name, t in times.items()}
  return {"model": model, "params": models.params_count(model), "batch_size": batch_size,
          "max_batch_size": private.sampler.max_batch_size, "seq_len": seq_len,
          "dp_tokens_per_second": tokens / med["dp"],
          "plain_tokens_per_second": tokens / med["plain"],
          "naive_plain_tokens_per_second": tokens / med["naive"] if naive else None,
          "dp_slowdown": med["dp"] / med["plain"], "repeats": repeats,
          "step_seconds": med, "compile_seconds": compile_seconds}


# --- main --------------------------------------------------------------------------------

def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--preset", choices=tuple(PRESETS), default="full",
                      help="the grid: full (CPU, ~1.5 h) or accelerator (one H100, <= 8 min)")
  parser.add_argument("--quick", action="store_true",
                      help="minutes-long pipeline check (CI): a small copy of the preset")
  parser.add_argument("--out", default=None,
                      help="output folder (default: benchmarks/out/scaling_study[_PRESET]"
                      "[_quick])")
  parser.add_argument("--skip-speed", action="store_true", help="skip the speed comparison")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  spec = preset_spec(args.preset, args.quick)
  suffix = ("" if args.preset == "full" else "_" + args.preset) + ("_quick" if args.quick else "")
  out = args.out or os.path.join(_HERE, "out", "scaling_study" + suffix)
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  notes = []

  configs = study_configs(spec)
  corpus = sweep.corpus_for(configs[0])
  results_path = os.path.join(out, "results.jsonl")
  summary = sweep.run_sweep(configs, results_path, progress=not args.no_progress)
  rows = summary.rows
  sweep_seconds = time.perf_counter() - start
  print(f"sweep: {len(summary.trained)} runs trained, {len(summary.skipped)} resumed from "
        f"{results_path} ({sweep_seconds:.0f} s)", file=sys.stderr)

  speed = []
  if not args.skip_speed:
    for model in spec["speed"]["models"]:
      speed.append(measure_speed(model, spec["speed"]["batch_size"],
                                 seq_len=spec["common"]["seq_len"],
                                 repeats=spec["speed"]["repeats"], corpus=corpus,
                                 naive=spec["speed"]["naive"]))

  warmup = spec["common"]["warmup_steps"]
  delta = spec["common"]["delta"]
  users = corpus.num_train_examples
  computes = [float(c) for c in spec["computes"]]
  findings = {"ratio": report_lib.finding_ratio_drives_utility(rows)}
  frontier = report_lib.nonprivate_frontier(rows, computes, warmup)
  plots = [("measured loss vs noise-batch ratio", report_lib.plot_final_loss_vs_ratio(
      rows, os.path.join(out, "measured_loss_vs_ratio.png")))]
  optima, any_batch, shipped = {}, {}, []
  swept_batches = sorted({run[1] for run in spec["runs"]})
  shipped_epsilon = spec["epsilons"][len(spec["epsilons"]) // 2]
  try:  # fitting and planning: dpfl.scaling.fit / planner / plots
    from dpfl.scaling import fit, plots as law_plots
  except ImportError as err:
    notes.append(f"fit/planner unavailable ({err}): only measured results are reported")
    fit = law_plots = None
  if fit is not None:
    description = ("benchmarks/scaling_study.py"
                   + ("" if args.preset == "full" else " --preset " + args.preset)
                   + (" --quick" if args.quick else ""))
    law, note = fit_study_law(rows, description=description, source=results_path)
    if note:
      notes.append(note)
    fit.save_law(law, os.path.join(out, "law.json"))
    plots.append(("fitted law: loss vs noise-batch ratio", law_plots.plot_loss_vs_ratio(
        law, os.path.join(out, "law_loss_vs_ratio.png"), tables=fit.loss_tables(rows))))
    try:
      grid, note = study_sigma_grid(spec, out, args.quick)
      if note:
        notes.append(note)
      query = dict(delta=delta, users=users, seq_len=corpus.seq_len, grid=grid)
      optima = report_lib.supported_optima(law, computes=computes, epsilons=spec["epsilons"],
                                           batch_sizes=swept_batches, **query)
      any_batch = report_lib.supported_optima(law, computes=computes,
                                              epsilons=spec["epsilons"], **query)
      shipped = report_lib.shipped_planner(law, computes=computes, epsilon=shipped_epsilon,
                                           **query)
      plots.append(("compute-optimal configurations (planner as shipped)",
                    law_plots.plot_compute_optimal(
                        law, os.path.join(out, "compute_optimal.png"),
                        epsilons=spec["epsilons"], computes=computes, **query)))
    except (OSError, ValueError) as err:  # e.g. no σ grid shipped yet
      notes.append(f"planner unavailable: {type(err).__name__}: {err}")
  findings["smaller"] = report_lib.finding_smaller_models_larger_batches(optima, frontier,
                                                                        computes)
  findings["epsilon"] = report_lib.finding_diminishing_epsilon(optima, computes)
  if args.preset == "accelerator":
    notes.extend(accelerator_notes(spec, quick=args.quick))
  if args.quick and args.preset == "full":
    notes.append("--quick: 30 steps, two small models, few runs; the verdicts above test the "
                 "pipeline, not the paper")
  seconds = time.perf_counter() - start
  report = os.path.join(out, "REPORT.md")
  intro = (f"{len(rows)} runs on the Python-stdlib corpus ({users} training sequences of "
           f"{corpus.seq_len} tokens from {len(corpus.train_users)} files; eval on "
           f"{len(corpus.eval_users)} held-out files), {steps_text(spec)}, "
           "example-level DP-SGD via `dpfl.make_private` (Poisson sampling, C = 1, Adam), "
           f"δ = {delta:g}. Wall time {seconds / 60:.1f} min ({sweep_seconds / 60:.1f} min "
           f"sweep, {len(summary.trained)} runs trained now). Losses are nats per token "
           "(uniform over bytes: 5.55).")
  title = ("DP scaling study" + (" (accelerator preset)" if args.preset == "accelerator" else "")
           + (" (quick: pipeline check, not evidence)" if args.quick else ""))
  report_lib.write_report(report, title=title, intro=intro, rows=rows, findings=findings,
                          computes=computes, any_batch=any_batch, shipped=shipped,
                          shipped_epsilon=shipped_epsilon, speed=speed, plots=plots,
                          notes=notes)
  summary_out = {
      "benchmark": "scaling_study", "preset": args.preset, "quick": args.quick,
      "device_kind": device_kind(), "runs": len(rows),
      "trained": len(summary.trained), "seconds": round(seconds, 1),
      "sweep_seconds": round(sweep_seconds, 1), "report": report,
      "findings": {"noise_batch_ratio_drives_utility": findings["ratio"]["holds"],
                   "private_optimum_smaller_model": findings["smaller"].get("holds_model"),
                   "private_optimum_larger_batch": findings["smaller"].get("holds_batch"),
                   "diminishing_returns_in_epsilon": findings["epsilon"]["holds"]},
      "speed": [{k: s[k] for k in ("model", "batch_size", "dp_tokens_per_second",
                                   "plain_tokens_per_second", "naive_plain_tokens_per_second",
                                   "dp_slowdown")} for s in speed],
  }
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({**summary_out, "details": findings}, f, indent=1, default=float)
  print(f"{'finding':<48} verdict")
  for key, value in summary_out["findings"].items():
    print(f"{key:<48} {report_lib.verdict(value).strip('*')}")
  for s in speed:
    print(f"speed {s['model']} B={s['batch_size']}: DP {s['dp_tokens_per_second']:,.0f} tok/s, "
          f"non-private {s['plain_tokens_per_second']:,.0f} tok/s ({s['dp_slowdown']:.2f}x)")
  print(f"report: {report}")
  print(json.dumps(summary_out, default=float))
  return summary_out


if __name__ == "__main__":
  main()
