"""Clipping methods: ways to compute a clipped sum of per-unit updates.

:mod:`dpfl.clipping` validates arguments, documents the guarantee and picks
the method; the methods here compute, for a block of units (examples or
users), the same mathematical quantity

    sum_i  w_i * u_i,   u_i = unit i's update,
    w_i = min(1, C / ||u_i||)  if unit i is unmasked and ||u_i|| is finite,
          0                    otherwise,

accumulated in float32 (or wider), plus the per-unit statistics (update
norm, loss value, aux). A unit is described by two functions of
``(params, unit_batch, unit_mask)``: ``unit_update -> (update, value, aux)``
(any per-unit update: a gradient, or DP-FedAvg's θ − θ_u after local steps)
and, when the update is the gradient of a loss, ``unit_loss -> (loss,
aux)``. The methods differ only in how they get there:

* ``materialize``: vmap the per-unit update, so the ``[units, params]``
  updates exist in memory, then take norms and a weighted sum (``einsum``).
  The bound ``||w_i u_i|| <= C`` holds by construction, since the norm and
  the sum use the very same vector. Works for any update. Cheap when a
  unit's gradient costs much compute per parameter (sequence models: a
  unit's weight gradient is a real matrix product over its tokens).
* ``reweight``: for gradients of a loss only. Two passes. Pass 1 computes
  only the per-unit norms (the per-unit gradients are produced and reduced
  chunk by chunk and never leave cache; XLA often fuses the reduction into
  the outer product of dense layers). Pass 2 is one ordinary backward pass
  of the weighted loss ``sum_i stop_gradient(w_i) * loss_i``, whose gradient
  is ``sum_i w_i g_i`` by linearity. No ``[units, params]`` tensor; one extra
  forward+backward. Cheap when a unit's gradient is mostly memory traffic
  (an MLP on single examples). The bound holds up to floating-point
  differences between the two evaluations of ``g_i`` (same function, same
  inputs). An update that is not the gradient of a loss (θ − θ_u after
  several local steps is a nonlinear function of the whole local
  trajectory) has no weighted loss to back-propagate: ``reweight`` does not
  apply to it.

* ``ghost``: for gradients of a loss only; see :mod:`dpfl.ghost`. One
  forward pass and one backward pass with respect to the activations record,
  at every place a parameter meets data, the input and the output
  cotangent; per-unit norms come from those (Gram forms, no per-unit
  gradient for dense, attention, embedding and conv layers), and the
  clipped sum from the same records with cotangents scaled by the clip
  weights. About the cost of one plain step, whatever the model.

``auto`` chooses from a static cost model, see :mod:`dpfl.clip_cost`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dpfl import explicit_sharding, ghost

PyTree = Any
# unit_loss(params, unit_batch, unit_mask) -> (loss scalar, aux).
UnitLoss = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree]]
# unit_update(params, unit_batch, unit_mask) -> (update pytree, value, aux).
UnitUpdate = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array, PyTree]]

METHODS = ("auto", "materialize", "reweight", "ghost")

# Per-unit gradients are produced in chunks of about this many bytes. On
# CPU a chunk then stays in the last-level cache instead of streaming
# through DRAM and the page allocator (measured on a 2-core CPU with 32 MiB
# L3: chunks of 4-8 units are 3-10x faster than one vmap over 256 MLP
# examples, and ~1.3x faster on the transformer benchmark). Accelerators
# want wide vmaps instead, and have the memory bandwidth for them.
CPU_CHUNK_BYTES = 32 * 2**20
ACCELERATOR_CHUNK_BYTES = 2 * 2**30


def chunk_bytes() -> int:
  if jax.default_backend() == "cpu":
    return CPU_CHUNK_BYTES
  return ACCELERATOR_CHUNK_BYTES

def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32 for half precision, the parameter's own dtype if wider."""
  return jnp.promote_types(dtype, jnp.float32)


def zeros_accumulator(params: PyTree) -> PyTree:
  # zeros_like keeps a parameter's (Explicit) sharding, so that a scan over
  # microbatches carries the sum sharded as the parameters are.
  return jax.tree.map(
      lambda p: jnp.zeros_like(p, accumulation_dtype(jnp.result_type(p))),
      params,
  )


def has_half_precision(params: PyTree) -> bool:
  """Whether any floating parameter leaf is narrower than float32."""
  for p in jax.tree.leaves(params):
    dtype = jnp.result_type(p)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      return True
  return False


def num_parameters(params: PyTree) -> int:
  return sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(params))


