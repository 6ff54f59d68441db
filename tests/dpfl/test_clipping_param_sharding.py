"""Every clipping method with parameters sharded over "model" of a (data, model) mesh.

The device count is fixed when JAX starts, so the checks run in a child
process (``param_sharding_child.py``) with 4 host-platform devices on a
(2, 2) mesh: the user's own NamedShardings on the parameters, the batch
sharded over "data", Auto and Explicit axis types. For each configuration:

* the clipped sum equals a brute-force float64 loop on unsharded
  parameters (``clip_reference``; DP-FedAvg's local steps: a loop of SGD
  steps), to float32 tolerance of the summands' magnitude (units × C);
  the reported norms equal the loop's full norms;
* the sum comes back sharded as the parameters are;
* the compiled program (HLO) holds no all-gather / all-to-all /
  collective-permute as large as one shard of a parameter (no gather of
  parameters or per-unit gradients), no all-reduce of a whole (unsharded)
  parameter, and an all-reduce over "model" of the per-unit squared norms
  (``[units on this device]``): the norms are summed across parameter
  shards before clipping, the gradients never are.

And the contribution bound: one-unit batches whose gradient lives on one
model shard only, or on both, each contribute <= C, with the true norm
(closed form) reported.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
MODEL_SIZE, DATA_SIZE = 2, 2
C = 0.3  # the child's clip norm

# (mesh axis type, unit, method, microbatch_size). "local_steps" is
# dpfl.federated.clipped_user_updates with 2 local steps (ULS, DP-FedAvg).
FAST = [("explicit", "user", "materialize", None), ("auto", "example", "ghost", None),
        ("explicit", "user", "local_steps", None)]
FAST_BOUND = [("explicit", "user", "ghost")]
SLOW = [(kind, unit, method, micro)
        for kind in ("auto", "explicit")
        for unit in ("example", "user")
        for method in ("materialize", "reweight", "ghost", "auto")
        for micro in (None, 4)] + [
            ("auto", "user", "local_steps", None), ("auto", "user", "local_steps", 4),
            ("explicit", "user", "local_steps", 4)]
SLOW = [c for c in SLOW if c not in FAST]
SLOW_BOUND = [(kind, unit, method) for kind in ("auto", "explicit")
              for unit in ("example", "user")
              for method in ("materialize", "reweight", "ghost", "auto")] + [
                  ("auto", "user", "local_steps"), ("explicit", "user", "local_steps")]
SLOW_BOUND = [c for c in SLOW_BOUND if c not in FAST_BOUND]


def _run_child(configs, bound):
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
      [sys.executable, str(HERE / "param_sharding_child.py"),
       json.dumps({"configs": configs, "bound": bound})],
      env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _shard_shape(shape, spec):
  return [n // (MODEL_SIZE if s == "model" else 1) for n, s in
          zip(shape, spec + ["None"] * (len(shape) - len(spec)))]


def check_config(name, r):
  kind, unit, method, micro = name.split("/")
  # The sum: brute-force reference, float32 tolerance of units x C.
  assert r["sum_norm"] > 0.1 and r["num_clipped"] > 0, (name, r)
  assert r["sum_error"] <= 1e-5 * r["sum_scale"] + 1e-6, (name, r)
  assert r["norm_error"] <= 1e-5, (name, r)
  # Sharded as the parameters are (trailing None entries are equivalent).
  for leaf, spec in r["param_specs"].items():
    got = list(r["shardings"][leaf])
    while got and got[-1] == "None":
      got.pop()
    want = list(spec)
    while want and want[-1] == "None":
      want.pop()
    assert got == want, (name, leaf, r["shardings"], r["param_specs"])

  shapes = r["param_shapes"]
  sharded = {k: v for k, v in shapes.items() if "model" in r["param_specs"][k]}
  smallest_shard = min(math.prod(_shard_shape(shapes[k], r["param_specs"][k]))
                       for k in sharded)
  for c in r["collectives"]:
    sizes = [math.prod(s) for s in c["shapes"]]
    if c["kind"] in ("all-gather", "all-to-all", "collective-permute"):
      # Nothing the size of a parameter shard (or of a unit's gradient) moves.
      assert max(sizes) < smallest_shard, (name, c)
    else:
      # A whole parameter is never summed: the sum over units reduces shards.
      for s in c["shapes"]:
        for k, full in sharded.items():
          assert s[len(s) - len(full):] != full or len(s) < len(full), (name, k, c)
  # The per-unit squared norms: one all-reduce over "model" of [local units].
  # (Blocks of microbatch_size units; unit="user" counts users.)
  units = 8 if unit == "user" else 16  # the child's USERS x PER_USER
  block = units if micro == "None" else int(micro)
  local = block // DATA_SIZE
  norm_reduces = [c for c in r["collectives"] if c["kind"] == "all-reduce"
                  and c["axes"] == "model" and [local] in c["shapes"]]
  assert norm_reduces, (name, r["collectives"])


def check_bound(name, r):
  assert set(r) == {"one shard/x1.0", "one shard/x0.001", "all shards/x1.0",
                    "all shards/x0.001"}, r
  for case, v in r.items():
    # Clipped: exactly C (the bound is tight for a norm 400x C); below C:
    # the unit's own gradient. The norm reported is the full norm, not a shard's.
    assert v["contribution"] <= C * (1 + 1e-6), (name, case, v)
    assert math.isclose(v["reported"], v["true"], rel_tol=1e-5), (name, case, v)
    want = min(C, v["true"])
    assert math.isclose(v["contribution"], want, rel_tol=1e-5), (name, case, v)


def _check(configs, bound):
  out = _run_child(configs, bound)
  assert len(out["configs"]) == len(configs) and len(out["bound"]) == len(bound)
  for name, r in out["configs"].items():
    check_config(name, r)
  for name, r in out["bound"].items():
    check_bound(name, r)


def test_param_sharding_fast_subset():
  _check(FAST, FAST_BOUND)


@pytest.mark.slow
def test_param_sharding_every_method():
  _check(SLOW, SLOW_BOUND)
