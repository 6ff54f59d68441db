"""Tests for dpfl.clipping.clipped_grad.

Every reference value is computed here, independently of dpfl: a Python loop
calling ``jax.grad`` on one example (or one user's real examples) at a time,
clipped and summed in float64 NumPy.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from dpfl import clip_cost
from dpfl.clipping import ClippedGradAux, ClippedGradFn, clipped_grad, clipped_sum, per_unit_loss

METHODS = ["materialize", "reweight", "auto"]
EXPLICIT = ["materialize", "reweight"]


@functools.cache
def _jit_clipped(loss_fn, **kwargs):
  """One compiled clipped_grad per configuration (compiles take ~1 s here)."""
  return jax.jit(clipped_grad(loss_fn, **kwargs))


@functools.cache
def _jit_grad(loss_fn):
  return jax.jit(jax.grad(loss_fn))


# --------------------------------------------------------------------------
# A small model and an independent brute-force reference.


def _params(seed=0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      "w1": jax.random.normal(k1, (5, 4), dtype),
      "b1": jax.random.normal(k2, (4,), dtype) * 0.1,
      "w2": jax.random.normal(k3, (4, 2), dtype),
  }


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  pred = h @ params["w2"]
  return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))


def _loss_with_aux(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  pred = h @ params["w2"]
  loss = jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))
  return loss, {"pred": pred, "h_norm": jnp.linalg.norm(h)}


def _batch(n, seed=1, scale=1.0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {
      "x": scale * jax.random.normal(kx, (n, 5)),
      "y": jax.random.normal(ky, (n, 2)),
  }


def _flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], dtype=np.float64)


class _Reference(NamedTuple):
  total: np.ndarray     # the clipped sum, float64
  abs_sum: np.ndarray   # coordinate-wise sum of |clipped contribution|
  norms: np.ndarray     # per-unit gradient norms (example level)
  counted: int          # units with at least one real example (user level)
  num_clipped: int


def _brute_force(loss_fn, params, batch, l2_clip_norm, mask=None):
  """Sum of clipped per-example gradients by an explicit loop, in float64."""
  n = jax.tree.leaves(batch)[0].shape[0]
  grad_fn = _jit_grad(loss_fn)
  total = np.zeros(_flat(params).shape)
  abs_sum = np.zeros_like(total)
  norms, clipped = [], 0
  for i in range(n):
    g = _flat(grad_fn(params, jax.tree.map(lambda x: x[i : i + 1], batch)))
    norm = math.sqrt(float(np.sum(g * g)))
    norms.append(norm)
    if mask is not None and not mask[i]:
      continue
    if not np.isfinite(norm):
      continue
    clipped += norm > l2_clip_norm
    contribution = g * min(1.0, l2_clip_norm / norm) if norm > 0 else g
    total += contribution
    abs_sum += np.abs(contribution)
  counted = n if mask is None else int(np.sum(mask))
  return _Reference(total, abs_sum, np.array(norms), counted, clipped)


def _brute_force_users(params, batch, mask, l2_clip_norm, loss_fn=None):
  """Per-user clipped sum: gradient of each user's mean loss over real data."""
  total = np.zeros(_flat(params).shape)
  abs_sum = np.zeros_like(total)
  grad_fn = _jit_grad(_loss if loss_fn is None else loss_fn)
  counted = clipped = 0
  for u in range(mask.shape[0]):
    real = np.flatnonzero(mask[u])
    if real.size == 0:
      continue
    counted += 1
    # _loss is a mean over its batch: called on the user's real examples
    # only, it is the user's mean loss, computed without dpfl's masking.
    user = jax.tree.map(lambda x: x[u][real], batch)
    g = _flat(grad_fn(params, user))
    norm = math.sqrt(float(np.sum(g * g)))
    if not np.isfinite(norm):
      continue
    clipped += norm > l2_clip_norm
    contribution = g * min(1.0, l2_clip_norm / norm)
    total += contribution
    abs_sum += np.abs(contribution)
  return _Reference(total, abs_sum, np.array([]), counted, clipped)


