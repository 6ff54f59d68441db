"""Noise keys: every bit of an int key is kept, and replicas never share a key.

Issue 11, section 2. ``jax.random.key(int)`` keeps 32 bits without x64, so
``key=5``, ``key=5 + 2**32`` and ``key=2**62 + 5`` used to give the same
noise; ``jax.vmap(tx.init)`` and ``lax.map`` / ``lax.scan`` over ``init``
used to give every replica the same key, so the difference of two replicas'
updates removed the noise exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpfl
from dpfl import _rng, noise
from dpfl.federated import shared_secret_seed
from dpfl.mf import streaming

THREE_KEYS = (5, 5 + 2**32, 2**62 + 5)
SHARED = dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0)


def _gaussian(key):
  return noise.gaussian_noise(key=key, **SHARED)


def _blt(key):
  return streaming.blt_noise(buffer_decay=[0.9, 0.5], output_scale=[0.3, 0.1], num_steps=4,
                             sensitivity=1.0, key=key, **SHARED)


TRANSFORMS = {"gaussian": _gaussian, "blt": _blt}


def _noise_of(tx, updates, state=None):
  state = tx.init(updates) if state is None else state
  return np.asarray(tx.update(updates, state)[0]["w"])


# --- every bit of an integer key ------------------------------------------------


def test_int_key_data_is_jax_x64_key_below_2_64():
  # Reference: jax.random.key with x64 on keeps all 64 bits (threefry's two words).
  for seed in (0, 5, 2**32 - 1, *THREE_KEYS, 2**63 - 1):
    with jax.enable_x64(True):
      expected = np.asarray(jax.random.key_data(jax.random.key(seed)))
    np.testing.assert_array_equal(np.asarray(_rng.key_data(seed)), expected)
  # ...and up to 2**64 - 1, as the two words of the seed.
  np.testing.assert_array_equal(np.asarray(_rng.key_data(2**64 - 1)), [2**32 - 1, 2**32 - 1])
  # Small seeds keep the key they had (jax.random.key without x64).
  np.testing.assert_array_equal(np.asarray(_rng.key_data(7)),
                                np.asarray(jax.random.key_data(jax.random.key(7))))


def test_every_bit_of_a_128_bit_seed_changes_the_key():
  seed = shared_secret_seed()
  assert 0 <= seed < 2**128
  keys = {tuple(np.asarray(_rng.key_data(seed)).tolist())}
  for bit in (0, 31, 32, 63, 64, 95, 96, 127):
    keys.add(tuple(np.asarray(_rng.key_data(seed ^ (1 << bit))).tolist()))
  assert len(keys) == 9
  # Wider than 64 bits: the high words are folded in (not truncated).
  assert not np.array_equal(np.asarray(_rng.key_data(2**64 + 5)), np.asarray(_rng.key_data(5)))
  assert not np.array_equal(np.asarray(_rng.key_data(2**96 + 5)),
                            np.asarray(_rng.key_data(2**64 + 5)))


def test_shared_secret_seed_has_128_bits_of_entropy():
  seeds = [shared_secret_seed() for _ in range(8)]
  assert len(set(seeds)) == 8
  # Each bit is set in about half of 8 draws; all 8 draws below 2**64 has odds 2**-512.
  assert max(seeds) >= 2**64
  # The secret survives into the noise key and the sampler intact.
  np.testing.assert_array_equal(np.asarray(_rng.key_data(seeds[0])),
                                np.asarray(_rng.key_data(int(seeds[0]))))
  draw = lambda s: dpfl.ShuffledSampler(100, batch_size=10, seed=s)().indices
  np.testing.assert_array_equal(draw(seeds[0]), draw(seeds[0]))
  assert not np.array_equal(draw(seeds[0]), draw(seeds[0] ^ (1 << 127)))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_three_int_keys_give_three_noises(name):
  updates = {"w": jnp.zeros((16,))}
  noises = [_noise_of(TRANSFORMS[name](key), updates) for key in THREE_KEYS]
  for i in range(3):
    for j in range(i):
      assert not np.any(noises[i] == noises[j]), (THREE_KEYS[i], THREE_KEYS[j])


def _private_params_after_one_step(key):
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(40, 3)).astype(np.float32), "y": np.ones(40, np.float32)}

  def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

  private = dpfl.make_private(loss_fn, optax.sgd(1.0), l2_clip_norm=1.0, dataset_size=40,
                              batch_size=8, num_steps=1, noise_multiplier=1.0, delta=1e-5,
                              key=key, seed=0)
  state = private.init({"w": jnp.zeros(3)})
  batch, mask = next(private.batches(data, state))
  state, _ = private.make_step()(state, batch, mask)
  return np.asarray(state.params["w"])


def test_three_int_keys_give_three_noises_through_make_private():
  # Same data, same sample (seed=0): only the noise key differs.
  out = [_private_params_after_one_step(key) for key in THREE_KEYS]
  for i in range(3):
    for j in range(i):
      assert not np.any(out[i] == out[j])
  np.testing.assert_array_equal(_private_params_after_one_step(THREE_KEYS[2]), out[2])


@pytest.mark.parametrize("bad", [-1, -(2**40)])
def test_negative_int_keys_are_refused(bad):
  with pytest.raises(ValueError, match=rf"key must be an integer >= 0.*{bad}"):
    _gaussian(bad)
  with pytest.raises(ValueError, match=rf"key must be an integer >= 0.*{bad}"):
    _blt(bad)
  state = _gaussian(0).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match=rf"key must be an integer >= 0.*{bad}"):
    noise.reseed(state, key=bad)


def test_reseed_keeps_every_bit_of_an_int_key():
  state = _gaussian(1).init({"w": jnp.zeros(2)})
  keys = [np.asarray(noise.reseed(state, key=k).key).tolist() for k in THREE_KEYS]
  assert len({tuple(k) for k in keys}) == 3


# --- replicas never share a key -----------------------------------------------------


def _distinct_rows(array):
  rows = np.asarray(array).reshape(array.shape[0], -1)
  return len({row.tobytes() for row in rows}) == rows.shape[0]


@pytest.mark.parametrize("key", [None, 7])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_vmapped_init_gives_every_replica_its_own_key(name, key):
  params = {"w": jnp.zeros((4, 16))}
  for init in (jax.vmap(TRANSFORMS[name](key).init),
               jax.jit(jax.vmap(TRANSFORMS[name](key).init))):
    states = init(params)
    assert states.key.shape[0] == 4 and _distinct_rows(states.key)
    out, _ = jax.vmap(TRANSFORMS[name](key).update)(params, states)
    assert _distinct_rows(out["w"])


@pytest.mark.parametrize("key", [None, 7])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_lax_map_and_scan_over_init_give_distinct_keys(name, key):
  params = {"w": jnp.zeros((4, 16))}
  tx = TRANSFORMS[name](key)
  mapped = jax.lax.map(tx.init, params)
  _, scanned = jax.lax.scan(lambda c, p: (c, tx.init(p)), 0, params)
  batched = jax.lax.map(tx.init, params, batch_size=2)  # a vmap inside a scan
  keys = [mapped.key, scanned.key, batched.key]
  assert _distinct_rows(np.concatenate(keys))


def test_explicit_key_is_reproducible_and_first_init_uses_it():
  params = {"w": jnp.zeros((4, 16))}
  expected = np.asarray(jax.random.key_data(jax.random.key(7)))
  first = _gaussian(7).init({"w": jnp.zeros(16)})
  np.testing.assert_array_equal(first.key, expected)
  # The same key gives the same sequence of keys, vmapped or not; replica 0
  # gets the key itself, replica i its fold_in(key, i).
  a, b = jax.vmap(_gaussian(7).init)(params), jax.vmap(_gaussian(7).init)(params)
  np.testing.assert_array_equal(a.key, b.key)
  np.testing.assert_array_equal(a.key[0], expected)
  np.testing.assert_array_equal(
      a.key[3], jax.random.key_data(jax.random.fold_in(jax.random.key(7), 3)))
  # A second init of one transform (eager or a second run of a jitted init)
  # starts a new stream instead of replaying the first.
  tx = _gaussian(7)
  init = jax.jit(tx.init)
  keys = [np.asarray(init({"w": jnp.zeros(16)}).key) for _ in range(2)]
  keys.append(np.asarray(tx.init({"w": jnp.zeros(16)}).key))
  np.testing.assert_array_equal(keys[0], expected)
  assert _distinct_rows(np.stack(keys))
  # Tracing without running (eval_shape, lower) hands out no key.
  jax.eval_shape(tx.init, {"w": jnp.zeros(16)})
  nxt = np.asarray(tx.init({"w": jnp.zeros(16)}).key)
  np.testing.assert_array_equal(
      nxt, jax.random.key_data(jax.random.fold_in(jax.random.key(7), 3)))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_differencing_two_replicas_does_not_cancel_the_noise(name):
  # The attack: identical inputs on two replicas; their difference would be 0
  # if they shared a key.
  tx = TRANSFORMS[name](123)
  params = {"w": jnp.zeros((2, 64))}
  states = jax.vmap(tx.init)(params)
  grads = {"w": jnp.ones((2, 64))}
  out, states = jax.jit(jax.vmap(tx.update))(grads, states)
  assert np.all(np.asarray(out["w"][0] - out["w"][1]) != 0)
  out, _ = jax.jit(jax.vmap(tx.update))(grads, states)  # and at the next step
  assert np.all(np.asarray(out["w"][0] - out["w"][1]) != 0)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_vmapped_update_with_one_shared_state_raises(name):
  tx = TRANSFORMS[name](3)
  state = tx.init({"w": jnp.zeros(8)})
  grads = {"w": jnp.ones((4, 8))}
  for update in (jax.vmap(tx.update, in_axes=(0, None)),
                 jax.jit(jax.vmap(tx.update, in_axes=(0, None)))):
    with pytest.raises(ValueError, match=r"shared by every vmapped replica.*jax.vmap\(tx.init\)"):
      update(grads, state)


def test_vmapped_update_with_one_shared_state_raises_under_an_outer_vmap():
  tx = _gaussian(3)
  states = jax.vmap(tx.init)({"w": jnp.zeros((2, 8))})  # batched over the outer axis only
  inner_shared = jax.vmap(jax.vmap(tx.update, in_axes=(0, None)), in_axes=(0, 0))
  with pytest.raises(ValueError, match="shared by every vmapped replica"):
    inner_shared({"w": jnp.ones((2, 4, 8))}, states)
  outer_shared = jax.vmap(jax.vmap(tx.update), in_axes=(0, None))
  with pytest.raises(ValueError, match="shared by every vmapped replica"):
    outer_shared({"w": jnp.ones((2, 4, 8))}, jax.vmap(tx.init)({"w": jnp.zeros((4, 8))}))


def test_update_is_still_differentiable_and_unbatched_path_unchanged():
  tx = _gaussian(5)
  state = tx.init({"w": jnp.zeros(4)})
  grad = jax.grad(lambda u: tx.update({"w": u}, state)[0]["w"].sum())(jnp.zeros(4))
  np.testing.assert_allclose(grad, np.ones(4))  # d/du (u + noise) / 1
  out = np.asarray(tx.update({"w": jnp.zeros(4)}, state)[0]["w"])
  expected = np.asarray(jax.random.normal(
      jax.random.split(jax.random.split(jax.random.key(5))[1], 1)[0], (4,)))
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_reseed_under_vmap_gives_every_replica_its_own_key():
  states = jax.vmap(_gaussian(1).init)({"w": jnp.zeros((4, 3))})
  reseeded = jax.vmap(noise.reseed)(states)
  assert _distinct_rows(reseeded.key)
  assert not np.any(np.all(np.asarray(reseeded.key) == np.asarray(states.key), axis=1))


def test_init_accepts_any_params_pytree():
  # Typed-key, integer and empty leaves (and no leaves) still give keys.
  params = {"w": jnp.zeros((4, 3)), "k": jax.random.split(jax.random.key(0), 4),
            "n": jnp.arange(4), "e": jnp.zeros((4, 0))}
  assert _distinct_rows(jax.vmap(_gaussian(3).init)(params).key)
  np.testing.assert_array_equal(_gaussian(3).init({}).key, _rng.key_data(3))
