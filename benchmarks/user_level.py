"""Speed of a ULS step (per-user clipped gradients) vs the plain step, on 1, 2 and 4 devices.

Workload: the 2-layer causal transformer of ``benchmarks/_models.py``
(d_model 256, sequence 64, byte vocabulary, ~1.7M parameters) on a batch of
``--users`` users x ``--examples-per-user`` sequences. Two train steps over
the very same examples, each jit-compiled and warmed up:

* ``plain``: ``jax.grad`` of the mean loss over all the examples, then Adam;
* ``uls``:  ``dpfl.clipped_grad(..., unit="user")`` (each user's gradient of
  their mean loss, clipped to C, summed), then ``dpfl.gaussian_noise`` and
  Adam: the full ULS step, noise included.

The two are timed in interleaved rounds (plain, uls, plain, ...); the ratio
is the median over rounds of (uls time / plain time in the same round),
which cancels most of a shared CPU's drift. Every step is compiled and run
once untimed first; within a round, a step faster than 0.3 s is timed as the
median of 3 back-to-back calls (after one more untimed call), a slower one
once; always with ``jax.block_until_ready``.
The gradient-only ratio (``clipped_grad`` vs ``jax.grad``, no optimizer) is
reported too.

Devices: each device count runs in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (fixed when JAX
starts); the user axis (and, for the plain step, the example axis) is
sharded over a 1-D mesh of N devices. On a CPU, host-platform devices share
the same cores, so examples/s across device counts measures the overhead of
the sharded program, not a speed-up.

Usage: ``python benchmarks/user_level.py [--rounds N] [--json]``. With
``--json`` the last stdout line is one JSON object with ``uls_ratio`` (ULS
step time / plain step time, 1 device), ``examples_per_second`` (ULS step,
keyed by device count "1", "2", "4"), ``plain_examples_per_second``,
``uls_ratio_by_devices``, ``grad_only_ratio`` and the workload.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Run as a script, this folder comes first on sys.path, where
# benchmarks/accounting.py would shadow the real `accounting` package that
# dpfl imports: drop it, import dpfl, then put it back for `_models`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

DEVICE_COUNTS = (1, 2, 4)
L2_CLIP_NORM = 1.0


def _time_once(fn, *args) -> float:
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


_BURST_BELOW_S = 0.3


def _burst(fn, *args, calls: int) -> float:
  if calls == 1:
    return _time_once(fn, *args)
  _time_once(fn, *args)  # the steady state of a loop: one untimed call first
  return statistics.median(_time_once(fn, *args) for _ in range(calls))


def child(num_devices: int, users: int, examples_per_user: int, rounds: int, *,
          model_kwargs: dict | None = None) -> dict:
  """Times both steps on ``num_devices`` devices (this process's JAX).

  ``model_kwargs`` go to ``make_transformer`` (``benchmarks/accelerator.py
  --quick`` shrinks the model; this script never passes them).
  """
  import jax
  import optax

  import dpfl
  from dpfl.federated import shard_users, user_mesh

  sys.path.append(_HERE)
  from _models import make_transformer

  assert jax.device_count() == num_devices, jax.devices()
  params, flat, loss_fn = make_transformer(users * examples_per_user, **(model_kwargs or {}))
  # Users are consecutive runs of examples: the same examples in both steps.
  grouped = jax.tree.map(lambda x: x.reshape((users, examples_per_user) + x.shape[1:]), flat)
  mask = jax.numpy.ones((users, examples_per_user), bool)
  mesh = user_mesh(num_devices)
  flat, grouped, mask = shard_users((flat, grouped, mask), mesh)

  adam = optax.adam(1e-3)
  private = optax.chain(
      dpfl.gaussian_noise(noise_multiplier=1.0, l2_clip_norm=L2_CLIP_NORM,
                          expected_batch_size=users, key=0), optax.adam(1e-3))
  clipped = dpfl.clipped_grad(loss_fn, l2_clip_norm=L2_CLIP_NORM, unit="user")

  @jax.jit
  def plain_step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def uls_step(params, state, batch, mask):
    grads, _ = clipped(params, batch, mask=mask)
    updates, state = private.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  plain_grad = jax.jit(jax.grad(loss_fn))
  uls_grad = jax.jit(lambda p, b, m: clipped(p, b, mask=m)[0])
  runs = {
      "plain": (plain_step, (params, adam.init(params), flat)),
      "uls": (uls_step, (params, private.init(params), grouped, mask)),
      "plain_grad": (plain_grad, (params, flat)),
      "uls_grad": (uls_grad, (params, grouped, mask)),
  }
  compile_s, calls = {}, {}
  for name, (fn, args) in runs.items():
    compile_s[name] = _time_once(fn, *args)  # compile + first run
    calls[name] = 3 if _time_once(fn, *args) < _BURST_BELOW_S else 1
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, (fn, args) in runs.items():
      times[name].append(_burst(fn, *args, calls=calls[name]))
  ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
  median = {name: statistics.median(t) for name, t in times.items()}
  examples = users * examples_per_user
  return {
      "devices": num_devices,
      "uls_ratio": ratio("uls", "plain"),
      "grad_only_ratio": ratio("uls_grad", "plain_grad"),
      "median_ms": {k: 1e3 * v for k, v in median.items()},
      "examples_per_second": examples / median["uls"],
      "plain_examples_per_second": examples / median["plain"],
      "compile_s": compile_s,
      "num_parameters": sum(x.size for x in jax.tree.leaves(params)),
  }


def _run_child(num_devices: int, args) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={num_devices}")
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", str(num_devices),
         "--users", str(args.users), "--examples-per-user", str(args.examples_per_user),
         "--rounds", str(args.rounds)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{num_devices}-device run failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--users", type=int, default=16, help="users per step (divisible by 4)")
  parser.add_argument("--examples-per-user", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds (>= 5)")
  parser.add_argument("--json", action="store_true", help="print a JSON line last")
  parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.rounds < 5:
    parser.error(f"--rounds must be >= 5, got {args.rounds}")
  if args.users < 1 or args.users % max(DEVICE_COUNTS):
    parser.error(f"--users must be a positive multiple of {max(DEVICE_COUNTS)}, got "
                 f"{args.users}")
  if args.child is not None:
    print(json.dumps(child(args.child, args.users, args.examples_per_user, args.rounds)))
    return

  results = {n: _run_child(n, args) for n in DEVICE_COUNTS}
  one = results[1]
  print(f"ULS step vs plain step: causal transformer ({one['num_parameters']:,} params, "
        f"seq 64), {args.users} users x {args.examples_per_user} examples, C={L2_CLIP_NORM}, "
        f"{args.rounds} interleaved rounds, host-platform CPU devices")
  header = (f"{'devices':>7} {'plain ms':>9} {'ULS ms':>9} {'ULS/plain':>10} "
            f"{'grad-only':>10} {'ULS ex/s':>9} {'plain ex/s':>11}")
  print(header)
  print("-" * len(header))
  for n, r in results.items():
    print(f"{n:>7} {r['median_ms']['plain']:>9.1f} {r['median_ms']['uls']:>9.1f} "
          f"{r['uls_ratio']:>9.3f}x {r['grad_only_ratio']:>9.3f}x "
          f"{r['examples_per_second']:>9.1f} {r['plain_examples_per_second']:>11.1f}")
  if args.json:
    out = {
        "uls_ratio": round(one["uls_ratio"], 4),
        "grad_only_ratio": round(one["grad_only_ratio"], 4),
        "examples_per_second": {str(n): round(r["examples_per_second"], 2)
                                for n, r in results.items()},
        "plain_examples_per_second": {str(n): round(r["plain_examples_per_second"], 2)
                                      for n, r in results.items()},
        "uls_ratio_by_devices": {str(n): round(r["uls_ratio"], 4) for n, r in results.items()},
        "workload": {"model": "causal transformer d256 seq64", "users": args.users,
                     "examples_per_user": args.examples_per_user,
                     "num_parameters": one["num_parameters"], "rounds": args.rounds},
        "details": {str(n): r for n, r in results.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
  main()