# Float32 tolerance of a clipped sum. The references sum float32 per-unit
# gradients in float64; clipped_grad sums them in float32, vmapped, in an
# order that also changes with the CPU's vector width and XLA's thread count
# (and microbatching, method, sharding). A float32 sum's error is a few ulps
# of its *summands*, not of the result: a coordinate that cancels to ~0 keeps
# the summands' absolute error (2.9e-6 seen on one machine, on terms of ~3).
# So rtol for the large coordinates, plus the same relative size of the
# largest coordinate-wise sum of |terms| as atol. 1e-5 is ~84 float32 ulps;
# a real defect (a unit dropped, a wrong clip factor) moves the sum by O(1).
F32_RTOL = 1e-5


def _assert_sum_close(got, want, abs_sum, *, rtol=F32_RTOL):
  """got ~ want, two clipped sums whose terms have coordinate-wise |sum| abs_sum."""
  np.testing.assert_allclose(_flat(got), want, rtol=rtol, atol=rtol * float(np.max(abs_sum)))


# Shared clip norm: per-example norms of _loss on _batch(8) span 1.8 .. 16.6,
# so about half of the examples are clipped. Sharing it (and the loss) lets
# tests reuse compiled functions.
CLIP = 10.0


# --------------------------------------------------------------------------
# Example-level correctness.


@pytest.mark.parametrize("method", METHODS)
def test_matches_brute_force(method):
  params, batch = _params(), _batch(8)
  ref = _brute_force(_loss, params, batch, CLIP)
  norms, num_clipped = ref.norms, ref.num_clipped
  assert 0 < num_clipped < 8
  fn = _jit_clipped(_loss, l2_clip_norm=CLIP, method=method)
  clipped_sum, aux = fn(params, batch)

  assert jax.tree.structure(clipped_sum) == jax.tree.structure(params)
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum)
  np.testing.assert_allclose(aux.grad_norms, norms, rtol=1e-5)
  assert int(aux.num_units) == 8
  assert int(aux.num_clipped) == num_clipped
  assert float(aux.fraction_clipped) == pytest.approx(num_clipped / 8)
  assert int(aux.num_nonfinite) == 0
  assert aux.aux is None
  expected_values = [
      float(_loss(params, jax.tree.map(lambda x: x[i : i + 1], batch)))
      for i in range(8)
  ]
  np.testing.assert_allclose(aux.values, expected_values, rtol=1e-5)


def test_large_clip_norm_is_the_plain_gradient_sum():
  params, batch = _params(), _batch(8)
  clipped_sum, aux = _jit_clipped(_loss, l2_clip_norm=1e9, method="auto")(
      params, batch
  )
  # The mean loss's gradient times the batch size is the sum of per-example
  # gradients: an independent closed form when nothing is clipped.
  expected = 8 * _flat(jax.grad(_loss)(params, batch))
  _assert_sum_close(clipped_sum, expected, _brute_force(_loss, params, batch, 1e9).abs_sum)
  assert int(aux.num_clipped) == 0


@settings(max_examples=10, deadline=None)
@given(
    log10_scale=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(EXPLICIT),
)
def test_each_contribution_is_at_most_clip_norm(log10_scale, seed, method):
  # The clip norm is fixed (no recompiles); the data scale spans four
  # decades and the parameters vary, so norms fall on both sides of it.
  n = 8
  params = _params(seed)
  batch = _batch(n, seed=seed + 1, scale=10.0**log10_scale)
  fn = _jit_clipped(_loss, l2_clip_norm=CLIP, method=method)
  total, _ = fn(params, batch)
  contributions = []
  for i in range(n):
    # Masking all other examples isolates example i's contribution.
    only_i, aux = fn(params, batch, mask=jnp.arange(n) == i)
    assert int(aux.num_units) == 1
    contributions.append(_flat(only_i))
    assert np.linalg.norm(contributions[-1]) <= CLIP * (1 + 1e-5)
  _assert_sum_close(total, np.sum(contributions, axis=0), np.sum(np.abs(contributions), axis=0))


