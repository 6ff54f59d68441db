"""One process of the multi-process test (tests/dpfl/test_multiprocess.py).

Usage: python multiprocess_child.py WORKDIR NAME NUM_PROCESSES PROCESS_ID PORT

Runs on 4 CPU devices in all: one process with 4 (``NUM_PROCESSES=1``) or
each of two processes with 2, joined by ``jax.distributed`` over gloo. The
mesh is ``(data, model) = (2, 2)``; "model" spans the two processes, so the
sharded parameter leaf is not fully addressable in either.

1. Trains ULS for ``FIRST`` of ``PLANNED`` steps (explicit key and seed,
   ledger and checkpoints in ``WORKDIR/NAME``), saves, copies the directory
   to ``NAME-self`` and ``NAME-other`` and writes ``WORKDIR/NAME.done``.
2. Continues the state in memory to the planned end, its noise key replaced
   as ``restore(key=RESUME_KEY)`` replaces it: the reference for step 4.
3. Restores ``NAME-self`` without a key (the fresh key is recorded).
4. Waits for the other launch's ``.done``, restores its ``-other`` copy
   (written by the other process count) with ``key=RESUME_KEY`` and trains
   to the planned end.

Writes what it saw to ``WORKDIR/NAME-<PROCESS_ID>.json``: the parameters
after steps 1, 2 and 4 gathered from every process, the shared secrets, the
fresh key, the journal's directory, the journal files this process wrote,
and (process 0) the steps the ledger on disk records. Prints each phase's
wall and CPU time. On any error it exits at once with status 1.
"""

import json
import os
import shutil
import sys
import time
import traceback

