"""Speed and memory of per-example clipping vs a plain gradient step.

For each model (MLP 784-512-512-10 at batch 256; 2-layer causal transformer,
d_model 256, sequence 64, batch 64; see ``_models.py``) this compiles
(ahead of time) and then times:

* ``plain``: ``jax.grad`` of the mean loss over the batch (the baseline);
* ``dpfl``: ``dpfl.clipping.clipped_grad`` with the default
  ``method="auto"`` (the figure quoted as "dpfl"; the table says which
  method ``auto`` picked);
* every explicit clipping method in ``dpfl.clip_methods.METHODS``
  (``materialize``, ``reweight``, and ``ghost`` once it exists): each one's
  own row, so a new method shows up here without editing this file;
* ``jax_privacy``: ``jax_privacy.clipping.clipped_grad`` when importable.

Time: all steps are timed in interleaved rounds (plain, dpfl, materialize,
..., plain, ...), and each ratio is the median over rounds of (step time /
plain step time in the same round): the shared CPU's speed drifts by 2x
within a minute, and pairing cancels most of it. Within a round, a step
faster than 0.3 s is run once untimed and then timed as the median of 3
back-to-back calls (the steady state of a training loop).

Memory: XLA's compiled temp-buffer size (``compiled.memory_analysis()
.temp_size_in_bytes``: everything the step allocates besides its
arguments and outputs) of each step at the timing batch, and its ratio to
the plain step's. Separately, as before, the clipped step's temp size at a
logical batch of 4096 processed in microbatches of 256, vs one batch of 256
(and 4096 without microbatching; and the plain gradient at 256, for scale).

Targets (issue 13, on the 2-core CPU): with ghost clipping, the default
``auto`` step costs **<= 2.0x** a plain step on the MLP and **<= 1.2x** on
the transformer, whose temp memory stays **<= 1.5x** the plain step's at
batch 64.

``--gpt2`` adds a GPT-2-small-shaped model (12 layers, d_model 768, 12
heads, sequence 256, vocabulary 50257, tied embeddings; ~124M parameters):
plain, ``materialize`` and ``ghost`` (not ``reweight``, whose per-example
norm pass is a second materialisation at this size) at the largest batch
that fits in memory: the largest power of two <= 16 at which every step's
compiled footprint (temp + arguments + outputs, from compile-only memory
analysis) stays under 60% of the RAM available when the script starts
(``--gpt2-batch`` overrides). Its steps take seconds to minutes on a CPU, so
it runs ``--gpt2-rounds`` rounds (default 3; 0 = memory analysis only, no
step is run).

Usage: ``python benchmarks/clipping.py [--rounds N] [--json] [--gpt2
[--gpt2-rounds K] [--gpt2-batch B]] [--gpt2-only]``. With ``--json`` the
last stdout line is one JSON object::

  {"mlp": {"dpfl": r, "jax_privacy": r|null, "auto_method": name,
           "batch_size": 256, "methods": {"materialize": r, ...}},
   "transformer": {...},
   "gpt2": {"batch_size": b, "rounds": k, "auto_method": name,
            "methods": {"materialize": r|null, ...}},     # with --gpt2
   "memory": {"mlp": {"plain": bytes, "dpfl": bytes, "materialize": bytes,
                      ...}, ...},
   "memory_ratio": {"mlp": {"dpfl": temp / plain temp, ...}, ...},
   "microbatch_memory": {"mlp": {"dpfl_batch_256": bytes, ...}, ...},
   "details": {"mlp": {"median_ms": {...}, "auto_method": name}, ...}}

where each ``r`` is a median ratio of step time to the plain step's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Run as a script, this folder comes first on sys.path, where
# benchmarks/accounting.py would shadow the real `accounting` package that
# dpfl imports: import dpfl first, then put the folder back for `_models`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from dpfl.clip_cost import choose_method  # noqa: E402
from dpfl.clip_methods import METHODS  # noqa: E402
from dpfl.clipping import clipped_grad, per_unit_loss  # noqa: E402

sys.path.append(_HERE)
from _models import make_gpt2, make_mlp, make_transformer  # noqa: E402

try:  # Optional baseline; never a dependency of dpfl.
  from jax_privacy import clipping as jp_clipping  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
  jp_clipping = None

L2_CLIP_NORM = 1.0
_BURST_BELOW_S = 0.3
MODELS = {
    "mlp": lambda: make_mlp(256),
    "transformer": lambda: make_transformer(64),
}
GPT2_BATCH_CAP = 16
GPT2_RAM_FRACTION = 0.6
# reweight's norm pass forms each example's whole gradient, like
# materialize, and then runs a second backward pass: never the pick here.
GPT2_SKIPPED_METHODS = ("reweight",)

Make = Callable[[], tuple[Any, Any, Callable[[Any, Any], jax.Array]]]


def clip_methods() -> tuple[str, ...]:
  """Every explicit clipping method dpfl has (``METHODS`` minus ``auto``)."""
  return tuple(m for m in METHODS if m != "auto")


def auto_method(loss_fn, params, batch) -> str:
  """What ``method="auto"`` picks for this model, as ``clipped_grad`` asks."""
  one = lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x))
  return choose_method(
      per_unit_loss(loss_fn, unit="example"),
      params,
      jax.tree.map(one, batch),
      jax.ShapeDtypeStruct((), jnp.bool_),
  )


def _steps(loss_fn, methods, *, auto: bool, baselines: bool) -> dict:
  steps = {"plain": jax.grad(loss_fn)}
  if auto:
    steps["dpfl"] = clipped_grad(loss_fn, l2_clip_norm=L2_CLIP_NORM)
  for method in methods:
    steps[method] = clipped_grad(
        loss_fn, l2_clip_norm=L2_CLIP_NORM, method=method
    )
  if baselines and jp_clipping is not None:
    steps["jax_privacy"] = jp_clipping.clipped_grad(
        loss_fn, l2_clip_norm=L2_CLIP_NORM
    )
  return steps


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
  )


def compile_steps(steps: dict, params, batch) -> dict:
  """Ahead-of-time compiles each step; arrays or ShapeDtypeStructs."""
  return {
      key: jax.jit(fn).lower(_abstract(params), _abstract(batch)).compile()
      for key, fn in steps.items()
  }


def memory_of(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {
      "temp": int(m.temp_size_in_bytes),
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
  }


def _time_once(fn: Callable[..., Any], *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def time_interleaved(compiled: dict, params, batch, rounds: int) -> dict:
  """Per-step lists of round times; ``compiled`` must contain ``plain``."""
  bursts = {}
  for key, fn in compiled.items():
    # One warm-up call. Fast steps are then timed as the median of a short
    # burst after one untimed call, as in a training loop where the same
    # step runs back to back.
    bursts[key] = 3 if _time_once(fn, params, batch) < _BURST_BELOW_S else 1
  times: dict[str, list[float]] = {k: [] for k in compiled}
  for _ in range(rounds):
    for key, fn in compiled.items():
      if bursts[key] > 1:
        _time_once(fn, params, batch)
      times[key].append(
          statistics.median(
              _time_once(fn, params, batch) for _ in range(bursts[key])
          )
      )
  return times


def _paired_ratios(times: dict) -> dict[str, float]:
  return {
      key: statistics.median(t / p for t, p in zip(ts, times["plain"]))
      for key, ts in times.items()
      if key != "plain"
  }


def _temp_summary(memory: dict) -> tuple[dict, dict]:
  temp = {k: m["temp"] for k, m in memory.items()}
  # XLA may need no temp buffer at all for a tiny plain step.
  plain = max(temp["plain"], 1)
  return temp, {k: t / plain for k, t in temp.items() if k != "plain"}


def bench_model(
    make: Make,
    *,
    rounds: int,
    methods: tuple[str, ...] | None = None,
    baselines: bool = True,
) -> dict:
  """Times and measures plain, auto, each method (and jax-privacy).

  Returns ``median_ms``, ``ratio`` (paired median, vs plain), ``temp_bytes``,
  ``temp_ratio`` (vs plain), ``auto_method`` and ``batch_size``; keys of
  the per-step dicts are ``plain``, ``dpfl`` (auto), the method names and
  ``jax_privacy``.
  """
  params, batch, loss_fn = make()
  methods = clip_methods() if methods is None else methods
  steps = _steps(loss_fn, methods, auto=True, baselines=baselines)
  compiled = compile_steps(steps, params, batch)
  temp, temp_ratio = _temp_summary(
      {k: memory_of(c) for k, c in compiled.items()}
  )
  times = time_interleaved(compiled, params, batch, rounds)
  return {
      "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
      "ratio": _paired_ratios(times),
      "temp_bytes": temp,
      "temp_ratio": temp_ratio,
      "auto_method": auto_method(loss_fn, params, batch),
      "batch_size": len(jax.tree.leaves(batch)[0]),
  }


def available_ram_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux), else physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def footprint(memory: dict[str, int]) -> int:
  return memory["temp"] + memory["arguments"] + memory["outputs"]


def largest_fitting_batch(
    steps: dict, params, batch, *, budget_bytes: int, cap: int = GPT2_BATCH_CAP
) -> tuple[int | None, dict, dict]:
  """The largest power of two <= ``cap`` at which every step fits.

  Compile-only: nothing is run. A step fits when its compiled footprint
  (temp + arguments + outputs) is <= ``budget_bytes``. ``batch`` must have
  at least ``cap`` examples. Returns ``(batch_size or None, compiled steps
  at that batch, {batch_size: {step: memory}} for every size tried)``.
  """
  tried = {}
  size = 1 << (cap.bit_length() - 1)
  while size >= 1:
    sub = jax.tree.map(lambda x: x[:size], batch)
    compiled = compile_steps(steps, params, sub)
    tried[size] = {k: memory_of(c) for k, c in compiled.items()}
    if all(footprint(m) <= budget_bytes for m in tried[size].values()):
      return size, compiled, tried
    size //= 2
  return None, {}, tried


def bench_gpt2(
    make: Make = make_gpt2,
    *,
    rounds: int,
    batch_size: int | None = None,
    budget_bytes: int | None = None,
    cap: int = GPT2_BATCH_CAP,
    methods: tuple[str, ...] | None = None,
) -> dict:
  """Plain vs each method but reweight on a big model, at the largest batch.

  ``make()`` returns a model whose batch has at least ``cap`` (or
  ``batch_size``) examples. ``rounds=0``: memory analysis only. Returns
  ``bench_model``'s keys (timing ones None when ``rounds=0``), plus
  ``footprint_bytes``, ``budget_bytes``, ``tried`` (batch size -> step ->
  footprint bytes) and ``rounds``.
  """
  params, batch, loss_fn = make()
  if methods is None:
    methods = tuple(m for m in clip_methods() if m not in GPT2_SKIPPED_METHODS)
  steps = _steps(loss_fn, methods, auto=False, baselines=False)
  if budget_bytes is None:
    budget_bytes = int(GPT2_RAM_FRACTION * available_ram_bytes())
  if batch_size is None:
    batch_size, compiled, tried = largest_fitting_batch(
        steps, params, batch, budget_bytes=budget_bytes, cap=cap
    )
    if batch_size is None:
      raise RuntimeError(
          f"GPT-2 does not fit at batch 1: footprints {tried[1]} bytes,"
          f" budget {budget_bytes} bytes ({GPT2_RAM_FRACTION:.0%} of"
          " available RAM)"
      )
  else:
    compiled = compile_steps(
        steps, params, jax.tree.map(lambda x: x[:batch_size], batch)
    )
    tried = {batch_size: {k: memory_of(c) for k, c in compiled.items()}}
  memory = tried[batch_size]
  temp, temp_ratio = _temp_summary(memory)
  batch = jax.tree.map(lambda x: x[:batch_size], batch)
  out = {
      "batch_size": batch_size,
      "rounds": rounds,
      "auto_method": auto_method(loss_fn, params, batch),
      "temp_bytes": temp,
      "temp_ratio": temp_ratio,
      "footprint_bytes": {k: footprint(m) for k, m in memory.items()},
      "budget_bytes": budget_bytes,
      "tried": {
          b: {k: footprint(m) for k, m in ms.items()} for b, ms in tried.items()
      },
      "median_ms": {k: None for k in steps},
      "ratio": {k: None for k in steps if k != "plain"},
  }
  if rounds > 0:
    times = time_interleaved(compiled, params, batch, rounds)
    out["median_ms"] = {
        k: 1e3 * statistics.median(v) for k, v in times.items()
    }
    out["ratio"] = _paired_ratios(times)
  return out


def _temp_bytes(fn, *args, **kwargs) -> int:
  compiled = jax.jit(fn).lower(*args, **kwargs).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def microbatch_memory() -> dict:
  """Compiled temp bytes: batch 256 vs logical 4096 in microbatches of 256."""
  out = {}
  for name, make in (("mlp", make_mlp), ("transformer", make_transformer)):
    params, batch_4096, loss_fn = make(4096)
    batch_256 = jax.tree.map(lambda x: x[:256], batch_4096)
    whole = clipped_grad(loss_fn, l2_clip_norm=L2_CLIP_NORM)
    micro = clipped_grad(loss_fn, l2_clip_norm=L2_CLIP_NORM, microbatch_size=256)
    out[name] = {
        "dpfl_batch_256": _temp_bytes(whole, params, batch_256),
        "dpfl_batch_4096_microbatch_256": _temp_bytes(micro, params, batch_4096),
        "dpfl_batch_4096_no_microbatch": _temp_bytes(whole, params, batch_4096),
        "plain_grad_batch_256": _temp_bytes(jax.grad(loss_fn), params, batch_256),
    }
  return out


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
  return "-" if x is None else f"{x:{spec}}{suffix}"


def format_table(results: dict) -> list[str]:
  """One row per (model, step): median ms, time ratio, temp MiB and ratio."""
  header = (
      f"{'model':<12} {'step':<22} {'batch':>5} {'median ms':>10}"
      f" {'ratio':>7} {'temp MiB':>9} {'temp ratio':>10}"
  )
  lines = [header, "-" * len(header)]
  for name, res in results.items():
    for key, ms in res["median_ms"].items():
      label = f"auto ({res['auto_method']})" if key == "dpfl" else key
      plain = key == "plain"
      lines.append(
          f"{name:<12} {label:<22} {res['batch_size']:>5}"
          f" {_fmt(ms, '>10.2f')}"
          f" {'1.00x' if plain else _fmt(res['ratio'][key], '.2f', 'x'):>7}"
          f" {res['temp_bytes'][key] / 2**20:>9.1f}"
          f" {'1.00x' if plain else _fmt(res['temp_ratio'][key], '.2f', 'x'):>10}"
      )
  return lines


def json_summary(results: dict, microbatch: dict | None) -> dict:
  """The JSON line: today's ``{model: {"dpfl", "jax_privacy"}}`` and more."""
  rnd = lambda x: None if x is None else round(x, 4)
  out: dict[str, Any] = {}
  for name, res in results.items():
    methods = {
        k: rnd(r) for k, r in res["ratio"].items()
        if k not in ("dpfl", "jax_privacy")
    }
    entry: dict[str, Any] = {}
    if "dpfl" in res["ratio"]:
      entry["dpfl"] = rnd(res["ratio"]["dpfl"])
      entry["jax_privacy"] = rnd(res["ratio"].get("jax_privacy"))
    else:
      entry["rounds"] = res["rounds"]
    entry.update(
        auto_method=res["auto_method"],
        batch_size=res["batch_size"],
        methods=methods,
    )
    out[name] = entry
  out["memory"] = {name: res["temp_bytes"] for name, res in results.items()}
  out["memory_ratio"] = {
      name: {k: rnd(r) for k, r in res["temp_ratio"].items()}
      for name, res in results.items()
  }
  if microbatch is not None:
    out["microbatch_memory"] = microbatch
  out["details"] = {
      name: {
          "median_ms": {k: rnd(v) for k, v in res["median_ms"].items()},
          "auto_method": res["auto_method"],
          **(
              {"footprint_bytes": res["footprint_bytes"],
               "budget_bytes": res["budget_bytes"],
               "tried": res["tried"]}
              if "tried" in res else {}
          ),
      }
      for name, res in results.items()
  }
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--rounds", type=int, default=7, help="timed rounds (>= 5)")
  parser.add_argument("--json", action="store_true", help="print a JSON line last")
  parser.add_argument(
      "--all-methods",
      action="store_true",
      help="no-op, kept for old command lines: every method is always timed",
  )
  parser.add_argument(
      "--gpt2", action="store_true", help="also run the GPT-2-small-shaped model"
  )
  parser.add_argument(
      "--gpt2-only", action="store_true",
      help="run only the GPT-2-small-shaped model",
  )
  parser.add_argument(
      "--gpt2-rounds", type=int, default=3,
      help="GPT-2 timed rounds (0: compile-only memory analysis)",
  )
  parser.add_argument(
      "--gpt2-batch", type=int, default=None,
      help=f"GPT-2 batch size (default: the largest power of two <="
      f" {GPT2_BATCH_CAP} that fits in {round(100 * GPT2_RAM_FRACTION)}%% of available RAM)",
  )
  args = parser.parse_args(argv)
  if args.rounds < 5:
    parser.error(f"--rounds must be >= 5, got {args.rounds}")
  if args.gpt2_rounds < 0:
    parser.error(f"--gpt2-rounds must be >= 0, got {args.gpt2_rounds}")
  if args.gpt2_batch is not None and args.gpt2_batch < 1:
    parser.error(f"--gpt2-batch must be >= 1, got {args.gpt2_batch}")
  gpt2 = args.gpt2 or args.gpt2_only

  rounds = [] if args.gpt2_only else [f"{args.rounds} interleaved rounds"]
  if gpt2:
    rounds.append(f"gpt2: {args.gpt2_rounds}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform};"
        f" jax-privacy {'found' if jp_clipping else 'not installed'};"
        f" C={L2_CLIP_NORM}; methods {', '.join(clip_methods())};"
        f" {', '.join(rounds)}")
  results = {}
  if not args.gpt2_only:
    for name, make in MODELS.items():
      results[name] = bench_model(make, rounds=args.rounds)
  if gpt2:
    size = args.gpt2_batch or GPT2_BATCH_CAP
    results["gpt2"] = bench_gpt2(
        lambda: make_gpt2(size),
        rounds=args.gpt2_rounds,
        batch_size=args.gpt2_batch,
    )
  print("\n".join(format_table(results)))
  print("(ratio: median over rounds of step time / plain step time in the same"
        " round; temp: XLA compiled temp buffers)")
  if gpt2:
    g = results["gpt2"]
    print(
        f"gpt2: batch {g['batch_size']}, {g['rounds']} rounds; footprint"
        " (temp+args+outputs) GiB: "
        + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in g["footprint_bytes"].items())
        + f"; budget {g['budget_bytes'] / 2**30:.2f} GiB"
    )

  microbatch = None
  if not args.gpt2_only:
    microbatch = microbatch_memory()
    print()
    print("Microbatching, temp memory (XLA memory_analysis), MiB:")
    print(
        f"{'model':<12} {'dpfl B=256':>11} {'dpfl 4096/256':>14}"
        f" {'dpfl 4096':>10} {'plain B=256':>12}"
    )
    for name, m in microbatch.items():
      print(
          f"{name:<12} {m['dpfl_batch_256'] / 2**20:>11.1f}"
          f" {m['dpfl_batch_4096_microbatch_256'] / 2**20:>14.1f}"
          f" {m['dpfl_batch_4096_no_microbatch'] / 2**20:>10.1f}"
          f" {m['plain_grad_batch_256'] / 2**20:>12.1f}"
      )

  if args.json:
    print(json.dumps(json_summary(results, microbatch)))


if __name__ == "__main__":
  main()