@pytest.mark.parametrize("method", EXPLICIT)
def test_padding_contributes_zero_and_is_not_counted(method):
  params, batch = _params(), _batch(8)
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], dtype=bool)
  # Garbage in padded slots must not leak, even NaN / Inf.
  x = np.array(batch["x"])
  x[2] = np.nan
  x[4] = np.inf
  batch = {"x": jnp.asarray(x), "y": batch["y"]}
  ref = _brute_force(_loss, params, batch, CLIP, mask=mask)
  num_clipped = ref.num_clipped
  clipped_sum, aux = _jit_clipped(_loss, l2_clip_norm=CLIP, method=method)(
      params, batch, mask=jnp.asarray(mask)
  )
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum)
  assert int(aux.num_units) == 5
  assert int(aux.num_clipped) == num_clipped
  assert int(aux.num_nonfinite) == 0
  assert float(aux.fraction_clipped) == pytest.approx(num_clipped / 5)
  np.testing.assert_array_equal(np.asarray(aux.grad_norms)[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(aux.values)[~mask], 0.0)


def test_integer_mask_is_accepted():
  params, batch = _params(), _batch(8)
  mask = np.array([1, 0, 1, 1, 1, 1, 1, 1], dtype=np.int32)
  ref = _brute_force(_loss, params, batch, CLIP, mask=mask.astype(bool))
  got, aux = _jit_clipped(_loss, l2_clip_norm=CLIP, method="materialize")(
      params, batch, mask=mask
  )
  _assert_sum_close(got, ref.total, ref.abs_sum)
  assert int(aux.num_units) == 7


@pytest.mark.parametrize("method", EXPLICIT)
def test_nonfinite_examples_contribute_zero_and_are_counted(method):
  params, batch = _params(), _batch(8)
  x, y = np.array(batch["x"]), np.array(batch["y"])
  x[1, 3] = np.nan  # NaN gradient
  y[4, 0] = np.inf  # Inf loss -> non-finite gradient
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  ref = _brute_force(_loss, params, batch, CLIP)
  assert np.all(np.isfinite(ref.total))
  clipped_sum, aux = _jit_clipped(_loss, l2_clip_norm=CLIP, method=method)(
      params, batch
  )
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum)
  assert int(aux.num_nonfinite) == 2
  assert int(aux.num_units) == 8  # unmasked, so counted, but contribute 0
  assert not np.isfinite(np.asarray(aux.grad_norms)[[1, 4]]).any()


@pytest.mark.parametrize("method", EXPLICIT)
def test_all_examples_nonfinite_gives_exact_zeros(method):
  params, batch = _params(), _batch(8)
  batch = {"x": jnp.full_like(batch["x"], jnp.nan), "y": batch["y"]}
  clipped_sum, aux = _jit_clipped(_loss, l2_clip_norm=CLIP, method=method)(
      params, batch
  )
  np.testing.assert_array_equal(_flat(clipped_sum), 0.0)
  assert int(aux.num_nonfinite) == 8