WORKDIR, NAME, NUM_PROCESSES, PROCESS_ID, PORT = sys.argv[1:6]
NUM_PROCESSES, PROCESS_ID = int(NUM_PROCESSES), int(PROCESS_ID)
OTHER = {"two": "one", "one": "two"}[NAME]
PLANNED, FIRST = 5, 3
KEY, SEED, RESUME_KEY = 11, 12, 21
WAIT_S = 240
START = time.monotonic()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if NUM_PROCESSES > 1:
  jax.distributed.initialize(coordinator_address=f"localhost:{PORT}",
                             num_processes=NUM_PROCESSES, process_id=PROCESS_ID,
                             initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import accounting  # noqa: E402
import dpfl  # noqa: E402
from accounting import journal as journal_module  # noqa: E402
from accounting import ledger as ledger_module  # noqa: E402
from dpfl.data import UserDataset  # noqa: E402

assert jax.device_count() == 4 and jax.process_count() == NUM_PROCESSES, jax.devices()

# Every file this process writes through the journal (ledger.json, run.json).
journal_writes = []
_write_atomically = ledger_module.write_atomically


def counted_write(path, text):
  journal_writes.append(os.path.basename(path))
  return _write_atomically(path, text)


ledger_module.write_atomically = journal_module.write_atomically = counted_write

# Devices [[0, 2], [1, 3]] (global order): each "data" row holds one device of
# each process, so "model" is split across the processes.
mesh = Mesh(np.array(jax.devices()).reshape(2, 2).T, ("data", "model"))
if NUM_PROCESSES > 1:
  assert {d.process_index for d in mesh.devices[0]} == {0, 1}


def loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"])
  return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


rng = np.random.default_rng(0)
x = rng.normal(size=(240, 5)).astype(np.float32)
dataset = UserDataset.from_arrays({"x": x, "y": np.sin(x).sum(1)}, rng.integers(0, 40, 240),
                                  examples_per_user=6)
initial = {"w1": rng.normal(size=(5, 4)).astype(np.float32),
           "w2": rng.normal(size=(4,)).astype(np.float32)}
shardings = {"w1": NamedSharding(mesh, P(None, "model")), "w2": NamedSharding(mesh, P())}


def placed():
  """The initial parameters as global arrays: w1 split over "model", w2 replicated."""
  return {name: jax.make_array_from_callback(v.shape, shardings[name],
                                             lambda index, v=v: v[index])
          for name, v in initial.items()}


def private(**kwargs):
  return dpfl.make_private(
      loss, optax.sgd(0.5, momentum=0.9), privacy_unit="user", dataset=dataset,
      batch_size=8, l2_clip_norm=0.5, num_steps=PLANNED, noise_multiplier=1.0, delta=1e-5,
      key=KEY, seed=SEED, mesh=mesh, **kwargs)


def train(run, state, step=None):
  step = step or run.make_step()
  for batch, mask in run.batches(dataset, state):
    state, _ = step(state, batch, mask)
  assert int(jax.device_get(state.step)) == PLANNED, state.step
  return state


def host(state):
  """The parameters on the host, gathered from every process."""
  gathered = multihost_utils.process_allgather(state.params, tiled=True)
  return {name: np.asarray(v).tolist() for name, v in gathered.items()}


def barrier(name):
  if NUM_PROCESSES > 1:
    multihost_utils.sync_global_devices(name)


def resumed(state):
  """``state`` with the noise key ``restore(..., key=RESUME_KEY)`` documents: the key replaced."""
  noise_state = state.opt_state[0]
  key = jax.make_array_from_callback(
      noise_state.key.shape, noise_state.key.sharding,
      lambda index: np.asarray(jax.random.key_data(jax.random.key(RESUME_KEY)))[index])
  return state._replace(opt_state=(noise_state._replace(key=key),) + tuple(state.opt_state[1:]))


def mark(name):
  print(f"{time.monotonic() - START:.1f} s cpu {time.process_time():.1f}: {name}", flush=True)


def main():
  mark("imported")
  out = {"secrets": [str(dpfl.shared_secret_seed()), str(dpfl.shared_secret_seed())]}
  # Default seed and key (OS entropy): one secret for the whole run, or each
  # process would sample its own batch (a unit twice in the global batch).
  defaults = dpfl.make_private(
      loss, optax.sgd(0.5), privacy_unit="user", dataset=dataset, batch_size=8,
      l2_clip_norm=0.5, num_steps=PLANNED, noise_multiplier=1.0, delta=1e-5, mesh=mesh)
  out["default_seed"] = [int(w) for w in defaults.sampler.seed]
  out["default_key"] = [int(w) for w in np.asarray(
      jax.device_get(defaults.init(placed()).opt_state[0].key)).ravel()]
  own = os.path.join(WORKDIR, NAME)
  for_self, for_other = own + "-self", own + "-other"

  # 1. Train, checkpoint, hand a copy of the checkpoint to the other launch.
  run = private(checkpoint_dir=own)
  out["journal_directory"] = run.journal.directory
  state = run.init(placed())
  mark("init")
  step = run.make_step()
  for batch, mask in run.batches(dataset, state, num_steps=FIRST):
    state, _ = step(state, batch, mask)
  mark("trained")
  run.save(own, state)
  mark("saved")
  out["first"] = host(state)
  barrier("saved")
  if PROCESS_ID == 0:
    shutil.copytree(own, for_self)
    shutil.copytree(own, for_other)
    with open(os.path.join(WORKDIR, NAME + ".done"), "w") as f:
      f.write("done")
  barrier("copied")

  # 2. The reference for every restored run: the same state continued in
  #    memory, its noise key replaced as restore(key=RESUME_KEY) replaces it.
  out["continued"] = host(train(run, resumed(state), step))
  mark("continued")
  if PROCESS_ID == 0:
    out["ledger_steps"] = accounting.Ledger.load(os.path.join(own, "ledger.json")).num_steps

  # 3. Its own checkpoint restored without a key: fresh entropy, the same on
  #    every process (process 0's draw).
  run = private()
  fresh = run.restore(for_self, placed()).opt_state[0].key
  out["fresh_key"] = np.asarray(multihost_utils.process_allgather(fresh, tiled=True)).tolist()
  out["restored_journal_directory"] = run.journal.directory
  mark("restored own")

  # 4. The other launch's checkpoint, written with the other process count.
  deadline = time.monotonic() + WAIT_S
  while not os.path.exists(os.path.join(WORKDIR, OTHER + ".done")):
    if time.monotonic() > deadline:
      raise TimeoutError(f"no checkpoint from the {OTHER!r} launch after {WAIT_S} s")
    time.sleep(0.1)
  run = private()
  restored = run.restore(os.path.join(WORKDIR, OTHER + "-other"), placed(), key=RESUME_KEY)
  mark("restore other")
  out["other_restored"] = host(train(run, restored))
  mark("trained other")
  out["journal_writes"] = journal_writes
  barrier("done")
  with open(os.path.join(WORKDIR, f"{NAME}-{PROCESS_ID}.json"), "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  try:
    main()
  except BaseException:
    # Exit at once: a process that raises would otherwise wait at exit for its
    # jax.distributed peer, which waits for it at the next barrier.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
