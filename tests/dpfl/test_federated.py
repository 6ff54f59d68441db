"""ULS with local steps: clipped pseudo-gradients vs a brute-force loop over users."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dpfl
from dpfl import clipping
from dpfl.clipping import clipped_grad
from dpfl.data import UserDataset
from dpfl.federated import clipped_user_updates


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"])
  return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def _problem(users=5, per_user=4, seed=0, scale=1.0):
  k = jax.random.split(jax.random.key(seed), 5)
  params = {"w1": jax.random.normal(k[0], (3, 4)), "w2": jax.random.normal(k[1], (4,))}
  batch = {"x": scale * jax.random.normal(k[2], (users, per_user, 3)),
           "y": scale * jax.random.normal(k[3], (users, per_user))}
  mask = np.array(jax.random.bernoulli(k[4], 0.7, (users, per_user)))
  mask[0] = False  # a user with no example at all
  mask[1] = [True] + [False] * (per_user - 1)
  return params, batch, mask


def _numpy_grad(w1, w2, x, y):
  """Closed-form gradient of mean((tanh(x w1) w2 - y)^2), float64, no JAX."""
  h = np.tanh(x @ w1)
  r = h @ w2 - y
  n = x.shape[0]
  g2 = 2.0 / n * h.T @ r
  g1 = 2.0 / n * x.T @ (np.outer(r, w2) * (1 - h ** 2))
  return g1, g2


# Float32 tolerance. A pseudo-gradient θ − θ_u is a difference of two
# parameter vectors: float32 rounds each local step at the parameters' scale,
# so its absolute error is a few ulps of |θ| (not of the small difference),
# times the user's clip factor; and the order of the float32 sums over users
# changes with vmapping, the CPU's vector width and XLA's thread count. Every
# comparison below is rtol=F32_RTOL plus F32_RTOL times that scale
# (1e-5 is ~84 float32 ulps; a real defect moves results by O(C)).
F32_RTOL = 1e-5


def _assert_f32_close(got, want, scale):
  np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=F32_RTOL * scale)


def _clip_factor_scale(params, grad_norms, clip):
  """Σ_u min(1, C/‖Δ_u‖) · max|θ|: the float32 error scale of a clipped pseudo-gradient sum."""
  norms = np.asarray(grad_norms, np.float64)
  factors = np.minimum(1.0, clip / np.where(norms > 0, norms, np.inf))
  return float(np.sum(factors[norms > 0])) * float(np.max(np.abs(_flat(params))))


def _brute_force(params, batch, mask, *, clip, steps, lr, local_batch_size=None):
  """Plain numpy: local SGD on each user's real examples, clip, sum.

  Returns the clipped sum and its float32 error scale: Σ_u c_u · max|θ, θ_u|
  (c_u the clip factor), see F32_RTOL.
  """
  w1 = np.asarray(params["w1"], np.float64)
  w2 = np.asarray(params["w2"], np.float64)
  x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
  total = np.zeros(w1.size + w2.size)
  scale = 0.0
  k = mask.shape[1]
  b = k if local_batch_size is None else local_batch_size
  for u in range(mask.shape[0]):
    if not mask[u].any():
      continue
    v1, v2 = w1.copy(), w2.copy()
    for t in range(steps):
      chunk = np.arange(k)[(t % (k // b)) * b:(t % (k // b) + 1) * b]
      real = chunk[mask[u, chunk]]
      if real.size == 0:
        continue  # a local batch of padding only: no step
      g1, g2 = _numpy_grad(v1, v2, x[u, real], y[u, real])
      v1, v2 = v1 - lr * g1, v2 - lr * g2
    pseudo = np.concatenate([(w1 - v1).ravel(), w2 - v2])  # leaf order: w1, w2
    factor = min(1.0, clip / np.linalg.norm(pseudo))
    total += pseudo * factor
    scale += factor * max(np.abs(w1).max(), np.abs(w2).max(), np.abs(v1).max(), np.abs(v2).max())
  return total, scale


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("steps,local_batch_size,method,microbatch_size", [
    (3, None, "auto", None), (5, 2, "materialize", None), (3, None, "materialize", 2)])
def test_clipped_sum_of_local_updates_equals_brute_force(steps, local_batch_size, method,
                                                         microbatch_size):
  params, batch, mask = _problem()
  clip, lr = 0.05, 0.1
  fn = clipped_user_updates(loss_fn, l2_clip_norm=clip, local_steps=steps,
                            local_learning_rate=lr, local_batch_size=local_batch_size,
                            method=method, microbatch_size=microbatch_size)
  assert fn.method == method and fn.unit == "user"
  got, aux = jax.jit(fn)(params, batch, mask=mask)
  ref, scale = _brute_force(params, batch, mask, clip=clip, steps=steps, lr=lr,
                            local_batch_size=local_batch_size)
  assert np.linalg.norm(ref) > 0.05  # not trivially zero
  _assert_f32_close(_flat(got), ref, scale)
  assert int(aux.num_units) == int(mask.any(axis=1).sum())
  assert int(aux.num_clipped) >= 1  # the clip is active in this problem


@pytest.mark.parametrize("method", ["auto", "materialize"])
def test_masked_and_nan_users_match_brute_force(method):
  # Padding slots hold NaN, user 0 has no example, and user 3's real data is
  # NaN: it is counted, contributes exactly zero, and leaks nowhere.
  params, batch, mask = _problem(users=6, per_user=4, seed=4)
  mask[3] = [True, True, False, True]
  inner = jnp.reshape(jnp.asarray(mask), mask.shape + (1,))
  batch = {"x": jnp.where(inner, batch["x"], jnp.nan).at[3, 1].set(jnp.nan),
           "y": jnp.where(jnp.asarray(mask), batch["y"], jnp.nan)}
  clip, lr, steps = 0.05, 0.1, 3
  fn = jax.jit(clipped_user_updates(loss_fn, l2_clip_norm=clip, local_steps=steps,
                                    local_learning_rate=lr, method=method,
                                    microbatch_size=4))
  got, aux = fn(params, batch, mask=mask)
  finite_users = mask.copy()
  finite_users[3] = False  # the brute force drops the NaN user by hand
  ref, scale = _brute_force(params, batch, finite_users, clip=clip, steps=steps, lr=lr)
  assert np.all(np.isfinite(ref)) and np.linalg.norm(ref) > 0.05
  _assert_f32_close(_flat(got), ref, scale)
  assert int(aux.num_units) == int(mask.any(axis=1).sum())
  assert int(aux.num_nonfinite) == 1
  assert float(aux.grad_norms[0]) == 0.0 and not np.isfinite(float(aux.grad_norms[3]))


def test_reweight_does_not_apply_to_local_steps():
  # reweight back-propagates a clip-weighted sum of unit losses; θ − θ_u after
  # local steps is no loss's gradient, so it must refuse rather than compute
  # another sum.
  with pytest.raises(ValueError, match="method='reweight'.*local-step") as info:
    clipped_user_updates(loss_fn, l2_clip_norm=1.0, local_steps=2, local_learning_rate=0.1,
                         method="reweight")
  assert "materialize" in str(info.value)


def test_local_steps_1_plain_sgd_equals_gradient_path():
  # θ − θ_u = η ∇L_u(θ) after one SGD step, so clipping at ηC gives η × the
  # gradient path clipped at C, user by user.
  params, batch, mask = _problem(users=6, per_user=3, seed=1)
  lr, clip = 0.3, 0.4
  fed, fed_aux = jax.jit(clipped_user_updates(loss_fn, l2_clip_norm=lr * clip, local_steps=1,
                                              local_learning_rate=lr))(params, batch, mask=mask)
  grad, grad_aux = jax.jit(clipped_grad(loss_fn, l2_clip_norm=clip, unit="user"))(
      params, batch, mask=mask)
  _assert_f32_close(_flat(fed), lr * _flat(grad),
                    _clip_factor_scale(params, grad_aux.grad_norms, clip))
  # ‖θ − θ_u‖ carries the same cancellation, unclipped: an error of ulps of |θ|.
  _assert_f32_close(fed_aux.grad_norms, lr * grad_aux.grad_norms,
                    np.max(np.abs(_flat(params))))
  np.testing.assert_allclose(fed_aux.values, grad_aux.values, rtol=1e-5)


def test_local_steps_1_round_equals_gradient_round_end_to_end():
  """Whole ULS rounds (sampling, noise, server SGD) agree with the same seeds."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 3)).astype(np.float32)
  ds = UserDataset.from_arrays({"x": x, "y": np.sin(x).sum(1)}, rng.integers(0, 40, 300),
                               examples_per_user=6)
  lr, clip, server_lr = 0.5, 0.2, 0.7
  common = dict(privacy_unit="user", dataset=ds, batch_size=8, num_steps=4,
                noise_multiplier=1.0, delta=1e-5, key=11, seed=5)
  fed = dpfl.make_private(loss_fn, optax.sgd(server_lr), l2_clip_norm=lr * clip,
                          local_steps=1, local_learning_rate=lr, **common)
  grad = dpfl.make_private(loss_fn, optax.sgd(server_lr * lr), l2_clip_norm=clip, **common)
  params = _problem()[0]
  results = []
  for private in (fed, grad):
    state, step = private.init(params), private.make_step()
    for b, m in private.batches(ds, state):
      state, _ = step(state, b, m)
    results.append(_flat(state.params))
  assert np.linalg.norm(results[0] - _flat(params)) > 1e-3
  # Two float32 paths (clip at ηC then lr vs clip at C then lr·η) to the same
  # parameters: they agree to float32 rounding at the parameters' scale.
  _assert_f32_close(results[0], results[1], np.max(np.abs(results[1])))
  assert fed.epsilon() == grad.epsilon()


