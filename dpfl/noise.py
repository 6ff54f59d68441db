"""Gaussian noise for DP-SGD as optax ``GradientTransformation``s.

The transform here is the *release* step of DP-SGD (Abadi et al. 2016,
"Deep Learning with Differential Privacy", Algorithm 1): it takes the sum of
per-unit gradients, each clipped to L2 norm ``l2_clip_norm`` (``C``), adds
``N(0, (noise_multiplier * C)^2 I)`` and divides by the expected batch size.

Why the input is the clipped *sum* and the transform divides. The noise is
calibrated to the sensitivity of the sum (``C``: one unit added or removed
moves the sum by at most ``C``). If the caller averaged first and this
transform noised the average, the two scales would have to be matched by hand
at every call site, which is exactly how jax-privacy issue #383 happened (an
example calibrated noise for the clipped sum and added it to the mean: a
factor-of-B mismatch between the noise added and the noise accounted). Here
the scale is fixed inside one function, so the output always carries noise of
standard deviation ``noise_multiplier * C / expected_batch_size`` around the
input divided by ``expected_batch_size``. Feeding anything whose sensitivity
is at most ``C`` (a clipped sum, or even a clipped mean) is therefore at least
as private as accounted; only inputs with sensitivity above ``C`` (unclipped
or rescaled gradients) can break the guarantee.

Why the *expected* batch size. Under Poisson sampling the realised batch size
is itself a function of the private sample: dividing by it would release it
(and the resulting average has data-dependent sensitivity ``C / |B|``, which
the Gaussian-mechanism analysis does not cover). Dividing by the public
constant ``q * N`` is post-processing of the noisy sum, so it costs no
privacy. This is the "fixed-denominator estimator" of McMahan et al. 2018
("Learning Differentially Private Recurrent Language Models", arXiv
1710.06963, Sec. 3) and what Opacus does with ``expected_batch_size``.

Zero noise. ``noise_multiplier == 0`` is rejected rather than accepted as a
"debug mode": it gives no privacy, and the accountant cannot describe it
(``accounting`` mechanisms require a multiplier > 0), so a run configured
with it by mistake would train fine and report nothing sensible. A
non-private baseline on the same clipped sums is ``optax.scale(1 /
expected_batch_size)``, which says what it is.

Keys. The PRNG key lives in the transform's state as raw ``uint32`` key data
(a plain array: jit, vmap and checkpoint friendly). Every update splits it,
uses one half for this step's noise and keeps the other, so no two steps share
noise. By default the key comes from OS entropy when ``init`` runs; an
explicit ``key`` gives reproducible runs. An int key keeps every bit (JAX's
``jax.random.key(int)`` keeps 32 without x64; see ``dpfl._rng.key_data``).
After restoring a checkpoint call ``reseed``: see its docstring.

Replicas never share a key. Two states with one key release updates whose
difference cancels the noise, so every execution of ``init`` hands out its
own key (``dpfl._rng.init_keys``): ``jax.vmap(tx.init)(stacked_params)``
gives every replica its own, and so do ``lax.map`` / ``lax.scan`` over
``init``; an explicit key reproduces the same sequence of keys in every run
(the first ``init`` gets the key itself). ``update`` vmapped over updates
with a state that is not batched raises a ``ValueError``: every replica
would add the same noise. Not detectable: one state copied (e.g.
``jnp.stack``-ed or broadcast) into several replicas after ``init``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from accounting import validate as check
from dpfl import _rng

# Folded into re-seeded keys: reseeding with key 0 (all-zero key data, the
# identity of the XOR mix) must still move off the checkpointed key.
_RESEED_DOMAIN = 0x5EED


class GaussianNoiseState(NamedTuple):
  """State of ``gaussian_noise``.

  Attributes:
    key: raw ``uint32`` PRNG key data for the *next* step's noise.
    count: number of noisy updates released so far (int32 scalar).
  """

  key: jax.Array
  count: jax.Array


# State types whose ``key`` field ``reseed`` refreshes. Other dpfl noise
# transforms (e.g. correlated noise) add theirs with ``register_noise_state``.
_NOISE_STATE_TYPES: tuple[type, ...] = (GaussianNoiseState,)


def register_noise_state(state_type: type) -> type:
  """Marks a NamedTuple state type with a ``key`` field for ``reseed``.

  Usable as a class decorator by other noise transforms.

  Args:
    state_type: a NamedTuple class with a ``key`` field holding raw key data.

  Returns:
    ``state_type`` unchanged.
  """
  global _NOISE_STATE_TYPES
  if "key" not in getattr(state_type, "_fields", ()):
    raise ValueError(f"state_type must be a NamedTuple with a 'key' field, got {state_type!r}")
  if state_type not in _NOISE_STATE_TYPES:
    _NOISE_STATE_TYPES = _NOISE_STATE_TYPES + (state_type,)
  return state_type


def check_noise_multiplier(value) -> float:
  """A DP noise multiplier: > 0 (zero noise is refused with advice), finite, bounded."""
  if check.real("noise_multiplier", value) == 0:
    # Zero noise is no privacy; the accountant cannot describe it either
    # (accounting.PoissonDpSgd rejects it). A non-private baseline should say
    # so in code rather than pass a number that looks like a DP setting.
    raise ValueError(
        f"noise_multiplier must be a finite number > 0, got {value!r}: zero noise gives no "
        "privacy. For a non-private baseline on the same clipped sums use "
        "optax.scale(1 / expected_batch_size) instead of gaussian_noise.")
  return check.noise_multiplier("noise_multiplier", value)


# Noise is drawn and added in float32 (or wider): its scale, and the division
# by the batch size, must be normal float32 numbers, or every update is ±inf
# (scale overflows), exactly noise-free (scale 0), or NaN.
_FLOAT32 = np.finfo(np.float32)


def check_noise_scale(*, stddev: float, expected_batch_size: float, names: str) -> None:
  """Refuses noise scales that are not normal float32 numbers (see above)."""
  lo, hi = float(_FLOAT32.tiny), float(_FLOAT32.max)
  for what, value in ((f"{names} (the noise standard deviation)", stddev),
                      (f"({names}) / expected_batch_size (the noise scale of the update)",
                       stddev / expected_batch_size),
                      ("expected_batch_size", expected_batch_size),
                      ("1 / expected_batch_size", 1 / expected_batch_size)):
    if not (math.isfinite(value) and lo <= value <= hi):
      raise ValueError(f"{what} must be in [{lo:g}, {hi:g}] (normal float32, the precision "
                       f"noise is drawn in), got {value!r}")


def check_float_leaves(updates) -> None:
  """Refuses updates with a non-floating leaf, naming its path."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(
          f"updates must have real floating-point leaves; the leaf at "
          f"{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}")


