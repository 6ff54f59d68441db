"""User-level training with the user axis sharded over 4 (host-platform) devices.

The device count is fixed when JAX starts, so the check runs in a child
process with ``--xla_force_host_platform_device_count=4``. In the child, each
computation runs once on unsharded inputs (one device) and once with the
user (or example) axis sharded over the 4 devices; the results must agree to
float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

_CHILD = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import dpfl
    from dpfl.data import UserDataset
    from dpfl.federated import clipped_user_updates, shard_users, user_mesh

    assert jax.device_count() == 4, jax.devices()

    def loss(params, batch):
      h = jnp.tanh(batch["x"] @ params["w1"])
      return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)

    def flat(t):
      return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])

    def clipped_sum_scale(aux, clip, local_steps):
      # Float32 error scale of a clipped sum: each unit adds at most C to a
      # coordinate; a pseudo-gradient θ − θ_u is also rounded at |θ|'s scale,
      # times the unit's clip factor.
      norms = np.asarray(aux.grad_norms, np.float64)
      factors = np.minimum(1.0, clip / np.where(norms > 0, norms, np.inf))
      scale = int(aux.num_units) * clip
      return scale + (float(np.sum(factors)) * theta_max if local_steps else 0.0)

    k = jax.random.split(jax.random.key(0), 5)
    params = {"w1": jax.random.normal(k[0], (5, 4)), "w2": jax.random.normal(k[1], (4,))}
    users, per_user = 16, 4
    batch = {"x": jax.random.normal(k[2], (users, per_user, 5)),
             "y": jax.random.normal(k[3], (users, per_user))}
    mask = jax.random.bernoulli(k[4], 0.7, (users, per_user))
    out = {}
    theta_max = float(np.max(np.abs(flat(params))))

    # 1. Local steps (DP-FedAvg) on an Explicit mesh (jax.make_mesh's default).
    explicit = jax.make_mesh((4,), ("users",))
    put = lambda t: jax.device_put(t, NamedSharding(explicit, P("users")))
    for steps, micro in ((1, None), (3, 4)):
      fn = jax.jit(clipped_user_updates(loss, l2_clip_norm=0.3, local_steps=steps,
                                        local_learning_rate=0.2, microbatch_size=micro))
      ref, ref_aux = fn(params, batch, mask=mask)
      with jax.set_mesh(explicit):
        got, got_aux = fn(params, put(batch), mask=put(mask))
      out[f"local_steps={steps}/microbatch={micro}"] = [
          flat(ref).tolist(), flat(got).tolist(),
          [int(ref_aux.num_units), int(got_aux.num_units)],
          clipped_sum_scale(ref_aux, 0.3, steps)]

    # 2. The gradient path on the Auto mesh of dpfl.federated.user_mesh.
    auto = user_mesh()
    fn = jax.jit(dpfl.clipped_grad(loss, l2_clip_norm=0.3, unit="user"))
    ref, ref_aux = fn(params, batch, mask=mask)
    sharded_batch, sharded_mask = shard_users((batch, mask), auto)
    got, _ = fn(params, sharded_batch, mask=sharded_mask)
    out["gradient/auto mesh"] = [flat(ref).tolist(), flat(got).tolist(), [0, 0],
                                 clipped_sum_scale(ref_aux, 0.3, 0)]

    # 3. Whole training runs (sampling, noise, server optimizer) with the same
    #    seeds, with and without a mesh, on the Auto and on an Explicit mesh:
    #    ULS with and without local steps, and ELS. Without local steps the
    #    step uses clipped_grad's default method="auto".
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    ds = UserDataset.from_arrays({"x": x, "y": np.sin(x).sum(1)}, rng.integers(0, 50, 400),
                                 examples_per_user=6)
    configs = {
        "uls run": dict(batch_size=10, local_steps=2, local_learning_rate=0.3),
        "uls gradient run": dict(batch_size=10),
        "els run": dict(sampling_unit="example", batch_size=30),
    }

    def run(mesh, extra):
      private = dpfl.make_private(
          loss, optax.sgd(0.5, momentum=0.9, nesterov=True), privacy_unit="user",
          dataset=ds, l2_clip_norm=0.3, num_steps=3, noise_multiplier=1.0, delta=1e-5,
          key=3, seed=4, mesh=mesh, **extra)
      state, step = private.init(params), private.make_step()
      for b, m in private.batches(ds, state):
        if mesh is not None:
          assert len(jax.tree.leaves(b)[0].sharding.device_set) == 4
        state, _ = step(state, b, m)
      return flat(state.params).tolist()

    for name, extra in configs.items():
      ref = run(None, extra)
      for mesh_name, mesh in (("auto", auto), ("explicit", explicit)):
        # Parameters after 3 steps: float32 rounding at their own scale.
        scale = max(abs(v) for v in ref)
        out[f"{name}/{mesh_name} mesh"] = [ref, run(mesh, extra), [0, 0], scale]
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # ~20 s; sharded ULS also runs in test_param_sharding's and test_multiprocess's default subsets
def test_one_and_four_devices_agree():
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(results) == 9
  for config, (one, four, units, scale) in results.items():
    one, four = np.array(one, np.float64), np.array(four, np.float64)
    assert np.max(np.abs(one)) > 1e-2, config  # the reference is not trivially zero
    # One device vs four: float32 sums over users in another order. rtol 1e-5
    # (~84 float32 ulps) plus the same relative size of the terms' scale
    # (computed in the child: users x C, the clip-weighted |θ| of local steps'
    # pseudo-gradients, or |θ| after whole training runs).
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-5 * scale, err_msg=config)
    assert units[0] == units[1], config
