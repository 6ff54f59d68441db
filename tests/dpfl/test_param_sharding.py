"""Private training with the parameters sharded over the ``model`` axis of a (data, model) mesh.

The device count is fixed when JAX starts, so the multi-device checks run in a
child process with ``--xla_force_host_platform_device_count=4`` (as
``test_user_level_sharding.py``). The child places the parameters on a
``(2, 2)`` mesh ``("data", "model")`` — one weight split over ``model`` on its
second dimension, one bias split over ``model``, one weight replicated — and
runs each configuration twice with the same ``key=`` and ``seed=``: unsharded
on one device (the reference) and on the mesh. It reports the parameters of
both runs, their ε and plans, the shardings of the state after the steps, the
noise drawn for a sharded leaf next to the unsharded draw, and the compiled
memory of a sharded noise update; the parent checks them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpfl
from dpfl import sampling

_CHILD = textwrap.dedent(
    """
    import json
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import dpfl
    from dpfl import mf, noise
    from dpfl.data import UserDataset

    assert jax.device_count() == 4, jax.devices()
    which = json.loads(sys.argv[1])
    out = {"runs": {}, "draws": {}, "memory": {}}

    def loss(params, batch):
      h = jnp.tanh(batch["x"] @ params["w1"] + params["b"])
      return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)

    def flat(t):
      return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])

    def mesh_of(kind):
      types = (AxisType.Explicit if kind == "explicit" else AxisType.Auto,) * 2
      return jax.make_mesh((2, 2), ("data", "model"), axis_types=types)

    k = jax.random.split(jax.random.key(0), 2)
    params = {"w1": jax.random.normal(k[0], (5, 8)), "b": jnp.full((8,), 0.1),
              "w2": jax.random.normal(k[1], (8,))}
    specs = {"w1": P(None, "model"), "b": P("model"), "w2": P()}

    def place(tree, mesh):
      return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)).astype(np.float32)
    examples = {"x": x, "y": np.sin(x).sum(1).astype(np.float32)}
    users = UserDataset.from_arrays(examples, rng.integers(0, 24, 96), examples_per_user=4)
    common = dict(l2_clip_norm=0.5, num_steps=3, noise_multiplier=1.0, delta=1e-5, key=3,
                  seed=4)
    configs = {
        "dp-sgd poisson": dict(dataset_size=96, batch_size=8, max_batch_size=16),
        "dp-ftrl blt": dict(dataset_size=96, batch_size=8, strategy="blt",
                            strategy_options={"buffers": 2}),
        "dp-ftrl banded": dict(dataset_size=96, batch_size=8, strategy="banded",
                               strategy_options={"bands": 2}),
        "els": dict(privacy_unit="user", sampling_unit="example", dataset=users,
                    batch_size=8, max_batch_size=16),
        "uls": dict(privacy_unit="user", dataset=users, batch_size=6, max_batch_size=8),
        "uls local steps": dict(privacy_unit="user", dataset=users, batch_size=6,
                                max_batch_size=8, local_steps=2, local_learning_rate=0.3),
    }

    def run(mesh, config):
      extra = configs[config]
      private = dpfl.make_private(loss, optax.sgd(0.3, momentum=0.9), mesh=mesh,
                                  **common, **extra)
      data = extra.get("dataset", examples)
      state = private.init(params if mesh is None else place(params, mesh))
      step = private.make_step()
      for b, m in private.batches(data, state):
        if mesh is not None:  # split over the data axis, replicated over "model"
          batch_leaf = jax.tree.leaves(b)[0]
          assert batch_leaf.sharding.is_equivalent_to(NamedSharding(mesh, P("data")),
                                                      batch_leaf.ndim), batch_leaf.sharding
        state, _ = step(state, b, m)
      return private, state

    def misplaced(state, mesh):
      # Every params-shaped leaf (params, momentum, MF buffers) must be
      # sharded like its parameter; the rest (keys, counts) replicated.
      bad = []
      noise_state, (trace, *_) = state.opt_state
      trees = {"params": state.params, "momentum": trace.trace}
      for i, buffer in enumerate(noise_state.buffers):
        trees[f"buffer {i}"] = buffer
      for name, tree in trees.items():
        for leaf_name, leaf in tree.items():
          want = NamedSharding(mesh, specs[leaf_name])
          if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
            bad.append(f"{name}[{leaf_name}]: {leaf.sharding}")
      for name, leaf in (("key", noise_state.key), ("count", noise_state.count)):
        if not leaf.sharding.is_equivalent_to(NamedSharding(mesh, P()), leaf.ndim):
          bad.append(f"{name}: {leaf.sharding}")
      return bad

    def buffers_of(state):
      buffers = state.opt_state[0].buffers
      return flat(buffers).tolist() if buffers else []

    for config, kind in which["runs"]:
      mesh = mesh_of(kind)
      ref_private, ref = run(None, config)
      got_private, got = run(mesh, config)
      out["runs"][f"{config}/{kind}"] = {
          "ref": flat(ref.params).tolist(), "got": flat(got.params).tolist(),
          "ref_buffers": buffers_of(ref), "got_buffers": buffers_of(got),
          "epsilon": [ref_private.epsilon(), got_private.epsilon()],
          "plans": [ref_private.plan.to_dict(), got_private.plan.to_dict()],
          "misplaced": misplaced(got, mesh), "steps": int(got.step)}

    # The noise draw of a sharded leaf: the unsharded values, laid out like
    # the leaf, eagerly and inside jit.
    big = jnp.zeros((256, 512), jnp.float32)
    step_key = jax.random.key(11)
    (ref_draw,) = noise.normal_leaves(step_key, [big])
    for kind in which["draws"]:
      mesh = mesh_of(kind)
      leaf = jax.device_put(big, NamedSharding(mesh, P("data", "model")))
      (eager,) = noise.normal_leaves(step_key, [leaf])
      with jax.set_mesh(mesh):
        (jitted,) = jax.jit(lambda z: noise.normal_leaves(step_key, [z]))(leaf)
      tx = noise.gaussian_noise(noise_multiplier=1.5, l2_clip_norm=2.0, expected_batch_size=1.0,
                                key=5)
      with jax.set_mesh(mesh):
        noisy, _ = jax.jit(tx.update)(leaf, tx.init(leaf))
      out["draws"][kind] = {
          "eager_equal": bool(np.array_equal(np.asarray(eager), np.asarray(ref_draw))),
          "jit_equal": bool(np.array_equal(np.asarray(jitted), np.asarray(ref_draw))),
          "shardings": [a.sharding.is_equivalent_to(leaf.sharding, 2)
                        for a in (eager, jitted, noisy)],
          "noisy": np.asarray(noisy, np.float64).ravel().tolist(), "size": int(big.size)}

    # Compiled memory of one noise step on a 64 MiB leaf split 4 ways (DP-SGD
    # and a 2-buffer BLT), next to the same leaf replicated: per device, temp
    # + output must be a fraction of the leaf, i.e. noise is not made whole.
    huge = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    for kind in which["memory"]:
      mesh = mesh_of(kind)
      for name, tx in (("dp-sgd", noise.gaussian_noise(noise_multiplier=1.0, l2_clip_norm=1.0,
                                                         expected_batch_size=1.0, key=0)),
                       ("blt", mf.blt_noise(buffer_decay=[0.9, 0.5], output_scale=[0.3, 0.1],
                                            num_steps=8, sensitivity=1.0, noise_multiplier=1.0,
                                            l2_clip_norm=1.0, expected_batch_size=1.0,
                                            key=0))):
        for layout in ("sharded", "replicated"):
          sharding = NamedSharding(mesh, P("data", "model") if layout == "sharded" else P())
          leaf = jax.ShapeDtypeStruct(huge.shape, huge.dtype, sharding=sharding)
          state = jax.eval_shape(tx.init, jnp.zeros((1,)))  # key/count shapes only
          buffers = tuple(leaf for _ in range(2 if name == "blt" else 0))
          state = noise.NoiseState(
              key=jax.ShapeDtypeStruct(state.key.shape, state.key.dtype,
                                       sharding=NamedSharding(mesh, P())),
              count=jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
              buffers=buffers)
          with jax.set_mesh(mesh):
            stats = jax.jit(tx.update).lower(leaf, state).compile().memory_analysis()
          out["memory"][f"{name}/{kind}/{layout}"] = {
              "temp": int(stats.temp_size_in_bytes), "output": int(stats.output_size_in_bytes),
              "leaf": 4096 * 4096 * 4, "buffers": len(buffers)}
    print(json.dumps(out))
    """
)


def _child(which: dict) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(which)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_runs(runs: dict) -> None:
  for name, r in runs.items():
    ref, got = np.array(r["ref"], np.float64), np.array(r["got"], np.float64)
    assert r["steps"] == 3, name
    assert np.max(np.abs(ref)) > 1e-2, name  # the reference is not trivially zero
    # Same keys and seeds, so the same batches and noise: the runs differ only
    # by float32 sums in another order (over the data shards, and over the
    # model shards of h @ w2). rtol 1e-5 (~84 float32 ulps) plus the same
    # relative size of the parameters' own scale.
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    if r["ref_buffers"]:
      ref_b, got_b = np.array(r["ref_buffers"]), np.array(r["got_buffers"])
      np.testing.assert_allclose(got_b, ref_b, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref_b)),
                                 err_msg=name)
    assert r["misplaced"] == [], (name, r["misplaced"])
    assert r["plans"][0] == r["plans"][1], name
    assert r["epsilon"][0] == r["epsilon"][1] and r["epsilon"][0] > 0, name


def _check_draws(draws: dict) -> None:
  for kind, d in draws.items():
    # Bit for bit the unsharded draw (the values cannot depend on the layout).
    assert d["eager_equal"] and d["jit_equal"], kind
    assert all(d["shardings"]), (kind, d["shardings"])
    # And N(0, (σC)²) with σC = 3: a 6-sigma bound on the mean (s/√n) and on
    # the variance (s² √(2/n) for a Gaussian), false failure < 1e-8 each.
    z = np.array(d["noisy"])
    n, s = d["size"], 1.5 * 2.0
    assert z.size == n
    assert abs(z.mean()) <= 6 * s / math.sqrt(n), kind
    assert abs(z.var() / s**2 - 1) <= 6 * math.sqrt(2 / n), kind


def _check_memory(memory: dict) -> None:
  for name, m in memory.items():
    if not name.endswith("/sharded"):
      continue
    replicated = memory[name.replace("/sharded", "/replicated")]
    leaf, model_sized = m["leaf"], 1 + m["buffers"]  # the update and the buffers
    # Split 4 ways: each device holds a quarter of every model-sized output
    # (and BLT a quarter-leaf temporary, x written once); noise made whole on
    # a device would add a full leaf and break the bound.
    per_device = m["temp"] + m["output"]
    assert per_device <= 0.5 * model_sized * leaf, (name, m)
    # The control: the same step on the replicated leaf holds it whole.
    assert replicated["temp"] + replicated["output"] >= model_sized * leaf, (name, replicated)


def test_sharded_params_runs_noise_and_memory():
  """A fast subset (~30 s of CPU, mostly compiles): DP-SGD and ULS with local steps on
  the Auto mesh, BLT DP-FTRL on an Explicit one; the draw; the compiled memory."""
  out = _child({"runs": [["dp-sgd poisson", "auto"], ["uls local steps", "auto"],
                         ["dp-ftrl blt", "explicit"]],
                "draws": ["auto", "explicit"], "memory": ["auto", "explicit"]})
  assert len(out["runs"]) == 3 and len(out["draws"]) == 2 and len(out["memory"]) == 8
  _check_runs(out["runs"])
  _check_draws(out["draws"])
  _check_memory(out["memory"])


@pytest.mark.slow
def test_sharded_params_every_path_on_both_mesh_types():
  configs = ["dp-sgd poisson", "dp-ftrl blt", "dp-ftrl banded", "els", "uls", "uls local steps"]
  runs = [[c, kind] for c in configs for kind in ("auto", "explicit")]
  out = _child({"runs": runs, "draws": [], "memory": []})
  assert len(out["runs"]) == 12
  _check_runs(out["runs"])


def _loss(params, batch):
  return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)


@pytest.mark.parametrize("mesh", ["data", 4, object()])
def test_mesh_must_be_a_jax_mesh(mesh):
  with pytest.raises(ValueError, match=r"mesh must be a jax\.sharding\.Mesh.*got"):
    dpfl.make_private(_loss, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=10, batch_size=2,
                      num_steps=1, noise_multiplier=1.0, delta=1e-5, mesh=mesh)


def test_example_level_mesh_pads_batches_to_the_data_axis():
  """Before: example-level make_private refused mesh=. Now batches are padded and sharded."""
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  private = dpfl.make_private(_loss, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=10,
                              batch_size=3, num_steps=1, noise_multiplier=1.0, delta=1e-5,
                              sampling_scheme="shuffle", mesh=mesh, key=0, seed=0)
  assert private.sampler.max_batch_size == 3  # a data axis of 1 pads nothing
  data = {"x": np.ones((10, 2), np.float32), "y": np.zeros(10, np.float32)}
  state = private.init(np.zeros(2, np.float32))
  (batch, mask), = private.batches(data, state)
  assert batch["x"].sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), 2)
  state, _ = private.make_step()(state, batch, mask)
  assert int(state.step) == 1


def test_example_level_samplers_pad_to_the_data_axis():
  shuffled = sampling.ShuffledSampler(10, batch_size=3, multiple_of=2, seed=0)
  batch = shuffled.draw(np.zeros(4, np.uint32), 0)
  assert shuffled.max_batch_size == 4 and batch.indices.shape == (4,)
  assert batch.mask.tolist() == [True, True, True, False]
  assert shuffled.expected_batch_size == 3  # the noise normaliser ignores padding
  poisson = sampling.PoissonSampler(100, sampling_prob=0.1, max_batch_size=13, multiple_of=4,
                                    seed=0)
  assert poisson.max_batch_size == 16 and poisson.describe()["max_batch_size"] == 16
  assert poisson.draw(np.zeros(4, np.uint32), 0).indices.shape == (16,)
  cyclic = sampling.CyclicPoissonSampler(100, num_groups=2, sampling_prob=0.1,
                                         max_batch_size=7, multiple_of=2, seed=0)
  assert cyclic.max_batch_size == 8


# --- following the params: one process, a (1, 1) mesh (the specs are what is checked) ---

from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from dpfl import _sharding  # noqa: E402


def _mesh(kind=AxisType.Auto):
  return jax.make_mesh((1, 1), ("data", "model"), axis_types=(kind, kind))


def _specs(tree):
  return jax.tree.map(lambda s: tuple(s.spec), tree,
                      is_leaf=lambda s: isinstance(s, NamedSharding))


def test_follow_params_matches_whole_param_subtrees_before_path_suffixes():
  mesh = _mesh()
  x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P("model", None)))
  y = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P(None, "model")))
  params = {"m": {"w": x}, "w": y}
  # A user optimizer keeping its moment as {"m": params-like}: the moment of
  # params["w"] sits at ['m']['w'], the path of params["m"]["w"] too.
  state = {"m": jax.tree.map(jnp.zeros_like, params), "count": jnp.zeros((), jnp.int32)}
  got = _specs(_sharding.follow_params(state, params, mesh))
  assert got == {"m": {"m": {"w": ("model", None)}, "w": (None, "model")}, "count": ()}


def test_follow_params_never_gives_a_bare_params_sharding_to_keys_or_counters():
  mesh = _mesh()
  params = jax.device_put(jnp.ones((4,)), NamedSharding(mesh, P("model")))
  state = (jnp.zeros((4,), jnp.uint32), jnp.zeros((4,)), jnp.zeros((), jnp.int32))
  assert _specs(_sharding.follow_params(state, params, mesh)) == ((), ("model",), ())


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
def test_factored_optimizer_state_steps_on_both_mesh_types(kind):
  # Adafactor's factored statistics are not params-shaped: replicated, and on
  # an Explicit mesh laid out by reshard (with_sharding_constraint only asserts).
  mesh = _mesh(kind)
  params = {"w": jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P(None, "model")))}
  data = {"x": np.linspace(-1, 1, 32, dtype=np.float32)[:, None]}
  private = dpfl.make_private(
      lambda p, b: jnp.mean(jnp.tanh(b["x"] * jnp.sum(p["w"])) ** 2),
      optax.adafactor(0.01, min_dim_size_to_factor=2), l2_clip_norm=1.0, dataset_size=32,
      batch_size=4, num_steps=2, noise_multiplier=0.5, delta=1e-5, sampling_scheme="shuffle",
      mesh=mesh, key=1, seed=2)
  state, step = private.init(params), private.make_step()
  for batch, mask in private.batches(data, state):
    state, _ = step(state, batch, mask)
  assert int(state.step) == 2 and state.params["w"].sharding.spec == P(None, "model")


def test_restore_lays_the_state_out_as_init_does(tmp_path):
  mesh = _mesh()
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  params = {"w": put(jnp.ones((4, 8)), P(None, "model")), "v": put(jnp.ones((8,)), P("model"))}
  make = lambda: dpfl.make_private(
      _loss, optax.adam(0.01), l2_clip_norm=1.0, dataset_size=32, batch_size=4, num_steps=4,
      noise_multiplier=0.5, delta=1e-5, strategy="blt", strategy_options={"buffers": 2},
      mesh=mesh, key=1, seed=2, checkpoint_dir=tmp_path)
  first = make()
  state = first.init(params)
  restored = make().restore(tmp_path, params)
  want = {"w": (None, "model"), "v": ("model",)}
  for tree in (state.opt_state[0].buffers[0], restored.opt_state[0].buffers[0],
               restored.opt_state[1][0].mu):
    assert {k: tuple(v.sharding.spec) for k, v in tree.items()} == want


@pytest.mark.parametrize("where", ["make_private", "clipped_grad"])
def test_params_split_over_the_data_axis_are_refused_on_an_explicit_mesh(where):
  mesh = _mesh(AxisType.Explicit)
  params = {"r": jax.device_put(jnp.ones(6), NamedSharding(mesh, P("data")))}
  loss = lambda p, b: jnp.mean((b["x"] * jnp.sum(p["r"])) ** 2)
  with pytest.raises(ValueError, match=r"params\['r'\] is sharded over the mesh axis 'data'"):
    if where == "make_private":
      dpfl.make_private(loss, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=8, batch_size=2,
                        num_steps=1, noise_multiplier=1.0, delta=1e-5, mesh=mesh).init(params)
    else:
      batch = jax.device_put(({"x": jnp.ones(8)}, jnp.ones(8, bool)),
                             NamedSharding(mesh, P("data")))
      with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh):
        jax.jit(lambda p, b, m: dpfl.clipped_grad(loss, l2_clip_norm=1.0)(p, b, mask=m))(
            params, *batch)