@pytest.mark.parametrize(
    "method, microbatch_size", [("materialize", 3), ("reweight", 5)]
)
def test_microbatched_equals_unbatched(method, microbatch_size):
  # 8 examples in blocks of 3 or 5: the last block is a remainder.
  params, batch = _params(), _batch(8)
  mask = jnp.arange(8) != 6
  ref = _brute_force(_loss, params, batch, CLIP, mask=np.asarray(mask))
  full, full_aux = _jit_clipped(_loss, l2_clip_norm=CLIP, method=method)(
      params, batch, mask=mask
  )
  micro, micro_aux = _jit_clipped(
      _loss, l2_clip_norm=CLIP, method=method, microbatch_size=microbatch_size
  )(params, batch, mask=mask)
  _assert_sum_close(micro, _flat(full), ref.abs_sum)  # two float32 summation orders
  _assert_sum_close(micro, ref.total, ref.abs_sum)
  np.testing.assert_allclose(micro_aux.grad_norms, np.where(mask, ref.norms, 0), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(micro_aux), jax.tree.leaves(full_aux)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method, microbatch_size", [("materialize", None), ("reweight", 5)]
)
def test_has_aux_returns_per_example_aux(method, microbatch_size):
  params, batch = _params(), _batch(10)
  clipped_sum, aux = _jit_clipped(
      _loss_with_aux,
      l2_clip_norm=CLIP,
      has_aux=True,
      method=method,
      microbatch_size=microbatch_size,
  )(params, batch)
  ref = _brute_force(_loss, params, batch, CLIP)
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum)
  # loss_fn saw a batch of one example: pred has shape [1, 2] per example.
  assert aux.aux["pred"].shape == (10, 1, 2)
  assert aux.aux["h_norm"].shape == (10,)
  for i in range(10):
    _, ref = _loss_with_aux(params, jax.tree.map(lambda x: x[i : i + 1], batch))
    np.testing.assert_allclose(aux.aux["pred"][i], ref["pred"], rtol=1e-5)
    np.testing.assert_allclose(aux.aux["h_norm"][i], ref["h_norm"], rtol=1e-5)


def test_loss_without_aux_under_has_aux_fails_loudly():
  with pytest.raises(ValueError, match="has_aux"):
    clipped_grad(_loss, l2_clip_norm=1.0, has_aux=True)(_params(), _batch(2))


# --------------------------------------------------------------------------
# Flax models.


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def _xent(logits, labels):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def test_flax_linen_model():
  model = _LinenMLP()
  x = jax.random.normal(jax.random.key(0), (6, 5))
  batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1, 2])}
  variables = model.init(jax.random.key(1), x[:1])

  def loss_fn(variables, batch):
    return _xent(model.apply(variables, batch["x"]), batch["y"])

  ref = _brute_force(loss_fn, variables, batch, 0.3)
  clipped_sum, aux = jax.jit(clipped_grad(loss_fn, l2_clip_norm=0.3))(
      variables, batch
  )
  assert jax.tree.structure(clipped_sum) == jax.tree.structure(variables)
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum)
  assert int(aux.num_units) == 6


class _NNXMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(5, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_flax_nnx_model():
  model = _NNXMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(0), (6, 5))
  batch = {"x": x, "y": jnp.array([2, 1, 0, 0, 1, 2])}

  def loss_fn(state, batch):
    return _xent(nnx.merge(graphdef, state)(batch["x"]), batch["y"])

  ref = _brute_force(loss_fn, state, batch, 0.3)
  clipped_sum, _ = jax.jit(clipped_grad(loss_fn, l2_clip_norm=0.3))(state, batch)
  assert jax.tree.structure(clipped_sum) == jax.tree.structure(state)
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum)
  # The clipped sum drops straight back into the model as an update.
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, state, clipped_sum))


# --------------------------------------------------------------------------
# Precision.


def test_bf16_params_accumulate_in_float32():
  dim, n = 3, 256
  params = {"w": jnp.zeros((dim,), jnp.bfloat16)}

  def loss_fn(params, batch):  # gradient of one example is exactly its x
    return jnp.mean(batch["x"] @ params["w"])

  # 1 + 2**-7 is exact in bf16; 256 of them sum to 258, which bf16 (8-bit
  # mantissa) cannot hold: a bf16 accumulator would give 256 or 260.
  x = jnp.full((n, dim), 1 + 2**-7, jnp.bfloat16)
  clipped_sum, aux = jax.jit(clipped_grad(loss_fn, l2_clip_norm=100.0))(
      params, {"x": x}
  )
  assert clipped_sum["w"].dtype == jnp.float32
  assert aux.grad_norms.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(clipped_sum["w"]), 258.0)
  expected_norm = math.sqrt(dim) * (1 + 2**-7)
  np.testing.assert_allclose(aux.grad_norms, expected_norm, rtol=1e-6)


