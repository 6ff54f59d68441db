"""Tests for dpfl.noise: calibration, key handling, resume safety, validation.

Statistical checks use fixed seeds and 6-sigma bounds. For n iid N(0, s^2)
samples the sample variance has relative standard deviation sqrt(2/(n-1)),
the sample mean has standard deviation s/sqrt(n), and the sample correlation
of two independent vectors has standard deviation ~1/sqrt(n); a two-sided
6-sigma bound has a false-failure rate of ~2e-9 per check.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpfl import noise

SIX_SIGMA = 6.0


def _assert_std(samples, expected_std):
  samples = np.asarray(samples, np.float64).ravel()
  n = samples.size
  # 6-sigma bound on the sample variance, then on the std (sqrt is monotone).
  var_tol = SIX_SIGMA * math.sqrt(2.0 / (n - 1))
  ratio = samples.var(ddof=1) / expected_std**2
  assert abs(ratio - 1) <= var_tol, (ratio, var_tol)
  assert abs(samples.mean()) <= SIX_SIGMA * expected_std / math.sqrt(n)


def _assert_uncorrelated(a, b):
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  r = np.corrcoef(a, b)[0, 1]
  assert abs(r) <= SIX_SIGMA / math.sqrt(a.size), r


def _transform(key=0, noise_multiplier=1.3, l2_clip_norm=0.7, expected_batch_size=32.0):
  return noise.gaussian_noise(noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                              expected_batch_size=expected_batch_size, key=key)


def test_noise_std_is_sigma_c_over_expected_batch_size():
  sigma, clip, batch = 1.3, 0.7, 32.0
  tx = _transform(noise_multiplier=sigma, l2_clip_norm=clip, expected_batch_size=batch)
  rng = np.random.default_rng(0)
  clipped_sum = {"w": jnp.asarray(rng.normal(size=(400, 500)), jnp.float32)}
  out, _ = tx.update(clipped_sum, tx.init(clipped_sum))
  residual = np.asarray(out["w"], np.float64) - np.asarray(clipped_sum["w"], np.float64) / batch
  _assert_std(residual, sigma * clip / batch)  # 200,000 samples


def test_issue_383_noise_relative_to_mean_of_clipped_gradients():
  """jax-privacy #383: sum-calibrated noise applied to a mean (a factor-B mismatch).

  Independent reference: clip per-example gradients with numpy, average them,
  and check the transform's output is that mean plus noise of std
  sigma*C/B -- not sigma*C (noise for the sum put on the mean) and not
  sigma*C/B^2 (noise divided twice).
  """
  sigma, clip, batch, dim = 1.1, 2.0, 8, 25_000
  rng = np.random.default_rng(1)
  per_example = rng.normal(scale=3.0, size=(batch, dim))
  norms = np.linalg.norm(per_example, axis=1, keepdims=True)
  clipped = per_example * np.minimum(1.0, clip / norms)
  mean_of_clipped = clipped.mean(axis=0)
  tx = noise.gaussian_noise(noise_multiplier=sigma, l2_clip_norm=clip,
                            expected_batch_size=batch, key=3)
  update = {"g": jnp.asarray(clipped.sum(axis=0), jnp.float32)}
  state = tx.init(update)
  residuals = []
  for _ in range(8):  # 8 steps x 25,000 coordinates = 200,000 samples
    out, state = tx.update(update, state)
    residuals.append(np.asarray(out["g"], np.float64) - mean_of_clipped)
  residuals = np.concatenate(residuals)
  _assert_std(residuals, sigma * clip / batch)
  assert residuals.std() < 0.5 * sigma * clip          # not the #383 scale
  assert residuals.std() > 2.0 * sigma * clip / batch**2  # not divided twice


def test_noise_does_not_depend_on_input_scale():
  # The noise scale is fixed inside the transform: no caller-side rescaling of
  # the input can shrink it (feeding a mean instead of a sum only loses signal).
  tx = _transform(key=5)
  zeros = {"a": jnp.zeros((1000,))}
  big = {"a": jnp.full((1000,), 1e3)}
  state = tx.init(zeros)
  out0, _ = tx.update(zeros, state)
  out1, _ = tx.update(big, state)
  # Same noise on top of 1e3 / 32 = 31.25: equal up to float32 rounding at
  # that magnitude (16 ulps of 31.25 = 6e-5); the noise std is 0.028.
  np.testing.assert_allclose(np.asarray(out1["a"]) - 1e3 / 32.0, np.asarray(out0["a"]),
                             rtol=0, atol=16 * np.finfo(np.float32).eps * 1e3 / 32.0)


def test_expected_batch_size_is_required():
  with pytest.raises(TypeError, match="expected_batch_size"):
    noise.gaussian_noise(noise_multiplier=1.0, l2_clip_norm=1.0)  # pylint: disable=missing-kwoa


def test_independent_across_leaves_and_steps():
  tx = _transform(key=11)
  zeros = {"a": jnp.zeros((100_000,)), "b": jnp.zeros((100_000,))}
  state = tx.init(zeros)
  out1, state = tx.update(zeros, state)
  out2, state = tx.update(zeros, state)
  _assert_uncorrelated(out1["a"], out1["b"])
  _assert_uncorrelated(out1["a"], out2["a"])
  _assert_uncorrelated(out1["b"], out2["b"])
  assert int(state.count) == 2


def test_same_key_same_noise_and_int_equals_jax_key():
  zeros = {"a": jnp.zeros((64,)), "b": jnp.zeros((3, 3))}
  outputs = []
  for key in (42, 42, jax.random.key(42), jax.random.PRNGKey(42)):
    tx = _transform(key=key)
    outputs.append(tx.update(zeros, tx.init(zeros))[0])
  for out in outputs[1:]:
    jax.tree.map(np.testing.assert_array_equal, outputs[0], out)


def test_different_keys_give_different_noise():
  zeros = {"a": jnp.zeros((64,))}
  tx1, tx2 = _transform(key=1), _transform(key=2)
  out1 = tx1.update(zeros, tx1.init(zeros))[0]["a"]
  out2 = tx2.update(zeros, tx2.init(zeros))[0]["a"]
  assert not np.any(np.asarray(out1) == np.asarray(out2))


def test_no_key_draws_os_entropy_per_init_even_under_jit():
  zeros = {"a": jnp.zeros((64,))}
  tx1, tx2 = _transform(key=None), _transform(key=None)
  out1 = tx1.update(zeros, tx1.init(zeros))[0]["a"]
  out2 = tx2.update(zeros, tx2.init(zeros))[0]["a"]
  assert not np.any(np.asarray(out1) == np.asarray(out2))
  # A jitted init must not bake one key in at trace time and replay it.
  init = jax.jit(tx1.init)
  assert not np.array_equal(np.asarray(init(zeros).key), np.asarray(init(zeros).key))


def test_jit_matches_eager_and_state_is_array_pytree():
  tx = _transform(key=9)
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,), jnp.bfloat16)}
  state = tx.init(params)
  eager, eager_state = tx.update(params, state)
  jitted, jitted_state = jax.jit(tx.update)(params, state)
  # Same key, same noise; XLA may fuse the arithmetic differently (ulp-level
  # of the terms: an update of 1/32 and noise of std 0.028, whose sum can
  # cancel to ~0, so the tolerance is absolute at the terms' scale too).
  terms = 1.0 / 32 + np.abs(np.asarray(eager["w"]) - 1.0 / 32)
  np.testing.assert_allclose(eager["w"], jitted["w"], rtol=1e-6, atol=1e-6 * terms.max())
  # bf16 leaf: one bf16 rounding of the same float32 value, possibly on either
  # side of a rounding boundary (one bf16 ulp, 2^-7 relative, at the terms' scale).
  eager_b = np.asarray(eager["b"], np.float32)
  np.testing.assert_allclose(eager_b, np.asarray(jitted["b"], np.float32), rtol=2.0**-7,
                             atol=2.0**-7 * (1.0 / 32 + np.abs(eager_b - 1.0 / 32).max()))
  jax.tree.map(np.testing.assert_array_equal, eager_state, jitted_state)
  assert jitted["b"].dtype == jnp.bfloat16 and jitted["w"].dtype == jnp.float32
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
  # Checkpoint-like round trip through numpy continues the same stream.
  restored = jax.tree.map(np.asarray, eager_state)
  again, _ = tx.update(params, restored)
  expected, _ = tx.update(params, eager_state)
  jax.tree.map(np.testing.assert_array_equal, again, expected)


def test_works_inside_optax_chain():
  opt = optax.chain(_transform(key=0), optax.sgd(0.1))
  params = {"w": jnp.zeros((5,))}
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(params, state)
  assert updates["w"].shape == (5,) and int(state[0].count) == 1


def _resume_scenario(reseed_key=None, do_reseed=True):
  """Noise of the first step after resuming from a checkpoint."""
  opt = optax.chain(_transform(key=123), optax.sgd(1.0))
  zeros = {"w": jnp.zeros((256,))}
  checkpoint = opt.init(zeros)
  crashed_run_noise, _ = opt.update(zeros, checkpoint)  # released before a crash
  state = noise.reseed(checkpoint, key=reseed_key) if do_reseed else checkpoint
  resumed_noise, resumed_state = opt.update(zeros, state)
  return np.asarray(crashed_run_noise["w"]), np.asarray(resumed_noise["w"]), resumed_state


def test_reseed_changes_noise_after_resume():
  crashed, resumed_without_reseed, _ = _resume_scenario(do_reseed=False)
  np.testing.assert_array_equal(crashed, resumed_without_reseed)  # the hazard
  crashed, resumed, state = _resume_scenario()
  assert not np.any(crashed == resumed)
  assert int(state[0].count) == 1  # the count survives a reseed
  _, resumed_again, _ = _resume_scenario()
  assert not np.any(resumed == resumed_again)  # OS entropy: fresh each time


def test_reseed_with_explicit_key_is_reproducible_and_fresh():
  crashed, resumed_a, _ = _resume_scenario(reseed_key=7)
  _, resumed_b, _ = _resume_scenario(reseed_key=7)
  _, resumed_c, _ = _resume_scenario(reseed_key=8)
  _, resumed_zero, _ = _resume_scenario(reseed_key=0)
  np.testing.assert_array_equal(resumed_a, resumed_b)
  assert not np.any(resumed_a == crashed) and not np.any(resumed_a == resumed_c)
  assert not np.any(resumed_zero == crashed)  # key 0 (all-zero key data) still mixes


def test_reseed_without_noise_state_raises():
  state = optax.sgd(0.1).init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="opt_state"):
    noise.reseed(state)


@pytest.mark.parametrize("name,value", [
    ("noise_multiplier", -1.0), ("noise_multiplier", float("nan")),
    ("noise_multiplier", float("inf")), ("noise_multiplier", 0.0),
    ("noise_multiplier", "1"), ("l2_clip_norm", 0.0), ("l2_clip_norm", -2.0),
    ("l2_clip_norm", float("inf")), ("expected_batch_size", 0),
    ("expected_batch_size", -8), ("expected_batch_size", float("nan")),
])
def test_invalid_arguments_name_argument_and_value(name, value):
  kwargs = dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=16)
  kwargs[name] = value
  with pytest.raises(ValueError, match=rf"{name} must be .*got {value!r}"):
    noise.gaussian_noise(**kwargs)


@pytest.mark.parametrize("key", ["seed", 1.5, jnp.zeros(3), jnp.zeros((2,), jnp.float32),
                                 jax.random.split(jax.random.key(0), 2)])
def test_invalid_key(key):
  with pytest.raises(ValueError, match="key must be"):
    _transform(key=key)


def test_integer_updates_rejected():
  tx = _transform()
  updates = {"step": jnp.zeros((3,), jnp.int32)}
  with pytest.raises(ValueError, match=r"updates must .*\['step'\].*int32"):
    tx.update(updates, tx.init(updates))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), ()])
def test_fused_normal_is_jax_random_normal_bit_for_bit(shape):
  # dpfl._rng.normal is a fused rewrite of jax.random.normal (3x faster on
  # CPU); the noise distribution is only as good as this equality.
  from dpfl import _rng
  key = jax.random.key(1234)
  ours = jax.jit(_rng.normal, static_argnums=(1, 2))(key, shape, jnp.float32)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.normal(key, shape)))


# --- the one privatizer (issue 12) -------------------------------------------------


def _old_gaussian_noise_outputs(key, leaves, steps, stddev, batch):
  """gaussian_noise as it was before the privatizer, rebuilt from the key with jax.random.

  Each step: next_key, step_key = split(key); one key per leaf from
  split(step_key, n_leaves); z = jax.random.normal in float32 or wider; then
  (leaf + stddev * z) / batch in that dtype, cast back to the leaf's dtype.
  """
  outs = []
  for _ in range(steps):
    key, step_key = jax.random.split(key)
    leaf_keys = jax.random.split(step_key, len(leaves))
    step = []
    for leaf, leaf_key in zip(leaves, leaf_keys):
      dtype = jnp.promote_types(leaf.dtype, jnp.float32)
      z = jax.random.normal(leaf_key, leaf.shape, dtype)
      step.append(((leaf.astype(dtype) + stddev * z) / batch).astype(leaf.dtype))
    outs.append(step)
  return outs


def test_gaussian_noise_is_bit_for_bit_the_old_gaussian_noise():
  rng = np.random.default_rng(0)
  leaves = [jnp.asarray(rng.normal(size=(17, 5)), jnp.float32),
            jnp.asarray(rng.normal(size=(33,)), jnp.bfloat16),
            jnp.asarray(1.25, jnp.float32),  # a scalar leaf
            jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float16),
            jnp.asarray(rng.normal(size=(4096,)), jnp.float32)]
  updates = {f"leaf{i}": leaf for i, leaf in enumerate(leaves)}  # keys sort as leaf0..4
  sigma, clip, batch = 1.3, 0.7, 32.0
  tx = noise.gaussian_noise(noise_multiplier=sigma, l2_clip_norm=clip,
                            expected_batch_size=batch, key=17)
  state = tx.init(updates)
  expected = _old_gaussian_noise_outputs(jax.random.key(17), leaves, 3, sigma * clip, batch)
  for step in range(3):
    out, state = tx.update(updates, state)
    got = jax.tree.leaves(out)
    for g, e in zip(got, expected[step]):
      assert g.dtype == e.dtype and g.shape == e.shape
      np.testing.assert_array_equal(np.asarray(g).reshape(-1).view(np.uint8),
                                    np.asarray(e).reshape(-1).view(np.uint8))
  assert int(state.count) == 3


def test_dp_sgd_state_is_the_one_state_type_with_only_key_and_count_leaves():
  import dpfl
  from dpfl.mf import streaming
  state = _transform().init({"w": jnp.zeros(3)})
  assert noise.GaussianNoiseState is noise.NoiseState is streaming.CorrelatedNoiseState
  assert dpfl.GaussianNoiseState is noise.NoiseState
  assert isinstance(state, noise.GaussianNoiseState)
  # Checkpoints of DP-SGD keep their two leaves: no empty buffers or keys.
  assert len(jax.tree.leaves(state)) == 2 and state.buffers == () and state.step_keys is None
  assert state.key.dtype == jnp.uint32 and int(state.count) == 0


def test_gaussian_noise_has_no_last_step():
  tx = _transform(key=1)
  zeros = {"w": jnp.zeros(4)}
  state = tx.init(zeros)._replace(count=jnp.asarray(10**6, jnp.int32))
  out, state = tx.update(zeros, state)
  assert np.all(np.isfinite(np.asarray(out["w"]))) and int(state.count) == 10**6 + 1


@pytest.mark.parametrize("build,match", [
    (lambda: noise.NoiseStrategy(num_buffers=2), "carry must be given for num_buffers=2"),
    (lambda: noise.NoiseStrategy(store_step_keys=True), "store_step_keys=True needs num_steps"),
    (lambda: noise.NoiseStrategy(num_steps=0), "num_steps must be an integer >= 1, got 0"),
    (lambda: noise.NoiseStrategy(num_buffers=-1), "num_buffers must be an integer >= 0"),
    (lambda: noise.privatizer("blt", noise_multiplier=1.0, l2_clip_norm=1.0,
                              expected_batch_size=1.0), "strategy must be a dpfl.noise"),
    (lambda: noise.privatizer(noise_multiplier=1.0, l2_clip_norm=1.0, sensitivity=0.0,
                              expected_batch_size=1.0), "sensitivity must be .*got 0.0"),
])
def test_privatizer_arguments_are_checked(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_privatizer_identity_with_sensitivity_scales_the_same_z():
  # s = noise_multiplier * clip * sensitivity: with zero updates the output is
  # exactly s * z / B; z rebuilt from the key as above.
  zeros = {"w": jnp.zeros((50,))}
  tx = noise.privatizer(noise_multiplier=1.5, l2_clip_norm=2.0, sensitivity=3.0,
                        expected_batch_size=4.0, key=5)
  out, _ = tx.update(zeros, tx.init(zeros))
  _, step_key = jax.random.split(jax.random.key(5))
  z = jax.random.normal(jax.random.split(step_key, 1)[0], (50,), jnp.float32)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray((0.0 + 9.0 * z) / 4.0))


# --- advance: skipping released steps ------------------------------------------------


def _advance_cases():
  from dpfl.mf import streaming
  n = 6
  shared = dict(noise_multiplier=1.1, l2_clip_norm=0.9, expected_batch_size=4.0, key=21)
  mf_shared = dict(shared, sensitivity=1.7)
  rng = np.random.default_rng(3)
  dense = np.tril(rng.uniform(-0.4, 0.4, (n, n))) + np.diag(np.linspace(1.0, 2.0, n))
  banded = np.tril(dense) - np.tril(dense, -3)
  return {
      "gaussian": (lambda: noise.gaussian_noise(**shared), None),
      "identity": (lambda: streaming.identity_noise(num_steps=n, **mf_shared), n),
      "blt": (lambda: streaming.blt_noise(buffer_decay=[0.9, -0.3], output_scale=[0.2, 0.1],
                                          num_steps=n, **mf_shared), n),
      "banded": (lambda: streaming.banded_noise(matrix=banded, **mf_shared), n),
      "dense": (lambda: streaming.dense_noise(matrix=dense, **mf_shared), n),
  }


ADVANCE_CASES = _advance_cases()


def _assert_close_trees(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    # Jitted and eager arithmetic may round differently: float32 ulps of the terms.
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * max(np.abs(y).max(), 1.0))


@pytest.mark.parametrize("skip", [0, 1, 4])
@pytest.mark.parametrize("name", list(ADVANCE_CASES))
def test_advance_then_update_is_the_last_of_skip_plus_one_updates(name, skip):
  make, _ = ADVANCE_CASES[name]
  tx = make()
  # float32 leaves: a bf16 output could round to either side of a boundary when
  # the buffers of the jitted skip differ from eager ones in the last ulp.
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(5)}
  start = tx.init(params)
  state = start
  for _ in range(skip + 1):
    expected, state = tx.update(params, state)
  skipped = noise.advance(tx, start, params, skip)
  assert int(skipped.count) == skip
  got, after = tx.update(params, skipped)
  _assert_close_trees(got, expected)
  np.testing.assert_array_equal(np.asarray(after.key), np.asarray(state.key))
  assert int(after.count) == int(state.count) == skip + 1
  if state.step_keys is not None:
    np.testing.assert_array_equal(np.asarray(after.step_keys), np.asarray(state.step_keys))
  _assert_close_trees(after.buffers, state.buffers)


def test_advance_moves_keys_as_splits_of_the_key():
  # Independent reference: each step keeps split(key)[0].
  tx, _ = ADVANCE_CASES["gaussian"]
  skipped = noise.advance(tx(), tx().init({"w": jnp.zeros(3)}), {"w": jnp.zeros(3)}, 50)
  key = jax.random.key(21)
  for _ in range(50):
    key = jax.random.split(key)[0]
  np.testing.assert_array_equal(np.asarray(skipped.key), np.asarray(jax.random.key_data(key)))
  assert int(skipped.count) == 50


@pytest.mark.parametrize("name", [k for k, (_, n) in ADVANCE_CASES.items() if n])
def test_advance_past_a_finite_strategy_end_raises(name):
  make, n = ADVANCE_CASES[name]
  tx = make()
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  at_end = noise.advance(tx, state, params, n)  # all n steps released: allowed
  assert int(at_end.count) == n
  with pytest.raises(ValueError, match=f"num_steps={n}"):
    tx.update(params, at_end)
  with pytest.raises(ValueError, match=f"num_steps={n}"):
    noise.advance(tx, state, params, n + 1)


def test_advance_arguments_are_checked():
  tx = _transform()
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="num_steps must be an integer >= 0, got -1"):
    noise.advance(tx, tx.init(params), params, -1)
  with pytest.raises(ValueError, match="state must be a dpfl.noise.NoiseState"):
    noise.advance(tx, (tx.init(params),), params, 1)
