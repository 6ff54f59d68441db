"""DP-SGD noise through the one privatizer vs the pre-privatizer ``gaussian_noise``, per step.

Issue 12 made ``dpfl.noise.gaussian_noise`` the identity strategy of
``dpfl.noise.privatizer`` (the streaming privatizer the correlated-noise
transforms of ``dpfl.mf`` run too). This checks that it costs nothing: the
old transform (its update function kept verbatim below, as the baseline) and
the new one are jitted with their state donated (as ``make_step(donate=True)``
does), compiled and warmed up, then alternate step by step so machine load
hits both alike; each figure is the median of the timed repetitions
(``jax.block_until_ready`` on outputs and state), at 1M and 10M float32
parameters (a few large leaves and a bias). The two also must release the
same bits for the same key, which is checked on the first step.
Target: ``ratio = new_seconds / old_seconds`` ~ 1.0.

Run: ``python benchmarks/noise_path.py [--quick] [--repeats N] [--json]``
(a table, then one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
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

from dpfl import _rng, noise  # noqa: E402

SIZES = (1_000_000, 10_000_000)


def _old_gaussian_noise(*, noise_multiplier: float, l2_clip_norm: float,
                        expected_batch_size: float, key: int) -> optax.GradientTransformation:
  """``gaussian_noise`` as it was before the privatizer (checks left out: not timed)."""
  stddev = noise_multiplier * l2_clip_norm

  def init_fn(params):
    del params
    return (jnp.asarray(_rng.key_data(key)), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    noise.check_float_leaves(updates)
    leaves, treedef = jax.tree.flatten(updates)
    key = _rng.unshared_key(jnp.asarray(state[0]), updates)
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(key))
    leaf_keys = jax.random.split(step_key, max(len(leaves), 1))
    noisy = []
    for leaf, leaf_key in zip(leaves, leaf_keys):
      leaf = jnp.asarray(leaf)
      dtype = jnp.promote_types(leaf.dtype, jnp.float32)
      draw = stddev * _rng.normal(leaf_key, leaf.shape, dtype)
      noisy.append(((leaf.astype(dtype) + draw) / expected_batch_size).astype(leaf.dtype))
    new_state = (jax.random.key_data(next_key), optax.safe_increment(state[1]))
    return jax.tree.unflatten(treedef, noisy), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _params(num_params: int) -> dict:
  """Three large 2-D leaves and a bias of 1% of the parameters, ``num_params`` floats."""
  bias = num_params // 100
  cols = 1000
  rows = (num_params - bias) // cols
  split = [rows // 2, rows // 3]
  split.append(rows - sum(split))
  params = {f"w{i}": jnp.asarray(np.random.default_rng(i).normal(size=(r, cols)), jnp.float32)
            for i, r in enumerate(split)}
  params["bias"] = jnp.zeros((num_params - rows * cols,), jnp.float32)
  assert sum(x.size for x in jax.tree.leaves(params)) == num_params
  return params


def _jit_step(tx):
  # (state, updates) out, so that jit pairs each donated buffer with the new
  # buffer of the same shape.
  def step(grads, state):
    updates, state = tx.update(grads, state)
    return state, updates
  return jax.jit(step, donate_argnums=(1,))


def bench_noise_path(num_params: int, repeats: int = 7) -> dict:
  """Median seconds per donated, jitted step of the old and the new gaussian_noise.

  Returns:
    ``{"params", "old_seconds", "new_seconds", "ratio", "same_bits", "repeats"}``.
  """
  repeats = max(int(repeats), 5)
  params = _params(num_params)
  shared = dict(noise_multiplier=1.1, l2_clip_norm=1.0, expected_batch_size=1024.0, key=0)
  txs = {"old": _old_gaussian_noise(**shared), "new": noise.gaussian_noise(**shared)}
  steps = {name: _jit_step(tx) for name, tx in txs.items()}
  states, first = {}, {}
  for name, tx in txs.items():
    state = tx.init(params)
    for i in range(2):  # compile, then one warm step
      state, out = steps[name](params, state)
      jax.block_until_ready((out, state))
      if i == 0:
        first[name] = jax.tree.map(np.asarray, out)
    states[name] = state
  same_bits = all(np.array_equal(a, b) for a, b in
                  zip(jax.tree.leaves(first["old"]), jax.tree.leaves(first["new"])))
  times: dict[str, list[float]] = {name: [] for name in txs}
  for _ in range(repeats):
    for name in txs:
      start = time.perf_counter()
      states[name], out = steps[name](params, states[name])
      jax.block_until_ready((out, states[name]))
      times[name].append(time.perf_counter() - start)
      del out
  old_s, new_s = (statistics.median(times[name]) for name in ("old", "new"))
  return {"params": num_params, "old_seconds": old_s, "new_seconds": new_s,
          "ratio": new_s / old_s, "same_bits": same_bits, "repeats": repeats}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--quick", action="store_true", help="1M parameters only")
  parser.add_argument("--repeats", type=int, default=9, help="timed steps of each (>= 5)")
  parser.add_argument("--json", action="store_true", help="print only the JSON line")
  args = parser.parse_args(argv)
  sizes = SIZES[:1] if args.quick else SIZES
  results = [bench_noise_path(size, args.repeats) for size in sizes]
  if not args.json:
    print(f"{'params':>12}{'old s/step':>14}{'new s/step':>14}{'ratio':>8}{'same bits':>11}")
    for r in results:
      print(f"{r['params']:>12,}{r['old_seconds']:>14.5f}{r['new_seconds']:>14.5f}"
            f"{r['ratio']:>8.3f}{str(r['same_bits']):>11}")
  print(json.dumps({"noise_path": results}))
  return 0 if all(r["same_bits"] for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
