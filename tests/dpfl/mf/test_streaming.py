"""Tests for dpfl.mf.streaming: streaming C^{-1} z equals the dense product.

Reference noise. Every transform splits its key as ``dpfl.noise.gaussian_noise``
does, so running ``gaussian_noise`` (noise multiplier 1, clip 1, batch 1) with
the same key on zero updates yields the very ``z_t`` the correlated transform
drew. ``X = C^{-1} Z`` is then computed in float64 with numpy from ``C`` built
here from its definition (BLT coefficients, a random banded matrix, ...).

Statistical checks use fixed seeds and 6-sigma bounds: for P independent
coordinates the sample covariance entry ``S_ij`` has variance
``(Sigma_ii Sigma_jj + Sigma_ij^2) / P``; a two-sided 6-sigma bound fails by
chance with probability ~2e-9 per entry, so ~1e-7 for the n^2 entries of a
check.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpfl import _rng, noise
from dpfl.mf import streaming

SIX_SIGMA = 6.0
SIGMA, CLIP, SENS, BATCH = 1.3, 0.7, 2.5, 16.0
SCALE = SIGMA * CLIP * SENS  # noise std per unit of x = C^{-1} z, before / BATCH


def _blt_matrix(theta, omega, n):
  coefs = [1.0] + [float(np.sum(np.asarray(omega) * np.asarray(theta) ** (t - 1)))
                   for t in range(1, n)]
  return np.array([[coefs[i - j] if i >= j else 0.0 for j in range(n)] for i in range(n)])


def _random_banded(n, bands, seed, toeplitz=False):
  rng = np.random.default_rng(seed)
  C = np.zeros((n, n))
  if toeplitz:
    coefs = np.r_[1.0, rng.uniform(-0.5, 0.8, bands - 1)]
    for d in range(bands):
      C += np.diag(np.full(n - d, coefs[d]), -d)
  else:
    C += np.diag(rng.uniform(0.5, 2.0, n))
    for d in range(1, bands):
      C += np.diag(rng.uniform(-0.8, 0.8, n - d), -d)
  return C


THETA, OMEGA = np.array([0.95, 0.6, 0.2]), np.array([0.3, 0.15, 0.05])
N = 10


def _cases():
  dense = np.tril(np.random.default_rng(5).uniform(-0.4, 0.4, (N, N))) + np.diag(
      np.linspace(1.0, 2.0, N))
  shared = dict(noise_multiplier=SIGMA, l2_clip_norm=CLIP, sensitivity=SENS,
                expected_batch_size=BATCH)
  toeplitz = _random_banded(N, 3, 1, toeplitz=True)
  general = _random_banded(N, 4, 2)
  return {
      "identity": (np.eye(N), lambda key: streaming.identity_noise(num_steps=N, key=key,
                                                                   **shared)),
      "blt": (_blt_matrix(THETA, OMEGA, N),
              lambda key: streaming.blt_noise(buffer_decay=THETA, output_scale=OMEGA,
                                              num_steps=N, key=key, **shared)),
      "banded_toeplitz": (toeplitz, lambda key: streaming.banded_noise(matrix=toeplitz,
                                                                       key=key, **shared)),
      "banded_general": (general, lambda key: streaming.banded_noise(matrix=general, key=key,
                                                                     **shared)),
      "banded_diagonals": (general, lambda key: streaming.banded_noise(
          diagonals=np.stack([np.r_[np.diagonal(general, -d), np.zeros(d)] for d in range(4)]),
          key=key, **shared)),
      "banded_full_width": (dense, lambda key: streaming.banded_noise(
          matrix=dense, num_bands=N, key=key, **shared)),
      "dense": (dense, lambda key: streaming.dense_noise(matrix=dense, key=key, **shared)),
  }


CASES = _cases()


def _params(dtype=jnp.float32):
  return {"w": jnp.linspace(-1.0, 1.0, 60, dtype=dtype).reshape(3, 4, 5),
          "layer": {"b": jnp.arange(7, dtype=dtype), "s": jnp.asarray(0.5, dtype)}}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _run(tx, updates, steps, *, jit=False, state=None):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(updates) if state is None else state
  outs = []
  for _ in range(steps):
    out, state = update(updates, state)
    outs.append(out)
  return outs, state


def _reference_z(key, updates, steps, *, reseed_at=None, reseed_key=None):
  """The z_t of steps 0..steps-1, from gaussian_noise with the same key."""
  tx = noise.gaussian_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0,
                            key=key)
  zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.promote_types(x.dtype,
                                                                          jnp.float32)), updates)
  state = tx.init(zeros)
  rows = []
  for t in range(steps):
    if t == reseed_at:
      state = noise.reseed(state, key=reseed_key)
    out, state = tx.update(zeros, state)
    rows.append(_flat(out))
  return np.stack(rows)


def _noise_rows(outs, updates):
  """x_t = (out_t * B - g_t) / SCALE, flattened per step."""
  g = _flat(updates)
  return np.stack([(_flat(o) * BATCH - g) / SCALE for o in outs])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(CASES))
def test_streaming_equals_dense_inverse_product(name, jit):
  C, make = CASES[name]
  updates = _params()
  outs, state = _run(make(7), updates, N, jit=jit)
  X = _noise_rows(outs, updates)
  Z = _reference_z(7, updates, N)
  expected = np.linalg.solve(C, Z)  # float64
  np.testing.assert_allclose(X, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
  assert int(state.count) == N
  for out, leaf in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(updates)):
    assert out.shape == leaf.shape and out.dtype == leaf.dtype


def test_draw_is_jax_random_normal_bit_for_bit():
  # The fused float32 draw must be jax.random.normal itself, so z_t is exactly
  # gaussian_noise's noise.
  draw = jax.jit(_rng.normal, static_argnums=(1, 2))
  for seed, shape in [(0, ()), (1, (1,)), (2, (1000,)), (3, (7, 13)), (4, (3, 4, 5)),
                      (5, (2, 1, 3, 2))]:
    key = jax.random.key(seed)
    np.testing.assert_array_equal(np.asarray(draw(key, shape, jnp.float32)),
                                  np.asarray(jax.random.normal(key, shape, jnp.float32)))
  assert _rng._fused_normal_applies((5,), jnp.float32)
  assert not _rng._fused_normal_applies((5,), jnp.bfloat16)


def test_identity_equals_gaussian_noise_with_sensitivity_folded_in():
  updates = _params()
  ours, _ = _run(CASES["identity"][1](11), updates, 3)
  ref_tx = noise.gaussian_noise(noise_multiplier=SIGMA * SENS, l2_clip_norm=CLIP,
                                expected_batch_size=BATCH, key=11)
  ref, _ = _run(ref_tx, updates, 3)
  # The same z and the same real scale σ·C·sens / B, rounded in another order:
  # a few float32 ulps of the terms g / B and noise (their sum may cancel).
  g = np.abs(_flat(updates)) / BATCH
  for a, b in zip(ours, ref):
    terms = g + np.abs(_flat(b) - _flat(updates) / BATCH)
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-6, atol=1e-6 * terms.max())


def test_bf16_leaves_get_float32_noise_and_buffers():
  C, _ = CASES["blt"]
  updates = _params(jnp.bfloat16)
  tx = streaming.blt_noise(buffer_decay=THETA, output_scale=OMEGA, num_steps=N,
                           noise_multiplier=SIGMA, l2_clip_norm=CLIP, sensitivity=SENS,
                           expected_batch_size=BATCH, key=3)
  outs, state = _run(tx, updates, N, jit=True)
  assert all(x.dtype == jnp.bfloat16 for o in outs for x in jax.tree.leaves(o))
  assert all(b.dtype == jnp.float32 for b in jax.tree.leaves(state.buffers))
  expected = np.linalg.solve(C, _reference_z(3, updates, N))
  expected_out = (expected * SCALE + _flat(updates)) / BATCH
  got = np.stack([_flat(o) for o in outs])
  # The final cast is bf16 (8 bits of mantissa): relative error <= 2^-8. Before
  # it, the float32 streaming C^{-1} z has the error the float32 tests allow
  # (2e-5 of max|C^{-1} z|), absolute, so near-zero outputs need that atol.
  np.testing.assert_allclose(got, expected_out, rtol=2**-8,
                             atol=2e-5 * np.abs(expected).max() * SCALE / BATCH)


def test_state_holds_exactly_the_stated_buffers():
  params = _params()
  size = sum(x.size for x in jax.tree.leaves(params))
  shared = dict(noise_multiplier=1.0, l2_clip_norm=1.0, sensitivity=1.0,
                expected_batch_size=1.0, key=0)
  for m in (1, 4):
    state = streaming.blt_noise(buffer_decay=np.linspace(0.9, 0.1, m),
                                output_scale=np.ones(m), num_steps=5, **shared).init(params)
    assert len(state.buffers) == m
    for buf in state.buffers:  # one model-sized buffer each, shaped like params
      assert jax.tree.structure(buf) == jax.tree.structure(params)
      assert sum(x.size for x in jax.tree.leaves(buf)) == size
    assert state.step_keys is None  # only dense_noise keeps step keys
  for bands in (1, 2, 5):
    C = _random_banded(12, bands, 0)
    state = streaming.banded_noise(matrix=C, **shared).init(params)
    assert len(state.buffers) == bands - 1
    assert sum(x.size for x in jax.tree.leaves(state.buffers)) == (bands - 1) * size
  dense_state = streaming.dense_noise(matrix=CASES["dense"][0], **shared).init(params)
  assert dense_state.buffers == () and dense_state.step_keys.shape[0] == N
  assert streaming.identity_noise(num_steps=3, **shared).init(params).buffers == ()
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(dense_state))


@pytest.mark.parametrize("name", ["blt", "banded_general"])
def test_noise_covariance_is_cinv_cinv_transposed(name):
  # Independent of the z reconstruction: with zero updates, each coordinate's
  # n-vector of outputs is N(0, (SCALE / B)^2 C^{-1} C^{-T}).
  C, make = CASES[name]
  num_coords = 200_000
  updates = {"a": jnp.zeros((num_coords // 2,)), "b": jnp.zeros((2, num_coords // 4))}
  outs, _ = _run(make(123), updates, N, jit=True)
  X = np.stack([_flat(o) for o in outs])  # [N, num_coords]
  sample = X @ X.T / num_coords  # mean zero is known
  inv = np.linalg.inv(C)
  expected = (SCALE / BATCH) ** 2 * inv @ inv.T
  tol = SIX_SIGMA * np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected**2)
                            / num_coords)
  assert np.all(np.abs(sample - expected) <= tol), np.max(np.abs(sample - expected) / tol)


def test_same_key_same_noise_different_key_different_os_entropy_default():
  updates = _params()
  make = CASES["blt"][1]
  a, _ = _run(make(42), updates, 3)
  b, _ = _run(make(jax.random.key(42)), updates, 3)
  c, _ = _run(make(43), updates, 3)
  d, _ = _run(make(None), updates, 3)
  e, _ = _run(make(None), updates, 3)
  for x, y, z, u, v in zip(a, b, c, d, e):
    np.testing.assert_array_equal(_flat(x), _flat(y))
    assert not np.any(_flat(x) == _flat(z))
    assert not np.any(_flat(u) == _flat(v))
  # No two steps share z: consecutive identity outputs differ everywhere.
  ident, _ = _run(CASES["identity"][1](42), updates, 2)
  assert not np.any(_flat(ident[0]) == _flat(ident[1]))


@pytest.mark.parametrize("name", ["blt", "banded_general", "dense"])
def test_reseed_changes_later_noise_and_keeps_the_factorization(name):
  C, make = CASES[name]
  updates = _params()
  opt = optax.chain(make(5), optax.sgd(1.0))
  params_state = opt.init(updates)
  _, checkpoint = _run(opt, updates, 4, state=params_state)
  crashed, _ = _run(opt, updates, 1, state=checkpoint)  # released before a crash
  replayed, _ = _run(opt, updates, 1, state=checkpoint)
  np.testing.assert_array_equal(_flat(crashed[0]), _flat(replayed[0]))  # the hazard
  fresh, _ = _run(opt, updates, 1, state=noise.reseed(checkpoint))
  assert not np.any(_flat(fresh[0]) == _flat(crashed[0]))
  # With an explicit reseed key the continued stream is still C^{-1} z, where z
  # switches to the reseeded key's stream at step 4 (dense keeps past keys).
  resumed_state = noise.reseed(checkpoint, key=9)
  assert int(resumed_state[0].count) == 4
  first, _ = _run(opt, updates, 4, state=params_state)
  rest, _ = _run(opt, updates, N - 4, state=resumed_state)
  X = _noise_rows(first + rest, jax.tree.map(lambda x: -x, updates))  # sgd(1.0) negates
  X = -X
  Z = _reference_z(5, updates, N, reseed_at=4, reseed_key=9)
  expected = np.linalg.solve(C, Z)
  np.testing.assert_allclose(X, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_checkpoint_round_trip_continues_the_stream():
  updates = _params()
  tx = CASES["banded_general"][1](8)
  _, state = _run(tx, updates, 3)
  restored = jax.tree.map(np.asarray, state)
  a, _ = _run(tx, updates, 2, state=restored)
  b, _ = _run(tx, updates, 2, state=state)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(_flat(x), _flat(y))


@pytest.mark.parametrize("name", ["identity", "blt", "banded_general", "dense"])
def test_past_the_last_step_raises_eagerly_and_returns_nan_under_jit(name):
  _, make = CASES[name]
  updates = _params()
  tx = make(1)
  _, state = _run(tx, updates, N)
  with pytest.raises(ValueError, match=f"num_steps={N}"):
    tx.update(updates, state)
  out, state2 = jax.jit(tx.update)(updates, state)
  assert all(np.all(np.isnan(np.asarray(x, np.float32))) for x in jax.tree.leaves(out))
  assert int(state2.count) == N + 1
  out, _ = jax.jit(tx.update)(updates, state2)  # and stays NaN
  assert all(np.all(np.isnan(np.asarray(x, np.float32))) for x in jax.tree.leaves(out))


def test_works_in_an_optax_chain_under_jit():
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros((3,))}
  opt = optax.chain(CASES["blt"][1](0), optax.adam(1e-2))
  state = opt.init(params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p))
  for _ in range(3):
    updates, state = step(params, state, params)
    params = optax.apply_updates(params, updates)
  assert int(state[0].count) == 3 and np.all(np.isfinite(_flat(params)))


def test_matrix_noise_dispatches_on_the_strategy():
  shared = dict(noise_multiplier=SIGMA, l2_clip_norm=CLIP, expected_batch_size=BATCH, key=4)
  params = _params()
  ident = streaming.matrix_noise(np.eye(N), sensitivity=SENS, **shared).init(params)
  assert ident.buffers == () and ident.step_keys is None
  banded = streaming.matrix_noise(_random_banded(N, 3, 0), sensitivity=SENS,
                                  **shared).init(params)
  assert len(banded.buffers) == 2
  dense = streaming.matrix_noise(CASES["dense"][0], sensitivity=SENS, **shared).init(params)
  assert dense.step_keys.shape[0] == N
  blt = types.SimpleNamespace(buffer_decay=THETA, output_scale=OMEGA, num_steps=N,
                              sensitivity=SENS)
  tx = streaming.matrix_noise(blt, **shared)
  state = tx.init(params)  # a second init would get the next key of the stream
  assert len(state.buffers) == 3
  outs, _ = _run(tx, params, N, state=state)
  expected = np.linalg.solve(CASES["blt"][0], _reference_z(4, params, N))
  np.testing.assert_allclose(_noise_rows(outs, params), expected, rtol=0,
                             atol=2e-5 * np.abs(expected).max())
  with pytest.raises(ValueError, match="sensitivity must be given"):
    streaming.matrix_noise(np.eye(3), **shared)
  with pytest.raises(ValueError, match="num_steps must match strategy.num_steps"):
    streaming.matrix_noise(blt, num_steps=N + 1, **shared)


def test_matrix_noise_with_dpfl_mf_strategies():
  import dpfl.mf as mf  # the strategies of issue 5 (other module)
  n = 8
  strategies = [
      mf.identity(n, participation=(2, 4)),
      mf.tree(n),
      mf.BltStrategy(num_steps=n, participation=None, workload=None,
                     buffer_decay=np.array([0.9, 0.4]), output_scale=np.array([0.3, 0.1])),
      mf.BandedStrategy(num_steps=n, participation=None, workload=None,
                        diagonals=np.array([np.linspace(1, 2, n), np.full(n, 0.5),
                                            np.full(n, -0.2)])),
  ]
  params = {"w": jnp.zeros((4, 6))}
  for strategy in strategies:
    tx = streaming.matrix_noise(strategy, noise_multiplier=1.0, l2_clip_norm=1.0,
                                expected_batch_size=1.0, key=2)
    outs, _ = _run(tx, params, n, jit=True)
    X = np.stack([_flat(o) for o in outs]) / strategy.sensitivity
    expected = np.linalg.solve(strategy.matrix, _reference_z(2, params, n))
    np.testing.assert_allclose(X, expected, rtol=0, atol=2e-5 * np.abs(expected).max(),
                               err_msg=strategy.name)


_OK = dict(noise_multiplier=1.0, l2_clip_norm=1.0, sensitivity=1.0, expected_batch_size=8.0)


@pytest.mark.parametrize("build,match", [
    (lambda: streaming.blt_noise(buffer_decay=[0.5, 1.0], output_scale=[1, 1], num_steps=4,
                                 **_OK), r"buffer_decay must lie in \(-1, 1\)"),
    (lambda: streaming.blt_noise(buffer_decay=[-1.0], output_scale=[1], num_steps=4, **_OK),
     "buffer_decay must lie in"),
    (lambda: streaming.blt_noise(buffer_decay=[float("nan")], output_scale=[1], num_steps=4,
                                 **_OK), "buffer_decay must be finite"),
    (lambda: streaming.blt_noise(buffer_decay=[], output_scale=[], num_steps=4, **_OK),
     "buffer_decay must hold at least one"),
    (lambda: streaming.blt_noise(buffer_decay=[0.5], output_scale=[1, 2], num_steps=4, **_OK),
     "output_scale must have the shape of buffer_decay"),
    (lambda: streaming.blt_noise(buffer_decay=[[0.5]], output_scale=[[1]], num_steps=4,
                                 **_OK), "buffer_decay must be a 1-D array"),
    (lambda: streaming.blt_noise(buffer_decay=[0.5], output_scale=[float("inf")],
                                 num_steps=4, **_OK), "output_scale must be finite"),
    (lambda: streaming.blt_noise(buffer_decay=[0.5], output_scale=[1], num_steps=0, **_OK),
     "num_steps must be an integer >= 1"),
    (lambda: streaming.identity_noise(num_steps=2.5, **_OK), "num_steps must be an integer"),
    (lambda: streaming.banded_noise(matrix=np.triu(np.ones((3, 3))), **_OK),
     r"matrix must be lower-triangular; entry \[0, 1\]"),
    (lambda: streaming.banded_noise(matrix=np.diag([1.0, 0.0, 2.0]), **_OK),
     r"matrix must be invertible .*\[1, 1\] is 0"),
    (lambda: streaming.dense_noise(matrix=np.tril(np.ones((3, 3))) - np.eye(3), **_OK),
     "matrix must be invertible"),
    (lambda: streaming.dense_noise(matrix=np.ones((2, 3)), **_OK), "matrix must be a square"),
    (lambda: streaming.dense_noise(matrix=np.ones(3), **_OK), "matrix must be a 2-D array"),
    (lambda: streaming.dense_noise(matrix=np.array([[1.0, 0], [np.nan, 1]]), **_OK),
     "matrix must be finite"),
    (lambda: streaming.banded_noise(matrix=_random_banded(6, 3, 0), num_bands=2, **_OK),
     "num_bands=2 .* must be >= 3"),
    (lambda: streaming.banded_noise(matrix=np.eye(3), num_bands=4, **_OK),
     "num_bands must be <= n = 3"),
    (lambda: streaming.banded_noise(matrix=np.eye(3), num_bands=0, **_OK),
     "num_bands must be an integer >= 1"),
    (lambda: streaming.banded_noise(**_OK), "exactly one of matrix"),
    (lambda: streaming.banded_noise(diagonals=np.zeros((2, 4)), **_OK),
     r"diagonals\[0, 0\] is 0"),
    (lambda: streaming.banded_noise(diagonals=np.ones((5, 4)), **_OK),
     "1 <= num_bands <= n"),
])
def test_invalid_strategy_arguments_name_the_argument(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize("name,value", [
    ("noise_multiplier", 0.0), ("noise_multiplier", -1.0), ("noise_multiplier", float("nan")),
    ("l2_clip_norm", 0.0), ("l2_clip_norm", float("inf")), ("sensitivity", 0.0),
    ("sensitivity", -2.0), ("sensitivity", float("nan")), ("expected_batch_size", 0),
    ("expected_batch_size", -4.0),
])
def test_invalid_scales_name_the_argument(name, value):
  kwargs = dict(_OK)
  kwargs[name] = value
  for build in (lambda: streaming.identity_noise(num_steps=3, **kwargs),
                lambda: streaming.blt_noise(buffer_decay=[0.5], output_scale=[1.0],
                                            num_steps=3, **kwargs),
                lambda: streaming.banded_noise(matrix=np.eye(3), **kwargs),
                lambda: streaming.dense_noise(matrix=np.eye(3), **kwargs)):
    with pytest.raises(ValueError, match=rf"{name} must be .*got {value!r}"):
      build()


def test_integer_updates_rejected():
  tx = streaming.identity_noise(num_steps=3, key=0, **_OK)
  updates = {"step": jnp.zeros((3,), jnp.int32)}
  with pytest.raises(ValueError, match=r"updates must .*\['step'\].*int32"):
    tx.update(updates, tx.init(updates))


def test_state_is_registered_for_reseed():
  state = streaming.identity_noise(num_steps=3, key=0, **_OK).init({"w": jnp.zeros(2)})
  again = noise.reseed(state, key=1)
  assert isinstance(again, streaming.CorrelatedNoiseState)
  assert not np.array_equal(np.asarray(again.key), np.asarray(state.key))
  assert int(again.count) == 0


# --- one BLT validator (issue 12): negative and zero decays ------------------------


def test_negative_and_zero_decays_stream_the_dense_inverse():
  # The recursion x_t = z_t - sum omega_i s_i, s_i <- theta_i s_i + x_t solves
  # C x = z for any real theta; |theta| < 1 only keeps the buffers bounded. The
  # reference C is built here from c_t = sum omega_i theta_i^(t-1) (0^0 = 1).
  import dpfl.mf as mf
  theta, omega = np.array([0.8, -0.6, 0.0]), np.array([0.3, 0.4, -0.2])
  C = _blt_matrix(theta, omega, N)
  params = _params()
  direct = streaming.blt_noise(buffer_decay=theta, output_scale=omega, num_steps=N,
                               noise_multiplier=SIGMA, l2_clip_norm=CLIP, sensitivity=SENS,
                               expected_batch_size=BATCH, key=8)
  strategy = mf.BltStrategy(num_steps=N, participation=None, workload=None,
                            buffer_decay=theta, output_scale=omega)
  np.testing.assert_allclose(strategy.matrix, C, rtol=1e-12, atol=1e-15)
  via_strategy = streaming.matrix_noise(strategy, noise_multiplier=SIGMA, l2_clip_norm=CLIP,
                                        sensitivity=SENS, expected_batch_size=BATCH, key=8)
  expected = np.linalg.solve(C, _reference_z(8, params, N))
  for tx in (direct, via_strategy):
    outs, _ = _run(tx, params, N, jit=True)
    np.testing.assert_allclose(_noise_rows(outs, params), expected, rtol=0,
                               atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("theta,omega,match", [
    ([0.5, -0.5], [0.1, 0.2], None), ([0.0], [0.3], None), ([-0.999], [0.3], None),
    ([1.0], [0.1], r"buffer_decay must lie in \(-1, 1\), got \[1.0\]"),
    ([-1.0], [0.1], r"buffer_decay must lie in \(-1, 1\), got \[-1.0\]"),
    ([0.5, 1.5], [0.1, 0.1], r"buffer_decay must lie in \(-1, 1\)"),
    ([float("nan")], [0.1], "buffer_decay must be finite"),
    ([0.5], [float("inf")], "output_scale must be finite"),
    ([], [], "buffer_decay must hold at least one"),
    ([0.5], [0.1, 0.2], "output_scale must have the shape of buffer_decay"),
    ([[0.5]], [[0.1]], "buffer_decay must be a 1-D array"),
])
def test_blt_strategy_and_blt_noise_accept_and_refuse_the_same_decays(theta, omega, match):
  import dpfl.mf as mf
  entry_points = (
      lambda: mf.BltStrategy(num_steps=4, participation=None, workload=None,
                             buffer_decay=theta, output_scale=omega),
      lambda: streaming.blt_noise(buffer_decay=theta, output_scale=omega, num_steps=4, **_OK))
  messages = []
  for build in entry_points:
    if match is None:
      build()
      continue
    with pytest.raises(ValueError, match=match) as err:
      build()
    messages.append(str(err.value))
  assert len(set(messages)) <= 1  # one validator: the very same message
