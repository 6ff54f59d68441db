"""Two processes x two CPU devices (jax.distributed, gloo) against one process x four.

Three child processes (``multiprocess_child.py``) run at once: a launch of
one process with 4 host devices, and a launch of two processes with 2 each,
joined by ``jax.distributed`` on a free localhost port. Both train the same
ULS run on a ``(data, model) = (2, 2)`` mesh whose "model" axis (one
parameter leaf split over it, one replicated) spans the two processes, save
a checkpoint, and each restores the other's: a checkpoint written by two
processes continues in one, and one written by one continues in two.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from accounting import Ledger

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_child.py")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_CHILD)))
_TIMEOUT_S = 180
PHASES = ("first", "continued", "other_restored")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir) -> dict[str, dict]:
  """Runs the three children; kills all of them if one fails or time runs out."""
  port = str(_free_port())
  children = {}
  for name, count, pid in (("one", 1, 0), ("two", 2, 0), ("two", 2, 1)):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={4 // count}"),
        PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
    log = open(os.path.join(workdir, f"{name}-{pid}.log"), "w")
    children[f"{name}-{pid}"] = (subprocess.Popen(
        [sys.executable, _CHILD, str(workdir), name, str(count), str(pid), port],
        env=env, stdout=log, stderr=subprocess.STDOUT), log)
  deadline = time.monotonic() + _TIMEOUT_S
  failed = None
  try:
    while failed is None and any(p.poll() is None for p, _ in children.values()):
      failed = next((k for k, (p, _) in children.items() if p.poll() not in (None, 0)), None)
      if time.monotonic() > deadline:
        failed = f"timeout after {_TIMEOUT_S} s"
      time.sleep(0.05)
    failed = failed or next((k for k, (p, _) in children.items() if p.returncode), None)
  finally:
    for proc, log in children.values():
      if proc.poll() is None:
        proc.kill()
      proc.wait()
      log.close()
  if failed is not None:
    logs = {k: open(log.name).read()[-3000:] for k, (_, log) in children.items()}
    raise AssertionError(f"child {failed} failed:\n" + "\n".join(
        f"--- {k} (exit {children[k][0].returncode}):\n{text}" for k, text in logs.items()))
  results = {}
  for key in children:
    with open(os.path.join(workdir, f"{key}.json")) as f:
      results[key] = json.load(f)
  return results


def _flat(params: dict) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(params[k], np.float64)) for k in sorted(params)])


def test_two_processes_equal_one(tmp_path):
  results = _launch(tmp_path)
  one, two0, two1 = results["one-0"], results["two-0"], results["two-1"]

  # Both processes hold the same global parameters (gathered bit for bit).
  for phase in PHASES:
    assert two0[phase] == two1[phase], phase

  # One process x 4 devices vs two x 2: the same run, summed in another
  # order. rtol 1e-5 (~84 float32 ulps) plus the same at the parameters' scale.
  reference = _flat(one["first"])
  assert np.max(np.abs(reference - _flat(one["continued"]))) > 1e-3  # the continuation moved
  for phase in PHASES:
    scale = np.max(np.abs(_flat(one[phase])))
    np.testing.assert_allclose(_flat(two0[phase]), _flat(one[phase]), rtol=1e-5,
                               atol=1e-5 * scale, err_msg=phase)
  # A checkpoint written by the other process count continues as the state
  # continued in memory with the same resume key.
  for result in (one, two0):
    expected = _flat(result["continued"])
    np.testing.assert_allclose(_flat(result["other_restored"]), expected, rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(expected)))
  # Without a key, a restore draws a fresh key: the same on every process.
  assert two0["fresh_key"] == two1["fresh_key"]
  assert len({tuple(two0["fresh_key"]), tuple(one["fresh_key"]), (0, 21), (0, 11)}) == 4

  # shared_secret_seed: one value on both processes, another in another launch
  # and on another call.
  assert two0["secrets"] == two1["secrets"]
  # make_private's default seed and key are one secret too (one sample, one noise).
  assert two0["default_seed"] == two1["default_seed"] != one["default_seed"]
  assert two0["default_key"] == two1["default_key"] != one["default_key"]
  assert len({*two0["secrets"], *one["secrets"]}) == 4

  # One writer: process 0 attaches and writes the ledger, process 1 never does.
  assert two0["journal_directory"] == os.path.join(str(tmp_path), "two")
  assert two1["journal_directory"] is None and two1["restored_journal_directory"] is None
  assert two1["journal_writes"] == []
  assert "ledger.json" in two0["journal_writes"] and "run.json" in two0["journal_writes"]
  for result in (one, two0):
    assert result["ledger_steps"] == 5  # 3 steps, saved, then 2 more
  # The checkpoints each launch continued from the other: ledgers of 5 steps.
  for name in ("one", "two"):
    assert Ledger.load(tmp_path / f"{name}-other" / "ledger.json").num_steps == 5
