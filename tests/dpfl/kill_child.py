"""Child process of the kill test (tests/dpfl/test_kill.py): trains, checkpoints, gets killed.

Usage: python kill_child.py CONFIG DIRECTORY RELEASE_LOG

Starts the run (or restores it from DIRECTORY), trains with a checkpoint every
``EVERY`` steps and appends, after every step, a hash of the update it just
released to RELEASE_LOG (fsynced). The loss is identically zero, so each
update is exactly the (scaled) noise released that step: the parent checks no
noise vector is ever released twice. Prints ``ready`` once the first step
ran and ``done <steps>`` at the end.
"""

import hashlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpfl

EVERY = 4
PLANNED = 40
TARGET_EPSILON = 4.0
DELTA = 1e-5


def _zero_loss(params, batch):
  # Depends on the batch (so shapes matter) but has zero gradient: the update
  # released is the noise itself.
  return 0.0 * jnp.sum(params["w"]) * jnp.mean(batch["x"])


def make(config: str, directory: str):
  params = {"w": jnp.zeros(8, jnp.float32)}
  common = dict(l2_clip_norm=1.0, delta=DELTA, target_epsilon=TARGET_EPSILON,
                num_steps=PLANNED, checkpoint_dir=directory, seed=1234)
  if config == "example":
    data = {"x": np.ones((200, 8), np.float32)}
    # The ledger written 3 steps ahead: a crash may over-count, never under-count.
    # Padded to the whole data set: plain Poisson, quick to calibrate at every start.
    private = dpfl.make_private(_zero_loss, optax.sgd(1.0), dataset_size=200, batch_size=20,
                                max_batch_size=200, ledger_sync_steps=3, **common)
  elif config == "uls":
    users = dpfl.UserDataset.from_arrays({"x": np.ones((300, 8), np.float32)},
                                         np.arange(300) % 60, examples_per_user=5)
    data = users
    private = dpfl.make_private(_zero_loss, optax.sgd(1.0), privacy_unit="user",
                                sampling_unit="user", dataset=users, batch_size=10, **common)
  elif config == "blt":
    data = {"x": np.ones((96, 8), np.float32)}
    private = dpfl.make_private(_zero_loss, optax.sgd(1.0), dataset_size=96, batch_size=16,
                                strategy="blt", strategy_options={"buffers": 2}, **common)
  else:
    raise SystemExit(f"unknown config {config!r}")
  return private, params, data


def main():
  config, directory, log_path = sys.argv[1:4]
  private, params, data = make(config, directory)
  if os.path.exists(os.path.join(directory, "run.json")):
    state = private.restore(directory, params)
  else:
    state = private.init(params)
  step = private.make_step()
  log = open(log_path, "a")
  ready = False
  for batch, mask in private.batches(data, state):
    before = state.params["w"]
    state, _ = step(state, batch, mask)
    released = np.asarray(jax.device_get(state.params["w"] - before))
    log.write(hashlib.sha256(released.tobytes()).hexdigest() + "\n")
    log.flush()
    os.fsync(log.fileno())
    if not ready:
      print("ready", flush=True)
      ready = True
    if int(state.step) % EVERY == 0:
      private.save(directory, state)
    time.sleep(0.04)
  print("done", int(state.step), private.epsilon(), flush=True)


if __name__ == "__main__":
  main()
