"""dpfl.nnx: NNX models through the one clipping path, checked against a per-example loop.

The reference never goes through dpfl: for each example, a clone of the
model whose RNG streams are re-keyed as the module documents
(``fold_in(fold_in(key, count), example_index)``, count 0) gives
``nnx.grad`` of the loss on that example alone; the gradients are clipped
and summed in float64 NumPy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpfl
from dpfl import nnx as dpnnx
from tests.dpfl.clip_reference import assert_sum_close, flat

# Per-example norms of _loss on _batch() span 3.0 .. 6.0: about half are clipped.
CLIP = 4.2


class _DropoutMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(5, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.norm(self.l1(x)))))


def _loss(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _batch(n=6):
  x = np.array(jax.random.normal(jax.random.key(1), (n, 5)))
  x[1] = x[0]  # two equal examples: their dropout masks must still differ
  return {"x": jnp.asarray(x), "y": jnp.arange(n) % 3}


def _rekeyed(model, index):
  """A clone of ``model`` whose every RNG stream is the one example ``index`` gets."""
  clone = nnx.clone(model)
  for _, stream in nnx.iter_graph(clone):
    if isinstance(stream, nnx.RngStream):
      step_key = jax.random.fold_in(stream.key[...], stream.count[...])
      stream.key[...] = jax.random.fold_in(step_key, index)
      stream.count[...] = jnp.zeros_like(stream.count[...])
  return clone


@nnx.jit
def _grad(model, batch):
  return nnx.grad(_loss)(model, batch)


def _reference(model, batch, mask=None):
  n = batch["y"].shape[0]
  grads = []
  for i in range(n):
    if mask is not None and not mask[i]:
      continue
    one = jax.tree.map(lambda a: a[i:i + 1], batch)
    grads.append(flat(_grad(_rekeyed(model, i), one)))
  total, abs_sum, norms = 0.0, 0.0, []
  for g in grads:
    norm = math.sqrt(float(g @ g))
    norms.append(norm)
    contribution = g * min(1.0, CLIP / norm)
    total, abs_sum = total + contribution, abs_sum + np.abs(contribution)
  return total, abs_sum, np.array(norms)


# "auto" (what users get; ghost here) in the default suite, the others slow.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow)
                                    for m in ("materialize", "reweight", "ghost")] + ["auto"])
def test_matches_per_example_loop_with_dropout_under_nnx_jit(method):
  model = _DropoutMLP(nnx.Rngs(0, dropout=1))
  batch, mask = _batch(), jnp.array([1, 1, 1, 1, 0, 1], bool)
  total, abs_sum, norms = _reference(model, batch, np.asarray(mask))
  grad_fn = dpnnx.clipped_grad(_loss, l2_clip_norm=CLIP, method=method)
  count = int(model.drop.rngs.count[...])

  @nnx.jit
  def step(model, batch, mask):
    return grad_fn(model, batch, mask)

  clipped, aux = step(model, batch, mask)
  assert isinstance(clipped, nnx.State)
  assert jax.tree.structure(clipped) == jax.tree.structure(nnx.state(model, nnx.Param))
  assert_sum_close(clipped, total, abs_sum)
  got = np.asarray(aux.grad_norms)[np.asarray(mask)]
  np.testing.assert_allclose(got, norms, rtol=1e-4)
  assert 0 < int(aux.num_clipped) < 5  # the clip bites on some examples, not all
  # Equal examples, independent masks: dropout really is per example.
  assert abs(got[0] - got[1]) > 1e-3 * got[0]
  # One step consumed one key of the stream (nnx.jit wrote the count back).
  assert int(model.drop.rngs.count[...]) == count + 1


@pytest.mark.slow
def test_next_step_draws_fresh_keys():
  model = _DropoutMLP(nnx.Rngs(0, dropout=1))
  batch = _batch()
  grad_fn = nnx.jit(dpnnx.clipped_grad(_loss, l2_clip_norm=CLIP, method="materialize"))
  total, abs_sum, _ = _reference(model, batch)
  first, _ = grad_fn(model, batch)
  assert_sum_close(first, total, abs_sum)
  total2, abs_sum2, _ = _reference(model, batch)  # the stream moved on: new masks
  second, _ = grad_fn(model, batch)
  assert_sum_close(second, total2, abs_sum2)
  assert np.max(np.abs(total2 - total)) > 1e-3


@pytest.mark.slow
def test_user_unit_matches_loop():
  model = _DropoutMLP(nnx.Rngs(3, dropout=4))
  batch = jax.tree.map(lambda a: a.reshape((3, 2) + a.shape[1:]), _batch())
  mask = jnp.array([[1, 1], [1, 0], [0, 0]], bool)
  grad_fn = dpnnx.clipped_grad(_loss, l2_clip_norm=CLIP, unit="user")
  total, abs_sum = 0.0, 0.0
  for u in range(3):
    real = np.flatnonzero(np.asarray(mask[u]))
    if not real.size:
      continue
    # A user's gradient: the mean of its examples', each with its own key
    # (index u * examples_per_user + k).
    g = sum(flat(_grad(_rekeyed(model, 2 * u + k), jax.tree.map(lambda a: a[u, k:k + 1], batch)))
            for k in real)
    g = g / real.size
    contribution = g * min(1.0, CLIP / math.sqrt(float(g @ g)))
    total, abs_sum = total + contribution, abs_sum + np.abs(contribution)
  clipped, aux = nnx.jit(grad_fn)(model, batch, mask)
  assert_sum_close(clipped, total, abs_sum)
  assert int(aux.num_units) == 2


class _BatchNormMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(5, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.l1(x))


class _Counter(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(5, 3, rngs=rngs)
    self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return self.l1(x)


def test_batch_norm_is_refused():
  grad_fn = dpnnx.clipped_grad(_loss, l2_clip_norm=CLIP)
  with pytest.raises(ValueError, match=r"BatchStat at bn\.(mean|var).*LayerNorm"):
    grad_fn(_BatchNormMLP(nnx.Rngs(0)), _batch())
  with pytest.raises(ValueError, match="writes model state"):
    grad_fn(_Counter(nnx.Rngs(0)), _batch())


def _private_args(**extra):
  # RDP and a given max batch: the cheap accounting (PLD's is tested elsewhere).
  return dict(l2_clip_norm=1.0, delta=1e-5, dataset_size=200, batch_size=20, num_steps=3,
              noise_multiplier=2.0, accountant="rdp", max_batch_size=40, **extra)


def test_adaptive_clipping_is_refused_for_nnx():
  with pytest.raises(ValueError, match="l2_clip_norm.*adaptive_clip"):
    dpnnx.make_private(_loss, optax.sgd(0.1),
                       **dict(_private_args(), l2_clip_norm=dpfl.adaptive_clip(initial=1.0)))


@pytest.mark.slow  # the README's NNX diff runs this loop in the default suite
def test_nnx_optimizer_loop_has_the_plan_and_epsilon_of_make_private():
  rng = np.random.default_rng(0)
  train = {"x": rng.normal(size=(200, 5)).astype(np.float32),
           "y": rng.integers(0, 3, 200).astype(np.int32)}
  model = _DropoutMLP(nnx.Rngs(0, dropout=1))
  private = dpnnx.make_private(_loss, optax.adam(1e-2), key=0, seed=0, clip_method="materialize",
                               **_private_args())
  params = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))  # values, not the live variables
  pytree = dpfl.make_private(lambda p, b: 0.0, optax.adam(1e-2), clip_method="materialize",
                             **_private_args())
  assert private.plan == pytree.plan
  optimizer = nnx.Optimizer(model, private.optimizer, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    grads, _ = private.clipped_grad(model, *batch)
    optimizer.update(model, grads)

  for batch in private.batches(train):
    train_step(model, optimizer, batch)
  assert private.steps_done == 3 and private.ledger.num_steps == 3
  assert private.epsilon() == pytree.planned_epsilon() > 0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), nnx.state(model, nnx.Param),
                       params)
  assert max(jax.tree.leaves(moved)) > 0
  with pytest.raises(ValueError, match="takes an NNX model"):  # the pytree step has no model
    private.run.clipped_grad(params, {"x": train["x"][:2], "y": train["y"][:2]})


@pytest.mark.slow
@pytest.mark.parametrize("user", [dict(sampling_unit="example", examples_per_user=2),
                                  dict(sampling_unit="user", local_steps=2,
                                       local_learning_rate=0.1)],
                         ids=["els", "uls-local-steps"])
def test_user_level_runs(user):
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(120, 5)).astype(np.float32),
          "y": rng.integers(0, 3, 120).astype(np.int32)}
  users = dpfl.UserDataset.from_arrays(data, rng.integers(0, 40, 120), examples_per_user=2)
  args = dict(privacy_unit="user", l2_clip_norm=1.0, batch_size=10, num_steps=2,
              noise_multiplier=1.0, delta=1e-5, dataset=users, **user)
  private = dpnnx.make_private(_loss, optax.sgd(0.1), **args)
  model = _DropoutMLP(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, private.optimizer, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch, mask):
    grads, aux = private.clipped_grad(model, batch, mask)
    optimizer.update(model, grads)
    return aux

  for batch, mask in private.batches(users):
    aux = train_step(model, optimizer, batch, mask)
  assert np.all(np.asarray(aux.grad_norms) >= 0)
  assert private.epsilon() == dpfl.make_private(lambda p, b: 0.0, optax.sgd(0.1),
                                                **args).planned_epsilon()


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="l2_clip_norm"):
    dpnnx.clipped_grad(_loss, l2_clip_norm=-1.0)
  with pytest.raises(ValueError, match="method"):
    dpnnx.clipped_grad(_loss, l2_clip_norm=1.0, method="fast")
  assert dpfl.nnx is dpnnx
