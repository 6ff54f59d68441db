"""clipped_grad on a unit axis sharded over 4 (host-platform) devices.

The device count is fixed when JAX starts, so the check runs in a child
process with ``--xla_force_host_platform_device_count=4``. The reference is
the same computation on unsharded inputs in that process. The child gets its
(unit, method, microbatch_size) configurations as JSON in argv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import json
    import sys
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dpfl.clipping import clipped_grad

    assert jax.device_count() == 4, jax.devices()

    def loss(params, batch):
      h = jnp.tanh(batch["x"] @ params["w1"])
      return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)

    k = jax.random.split(jax.random.key(0), 5)
    params = {"w1": jax.random.normal(k[0], (5, 4)),
              "w2": jax.random.normal(k[1], (4,))}
    users, per_user = 16, 3
    batch = {"x": jax.random.normal(k[2], (users, per_user, 5)),
             "y": jax.random.normal(k[3], (users, per_user))}
    mask = jax.random.bernoulli(k[4], 0.7, (users, per_user))
    # jax.make_mesh's default axis type is Explicit: the strictest case.
    mesh = jax.make_mesh((4,), ("users",))
    put = lambda t: jax.device_put(t, NamedSharding(mesh, P("users")))
    out = {}
    for unit, method, microbatch_size in json.loads(sys.argv[1]):
      b, m = batch, mask
      if unit == "example":
        b = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), b)
        m = m.reshape(-1)
      fn = jax.jit(clipped_grad(loss, l2_clip_norm=0.5, unit=unit,
                                method=method,
                                microbatch_size=microbatch_size))
      ref, ref_aux = fn(params, b, mask=m)
      with jax.set_mesh(mesh):
        got, got_aux = fn(params, put(b), mask=put(m))
      diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
                 zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
      out[f"{unit}/{method}/{microbatch_size}"] = {
          "diff": diff,
          # Each unit adds at most C = 0.5 to any coordinate: the magnitude
          # of the summands whose float32 sum sharding reorders.
          "terms": int(ref_aux.num_units) * 0.5,
          "units": [int(got_aux.num_units), int(ref_aux.num_units)],
          "norm": float(jnp.sqrt(sum(jnp.sum(x**2)
                                     for x in jax.tree.leaves(ref)))),
      }
    print(json.dumps(out))
    """
)


# "auto" (the default) picks a method from one unit's shapes: it must not
# slice the sharded unit axis to get them.
CONFIGS = [("user", "materialize", None), ("user", "reweight", 8),
           ("example", "materialize", 8), ("example", "reweight", None),
           ("user", "auto", None), ("example", "auto", None),
           ("user", "auto", 8)]
# Ghost norms are computed from activations and cotangents of the whole
# (sharded) batch: every config must stay data-parallel and exact.
GHOST_CONFIGS = [("example", "ghost", None), ("user", "ghost", 8), ("example", "ghost", 8)]


@pytest.mark.parametrize("configs", [CONFIGS, GHOST_CONFIGS], ids=["existing", "ghost"])
def test_sharded_unit_axis_matches_single_device(configs):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  )
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, "-c", _CHILD, json.dumps(configs)],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(results) == len(configs)
  for config, r in results.items():
    assert r["norm"] > 0.1, config  # the reference is not trivially zero
    # One device vs four reorders the float32 sum over units: 1e-5 (~84
    # float32 ulps) of the summands' magnitude, not of the result's.
    assert r["diff"] <= 1e-5 * r["terms"], (config, r)
    assert r["units"][0] == r["units"][1], (config, r)
