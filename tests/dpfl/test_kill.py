"""Kill test: a run killed with SIGKILL at random points, resumed until done.

A child process (``kill_child.py``) trains with a checkpoint every few steps;
the test kills it at random moments (during steps, saves, start-up) at least
five times per run, then lets it finish. Checked after every kill and at the
end: the ledger file is a valid ledger; the run ends after exactly the planned
steps; its ε is at most the target and at least the ε of the releases the
harness saw (the child logs a hash of every released update, after releasing
it, so the harness can only under-count); no noise vector is released twice.
"""

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import accounting
from accounting.journal import RunJournal

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "kill_child.py")
sys.path.insert(0, HERE)
import kill_child  # noqa: E402  (its constants: planned steps, target, δ)

KILLS = 5


def _start(config, directory, log_path):
  root = os.path.dirname(os.path.dirname(HERE))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, CHILD, config, str(directory), str(log_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _released(log_path):
  if not os.path.exists(log_path):
    return []
  with open(log_path) as f:
    return [line.strip() for line in f if len(line.strip()) == 64]


# The default suite kills the DP-FTRL run (its resume also rolls correlated
# noise buffers forward: the path with the most to get wrong); the DP-SGD and
# ULS runs, which share every other line of the harness, are slow (~35 s each).
@pytest.mark.parametrize("config", [pytest.param("example", marks=pytest.mark.slow),
                                    pytest.param("uls", marks=pytest.mark.slow), "blt"])
def test_killed_runs_resume_to_the_plan_without_reusing_noise(config, tmp_path):
  rng = np.random.default_rng(zlib.crc32(config.encode()))
  directory, log_path = tmp_path / "run", tmp_path / "released.log"
  kills = 0
  for attempt in range(40):
    child = _start(config, directory, log_path)
    if kills < KILLS:
      if attempt > 0:
        # Kill after a random number of released steps (during a step, a
        # ledger write or a checkpoint save) ...
        line = child.stdout.readline()  # "ready": the first step ran
        if line.startswith("ready"):
          time.sleep(rng.uniform(0.0, 0.8))
      else:
        time.sleep(rng.uniform(0.0, 2.0))  # ... or during start-up
      if child.poll() is None:
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += 1
        if (directory / "ledger.json").exists():
          # Valid after every kill, and never behind what was released.
          ledger = accounting.Ledger.load(directory / "ledger.json")
          assert ledger.num_steps >= len(_released(log_path))
        continue
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    if "done" in out:
      break
  else:
    pytest.fail("the run never finished")
  assert kills >= KILLS
  journal = RunJournal.load(directory)
  released = _released(log_path)
  # Exactly the planned steps, recorded; the harness saw at most that many.
  assert journal.steps == journal.plan.num_steps == kill_child.PLANNED
  assert len(released) <= journal.steps
  # No noise vector released twice.
  assert len(set(released)) == len(released)
  # ε: at most the target, at least that of the releases seen (dp-accounting
  # of the same plan's mechanism, composed as the plan says).
  eps = journal.epsilon()
  assert eps <= kill_child.TARGET_EPSILON
  assert eps >= journal.epsilon(len(released)) - 1e-12
  final = accounting.Ledger.load(directory / "ledger.json")
  assert final.epsilon(delta=kill_child.DELTA) == pytest.approx(eps, rel=1e-12)
  assert json.loads((directory / "run.json").read_text())["plan"]["num_steps"] == \
      kill_child.PLANNED
