"""The benchmarks that need an accelerator, in one run of <= 8 minutes on one GPU.

Four sections, each the code of an existing benchmark called as is (only the
sizes differ), each baseline in the same process and run:

* ``clipping`` (``benchmarks/clipping.py``): per-example clipping with every
  method (``materialize``, ``reweight``, ``ghost``, and ``auto``, the default,
  with the method it picks) against the plain ``jax.grad`` step, time ratio
  (paired median over interleaved rounds) and XLA compiled temp memory, on
  the MLP 784-512-512-10 (batch 256), the 2-layer transformer (batch 64) and
  the GPT-2-small shape (~124M parameters, sequence 256) at the largest
  power-of-two batch <= 16 whose every step fits in 60% of the device's
  memory (``bytes_limit``; the host's RAM when the device has no memory
  stats). On an accelerator the GPT-2 rows include ``reweight``.
* ``uls`` (``benchmarks/user_level.py``, one device): the full ULS step
  (per-user clipped gradient, noise, Adam) against the plain Adam step over
  the same examples (64 users x 8 sequences of the 2-layer transformer).
* ``noise`` (``benchmarks/_mf_streaming.py``): streaming BLT noise (4
  buffers, state donated) against iid ``gaussian_noise``, per step, at 100M
  parameters.
* ``tokens`` (``benchmarks/scaling_study.py``'s ``measure_speed``): tokens/s
  of ``make_private``'s DP-SGD step against the plain optax step, same model
  and batch (256 sequences of 64 tokens; the one-pass ``jax.grad`` step
  too, as ``naive_plain_tokens_per_second``), for the ``dpfl.scaling``
  models from ``s200k`` to ``s20m``, largest first.

Time budget: ``--budget-s`` (default 420 s, so the run stays under 8 minutes
with interpreter start-up and a slow first compile; 1800 s with ``--quick``) is shared among the
sections (``SHARES``); section k must end by ``start + (share_1 + ... +
share_k) * budget``, so an overrun is taken from the later sections, never
added to the total. A section starts an item (one model, one step) only
while its deadline leaves the item's expected time; what it did not start is
listed in its ``skipped`` and its ``complete`` is false; so is a section
that raised (its ``skipped`` holds the error; the other sections still run). An item already
running is not interrupted (a JAX compile cannot be), which is why each item
is sized well under its section's share.

Memory: per step, XLA's compiled temp-buffer bytes (``memory_analysis``,
what ``benchmarks/clipping.py`` reports); per section, the device's
``peak_bytes_in_use`` from ``jax.devices()[0].memory_stats()`` where the
backend has it (GPU; a process-wide high-water mark, so non-decreasing
across sections), else null.

``--quick`` runs the same code paths at small sizes (tiny MLP, transformer
and GPT-2 shapes, 100K-parameter noise, the smallest scaling model) in about
2 minutes of CPU time: a check that the script works, not figures to quote.

Usage: ``python benchmarks/accelerator.py [--quick] [--budget-s S]``. Prints
a line per section and, last, one JSON object::

  {"benchmark": "accelerator", "quick": bool, "device_kind": str,
   "platform": str, "jax_version": str, "budget_s": s, "wall_s": s,
   "sections": {name: {"wall_s", "budget_s", "complete", "skipped",
                       "peak_bytes_in_use", ...results}}}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Callable

# Run as a script, this folder comes first on sys.path, where
# benchmarks/accounting.py would shadow the real `accounting` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax  # noqa: E402

import dpfl  # noqa: E402,F401  (imported before the benchmarks put _HERE back)


def _load(name: str, file: str):
  """A sibling benchmark as a module (by path: this folder is off sys.path)."""
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, file))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


clipping = _load("_accelerator_clipping", "clipping.py")
user_level = _load("_accelerator_user_level", "user_level.py")
streaming = _load("_accelerator_mf_streaming", "_mf_streaming.py")
scaling_study = _load("_accelerator_scaling_study", "scaling_study.py")
_models = sys.modules[clipping.make_mlp.__module__]  # benchmarks/_models.py

DEFAULT_BUDGET_S = 420.0
# --quick checks the code on a CPU, where a busy shared machine can be 10x
# slower than an idle one: its guard is there for runaway runs only.
QUICK_BUDGET_S = 1800.0
# Share of the budget per section, in the order they run.
SHARES = {"clipping": 0.45, "uls": 0.12, "noise": 0.13, "tokens": 0.30}


def _sizes(quick: bool) -> dict:
  """Workloads: the benchmarks' own sizes on an accelerator; tiny with ``quick``.

  ``need_s`` is the time an item is expected to take at most (compile
  included): an item starts only if its section has that much left.
  """
  if quick:
    return dict(
        clip_models={
            "mlp": lambda: _models.make_mlp(16, in_features=32, hidden=(32, 32)),
            "transformer": lambda: _models.make_transformer(
                8, seq_len=16, d_model=32, num_heads=2),
        },
        clip_rounds=5,
        gpt2=lambda: _models.make_gpt2(2, seq_len=16, d_model=32, num_layers=2,
                                       num_heads=2, vocab_size=512),
        gpt2_cap=2, gpt2_rounds=1, gpt2_need_s=5.0,
        uls=dict(users=4, examples_per_user=2, rounds=5),
        uls_model=dict(seq_len=16, d_model=32, num_heads=2),
        noise_params=100_000, noise_repeats=5,
        token_models=("s50k",), token_batch=16, token_repeats=5, token_naive=False,
        item_need_s=2.0)
  return dict(
      clip_models=dict(clipping.MODELS),
      clip_rounds=7,
      gpt2=lambda: _models.make_gpt2(clipping.GPT2_BATCH_CAP),
      gpt2_cap=clipping.GPT2_BATCH_CAP, gpt2_rounds=3, gpt2_need_s=90.0,
      uls=dict(users=64, examples_per_user=8, rounds=7), uls_model=None,
      noise_params=100_000_000, noise_repeats=7,
      # Largest first: if the section runs out of time, the small models,
      # which a CPU measures as well, are the ones skipped.
      token_models=tuple(n for n in reversed(scaling_study.models.model_names())
                         if scaling_study.models.params_count(n) >= 200_000),
      # naive: the one-pass jax.grad step as well (the sweep's plain step
      # accumulates over blocks of <= 32 sequences, which suits a CPU).
      token_batch=256, token_repeats=7, token_naive=True, item_need_s=15.0)


def device_info() -> dict:
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "platform": device.platform,
          "device_count": jax.device_count(), "jax_version": jax.__version__}


def memory_stats() -> dict | None:
  """``memory_stats()`` of the first device, or None where the backend has none (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    return None
  return dict(stats) if stats else None


def device_memory_budget(fraction: float = clipping.GPT2_RAM_FRACTION) -> int:
  """``fraction`` of the device's memory (``bytes_limit``), else of the host's free RAM."""
  stats = memory_stats()
  if stats and stats.get("bytes_limit"):
    return int(fraction * stats["bytes_limit"])
  return int(fraction * clipping.available_ram_bytes())


class Section:
  """One section's clock: its deadline, and what it finished or skipped."""

  def __init__(self, name: str, deadline: float):
    self.name, self.deadline = name, deadline
    self.start = time.perf_counter()
    self.skipped: list[str] = []

  def room_for(self, item: str, need_s: float) -> bool:
    """True if ``item`` (expected ``need_s`` seconds) fits before the deadline; else skip it."""
    if time.perf_counter() + need_s <= self.deadline:
      return True
    self.skipped.append(item)
    return False

  def close(self, results: dict) -> dict:
    stats = memory_stats()
    return {"wall_s": round(time.perf_counter() - self.start, 2),
            "budget_s": round(self.deadline - self.start, 2),
            "complete": not self.skipped, "skipped": self.skipped,
            "peak_bytes_in_use": None if stats is None else stats.get("peak_bytes_in_use"),
            **results}


def _round(x, digits: int = 4):
  if isinstance(x, dict):
    return {k: _round(v, digits) for k, v in x.items()}
  if isinstance(x, float):
    return round(x, digits)
  return x


def _clip_row(res: dict) -> dict:
  return _round({k: res[k] for k in ("batch_size", "auto_method", "ratio", "median_ms",
                                     "temp_bytes", "temp_ratio") if k in res})


def section_clipping(section: Section, sizes: dict) -> dict:
  """``benchmarks/clipping.py``'s rows: each model, then GPT-2 (every method on a device)."""
  out: dict[str, Any] = {"models": {}}
  for name, make in sizes["clip_models"].items():
    if section.room_for(name, sizes["item_need_s"]):
      res = clipping.bench_model(make, rounds=sizes["clip_rounds"], baselines=False)
      out["models"][name] = _clip_row(res)
  if section.room_for("gpt2", sizes["gpt2_need_s"]):
    # reweight's second materialisation is what clipping.py skips on a CPU;
    # a device with memory stats (GPU) has room for it.
    methods = clipping.clip_methods() if memory_stats() else None
    res = clipping.bench_gpt2(sizes["gpt2"], rounds=sizes["gpt2_rounds"],
                              cap=sizes["gpt2_cap"], methods=methods,
                              budget_bytes=device_memory_budget())
    row = _clip_row(res)
    row.update(rounds=res["rounds"], budget_bytes=res["budget_bytes"],
               footprint_bytes=res["footprint_bytes"])
    out["models"]["gpt2"] = row
  return out


def section_uls(section: Section, sizes: dict) -> dict:
  """``benchmarks/user_level.py``'s one-device ULS step vs plain step."""
  if not section.room_for("uls", sizes["item_need_s"]):
    return {}
  res = user_level.child(1, sizes["uls"]["users"], sizes["uls"]["examples_per_user"],
                         sizes["uls"]["rounds"], model_kwargs=sizes["uls_model"])
  return _round({"uls_ratio": res["uls_ratio"], "grad_only_ratio": res["grad_only_ratio"],
                 "examples_per_second": res["examples_per_second"],
                 "plain_examples_per_second": res["plain_examples_per_second"],
                 "median_ms": res["median_ms"], "num_parameters": res["num_parameters"],
                 **sizes["uls"]})


def section_noise(section: Section, sizes: dict) -> dict:
  """``benchmarks/_mf_streaming.py``: BLT (4 buffers) vs iid noise per step."""
  if not section.room_for("noise", sizes["item_need_s"]):
    return {}
  res = streaming.bench_streaming(False, repeats=sizes["noise_repeats"], jax_privacy=False,
                                  num_params=sizes["noise_params"])
  res.pop("jax_privacy", None)
  return _round(res, 6)


def section_tokens(section: Section, sizes: dict) -> dict:
  """``benchmarks/scaling_study.py``'s DP vs plain tokens/s, per scaling model."""
  corpus = scaling_study.corpus_lib.load_corpus(seq_len=64)
  rows = {}
  for model in sizes["token_models"]:
    if section.room_for(model, sizes["item_need_s"]):
      res = scaling_study.measure_speed(model, sizes["token_batch"], seq_len=64,
                                        repeats=sizes["token_repeats"], corpus=corpus,
                                        naive=sizes["token_naive"])
      rows[model] = _round({k: res[k] for k in (
          "params", "batch_size", "max_batch_size", "dp_tokens_per_second",
          "plain_tokens_per_second", "naive_plain_tokens_per_second", "dp_slowdown")}, 2)
  return {"models": rows}


SECTIONS: dict[str, Callable[[Section, dict], dict]] = {
    "clipping": section_clipping, "uls": section_uls, "noise": section_noise,
    "tokens": section_tokens}


def run(*, quick: bool, budget_s: float, only: tuple[str, ...] | None = None) -> dict:
  """Runs the sections (``only``: a subset, same shares) and returns the JSON object."""
  start = time.perf_counter()
  sizes = _sizes(quick)
  out: dict[str, Any] = {"benchmark": "accelerator", "quick": quick, **device_info(),
                         "budget_s": budget_s, "sections": {}}
  used = 0.0
  for name, fn in SECTIONS.items():
    used += SHARES[name]
    if only is not None and name not in only:
      continue
    section = Section(name, start + used * budget_s)
    try:
      results = fn(section, sizes)
    except Exception as err:  # noqa: BLE001 - one failed section must not lose the others
      # A device run is one short shot: keep the other sections' figures and
      # say what failed (the section is then not complete).
      section.skipped.append(f"error: {type(err).__name__}: {str(err)[:300]}")
      results = {}
    out["sections"][name] = section.close(results)
    print(f"{name}: {_summary_line(name, out['sections'][name])}", flush=True)
  out["wall_s"] = round(time.perf_counter() - start, 2)
  return out


def _summary_line(name: str, s: dict) -> str:
  tail = f" ({s['wall_s']:.1f} s{'' if s['complete'] else ', skipped ' + ', '.join(s['skipped'])})"
  if name == "clipping":
    parts = [f"{m} " + " ".join(f"{k} {v:.2f}x" for k, v in r["ratio"].items() if v is not None)
             for m, r in s.get("models", {}).items()]
    return "; ".join(parts) + tail
  if name == "uls" and "uls_ratio" in s:
    return f"ULS/plain {s['uls_ratio']:.2f}x" + tail
  if name == "noise" and "ratio" in s:
    return f"BLT/iid {s['ratio']:.2f}x at {s['params']:,} parameters" + tail
  if name == "tokens":
    return "; ".join(f"{m} DP {r['dp_tokens_per_second']:,.0f} vs "
                     f"{r['plain_tokens_per_second']:,.0f} tok/s"
                     for m, r in s.get("models", {}).items()) + tail
  return tail.strip()


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--quick", action="store_true", help="small sizes (a CPU check)")
  parser.add_argument("--budget-s", type=float, default=None,
                      help=f"seconds shared among the sections (> 0; default "
                      f"{DEFAULT_BUDGET_S:g}, with --quick {QUICK_BUDGET_S:g})")
  parser.add_argument("--only", choices=tuple(SECTIONS), action="append",
                      help="run only this section (repeatable)")
  args = parser.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S
  if not (math.isfinite(args.budget_s) and args.budget_s > 0):
    parser.error(f"--budget-s must be a finite number > 0, got {args.budget_s}")
  info = device_info()
  print(f"jax {info['jax_version']} on {info['device_kind']} ({info['platform']}); "
        f"budget {args.budget_s:g} s{'; quick' if args.quick else ''}", flush=True)
  out = run(quick=args.quick, budget_s=args.budget_s,
            only=None if args.only is None else tuple(args.only))
  print(json.dumps(out, default=float))
  return out


if __name__ == "__main__":
  main()