def test_server_sgd_1_is_fedavg_plus_noise():
  params, batch, mask = _problem(users=4, per_user=3, seed=2)
  clip, expected_users = 0.1, 2.5
  fn = clipped_user_updates(loss_fn, l2_clip_norm=clip, local_steps=2, local_learning_rate=0.2)
  make_noise = lambda: dpfl.gaussian_noise(noise_multiplier=1.3, l2_clip_norm=clip,
                                          expected_batch_size=expected_users, key=4)
  # Two transforms with one key: a second init of one transform gets the next key.
  opt, noise = optax.chain(make_noise(), optax.sgd(1.0)), make_noise()

  @jax.jit
  def run(params, batch, mask):
    clipped_sum, _ = fn(params, batch, mask=mask)
    updates, _ = opt.update(clipped_sum, opt.init(params), params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    noise_only, _ = noise.update(zeros, noise.init(params))  # the same draw (same key)
    return clipped_sum, optax.apply_updates(params, updates), noise_only

  clipped_sum, new, noise_only = run(params, batch, mask)
  # θ_new = θ − (Σ clip(θ − θ_u) + z) / B = θ + mean clipped delta − z / B.
  want = _flat(params) - _flat(clipped_sum) / expected_users - _flat(noise_only)
  _assert_f32_close(_flat(new), want, np.max(np.abs(want)))


def test_padding_and_nonfinite_users_contribute_zero():
  params, batch, mask = _problem(users=4, per_user=3, seed=3)
  fn = jax.jit(clipped_user_updates(loss_fn, l2_clip_norm=0.1, local_steps=2,
                                    local_learning_rate=0.2))
  ref, _ = fn(params, batch, mask=mask)
  # Garbage (NaN) in padded slots and a padded user full of NaN change nothing.
  garbage = jax.tree.map(lambda x: jnp.where(jnp.reshape(jnp.asarray(mask), mask.shape +
                                                         (1,) * (x.ndim - 2)), x, jnp.nan),
                         batch)
  padded_user = jax.tree.map(lambda x: jnp.concatenate([x, jnp.full_like(x[:1], jnp.nan)]),
                             garbage)
  padded_mask = np.concatenate([mask, np.zeros((1, 3), bool)])
  got, aux = fn(params, padded_user, mask=padded_mask)
  # Four users vs five (a padded one): another XLA program, another float32
  # summation order. Each user adds at most C = 0.1 to any coordinate. A NaN
  # leaking from the padding fails this comparison.
  units_times_clip = 4 * 0.1
  _assert_f32_close(_flat(got), _flat(ref), units_times_clip)
  assert int(aux.num_nonfinite) == 0
  # A real user whose data is NaN contributes exactly zero and is counted.
  bad = jax.tree.map(lambda x: x.at[2].set(jnp.nan), batch)
  got, aux = fn(params, bad, mask=mask)
  mask_without = mask.copy()
  mask_without[2] = False
  want, _ = fn(params, batch, mask=mask_without)
  _assert_f32_close(_flat(got), _flat(want), units_times_clip)
  assert int(aux.num_nonfinite) == int(mask[2].any())


_HYPO_FN = {}


@pytest.mark.parametrize("per_user", [1, 6])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_each_users_contribution_is_at_most_clip(per_user, data):
  # Whatever each user's number of examples (1..k), data scale and local
  # steps (0: the gradient path, dpfl.clipped_grad(unit="user")), one user's
  # contribution (the sum with only that user unmasked) has norm <= C, and
  # the full sum is the sum of the contributions.
  steps = data.draw(st.sampled_from([0, 1, 3]))
  key = (per_user, steps)
  if key not in _HYPO_FN:
    _HYPO_FN[key] = jax.jit(
        clipped_grad(loss_fn, l2_clip_norm=0.25, unit="user") if steps == 0 else
        clipped_user_updates(loss_fn, l2_clip_norm=0.25, local_steps=steps,
                             local_learning_rate=0.5))
  fn = _HYPO_FN[key]
  scale = data.draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0]))
  seed = data.draw(st.integers(0, 2**16))
  params, batch, _ = _problem(users=3, per_user=per_user, seed=seed, scale=scale)
  counts = data.draw(st.lists(st.integers(0, per_user), min_size=3, max_size=3))
  mask = np.arange(per_user)[None, :] < np.asarray(counts)[:, None]
  total, _ = fn(params, batch, mask=mask)
  parts = []
  for u in range(3):
    only = mask & (np.arange(3) == u)[:, None]
    part, _ = fn(params, batch, mask=only)
    parts.append(_flat(part))
    assert np.linalg.norm(parts[-1]) <= 0.25 * (1 + 1e-5)
    if counts[u] == 0:
      assert not parts[-1].any()
  _assert_f32_close(_flat(total), np.sum(parts, axis=0), np.max(np.sum(np.abs(parts), axis=0)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(local_steps=0, local_learning_rate=0.1), "local_steps"),
    (dict(local_steps=2), "exactly one of local_learning_rate"),
    (dict(local_steps=2, local_learning_rate=0.1, local_optimizer=optax.sgd(0.1)),
     "exactly one"),
    (dict(local_steps=2, local_learning_rate=-1.0), "local_learning_rate"),
    (dict(local_steps=2, local_learning_rate=0.1, local_batch_size=0), "local_batch_size"),
    (dict(local_steps=2, local_learning_rate=0.1, l2_clip_norm=0.0), "l2_clip_norm"),
    (dict(local_steps=2, local_learning_rate=0.1, method="book-keeping"),
     f"method must be one of {', '.join(clipping.METHODS)}; got 'book-keeping'"),
    (dict(local_steps=2, local_learning_rate=0.1, strategy="auto"), None),
])
def test_bad_arguments(kwargs, match):
  kwargs = {"l2_clip_norm": 1.0, **kwargs}
  # strategy= (the old name of method=) is an unknown keyword like any other.
  with pytest.raises(ValueError if match else TypeError, match=match):
    clipped_user_updates(loss_fn, **kwargs)


def test_local_batch_size_must_divide_examples_per_user():
  params, batch, mask = _problem(users=2, per_user=4)
  fn = clipped_user_updates(loss_fn, l2_clip_norm=1.0, local_steps=2, local_learning_rate=0.1,
                            local_batch_size=3)
  with pytest.raises(ValueError, match="local_batch_size must divide"):
    jax.eval_shape(lambda p, b, m: fn(p, b, mask=m), params, batch, mask)