def test_bf16_clipped_sum_matches_float32_reference():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
  batch = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _batch(8))
  # Reference: bf16 per-example gradients (independently computed), then
  # clipped and summed in float64.
  ref = _brute_force(_loss, params, batch, 0.5)
  clipped_sum, _ = _jit_clipped(_loss, l2_clip_norm=0.5)(params, batch)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(clipped_sum))
  # The per-example gradients are bf16 on both sides but come from different
  # XLA programs (one example vs vmapped): where a float32 intermediate lands
  # on a bf16 rounding boundary they differ by one bf16 ulp (2^-7 relative).
  # The float32 accumulation itself is checked exactly by the test above.
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum, rtol=2.0**-7)


def test_reweight_rejects_half_precision():
  params = jax.tree.map(lambda p: p.astype(jnp.float16), _params())
  with pytest.raises(ValueError, match="method='reweight'"):
    clipped_grad(_loss, l2_clip_norm=1.0, method="reweight")(params, _batch(2))


# --------------------------------------------------------------------------
# User-level clipping.


def _user_batch():
  users, k = 5, 3
  kx, ky = jax.random.split(jax.random.key(7))
  x = np.array(jax.random.normal(kx, (users, k, 5)))
  y = np.array(jax.random.normal(ky, (users, k, 2)))
  mask = np.array(
      [
          [1, 1, 1],
          [1, 0, 0],  # padding inside a user
          [0, 0, 0],  # fully padded user
          [1, 1, 0],
          [0, 1, 1],  # padding first
      ],
      dtype=bool,
  )
  x[~mask] = np.nan  # padded slots hold garbage that must not leak
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}, mask


# Users' gradient norms on _user_batch are about 5.3, 11.7, 9.2 and 8.1.
USER_CLIP = 8.5


@pytest.mark.parametrize(
    "method, microbatch_size",
    [("materialize", 2), ("reweight", None), ("auto", None)],
)
def test_user_level_matches_brute_force(method, microbatch_size):
  params, (batch, mask) = _params(), _user_batch()
  clip = USER_CLIP
  ref = _brute_force_users(params, batch, mask, clip)
  counted, num_clipped = ref.counted, ref.num_clipped
  assert 0 < num_clipped < counted
  fn = _jit_clipped(
      _loss,
      l2_clip_norm=clip,
      unit="user",
      method=method,
      microbatch_size=microbatch_size,
  )
  clipped_sum, aux = fn(params, batch, mask=jnp.asarray(mask))
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum)
  assert counted == 4
  assert int(aux.num_units) == 4
  assert int(aux.num_clipped) == num_clipped
  assert aux.grad_norms.shape == (5,)
  assert float(aux.grad_norms[2]) == 0.0
  assert int(aux.num_nonfinite) == 0


def test_user_level_each_user_bounded_and_nonfinite_user_dropped():
  params, (batch, mask) = _params(), _user_batch()
  x = np.array(batch["x"])
  x[3, 1, 0] = np.nan  # a real example of user 3 is broken
  batch = {"x": jnp.asarray(x), "y": batch["y"]}
  clip = 0.05  # every user clipped
  fn = _jit_clipped(_loss_with_aux, l2_clip_norm=clip, unit="user", has_aux=True)
  total, aux = fn(params, batch, mask=jnp.asarray(mask))
  mask_3 = mask.copy()
  mask_3[3] = False
  ref = _brute_force_users(params, batch, mask_3, clip)
  _assert_sum_close(total, ref.total, ref.abs_sum)
  assert int(aux.num_nonfinite) == 1
  assert int(aux.num_units) == 4
  assert aux.aux["pred"].shape == (5, 3, 1, 2)
  for u in range(5):
    only_u = np.zeros_like(mask)
    only_u[u] = mask[u]
    contribution, _ = fn(params, batch, mask=jnp.asarray(only_u))
    norm = np.linalg.norm(_flat(contribution))
    assert norm <= clip * (1 + 1e-5)
    if u in (2, 3):  # fully padded, non-finite
      assert norm == 0.0


