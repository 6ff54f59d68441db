"""What the one-state step costs: ``make_step()`` vs the same step without accounting.

Issue 12 made a private run one object: ``private.make_step()`` takes a
``PrivateState`` and records every step in the run's ledger before its noise
is drawn (the budget check on the host, then an ordered host callback inside
the noise step). The baseline is the very same computation without any of
that — ``clipped_grad`` + ``gaussian_noise`` + the optimizer, jitted on
``(params, opt_state)`` — in the same process. Both are compiled and warmed
up, then timed alternately (``--repeats`` blocks of ``--steps`` steps,
``jax.block_until_ready`` at the end of each block); figures are medians.
Small models show the fixed per-step cost (host callback, budget check)
worst; with a checkpoint directory each step also fsyncs ``ledger.json``.

Run: ``python benchmarks/private_step.py [--quick] [--json]`` (a table, then
one JSON line: ``{"mlp_<width>": {"baseline_s": ..., "private_s": ...,
"ratio": ...}, ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if __name__ == "__main__":
  # Run as a script, this folder comes first on sys.path, and its accounting.py
  # would shadow the real `accounting` package.
  _HERE = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dpfl  # noqa: E402


def _mlp(width: int, dim: int = 64):
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(keys[0], (dim, width)) / np.sqrt(dim),
            "w2": jax.random.normal(keys[1], (width, width)) / np.sqrt(width),
            "w3": jax.random.normal(keys[2], (width, 10)) / np.sqrt(width)}

  def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"])
    h = jnp.tanh(h @ params["w2"])
    logits = h @ params["w3"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1))

  return params, loss_fn


def measure(width: int, *, batch: int, steps: int, repeats: int, directory: str | None):
  params, loss_fn = _mlp(width)
  n = 100 * batch
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(n, 64)).astype(np.float32),
          "y": rng.integers(0, 10, size=n).astype(np.int32)}
  total = (repeats + 1) * steps * 2 + 10
  private = dpfl.make_private(loss_fn, optax.adam(1e-3), l2_clip_norm=1.0, noise_multiplier=1.0,
                              delta=1e-6, dataset_size=n, batch_size=batch, num_steps=total,
                              max_batch_size=batch, checkpoint_dir=directory)
  fixed = {k: v[:batch] for k, v in data.items()}
  mask = np.ones(batch, bool)
  # Baseline: the same clipping, noise and optimizer, no state object, no ledger.
  noisy = optax.chain(dpfl.gaussian_noise(noise_multiplier=1.0, l2_clip_norm=1.0,
                                          expected_batch_size=batch), optax.adam(1e-3))
  clipped = dpfl.clipped_grad(loss_fn, l2_clip_norm=1.0)

  @jax.jit
  def baseline(params, opt_state, batch, mask):
    grads, aux = clipped(params, batch, mask=mask)
    updates, opt_state = noisy.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  base_state = (params, noisy.init(params))
  state, step = private.init(params), private.make_step()

  def run_base(k):
    nonlocal base_state
    p, o = base_state
    for _ in range(k):
      p, o, _ = baseline(p, o, fixed, mask)
    jax.block_until_ready((p, o))
    base_state = (p, o)

  def run_private(k):
    nonlocal state
    for _ in range(k):
      state, _ = step(state, fixed, mask)
    jax.block_until_ready(state)

  run_base(3)
  run_private(3)
  base_times, private_times = [], []
  for _ in range(repeats):
    t = time.perf_counter()
    run_base(steps)
    base_times.append((time.perf_counter() - t) / steps)
    t = time.perf_counter()
    run_private(steps)
    private_times.append((time.perf_counter() - t) / steps)
  b, p = statistics.median(base_times), statistics.median(private_times)
  return {"baseline_s": b, "private_s": p, "ratio": p / b}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  widths = (64, 512) if args.quick else (64, 512, 2048)
  steps = 10 if args.quick else 30
  results = {}
  for width in widths:
    for ledger_on_disk in (False, True):
      with tempfile.TemporaryDirectory() as tmp:
        name = f"mlp_{width}" + ("_disk" if ledger_on_disk else "")
        results[name] = measure(width, batch=64, steps=steps,
                                repeats=3 if args.quick else args.repeats,
                                directory=os.path.join(tmp, "run") if ledger_on_disk else None)
  print(f"{'model':<16} {'baseline s/step':>16} {'make_step s/step':>17} {'ratio':>7}")
  for name, r in results.items():
    print(f"{name:<16} {r['baseline_s']:>16.5f} {r['private_s']:>17.5f} {r['ratio']:>7.2f}")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
