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

Sharded parameters (one more 4-device process): the ULS step with DP-FTRL
noise (``dpfl.mf.streaming.blt_noise``, 2 parameter-sized buffers) and Adam,
on a ``(data, model) = (2, 2)`` mesh with parameters, Adam moments and noise
buffers sharded over ``"model"`` (each array's largest axis divisible by 2,
arrays under 1024 elements replicated; the states built by
``jax.jit(init, out_shardings=...)``), vs the ``(4, 1)`` mesh where they are
replicated: the same model, the same users (batch over ``"data"``), the
step jitted with those in/out shardings. Timed in interleaved rounds as
above; per-device memory is read from the arrays' ``addressable_shards``
(the most any one device holds), and the compiled step's
``memory_analysis()`` is reported next to it.

Usage: ``python benchmarks/user_level.py [--rounds N] [--json] [--quick]
[--only devices|sharded]`` (``--quick``: a d_model 64, sequence 16
transformer, for tests). With ``--json`` the last stdout line is one JSON
object with ``uls_ratio`` (ULS step time / plain step time, 1 device),
``examples_per_second`` (ULS step, keyed by device count "1", "2", "4"),
``plain_examples_per_second``, ``uls_ratio_by_devices``,
``grad_only_ratio``; for the sharded row ``sharded_step_ratio`` (step time
on (2, 2) / on (4, 1)), ``sharded_memory_ratio`` (per-device bytes of
parameters + optimizer state + noise buffers, (2, 2) / (4, 1); 1/2 when all
of it shards), ``sharded_bytes_per_device`` (``{"2x2"|"4x1": {"params",
"optimizer_state", "noise_buffers"}}``, bytes) and ``sharded_details``;
and the workload.
"""

from __future__ import annotations

import argparse
import json
import os
import math
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


def child(num_devices: int, users: int, examples_per_user: int, rounds: int,
          quick: bool = False, *, model_kwargs: dict | None = None) -> dict:
  """Times both steps on ``num_devices`` devices (this process's JAX).

  ``quick`` shrinks the model (``--quick``); ``model_kwargs``, if given, go to
  ``make_transformer`` instead (``benchmarks/accelerator.py`` picks its sizes).
  """
  import jax
  import optax

  import dpfl
  from dpfl.federated import shard_users, user_mesh

  sys.path.append(_HERE)
  from _models import make_transformer

  assert jax.device_count() == num_devices, jax.devices()
  size = dict(d_model=64, seq_len=16) if quick else {}
  params, flat, loss_fn = make_transformer(users * examples_per_user,
                                           **(size if model_kwargs is None else model_kwargs))
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


MODEL_AXIS = 2  # the sharded row's (data, model) = (2, 2) mesh, vs (4, 1)
# The sharded row's noise: DP-FTRL with a 2-buffer BLT (two parameter-sized
# buffers); the values do not change the cost.
BLT_DECAY, BLT_SCALE = (0.9, 0.5), (0.1, 0.05)


def _model_spec(shape: tuple[int, ...], model_size: int):
  """The sharded row's FSDP rule: a leaf's largest axis divisible by the
  model axis goes over "model"; small leaves (< 1024 elements, e.g. PRNG
  key data, counters) stay replicated. A function of the shape only, so
  parameters, Adam moments and noise buffers of one shape shard alike."""
  from jax.sharding import PartitionSpec as P
  if len(shape) == 0 or math.prod(shape) < 1024:
    return P()
  axes = [a for a in range(len(shape)) if shape[a] % model_size == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda a: shape[a])
  return P(*([None] * axis + ["model"]))


def _bytes_per_device(tree) -> int:
  """The most bytes any one device holds of ``tree``'s arrays (their
  ``addressable_shards``; a replicated array counts in full on each)."""
  import collections
  import jax
  held = collections.Counter()
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return max(held.values())


def sharded_child(users: int, examples_per_user: int, rounds: int, quick: bool) -> dict:
  """The sharded-parameter row (4 devices): a ULS step with DP-FTRL (BLT)
  noise and Adam on a (data, model) = (2, 2) mesh, parameters, optimizer
  state and noise buffers sharded over "model", vs the (4, 1) mesh with them
  replicated; the same users, the same model."""
  import jax
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import dpfl
  from dpfl.mf import streaming

  sys.path.append(_HERE)
  from _models import make_transformer

  assert jax.device_count() == 4, jax.devices()
  size = dict(d_model=64, seq_len=16) if quick else {}
  params, flat, loss_fn = make_transformer(users * examples_per_user, **size)
  grouped = jax.tree.map(lambda x: x.reshape((users, examples_per_user) + x.shape[1:]), flat)
  mask = jax.numpy.ones((users, examples_per_user), bool)
  noise = streaming.blt_noise(buffer_decay=BLT_DECAY, output_scale=BLT_SCALE, num_steps=1000,
                              noise_multiplier=1.0, l2_clip_norm=L2_CLIP_NORM, sensitivity=1.0,
                              expected_batch_size=users, key=0)
  private = optax.chain(noise, optax.adam(1e-3))
  clipped = dpfl.clipped_grad(loss_fn, l2_clip_norm=L2_CLIP_NORM, unit="user")

  def uls_step(params, state, batch, mask):
    grads, _ = clipped(params, batch, mask=mask)
    updates, state = private.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  runs, held, compiled_bytes = {}, {}, {}
  for name, shape in (("2x2", (2, MODEL_AXIS)), ("4x1", (4, 1))):
    mesh = jax.make_mesh(shape, ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    # The user's own shardings: every array of one shape alike (see
    # _model_spec); on (4, 1) "model" has size 1, i.e. replicated.
    like = lambda tree: jax.tree.map(
        lambda x: NamedSharding(mesh, _model_spec(x.shape, MODEL_AXIS)), tree)
    p = jax.device_put(params, like(params))
    state_shardings = like(jax.eval_shape(private.init, params))
    state = jax.jit(private.init, out_shardings=state_shardings)(p)
    data = jax.device_put((grouped, mask), NamedSharding(mesh, P("data")))
    step = jax.jit(uls_step, in_shardings=(like(params), state_shardings, None, None),
                   out_shardings=(like(params), state_shardings))
    held[name] = {"params": _bytes_per_device(p), "optimizer_state": _bytes_per_device(state[1]),
                  "noise_buffers": _bytes_per_device(state[0].buffers)}
    compiled = step.lower(p, state, *data).compile()
    analysis = compiled.memory_analysis()
    compiled_bytes[name] = None if analysis is None else {
        "argument": int(analysis.argument_size_in_bytes),
        "temp": int(analysis.temp_size_in_bytes)}
    runs[name] = (compiled, (p, state, *data))
  for fn, args in runs.values():
    _time_once(fn, *args)  # warm
  calls = {n: 3 if _time_once(fn, *args) < _BURST_BELOW_S else 1
           for n, (fn, args) in runs.items()}
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, (fn, args) in runs.items():
      times[name].append(_burst(fn, *args, calls=calls[name]))
  total = {n: sum(h.values()) for n, h in held.items()}
  return {
      "step_ratio": statistics.median(a / b for a, b in zip(times["2x2"], times["4x1"])),
      "median_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
      "bytes_per_device": held,
      "memory_ratio": total["2x2"] / total["4x1"],
      "compiled_bytes": compiled_bytes,
      "num_parameters": sum(x.size for x in jax.tree.leaves(params)),
      "noise_buffers": len(BLT_DECAY),
  }


def _run_child(num_devices: int, args, sharded: bool = False) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={num_devices}")
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, os.path.abspath(__file__),
         "--sharded-child" if sharded else "--child", str(num_devices),
         "--users", str(args.users), "--examples-per-user", str(args.examples_per_user),
         "--rounds", str(args.rounds)] + (["--quick"] if args.quick else [])
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{num_devices}-device run failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_devices(results: dict, args, model: str) -> None:
  one = results[1]
  print(f"ULS step vs plain step: {model} ({one['num_parameters']:,} params), "
        f"{args.users} users x {args.examples_per_user} examples, C={L2_CLIP_NORM}, "
        f"{args.rounds} interleaved rounds, host-platform CPU devices")
  header = (f"{'devices':>7} {'plain ms':>9} {'ULS ms':>9} {'ULS/plain':>10} "
            f"{'grad-only':>10} {'ULS ex/s':>9} {'plain ex/s':>11}")
  print(header)
  print("-" * len(header))
  for n, r in results.items():
    print(f"{n:>7} {r['median_ms']['plain']:>9.1f} {r['median_ms']['uls']:>9.1f} "
          f"{r['uls_ratio']:>9.3f}x {r['grad_only_ratio']:>9.3f}x "
          f"{r['examples_per_second']:>9.1f} {r['plain_examples_per_second']:>11.1f}")


def _print_sharded(r: dict) -> None:
  print(f"\nSharded parameters: ULS step with BLT noise ({r['noise_buffers']} buffers) and "
        f"Adam, 4 devices, (data, model) = (2, {MODEL_AXIS}) vs (4, 1)")
  mib = lambda b: b / 2**20
  header = f"{'mesh':>5} {'step ms':>8} {'params MiB':>11} {'opt MiB':>8} {'noise MiB':>10}"
  print(header)
  print("-" * len(header))
  for name in ("2x2", "4x1"):
    h = r["bytes_per_device"][name]
    print(f"{name:>5} {r['median_ms'][name]:>8.1f} {mib(h['params']):>11.2f} "
          f"{mib(h['optimizer_state']):>8.2f} {mib(h['noise_buffers']):>10.2f}")
  print(f"(2, 2) / (4, 1): step time {r['step_ratio']:.3f}x, per-device memory of parameters +"
        f" optimizer state + noise buffers {r['memory_ratio']:.3f}x (1/{MODEL_AXIS} ="
        f" {1 / MODEL_AXIS:.3f})")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--users", type=int, default=16, help="users per step (divisible by 4)")
  parser.add_argument("--examples-per-user", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds (>= 5)")
  parser.add_argument("--json", action="store_true", help="print a JSON line last")
  parser.add_argument("--quick", action="store_true",
                      help="a small transformer (d_model 64, seq 16): the same code, for tests")
  parser.add_argument("--only", choices=("devices", "sharded"), default=None,
                      help="run only the device-count rows or only the sharded row")
  parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--sharded-child", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.rounds < 5:
    parser.error(f"--rounds must be >= 5, got {args.rounds}")
  if args.users < 1 or args.users % max(DEVICE_COUNTS):
    parser.error(f"--users must be a positive multiple of {max(DEVICE_COUNTS)}, got "
                 f"{args.users}")
  if args.child is not None:
    print(json.dumps(child(args.child, args.users, args.examples_per_user, args.rounds,
                           args.quick)))
    return
  if args.sharded_child is not None:
    print(json.dumps(sharded_child(args.users, args.examples_per_user, args.rounds,
                                   args.quick)))
    return

  model = "causal transformer " + ("d64 seq16" if args.quick else "d256 seq64")
  results = {} if args.only == "sharded" else {n: _run_child(n, args) for n in DEVICE_COUNTS}
  sharded = None if args.only == "devices" else _run_child(4, args, sharded=True)
  if results:
    _print_devices(results, args, model)
  if sharded:
    _print_sharded(sharded)
  if args.json:
    out = {}
    if results:
      one = results[1]
      out.update({
          "uls_ratio": round(one["uls_ratio"], 4),
          "grad_only_ratio": round(one["grad_only_ratio"], 4),
          "examples_per_second": {str(n): round(r["examples_per_second"], 2)
                                  for n, r in results.items()},
          "plain_examples_per_second": {str(n): round(r["plain_examples_per_second"], 2)
                                        for n, r in results.items()},
          "uls_ratio_by_devices": {str(n): round(r["uls_ratio"], 4) for n, r in results.items()},
          "details": {str(n): r for n, r in results.items()},
      })
    if sharded:
      out.update({
          "sharded_step_ratio": round(sharded["step_ratio"], 4),
          "sharded_memory_ratio": round(sharded["memory_ratio"], 4),
          "sharded_bytes_per_device": sharded["bytes_per_device"],
          "sharded_details": sharded,
      })
    num_parameters = (results[1] if results else sharded)["num_parameters"]
    out["workload"] = {"model": model, "users": args.users,
                       "examples_per_user": args.examples_per_user,
                       "num_parameters": num_parameters, "rounds": args.rounds}
    print(json.dumps(out))


if __name__ == "__main__":
  main()