def test_user_level_values_are_user_mean_losses():
  params, (batch, mask) = _params(), _user_batch()
  # Same configuration as the brute-force user test: reuses its compile.
  _, aux = _jit_clipped(
      _loss, l2_clip_norm=USER_CLIP, unit="user", method="auto", microbatch_size=None
  )(
      params, batch, mask=jnp.asarray(mask)
  )
  for u in range(5):
    real = np.flatnonzero(mask[u])
    expected = (
        0.0
        if real.size == 0
        else float(_loss(params, jax.tree.map(lambda x: x[u][real], batch)))
    )
    assert float(aux.values[u]) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------
# Typed PRNG keys in the batch (per-example dropout).

DROPOUT_KEEP = 0.5


def _dropout_loss(params, batch):
  """_loss with inverted dropout on the inputs, one typed key per example."""
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, DROPOUT_KEEP, (5,)))(batch["key"])
  x = jnp.where(keep, batch["x"] / DROPOUT_KEEP, 0.0)
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean(jnp.sum((h @ params["w2"] - batch["y"]) ** 2, axis=-1))


@pytest.mark.parametrize(
    "method, microbatch_size",
    [("materialize", None), ("reweight", None), ("auto", None), ("reweight", 3),
     ("materialize", 3), ("auto", 4)],
)
def test_typed_key_leaves_match_brute_force(method, microbatch_size):
  n = 10
  batch = dict(_batch(n), key=jax.random.split(jax.random.key(11), n))
  assert jax.dtypes.issubdtype(batch["key"].dtype, jax.dtypes.prng_key)
  x = np.array(batch["x"])
  x[[2, 7]] = np.nan  # padding: garbage that must not leak (reweight swaps it out)
  batch["x"] = jnp.asarray(x)
  batch["y"] = batch["y"].at[5, 0].set(jnp.inf)  # a real example, non-finite gradient
  mask = np.ones(n, bool)
  mask[[2, 7]] = False
  params = _params()
  ref = _brute_force(_dropout_loss, params, batch, CLIP, mask)
  expected, num_clipped = ref.total, ref.num_clipped
  fn = _jit_clipped(_dropout_loss, l2_clip_norm=CLIP, method=method,
                    microbatch_size=microbatch_size)
  clipped_sum, aux = fn(params, batch, mask=jnp.asarray(mask))
  _assert_sum_close(clipped_sum, expected, ref.abs_sum)
  assert int(aux.num_units) == 8 and int(aux.num_nonfinite) == 1
  assert int(aux.num_clipped) == num_clipped
  # The keys matter: other keys drop other inputs and give another sum.
  other = dict(batch, key=jax.random.split(jax.random.key(12), n))
  moved = _flat(fn(params, other, mask=jnp.asarray(mask))[0])
  assert np.max(np.abs(moved - expected)) > 1e-2


@pytest.mark.parametrize("method", EXPLICIT)
def test_typed_key_leaves_user_level(method):
  params, (batch, mask) = _params(), _user_batch()
  keys = jax.random.split(jax.random.key(13), mask.size).reshape(mask.shape)
  batch = dict(batch, key=keys)
  ref = _brute_force_users(params, batch, mask, USER_CLIP, _dropout_loss)
  fn = _jit_clipped(_dropout_loss, l2_clip_norm=USER_CLIP, unit="user", method=method)
  clipped_sum, aux = fn(params, batch, mask=jnp.asarray(mask))
  _assert_sum_close(clipped_sum, ref.total, ref.abs_sum)
  assert int(aux.num_units) == 4


# --------------------------------------------------------------------------
# Method choice and API surface.