def chunk_size(params: PyTree, num_units: int) -> int:
  """Units per chunk so that one chunk's gradients take ~chunk_bytes().

  Prefers a divisor of ``num_units`` (within a factor 2 below the target),
  which avoids a separately compiled remainder chunk.
  """
  bytes_per_unit = 4 * max(1, num_parameters(params))
  target = int(min(num_units, max(1, chunk_bytes() // bytes_per_unit)))
  for size in range(target, max(1, target // 2) - 1, -1):
    if num_units % size == 0:
      return size
  return target


def _leading(tree: PyTree) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def map_reduce(
    fn: Callable[[PyTree], tuple[PyTree, PyTree]],
    xs: PyTree,
    block: int | None,
    acc0: PyTree,
) -> tuple[PyTree, PyTree]:
  """Applies ``fn`` to blocks of ``xs``' leading axis, one block at a time.

  ``fn(block) -> (summed, per_unit)``; the ``summed`` outputs are added up
  across blocks, the ``per_unit`` outputs concatenated. Blocks run
  sequentially under ``lax.scan``, so at most one block's intermediates are
  live: this is what bounds peak memory for microbatching. A final partial
  block (when ``block`` does not divide the size) is processed by one more
  call of ``fn`` on the remainder rather than padded: no wasted compute.

  Blocks are strided, not contiguous: with ``m = n // block`` blocks, block
  ``j`` holds units ``j, j + m, j + 2m, ...``. When the unit axis is sharded
  over devices (contiguous ranges per device), every block then has units
  on every device, so each sequential step stays data-parallel instead of
  running one device's range at a time. Reading a block is a strided
  slice: the batch is never copied as a whole.
  """
  n = _leading(xs)
  if block is None or block >= n:
    return fn(xs)
  num_blocks, remainder = divmod(n, block)
  head = jax.tree.map(
      lambda x: x[: num_blocks * block].reshape(
          (block, num_blocks) + x.shape[1:]
      ),
      xs,
  )

  def body(acc, j):
    blk = jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False),
        head,
    )
    summed, per_unit = fn(blk)
    return jax.tree.map(jnp.add, acc, summed), per_unit

  total, per_unit = jax.lax.scan(body, acc0, jnp.arange(num_blocks))
  # per_unit[j, i] belongs to unit i * num_blocks + j.
  per_unit = jax.tree.map(
      lambda x: jnp.swapaxes(x, 0, 1).reshape((num_blocks * block,) + x.shape[2:]),
      per_unit,
  )
  if remainder:
    tail = jax.tree.map(lambda x: x[num_blocks * block :], xs)
    tail_sum, tail_per_unit = fn(tail)
    total = jax.tree.map(jnp.add, total, tail_sum)
    per_unit = jax.tree.map(
        lambda a, b: jnp.concatenate([a, b]), per_unit, tail_per_unit
    )
  return total, per_unit


def per_unit_norms(grads: PyTree) -> jax.Array:
  """Global L2 norm of each unit's gradient (leading axis), in float32+."""
  leaves = jax.tree.leaves(grads)
  # A reduction over the non-unit axes, not a reshape to [units, -1]: a
  # parameter axis sharded over a mesh stays sharded, each device sums its
  # shard and one all-reduce of [units] squared norms adds them up (a reshape
  # would merge a sharded axis, i.e. gather the per-unit gradients).
  sq = [
      jnp.sum(
          jnp.square(g.astype(accumulation_dtype(g.dtype))),
          axis=tuple(range(1, g.ndim)),
      )
      for g in leaves
  ]
  return jnp.sqrt(sum(sq[1:], sq[0]))


def global_norm(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  sq = [jnp.sum(jnp.square(g.astype(accumulation_dtype(g.dtype)))) for g in leaves]
  return jnp.sqrt(sum(sq[1:], sq[0]))


def _expand(v: jax.Array, like: jax.Array) -> jax.Array:
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def one_unit(units: PyTree) -> PyTree:
  """Shapes and dtypes of one unit (the leading unit axis dropped)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), units
  )


def ghost_analysis(unit_loss: UnitLoss, params: PyTree, units: PyTree):
  """``dpfl.ghost.analyze`` of ``unit_loss`` for one unit of ``units``."""
  one_batch, one_mask = one_unit(units)
  return ghost.analyze(unit_loss, params, one_batch, one_mask)


def _select_unit(x: jax.Array, one_hot: jax.Array) -> jax.Array:
  """x[argmax(one_hot)] by a masked reduction, not a gather.

  When the unit axis is sharded, an index gather would all-gather the whole
  batch; this reduction moves one unit. Selecting (not multiplying by 0/1)
  keeps NaN/Inf in other units out of the result.
  """
  picked = jnp.where(_expand(one_hot, x), x, jnp.zeros((), x.dtype))
  if x.dtype == jnp.bool_:
    return jnp.any(picked, axis=0)
  return jnp.sum(picked, axis=0, dtype=x.dtype)


def _is_key(x: jax.Array) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _take_valid_or_donor(x: jax.Array, valid: jax.Array, donor: jax.Array) -> jax.Array:
  """x where ``valid``, else the donor unit's x (see ``_reweight_block``)."""
  if _is_key(x):
    # Typed PRNG keys (e.g. per-example dropout keys) have no zero and no
    # sum: select on their raw bits and wrap them back into keys.
    data = _take_valid_or_donor(jax.random.key_data(x), valid, donor)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jnp.where(_expand(valid, x), x, _select_unit(x, donor))


def clip_weights(
    norms: jax.Array, included: jax.Array, l2_clip_norm: float
) -> jax.Array:
  """min(1, C/||g||) for included finite units, exactly 0 otherwise.

  A zero norm gives C/0 = inf and weight 1; a non-finite norm gives weight
  0 through the select (never through multiplication by a NaN). ``C`` may
  be a traced runtime value (adaptive clipping, a schedule): one that is not
  a finite number > 0 gives every unit weight 0 (the sum is 0, within any
  sensitivity), never a negative or NaN weight.
  """
  ok = included & jnp.isfinite(norms)
  if not isinstance(l2_clip_norm, (int, float)):
    ok = ok & jnp.isfinite(l2_clip_norm) & (l2_clip_norm > 0)
  safe_norms = jnp.where(ok, norms, 1.0)
  return jnp.where(ok, jnp.minimum(1.0, l2_clip_norm / safe_norms), 0.0)


def unit_map(
    fn: Callable[..., Any],
    xs: tuple,
    finite: Callable[[Any], jax.Array],
    *,
    isolate: bool = True,
) -> Any:
  """``vmap(fn)(*xs)``, recomputed one unit at a time if a unit is non-finite.

  A non-finite unit (NaN/Inf data, an overflowing gradient) is dropped by
  its weight, but that only bounds the sum if it never changed another
  unit's result. JAX's batching rules do not promise that: under ``vmap``
  the kernel gradient of a grouped convolution (``feature_group_count >
  1``, jax 0.10.2) spreads one unit's NaN to every unit of the batch, so
  one bad unit would zero its whole chunk, and removing it would change the
  sum by up to the chunk's size times C. So whenever ``finite(result)``
  (``[units]`` bool) is not all true, the block is recomputed with
  ``lax.map``, where each unit is its own computation. Costs nothing
  otherwise (the other branch of a ``cond``), but its compilation: so
  callers pass ``isolate=False`` when the unit function holds no grouped
  convolution (``dpfl.ghost.has_grouped_conv``), and get ``vmap`` alone.
  """
  out = jax.vmap(fn)(*xs)
  if not isolate:
    return out

  def one_at_a_time():
    # lax.map scans the unit axis, which must not be sharded over an
    # Explicit mesh: gather it (this branch only runs when a unit is bad),
    # then give the results the batched branch's shardings.
    seq = jax.lax.map(lambda x: fn(*x), jax.tree.map(explicit_sharding.units_unsharded, xs))
    return jax.tree.map(explicit_sharding.like, seq, out)

  return jax.lax.cond(jnp.all(finite(out)), lambda: out, one_at_a_time)


def gradient_update(unit_loss: UnitLoss) -> UnitUpdate:
  """The unit update that is the gradient of ``unit_loss``."""

  def update(params, unit_batch, unit_mask):
    (value, aux), grad = jax.value_and_grad(unit_loss, has_aux=True)(
        params, unit_batch, unit_mask
    )
    return grad, value, aux

  return update


def _materialize_block(
    unit_update: UnitUpdate,
    l2_clip_norm: float,
    params: PyTree,
    units: PyTree,
    included: jax.Array,
    isolate: bool = True,
) -> tuple[PyTree, PyTree]:
  updates, values, aux = unit_map(
      lambda b, m: unit_update(params, b, m),
      tuple(units),
      lambda out: jnp.isfinite(per_unit_norms(out[0])),
      isolate=isolate,
  )
  norms = per_unit_norms(updates)
  weights = clip_weights(norms, included, l2_clip_norm)
  finite = jnp.isfinite(norms)

  def weighted_sum(zero_nonfinite: bool) -> PyTree:
    def leaf(g):
      g = g.astype(accumulation_dtype(g.dtype))
      if zero_nonfinite:
        # 0 * NaN is NaN: drop non-finite units by select, not by weight.
        g = jnp.where(_expand(finite, g), g, 0.0)
      return jnp.einsum(
          "b,b...->...",
          weights.astype(g.dtype),
          g,
          # Under an Explicit mesh a contraction over the sharded unit
          # axis names its output: the parameters' sharding, g's other axes.
          out_sharding=explicit_sharding.of_dims(g, range(1, g.ndim)),
      )

    return jax.tree.map(leaf, updates)

  # The select costs one more pass over the [units, params] updates, so
  # it only runs when some unit actually is non-finite.
  summed = jax.lax.cond(
      jnp.all(finite),
      lambda: weighted_sum(False),
      lambda: weighted_sum(True),
  )
  return summed, (norms, values, aux)


def _reweight_block(
    unit_loss: UnitLoss,
    l2_clip_norm: float,
    params: PyTree,
    units: PyTree,
    included: jax.Array,
    isolate: bool = True,
) -> tuple[PyTree, PyTree]:
  n = _leading(units)

  # Pass 1: per-unit norms, a cache-sized chunk at a time; the gradients
  # themselves are dead after the reduction.
  def stats(unit_batch, unit_mask):
    grad, value, aux = gradient_update(unit_loss)(params, unit_batch, unit_mask)
    return global_norm(grad), value, aux

  _, (norms, values, aux) = map_reduce(
      lambda blk: ((), unit_map(stats, tuple(blk), lambda out: jnp.isfinite(out[0]),
                                isolate=isolate)),
      units,
      chunk_size(params, n),
      (),
  )
  weights = jax.lax.stop_gradient(clip_weights(norms, included, l2_clip_norm))

  # Pass 2: one backward pass of sum_i w_i * loss_i. A unit with weight 0
  # (padding, or non-finite) still runs through the batched backward pass,
  # where 0 * NaN would poison the shared parameter gradient; so its data
  # is replaced by that of a unit known to be finite, which then
  # contributes exactly 0 * (finite) = 0.
  valid = weights > 0
  any_valid = jnp.any(valid)
  donor = jnp.arange(n) == jnp.argmax(valid)
  safe_units = jax.tree.map(lambda x: _take_valid_or_donor(x, valid, donor), units)

  def weighted_loss(p):
    losses, _ = jax.vmap(unit_loss, (None, 0, 0))(p, *safe_units)
    return jnp.sum(weights * losses.astype(weights.dtype))

  summed = jax.grad(weighted_loss)(params)
  # If no unit is valid, the donor is itself invalid: return exact zeros.
  summed = jax.tree.map(
      lambda g: jnp.where(any_valid, g.astype(accumulation_dtype(g.dtype)), 0),
      summed,
  )
  return summed, (norms, values, aux)


def clipped_sum(
    method: str,
    unit_fn: UnitUpdate | UnitLoss,
    l2_clip_norm: float,
    params: PyTree,
    units: PyTree,
    included: jax.Array,
    microbatch_size: int | None,
) -> tuple[PyTree, PyTree]:
  """Clipped sum of the units' updates by ``method``, block by block.

  ``units`` is ``(unit_batches, unit_masks)`` with a leading unit axis.

  * ``"materialize"``: ``unit_fn`` is a ``UnitUpdate``. Blocks bound the
    ``[units, params]`` updates (and whatever else a unit's update holds
    live, e.g. DP-FedAvg's per-user parameters and optimizer state) to about
    ``chunk_bytes()``, and to ``microbatch_size`` units when given.
  * ``"reweight"``: ``unit_fn`` is a ``UnitLoss`` (only for updates that are
    gradients of it, see the module docstring); blocks of ``microbatch_size``
    units, all at once when None.

  Returns ``(sum, (norms, values, aux))`` as ``map_reduce`` does.
  """
  if method == "materialize":
    block = chunk_size(params, _leading(units))
    if microbatch_size is not None:
      block = min(block, microbatch_size)
    block_fn = _materialize_block
  elif method == "reweight":
    block, block_fn = microbatch_size, _reweight_block
  elif method == "ghost":
    analysis = ghost_analysis(unit_fn, params, units)
    ghost.warn_fallback(analysis.report)
    block = microbatch_size

    def block_fn(unit_fn, l2_clip_norm, params, units, included):
      del unit_fn
      return ghost.block(
          analysis, params, units, included, l2_clip_norm,
          chunk_units=lambda unit_bytes: max(1, chunk_bytes() // unit_bytes),
          clip_weights=clip_weights,
          take_valid_or_donor=_take_valid_or_donor,
          unit_map=unit_map,
          map_reduce=map_reduce,
      )
  else:
    raise ValueError(
        f"method must be 'materialize', 'reweight' or 'ghost', got {method!r}"
    )

  if method != "ghost":
    # Units need isolating (one at a time when one is non-finite) only if
    # the unit function holds a grouped convolution; see unit_map.
    one_batch, one_mask = one_unit(units)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
    isolate = ghost.has_grouped_conv(
        jax.make_jaxpr(unit_fn)(abstract, one_batch, one_mask))
    block_fn = functools.partial(block_fn, isolate=isolate)

  def fn(xs):
    return block_fn(unit_fn, l2_clip_norm, params, *xs)

  return map_reduce(fn, (units, included), block, zeros_accumulator(params))