def gaussian_noise(*, noise_multiplier: float, l2_clip_norm: float,
                   expected_batch_size: float,
                   key: Any = None) -> optax.GradientTransformation:
  """Adds Gaussian noise to a clipped gradient sum and averages it (DP-SGD).

  ``update(clipped_sum, state)`` returns, leaf by leaf,
  ``(clipped_sum + N(0, (noise_multiplier * l2_clip_norm)^2 I)) / expected_batch_size``
  with independent noise for every leaf and every step. Put it first in an
  ``optax.chain``, directly on the output of ``dpfl.clipped_grad``, e.g.
  ``optax.chain(gaussian_noise(...), optax.adam(1e-3))``.

  Privacy guarantee: if every privacy unit (example or user) changes
  ``clipped_sum`` by a vector of L2 norm at most ``l2_clip_norm`` (true for
  the output of ``dpfl.clipped_grad`` with that clip norm), each update is the
  Gaussian mechanism with noise multiplier ``noise_multiplier`` (sensitivity
  ``C``, noise standard deviation ``noise_multiplier * C``) followed by
  post-processing. Its ε depends on how batches were sampled: use the
  sampler's ``mechanism(...)`` description with ``accounting``.

  Noise is drawn in ``float32`` (or the leaf's dtype if wider), added in that
  precision and the result cast back to the leaf's dtype, so bf16/fp16 updates
  are not noised with low-precision samples.

  Args:
    noise_multiplier: ratio of the noise standard deviation to the clip norm;
      finite and > 0 (0 is rejected; see "Zero noise" in the
      module docstring).
    l2_clip_norm: the clip norm ``C`` the input sum was clipped with; > 0.
    expected_batch_size: the public normaliser, ``sampling_prob *
      dataset_size`` for Poisson sampling or the fixed batch size; > 0. Never
      the realised batch size, which would leak the sample size.
    key: None (default: fresh OS entropy each time ``init`` runs, so two
      transforms or two runs never share noise), or an ``int`` seed >= 0 (all
      of its bits are used) / ``jax.random.key`` for reproducible noise: the
      first ``init`` uses this key, each later one (another call, vmapped
      replica or scan iteration) ``jax.random.fold_in(key, n)``. In
      multi-process training all processes must hold the same key: pass one
      explicitly (e.g. ``dpfl.shared_secret_seed()``).

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    ``GaussianNoiseState``.
  """
  noise_multiplier = check_noise_multiplier(noise_multiplier)
  l2_clip_norm = check.positive("l2_clip_norm", l2_clip_norm)
  expected_batch_size = check.positive("expected_batch_size", expected_batch_size)
  check_noise_scale(stddev=noise_multiplier * l2_clip_norm,
                     expected_batch_size=expected_batch_size,
                     names="noise_multiplier * l2_clip_norm")
  draw_key = _rng.init_keys(key)
  stddev = noise_multiplier * l2_clip_norm

  def init_fn(params):
    return GaussianNoiseState(key=draw_key(params), count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    check_float_leaves(updates)
    leaves, treedef = jax.tree.flatten(updates)
    key = _rng.unshared_key(jnp.asarray(state.key), updates)
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(key))
    leaf_keys = jax.random.split(step_key, max(len(leaves), 1))
    noisy = []
    for leaf, leaf_key in zip(leaves, leaf_keys):
      leaf = jnp.asarray(leaf)
      dtype = jnp.promote_types(leaf.dtype, jnp.float32)
      noise = stddev * _rng.normal(leaf_key, leaf.shape, dtype)  # == jax.random.normal
      noisy.append(((leaf.astype(dtype) + noise) / expected_batch_size).astype(leaf.dtype))
    new_state = GaussianNoiseState(key=jax.random.key_data(next_key),
                                   count=optax.safe_increment(state.count))
    return jax.tree.unflatten(treedef, noisy), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def reseed(opt_state: Any, *, key: Any = None) -> Any:
  """Replaces the key of every dpfl noise state in an optax state.

  Why: a checkpoint stores the key that the *next* step will use. A run that
  crashed after the checkpoint had already released noisy updates drawn from
  that key; resuming from the checkpoint with the same key would draw the very
  same noise again for different gradients, and the difference of two such
  releases cancels the noise (no privacy for those steps). Call
  ``opt_state = reseed(restored_opt_state)`` right after restoring.

  Walks any optax state (``chain`` tuples, ``inject_hyperparams``,
  ``multi_transform``, ...) and replaces each ``GaussianNoiseState`` (and
  each type registered with ``register_noise_state``) key; counts are kept.

  Privacy guarantee: with ``key=None`` each new key is fresh OS entropy, so
  the resumed run's noise is independent of everything drawn before. With an
  explicit ``key`` the new key is a deterministic mix of the old key and
  ``key``: reproducible, and fresh only if ``key`` differs between resumes
  (use e.g. the restart count).

  Args:
    opt_state: an optax state containing at least one dpfl noise state.
    key: None (OS entropy; under ``jax.vmap`` a fresh key per replica) or
      an ``int`` >= 0 (every bit used) / ``jax.random.key`` to fold in.

  Returns:
    ``opt_state`` with new keys (the input is not modified).

  Raises:
    ValueError: if ``opt_state`` holds no dpfl noise state (e.g. it was
      restored as plain dicts), since silently doing nothing would re-use noise.
  """
  extra = None if key is None else _rng.key_data(key)
  found = 0

  def replace(node):
    nonlocal found
    if not isinstance(node, _NOISE_STATE_TYPES):
      return node
    found += 1
    if extra is None:
      # Probed with the old key: under vmap every replica draws its own.
      new_key = _rng.fresh_key_data(like=node.key)
    else:
      mixed = jnp.bitwise_xor(jnp.asarray(node.key, jnp.uint32), extra)
      new_key = jax.random.key_data(
          jax.random.fold_in(jax.random.wrap_key_data(mixed), _RESEED_DOMAIN))
    return node._replace(key=new_key)

  out = jax.tree.map(replace, opt_state, is_leaf=lambda x: isinstance(x, _NOISE_STATE_TYPES))
  if not found:
    raise ValueError(
        "opt_state must contain a dpfl noise state (GaussianNoiseState) to reseed; "
        f"found none in {type(opt_state).__name__}. If it was restored from a "
        "checkpoint, restore it with the optimizer's init(params) as the target.")
  return out