def test_auto_method_follows_the_cost_model():
  mask = jnp.ones((), bool)
  key = jax.random.key(0)
  wide = {"w1": jax.random.normal(key, (256, 256)), "w2": jnp.ones((256, 4))}

  def dense_loss(p, unit_batch, unit_mask):  # one token: ghost needs two norms
    return jnp.mean(jnp.tanh(unit_batch["x"] @ p["w1"]) @ p["w2"]), None

  one = {"x": jnp.ones((1, 256))}
  assert clip_cost.choose_method(dense_loss, wide, one, mask) == "ghost"
  # Half precision: never reweight (its sum would accumulate in bf16).
  half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), wide)
  costs = clip_cost.method_costs(dense_loss, half, one, mask)
  assert "reweight" not in costs
  assert clip_cost.choose_method(dense_loss, half, one, mask) == "ghost"

  def sequence_loss(p, unit_batch, unit_mask):  # 64 tokens through 5 -> 4 -> 2
    tokens = unit_batch["x"]
    return jnp.mean(jnp.tanh(tokens @ p["w1"]) @ p["w2"]), None

  # Narrow layers reused by many tokens: a per-unit gradient is tiny and the
  # token Gram matrices (or per-layer gradients) cost more.
  seq = clip_cost.choose_method(
      sequence_loss, _params(), {"x": jnp.ones((64, 5))}, mask
  )
  assert seq == "materialize"

  def scanned_loss(p, unit_batch, unit_mask):  # every weight inside a scan
    def body(h, w):
      return jnp.tanh(h @ w), None
    h, _ = jax.lax.scan(body, unit_batch["x"], p["layers"])
    return jnp.mean(h), None

  layers = {"layers": jnp.ones((4, 256, 256))}
  assert clip_cost.choose_method(
      scanned_loss, layers, {"x": jnp.ones((1, 256))}, mask
  ) != "ghost"


def test_returned_callable_carries_its_sensitivity():
  fn = clipped_grad(_loss, l2_clip_norm=np.float32(2.5), unit="user")
  assert isinstance(fn, ClippedGradFn)
  assert fn.l2_clip_norm == 2.5 and isinstance(fn.l2_clip_norm, float)
  assert fn.unit == "user"
  assert fn.method == "auto"
  assert clipped_grad(_loss, l2_clip_norm=1.0, method="materialize").method == "materialize"
  assert ClippedGradAux._fields[:2] == ("grad_norms", "values")


@pytest.mark.parametrize("method", ["Ghost", "book-keeping", None, 3])
def test_bad_method_names_the_argument_and_the_allowed_values(method):
  with pytest.raises(ValueError, match="method") as info:
    clipped_grad(_loss, l2_clip_norm=1.0, method=method)
  assert repr(method) in str(info.value)
  assert all(name in str(info.value) for name in METHODS)


def test_strategy_is_no_longer_a_clipping_argument():
  # Renamed to method= before 1.0; strategy means the matrix factorization only.
  with pytest.raises(TypeError, match="strategy"):
    clipped_grad(_loss, l2_clip_norm=1.0, strategy="reweight")


# --------------------------------------------------------------------------
# clipped_sum of an arbitrary per-unit update (not a gradient).


def _odd_update(params, example, example_mask):
  """A per-example update that is no loss's gradient: params scaled by x."""
  del example_mask
  s = jnp.sum(example["x"]) + example["y"][0]
  update = jax.tree.map(lambda p: jnp.sin(s * p) * s, params)
  return update, s, {"s": s}


@pytest.mark.parametrize("method", ["auto", "materialize"])
def test_clipped_sum_of_any_update_matches_brute_force(method):
  params, batch = _params(), _batch(8)
  x = np.array(batch["x"])
  x[3] = np.nan  # a real example whose update is NaN: contributes 0, counted
  x[6] = np.inf  # padding with garbage
  batch = {"x": jnp.asarray(x), "y": batch["y"]}
  mask = np.array([1, 1, 1, 1, 0, 1, 0, 1], bool)
  clip = 2.0
  fn = clipped_sum(l2_clip_norm=clip, unit_update=_odd_update, method=method,
                   microbatch_size=3)
  assert fn.method == method
  got, aux = jax.jit(fn)(params, batch, mask=jnp.asarray(mask))
  total = np.zeros(_flat(params).shape)
  abs_sum = np.zeros_like(total)
  clipped = 0
  for i in np.flatnonzero(mask):
    u = _flat(_odd_update(params, jax.tree.map(lambda v: v[i], batch), True)[0])
    norm = np.linalg.norm(u)
    if not np.isfinite(norm):
      continue
    clipped += norm > clip
    total += u * min(1.0, clip / norm)
    abs_sum += np.abs(u * min(1.0, clip / norm))
  assert 0 < clipped < 5
  _assert_sum_close(got, total, abs_sum)
  assert int(aux.num_units) == 6 and int(aux.num_nonfinite) == 1
  assert int(aux.num_clipped) == clipped
  np.testing.assert_array_equal(np.asarray(aux.grad_norms)[~mask], 0.0)
  want_s = np.sum(x, axis=1) + np.asarray(batch["y"][:, 0])
  np.testing.assert_allclose(np.asarray(aux.values)[mask & np.isfinite(want_s)],
                             want_s[mask & np.isfinite(want_s)], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux.aux["s"])[[0, 1, 2]], want_s[[0, 1, 2]], rtol=1e-5)


