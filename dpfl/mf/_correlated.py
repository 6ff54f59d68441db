"""The machinery the correlated-noise transforms of ``dpfl.mf.streaming`` share.

``CorrelatedNoiseState`` (a checkpointable pytree), argument checks, and
``_correlated_transform``: the optax transform that splits the key exactly as
``dpfl.noise.gaussian_noise`` does, draws ``z_t`` per leaf, lets a strategy's
step kernel turn it into ``(C^{-1} z)_t`` and its new buffers, and scales and
adds the result. The public transforms and their documentation live in
``dpfl.mf.streaming``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from accounting import validate as check
from dpfl import _rng
from dpfl import noise as _noise


class CorrelatedNoiseState(NamedTuple):
  """State of the correlated-noise transforms (a pytree of arrays).

  Attributes:
    key: raw ``uint32`` PRNG key data for the *next* step's noise.
    count: number of noisy updates released so far (int32 scalar).
    buffers: a tuple of pytrees shaped like the updates (float32, or the
      leaf's dtype if wider): ``m`` for BLT, ``num_bands - 1`` for banded,
      none for identity and dense.
    step_keys: ``dense_noise`` only: ``[n, *key_shape]`` raw key data of every
      step's noise so far (zeros for future steps), so past ``z_s`` can be
      regenerated; ``[0, *key_shape]`` for the other strategies.
  """

  key: jax.Array
  count: jax.Array
  buffers: tuple[Any, ...]
  step_keys: jax.Array


_noise.register_noise_state(CorrelatedNoiseState)


# --- argument checks -----------------------------------------------------------


def _check_num_steps(name: str, value) -> int:
  return check.positive_int(name, value)


def _as_float_array(name: str, value, ndim: int) -> np.ndarray:
  try:
    arr = np.array(value, dtype=np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be a real {ndim}-D array, got {value!r}") from err
  if arr.ndim != ndim:
    raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite, got {arr!r}")
  return arr


def _check_blt(buffer_decay, output_scale) -> tuple[np.ndarray, np.ndarray]:
  theta = _as_float_array("buffer_decay", buffer_decay, 1)
  omega = _as_float_array("output_scale", output_scale, 1)
  if theta.size < 1:
    raise ValueError("buffer_decay must hold at least one buffer's decay, got shape (0,)")
  if omega.shape != theta.shape:
    raise ValueError(f"output_scale must have the shape of buffer_decay {theta.shape}, "
                     f"got {omega.shape}")
  if not np.all((theta > 0) & (theta < 1)):
    raise ValueError(f"buffer_decay must lie in (0, 1), got {theta.tolist()}")
  return theta, omega


def _check_lower_triangular(name: str, matrix) -> np.ndarray:
  """A finite, square, lower-triangular matrix with a nonzero diagonal."""
  arr = _as_float_array(name, matrix, 2)
  n = arr.shape[0]
  if arr.shape != (n, n) or n < 1:
    raise ValueError(f"{name} must be a square n x n matrix with n >= 1, got shape {arr.shape}")
  # Exactly zero above the diagonal: the stream solves the lower triangle only,
  # so any mass above it would make the noise differ from the accounted C^{-1} z.
  upper = np.argwhere(np.triu(arr, 1) != 0)
  if upper.size:
    i, j = upper[0]
    raise ValueError(f"{name} must be lower-triangular; entry [{i}, {j}] above the "
                     f"diagonal is {arr[i, j]!r}")
  zero_diag = np.flatnonzero(np.diag(arr) == 0)
  if zero_diag.size:
    i = zero_diag[0]
    raise ValueError(f"{name} must be invertible (nonzero diagonal); entry [{i}, {i}] is 0")
  return arr


def _lower_bandwidth(matrix: np.ndarray) -> int:
  """Smallest b with matrix[i, j] == 0 whenever i - j >= b."""
  rows, cols = np.nonzero(matrix)
  return int(np.max(rows - cols)) + 1 if rows.size else 1


def _concrete_int(value) -> int | None:
  """``int(value)`` outside of tracing, None for a tracer (inside jit/vmap)."""
  if isinstance(value, jax.core.Tracer):
    return None
  return int(value)


# --- the shared transform ---------------------------------------------------------


def _noise_dtype(leaf) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def _materialize(xs: list, valid: jax.Array) -> list:
  """``xs`` written to memory once; NaN when ``valid`` is False (past step n).

  Why a ``cond``: each of ``x``'s consumers (m buffer updates, the output) is
  a separate loop, and XLA fuses the cheap sum ``z - sum_i omega_i s_i`` into
  every one of them, re-reading all m buffers m + 1 times; on CPU it ignores
  ``optimization_barrier`` for this. A conditional's result must be stored, so
  ``x`` is computed once (with the draw of ``z`` fused in) and read back.
  """
  return jax.lax.cond(valid, lambda xs: xs,
                      lambda xs: [jnp.full_like(x, jnp.nan) for x in xs], xs)


# A step kernel maps (step index t, whether t < n, this step's z for every leaf,
# the buffers of every leaf, the state's step_keys) to (x = (C^{-1} z)_t per
# leaf, new buffers per leaf).
_Kernel = Callable[[jax.Array, jax.Array, list, list, jax.Array], tuple[list, list]]


def _correlated_transform(*, num_steps: int, num_buffers: int, kernel: _Kernel,
                          noise_multiplier: float, l2_clip_norm: float, sensitivity: float,
                          expected_batch_size: float, key: Any,
                          store_step_keys: bool = False) -> optax.GradientTransformation:
  noise_multiplier = _noise.check_noise_multiplier(noise_multiplier)
  l2_clip_norm = check.positive("l2_clip_norm", l2_clip_norm)
  sensitivity = check.positive("sensitivity", sensitivity)
  expected_batch_size = check.positive("expected_batch_size", expected_batch_size)
  _noise.check_noise_scale(stddev=noise_multiplier * l2_clip_norm * sensitivity,
                            expected_batch_size=expected_batch_size,
                            names="noise_multiplier * l2_clip_norm * sensitivity")
  draw_key = _rng.init_keys(key)
  stddev = noise_multiplier * l2_clip_norm * sensitivity
  key_shape = _rng._key_data_shape()

  def init_fn(params):
    key_data = draw_key(params)
    zeros = lambda p: jnp.zeros(jnp.shape(p), _noise_dtype(p))
    buffers = tuple(jax.tree.map(zeros, params) for _ in range(num_buffers))
    step_keys = jnp.zeros(((num_steps if store_step_keys else 0),) + key_shape, jnp.uint32)
    return CorrelatedNoiseState(key=key_data, count=jnp.zeros([], jnp.int32),
                                buffers=buffers, step_keys=step_keys)

  def update_fn(updates, state, params=None):
    del params
    _noise.check_float_leaves(updates)
    count = _concrete_int(state.count)
    if count is not None and count >= num_steps:
      raise ValueError(
          f"this correlated-noise transform was built for num_steps={num_steps} steps and "
          f"its state is at step {count}; the matrix mechanism (and its accounting) does not "
          "extend past its last step. Build a new transform (and account a new mechanism).")
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    # Split exactly as gaussian_noise does, so z_t is the noise it would draw.
    key = _rng.unshared_key(jnp.asarray(state.key), updates)
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(key))
    leaf_keys = jax.random.split(step_key, max(len(leaves), 1))
    z = [_rng.normal(k, leaf.shape, _noise_dtype(leaf)) for k, leaf in zip(leaf_keys, leaves)]
    # Past the planned steps the tables are indexed at n - 1 (no out-of-bounds
    # reads) and the output is NaN.
    t = jnp.minimum(state.count, num_steps - 1)
    step_keys = state.step_keys
    if store_step_keys:
      step_keys = jax.lax.dynamic_update_index_in_dim(
          step_keys, jax.random.key_data(step_key), t, axis=0)
    buffers = [treedef.flatten_up_to(b) for b in state.buffers]
    per_leaf_buffers = [[b[j] for b in buffers] for j in range(len(leaves))]
    valid = state.count < num_steps
    x, new_per_leaf = kernel(t, valid, z, per_leaf_buffers, step_keys)
    out = []
    for leaf, x_leaf in zip(leaves, x):
      dtype = _noise_dtype(leaf)
      noisy = (leaf.astype(dtype) + stddev * x_leaf) / expected_batch_size
      out.append(jnp.where(valid, noisy, jnp.nan).astype(leaf.dtype))
    new_buffers = tuple(
        jax.tree.unflatten(treedef, [new_per_leaf[j][i] for j in range(len(leaves))])
        for i in range(num_buffers))
    new_state = CorrelatedNoiseState(key=jax.random.key_data(next_key),
                                     count=optax.safe_increment(state.count),
                                     buffers=new_buffers, step_keys=step_keys)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


_SHARED_ARGS_DOC = """
    noise_multiplier: ``sigma``, the ratio of the noise standard deviation to
      the sensitivity ``sens(C) * l2_clip_norm`` of ``C G``; finite and > 0.
    l2_clip_norm: the clip norm ``C_clip`` the input sums were clipped with; > 0.
    sensitivity: ``sens(C)``, the largest L2 norm of ``C u`` over the
      participation patterns ``u`` one privacy unit may have (in units of the
      clip norm; e.g. ``strategy.sensitivity`` from ``dpfl.mf``); > 0.
    expected_batch_size: the public normaliser (``sampling_prob * N``, or the
      fixed batch size, or the number of users per round); > 0.
    key: None (OS entropy each time ``init`` runs), or an ``int`` seed >= 0
      (every bit used) / ``jax.random.key`` for reproducible noise: the first
      ``init`` uses this key, each later one (another call, vmapped replica
      or scan iteration) ``jax.random.fold_in(key, n)``, as in
      ``dpfl.noise.gaussian_noise``. Multi-process training must pass the
      same explicit key on every process.
"""

_GUARANTEE_DOC = """
  Privacy guarantee: if every privacy unit changes each step's clipped sum by a
  vector of L2 norm at most ``l2_clip_norm``, and takes part in the steps of
  one of the participation patterns ``sensitivity`` was computed for, then the
  ``n`` outputs are post-processing of ``C G + s Z`` with
  ``s = noise_multiplier * l2_clip_norm * sensitivity``: ONE Gaussian mechanism
  whose sensitivity is ``sensitivity * l2_clip_norm``, i.e. with noise
  multiplier ``noise_multiplier``, also when gradients are chosen adaptively
  (``C`` lower-triangular; Denisov et al. 2022, arXiv 2202.08312). Account it with
  ``accounting.MatrixMechanism(noise_multiplier, sensitivity, planned_steps=n,
  ...)``.
"""


def _docstring(fn):
  """Fills the ``{shared_args}`` and ``{guarantee}`` blocks of a docstring."""
  fn.__doc__ = fn.__doc__.replace("{shared_args}", _SHARED_ARGS_DOC.strip("\n")).replace(
      "{guarantee}", _GUARANTEE_DOC.strip())
  return fn
