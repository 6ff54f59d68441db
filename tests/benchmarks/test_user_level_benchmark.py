"""benchmarks/user_level.py: the sharded-parameter row, run small (--quick).

The memory reference is a closed form: replicated float32 parameters take
4 bytes per parameter on every device, Adam's two moments and the BLT
noise's two buffers as much again each; sharded over a model axis of 2
they halve (up to the few small leaves kept replicated).
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
  spec = importlib.util.spec_from_file_location(
      "user_level_benchmark", ROOT / "benchmarks" / "user_level.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # two 4-device compilations of a ULS step: minutes on 2 shared cores
def test_sharded_row_quick(monkeypatch):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    _load().main(["--only", "sharded", "--quick", "--users", "4", "--examples-per-user", "1",
                  "--json"])
  result = json.loads(out.getvalue().strip().splitlines()[-1])
  assert "uls_ratio" not in result  # --only sharded
  n = result["workload"]["num_parameters"]
  held = result["sharded_bytes_per_device"]
  replicated = held["4x1"]
  assert replicated["params"] == 4 * n
  assert replicated["noise_buffers"] == 2 * 4 * n  # two BLT buffers
  # Adam: mu and nu, plus its step counter.
  assert 2 * 4 * n <= replicated["optimizer_state"] <= 2 * 4 * n + 64
  for part, full in replicated.items():
    assert 0.5 * full <= held["2x2"][part] <= 0.52 * full, (part, held)
  ratio = sum(held["2x2"].values()) / sum(replicated.values())
  assert math.isclose(result["sharded_memory_ratio"], ratio, rel_tol=1e-3)
  assert 0 < result["sharded_step_ratio"] < 10
  assert set(result["sharded_details"]["median_ms"]) == {"2x2", "4x1"}