def test_clipped_sum_refuses_reweight_for_an_update_that_is_no_gradient():
  with pytest.raises(ValueError, match="method='reweight'.*unit_loss") as info:
    clipped_sum(l2_clip_norm=1.0, unit_update=_odd_update, method="reweight")
  assert "materialize" in str(info.value)


@pytest.mark.parametrize("given", ["neither", "both"])
def test_clipped_sum_needs_exactly_one_unit_function(given):
  kwargs = {} if given == "neither" else dict(
      unit_update=_odd_update, unit_loss=per_unit_loss(_loss, unit="example"))
  with pytest.raises(ValueError, match="exactly one of unit_loss"):
    clipped_sum(l2_clip_norm=1.0, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"l2_clip_norm": 0.0}, "l2_clip_norm"),
        ({"l2_clip_norm": -1.0}, "l2_clip_norm"),
        ({"l2_clip_norm": float("nan")}, "l2_clip_norm"),
        ({"l2_clip_norm": float("inf")}, "l2_clip_norm"),
        ({"l2_clip_norm": "1"}, "l2_clip_norm"),
        ({"l2_clip_norm": True}, "l2_clip_norm"),
        ({"l2_clip_norm": 1.0, "unit": "group"}, "unit"),
        ({"l2_clip_norm": 1.0, "microbatch_size": 0}, "microbatch_size"),
        ({"l2_clip_norm": 1.0, "microbatch_size": -2}, "microbatch_size"),
        ({"l2_clip_norm": 1.0, "microbatch_size": 2.5}, "microbatch_size"),
        ({"l2_clip_norm": 1.0, "method": "Ghost"}, "method"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
  with pytest.raises(ValueError, match=name) as info:
    clipped_grad(_loss, **kwargs)
  value = kwargs[name]
  assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize(
    "unit, mask_shape",
    [("example", (5,)), ("example", (4, 1)), ("user", (5,)), ("user", (5, 2))],
)
def test_mask_shape_mismatch_raises(unit, mask_shape):
  params = _params()
  if unit == "example":
    batch = _batch(4)
  else:
    batch, _ = _user_batch()
  fn = clipped_grad(_loss, l2_clip_norm=1.0, unit=unit)
  with pytest.raises(ValueError, match=r"mask.*" + re.escape(str(mask_shape))):
    fn(params, batch, mask=jnp.ones(mask_shape, bool))
  with pytest.raises(ValueError, match="mask"):  # also under jit
    jax.jit(fn)(params, batch, mask=jnp.ones(mask_shape, bool))


def test_batch_without_common_leading_axes_raises():
  params = _params()
  bad = {"x": jnp.ones((4, 5)), "y": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match="batch"):
    clipped_grad(_loss, l2_clip_norm=1.0)(params, bad)
  with pytest.raises(ValueError, match="batch"):  # user unit needs 2 axes
    clipped_grad(_loss, l2_clip_norm=1.0, unit="user")(params, {"x": jnp.ones((4,))})
  with pytest.raises(ValueError, match="batch"):
    clipped_grad(_loss, l2_clip_norm=1.0)(params, _batch(0))
