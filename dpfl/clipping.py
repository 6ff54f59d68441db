"""Per-example and per-user clipped sums: the one clipping path.

``clipped_grad`` transforms a loss the way ``jax.grad`` does, but returns the
sum over units of privacy (examples, or users) of each unit's gradient clipped
to a global L2 norm: the quantity DP-SGD adds Gaussian noise to. The clip norm
it enforces is the L2 sensitivity that the noise and accounting layers use.

``clipped_sum`` is the same path for any per-unit update: ``clipped_grad`` is
``clipped_sum`` of the gradient of each unit's loss, and DP-FedAvg
(``dpfl.federated.clipped_user_updates``) is ``clipped_sum`` of each user's
θ − θ_u after local steps. Masks, NaN safety, microbatching, statistics and
the choice of method (``dpfl.clip_methods``) live here, once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from accounting import validate as check
from dpfl import _sharding, clip_cost, clip_methods, ghost

PyTree = Any
LossFn = Callable[[PyTree, PyTree], Any]

UNITS = ("example", "user")
METHODS = clip_methods.METHODS


class ClippedGradAux(NamedTuple):
  """Statistics returned next to the clipped sum, for logging.

  These are per-unit quantities computed WITHOUT noise: releasing them is
  not covered by the clipped sum's guarantee.

  Attributes:
    grad_norms: ``[units]`` float32 L2 norm of each unit's gradient (or
      update, for ``clipped_sum`` of a ``unit_update``) before clipping (``[users]`` for ``unit="user"``); 0 for masked units, and
      ``inf``/``nan`` for non-finite units.
    values: ``[units]`` float32 loss of each unit (an example's loss, or a
      user's mean loss over their unmasked examples); 0 for masked units.
    num_units: int32, number of unmasked units (examples, or users with at
      least one unmasked example), non-finite ones included.
    num_clipped: int32, number of finite unmasked units whose norm exceeded
      ``l2_clip_norm`` (scaled down).
    fraction_clipped: float32, ``num_clipped / max(num_units, 1)``.
    num_nonfinite: int32, number of unmasked units whose gradient (or its
      norm) was NaN/Inf; each contributed exactly zero.
    aux: the loss function's auxiliary output when ``has_aux=True``, with
      leading axes ``[examples]`` (or ``[users, examples_per_user]``) in
      front of the shape ``loss_fn`` returned for a batch of one example;
      ``None`` otherwise. Entries of masked examples are unspecified.
    l2_clip_norm: float32, the clip norm this sum was clipped to (adaptive
      clipping's noise checks it against the state's C).
  """

  grad_norms: jax.Array
  values: jax.Array
  num_units: jax.Array
  num_clipped: jax.Array
  fraction_clipped: jax.Array
  num_nonfinite: jax.Array
  aux: PyTree = None
  l2_clip_norm: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ClippedGradFn:
  """The function returned by :func:`clipped_grad`, with its guarantee.

  Call it as ``fn(params, batch, mask=None) -> (clipped_sum, aux)``.
  ``l2_clip_norm`` is the L2 sensitivity of ``clipped_sum`` under adding or
  removing one ``unit`` (replacing one unit: twice that). ``method`` is the
  clipping method asked for (``"auto"`` resolves per call, from the
  parameters' shapes and dtypes).

  Args:
    fun: the per-call implementation, ``fun(params, batch, mask) -> (clipped_sum, aux)``.
    l2_clip_norm: C, the clip norm (the sum's sensitivity per unit).
    unit: ``"example"`` or ``"user"``, the privacy unit clipped.
    method: the clipping method asked for (``"auto"``, ``"materialize"``,
      ``"reweight"``, ``"ghost"``).
    explainer: optional, reports per-parameter ghost fallbacks (``explain``).
  """

  fun: Callable[..., tuple[PyTree, ClippedGradAux]]
  l2_clip_norm: float
  unit: str
  method: str = "auto"
  explainer: Callable[..., ghost.ClipReport] | None = None

  def __call__(
      self, params: PyTree, batch: PyTree, *, mask: jax.Array | None = None,
      l2_clip_norm: Any = None,
  ) -> tuple[PyTree, ClippedGradAux]:
    """``l2_clip_norm``: this call's clip norm (a float or a scalar array,
    traced or not: adaptive clipping, a schedule) instead of the built one;
    the guarantee then holds with it."""
    return self.fun(params, batch, mask=mask, l2_clip_norm=l2_clip_norm)

  def explain(
      self, params: PyTree, batch: PyTree, *, mask: jax.Array | None = None
  ) -> ghost.ClipReport:
    """Which method this call uses and, for ``"ghost"``, how each parameter's
    per-unit norm is computed: without a per-unit gradient (``ghost``),
    from a small per-unit gradient of an elementwise use (``per_unit``), or
    by forming that parameter's per-unit gradient (``fallback``, with the
    reason). Traces, never runs, the loss; arrays or ShapeDtypeStructs."""
    return self.explainer(params, batch, mask=mask)


def _check_microbatch_size(microbatch_size: Any) -> int | None:
  if microbatch_size is None:
    return None
  return check.positive_int("microbatch_size", microbatch_size)


def batch_unit_shape(batch: PyTree, unit: str) -> tuple[int, ...]:
  """The leading unit axes shared by every batch leaf: (B,) or (U, K)."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch must contain at least one array, got an empty pytree.")
  ndim = 1 if unit == "example" else 2
  axes = "[examples, ...]" if unit == "example" else "[users, examples_per_user, ...]"
  shapes = {tuple(np.shape(x)[:ndim]) for x in leaves}
  if any(np.ndim(x) < ndim for x in leaves) or len(shapes) != 1:
    raise ValueError(
        f"batch leaves must share leading axes {axes} for unit={unit!r}, got"
        f" leading shapes {sorted(shapes)} (leaf shapes"
        f" {[np.shape(x) for x in leaves]})."
    )
  (shape,) = shapes
  if math.prod(shape) == 0:
    raise ValueError(f"batch must hold at least one {unit}, got leading shape {shape}.")
  return shape


def _check_mask(mask: Any, shape: tuple[int, ...], unit: str) -> jax.Array:
  if mask is None:
    return jnp.ones(shape, dtype=bool)
  if tuple(np.shape(mask)) != shape:
    expected = "[examples]" if unit == "example" else "[users, examples_per_user]"
    raise ValueError(
        f"mask must have shape {shape} ({expected}, the batch's leading axes"
        f" for unit={unit!r}), got shape {tuple(np.shape(mask))}."
    )
  # Any nonzero entry means "a real example"; 0/False means padding.
  return jnp.asarray(mask) != 0


def _example_loss(loss_fn: LossFn, has_aux: bool):
  """loss_fn on one example, with its batch axis of size 1 put back."""

  def fn(params, example, example_mask):
    del example_mask  # a masked example's result is dropped by the caller
    out = loss_fn(params, jax.tree.map(lambda x: jnp.expand_dims(x, 0), example))
    if not has_aux:
      return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError(
          "has_aux=True: loss_fn must return a pair (loss, aux), got"
          f" {type(out).__name__}."
      )
    return out[0], out[1]

  return fn


def per_unit_loss(loss_fn: LossFn, *, unit: str, has_aux: bool = False):
  """``loss_fn`` as a function of one unit of privacy.

  Args:
    loss_fn: ``loss_fn(params, batch)``, a mean loss over a batch with a
      leading example axis (``(loss, aux)`` with ``has_aux``).
    unit: ``"example"`` or ``"user"``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``unit_loss(params, unit_batch, unit_mask) -> (loss, aux)`` (aux None
    without ``has_aux``). ``unit="example"``: ``unit_batch`` is one example
    (leaves without the example axis) and ``unit_mask`` a scalar that is
    ignored; the loss is ``loss_fn`` on a batch of that one example.
    ``unit="user"``: ``unit_batch`` leaves are ``[examples_per_user, ...]``,
    ``unit_mask`` is ``[examples_per_user]`` bool, and the loss is the mean of
    ``loss_fn`` over the user's unmasked examples (0 for none). Padded slots'
    data never enters the computation, so garbage (NaN) in them cannot leak
    into a gradient.
  """
  check.choice("unit", unit, UNITS)
  example_loss = _example_loss(loss_fn, has_aux)
  if unit == "example":
    return example_loss

  def user_loss(params, data, mask):
    # Padded slots are recomputed on the user's first real example and then
    # dropped by a select: their own (possibly garbage, NaN-producing) data
    # never enters the computation, so 0 * NaN cannot poison the gradient.
    index = jnp.where(mask, jnp.arange(mask.shape[0]), jnp.argmax(mask))
    data = jax.tree.map(lambda x: x[index], data)
    losses, aux = jax.vmap(example_loss, (None, 0, 0))(params, data, mask)
    count = jnp.sum(mask)
    total = jnp.sum(jnp.where(mask, losses, jnp.zeros_like(losses)))
    return total / jnp.maximum(count, 1).astype(total.dtype), aux

  return user_loss


def runtime_clip_norm(value: Any) -> Any:
  """A clip norm: a checked float (> 0, finite), or a scalar traced array as is.

  A traced value (inside ``jit``: adaptive clipping's C, a schedule, an
  ``optax.inject_hyperparams`` value) cannot be checked before it exists;
  the clipping then gives zero weight to every unit when it is not a finite
  number > 0, so it can never weaken the bound it states.
  """
  if isinstance(value, jax.core.Tracer):
    if jnp.shape(value) != ():
      raise ValueError(f"l2_clip_norm must be a scalar, got shape {jnp.shape(value)}")
    return value
  return check.positive("l2_clip_norm", value)


def clipped_sum(
    *,
    l2_clip_norm: float,
    unit: str = "example",
    unit_loss: Callable[..., Any] | None = None,
    unit_update: Callable[..., Any] | None = None,
    method: str = "auto",
    microbatch_size: int | None = None,
) -> ClippedGradFn:
  """The sum over units of each unit's update clipped to ``l2_clip_norm``.

  The one clipping path: give exactly one description of a unit's update.

  * ``unit_loss(params, unit_batch, unit_mask) -> (loss, aux)``: the update
    is the gradient of the unit's loss (``clipped_grad``; build it with
    :func:`per_unit_loss`). Every method applies.
  * ``unit_update(params, unit_batch, unit_mask) -> (update, value, aux)``:
    any per-unit update (a pytree shaped like ``params``), with a scalar
    ``value`` (e.g. a loss) and an ``aux`` pytree (or None) reported in the
    statistics; e.g. DP-FedAvg's θ − θ_u after local steps
    (``dpfl.federated.clipped_user_updates``). Only ``"materialize"``
    applies, and ``"auto"`` picks it: ``"reweight"`` and ``"ghost"``
    take the gradient of the clip-weighted sum of unit losses, and an update that is not the
    gradient of a loss has none (``ValueError``).

  ``unit_batch`` / ``unit_mask`` are one unit's slice of ``batch`` / ``mask``:
  for ``unit="example"`` one example (leaves without the example axis) and
  its scalar mask entry; for ``unit="user"`` leaves ``[examples_per_user,
  ...]`` and a ``[examples_per_user]`` mask. A unit function is called under
  ``vmap`` over units, also for masked units, whose results are dropped.

  Privacy guarantee:
    Every unit's contribution to the sum has L2 norm <= ``l2_clip_norm``.
    Masked units (all examples masked, for users) and units whose update
    is not finite contribute exactly zero, and a unit's contribution
    depends only on that unit's data (as long as the unit function reads
    only its own unit). Adding or removing one unit therefore changes the
    sum by at most ``l2_clip_norm`` in L2 norm. ``"materialize"`` scales
    the very vector whose norm it measured; ``"reweight"`` and ``"ghost"``
    evaluate the same gradient twice, so their bound holds up to float
    rounding of the order of 1e-6 relative.

  Args:
    l2_clip_norm: clip norm C, a finite number > 0 (or a traced scalar, see
      ``runtime_clip_norm``); a call may pass its own (``fn(...,
      l2_clip_norm=C_t)``: adaptive clipping), and the bound holds with it.
    unit: ``"example"`` (batch leaves ``[examples, ...]``) or ``"user"``
      (``[users, examples_per_user, ...]``).
    unit_loss / unit_update: the unit's loss or update (give one).
    method: ``"auto"``, ``"materialize"``, ``"reweight"`` or ``"ghost"``
      (see ``dpfl.clip_methods``); all give the same sum where they apply.
    microbatch_size: ``None`` or units per sequential block, >= 1.

  Returns:
    A :class:`ClippedGradFn` ``fn(params, batch, mask=None) -> (sum, aux)``,
    as :func:`clipped_grad`'s.

  Raises:
    ValueError: a bad argument (named), both or neither of ``unit_loss`` and
      ``unit_update``, ``method="reweight"`` with a ``unit_update``; when
      called, as :func:`clipped_grad`.
  """
  # The clip norm is the mechanism's sensitivity: a concrete one is checked
  # here as everywhere else; a traced one (built inside jit) is checked when
  # it is a number (clip_weights zeroes every unit for C <= 0 or non-finite).
  l2_clip_norm = runtime_clip_norm(l2_clip_norm)
  check.choice("unit", unit, UNITS)
  check.choice("method", method, METHODS)
  microbatch_size = _check_microbatch_size(microbatch_size)
  if (unit_loss is None) == (unit_update is None):
    raise ValueError(
        "give exactly one of unit_loss (the update is its gradient) and"
        f" unit_update (any update), got unit_loss={unit_loss!r},"
        f" unit_update={unit_update!r}."
    )
  if unit_update is not None and method in ("reweight", "ghost"):
    raise ValueError(
        f"method={method!r} needs a unit_loss: it computes the clipped sum as"
        " the gradient of the clip-weighted sum of unit losses, and a"
        " unit_update that is not the gradient of a loss (e.g. θ − θ_u after"
        " local steps) has none. Use method='materialize' or 'auto' (allowed:"
        f" {', '.join(METHODS)})."
    )

  built_norm = l2_clip_norm
  choices: dict = {}  # auto's choice per signature of (params, one unit)

  def resolve(params, units):
    if unit_update is not None:
      return "materialize"
    if method == "auto":
      # The choice needs only one unit's shapes and dtypes. Slicing x[0]
      # would fail on a unit axis sharded over an Explicit mesh (a size-1
      # slice of a sharded dim is a ShardingTypeError), so describe it.
      one_batch, one_mask = clip_methods.one_unit(units)
      leaves, treedef = jax.tree.flatten((params, one_batch, one_mask))
      key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
      if key not in choices:  # tracing the loss twice per call costs
        choices[key] = clip_cost.choose_method(  # un-jitted loops
            unit_loss, params, one_batch, one_mask)
      return choices[key]
    if method == "reweight" and clip_methods.has_half_precision(params):
      raise ValueError(
          "method='reweight' needs float32 or wider parameters (its sum is"
          " accumulated inside the backward pass, in the parameters' dtype);"
          " use method='ghost', 'materialize' or 'auto' for half precision."
      )
    return method

  def explain(params, batch, *, mask=None) -> ghost.ClipReport:
    shape = batch_unit_shape(batch, unit)
    units = (batch, _check_mask(mask, shape, unit))
    chosen = resolve(params, units)
    if chosen != "ghost":
      return ghost.ClipReport(method=chosen)
    return clip_methods.ghost_analysis(unit_loss, params, units).report

  def fun(params, batch, *, mask=None, l2_clip_norm=None):
    l2_clip_norm = built_norm if l2_clip_norm is None else runtime_clip_norm(l2_clip_norm)
    shape = batch_unit_shape(batch, unit)
    mask = _check_mask(mask, shape, unit)
    _sharding.refuse_params_on(params, set().union(
        *map(_sharding.unit_axes, jax.tree.leaves((batch, mask)))))
    units = (batch, mask)
    included = mask if unit == "example" else jnp.any(mask, axis=1)
    chosen = resolve(params, units)
    if chosen in ("reweight", "ghost"):
      unit_fn = unit_loss
    elif unit_update is not None:
      unit_fn = unit_update
    else:
      unit_fn = clip_methods.gradient_update(unit_loss)
    total, (norms, values, aux) = clip_methods.clipped_sum(
        chosen, unit_fn, l2_clip_norm, params, units, included, microbatch_size
    )

    finite = jnp.isfinite(norms)
    num_units = jnp.sum(included, dtype=jnp.int32)
    num_clipped = jnp.sum(included & finite & (norms > l2_clip_norm), dtype=jnp.int32)
    stats = ClippedGradAux(
        grad_norms=jnp.where(included, norms, 0.0).astype(jnp.float32),
        values=jnp.where(included, values.astype(jnp.float32), 0.0),
        num_units=num_units,
        num_clipped=num_clipped,
        fraction_clipped=num_clipped / jnp.maximum(num_units, 1).astype(jnp.float32),
        num_nonfinite=jnp.sum(included & ~finite, dtype=jnp.int32),
        aux=aux,
        l2_clip_norm=jnp.asarray(l2_clip_norm, jnp.float32),
    )
    return total, stats

  return ClippedGradFn(
      fun=fun, l2_clip_norm=l2_clip_norm, unit=unit, method=method, explainer=explain
  )


def clipped_grad(
    loss_fn: LossFn,
    *,
    l2_clip_norm: float,
    has_aux: bool = False,
    unit: str = "example",
    microbatch_size: int | None = None,
    method: str = "auto",
) -> ClippedGradFn:
  """Transforms a mean loss into a function returning a clipped gradient sum.

  Like ``jax.grad(loss_fn)``, but the result is

      clipped_sum = sum over unmasked units u of  clip(g_u),
      clip(g) = g * min(1, l2_clip_norm / ||g||_2),

  where ``||.||_2`` is the global L2 norm over the whole parameter pytree and
  ``g_u`` is the gradient of unit ``u``'s loss:

  * ``unit="example"``: ``batch`` leaves have a leading axis ``[examples]``;
    ``g_u`` is the gradient of ``loss_fn(params, example_u)``, where the
    example is passed with its leading batch axis of size 1 (``loss_fn`` is
    the user's own mean loss over a batch; it is called one example at a
    time inside ``vmap``).
  * ``unit="user"``: ``batch`` leaves have leading axes
    ``[users, examples_per_user]`` and ``mask`` has that shape; ``g_u`` is
    the gradient of the user's mean loss over their unmasked examples,
    ``sum_k m_uk loss_fn(params, x_uk) / sum_k m_uk``. A user with no
    unmasked example contributes zero and is not counted.

  Privacy guarantee:
    Every unit's contribution to ``clipped_sum`` has L2 norm
    <= ``l2_clip_norm``. Masked (padding) units and units whose gradient is
    not finite (NaN/Inf anywhere, or an overflowing norm) contribute exactly
    zero, and a unit's contribution depends only on that unit's data. Hence
    adding or removing one unit changes ``clipped_sum`` by at most
    ``l2_clip_norm`` in L2 norm (replacing one unit: ``2 * l2_clip_norm``),
    which is the sensitivity the noise and accounting layers assume. With
    ``method="reweight"`` or ``"ghost"`` the norm and the sum come from two
    evaluations of the same gradient, so the bound holds up to float
    rounding of the order of 1e-6 relative (ghost's norms and sums are
    float32 at the highest matmul precision, also for bf16 parameters); ``"materialize"`` scales the very vector whose
    norm it measured. The statistics in ``aux`` are not privatized.

  Precision: norms and sums are accumulated in float32 (float64 for float64
  parameters): each leaf of ``clipped_sum`` has dtype
  ``jnp.promote_types(param.dtype, jnp.float32)``, so bf16/fp16 parameters
  give a float32 sum. Cast it back when applying the update.

  Microbatching: with ``microbatch_size=M`` the units are processed in
  sequential blocks of ``M`` under ``jax.lax.scan``, so peak memory is that
  of one block; the result equals the unblocked one up to float summation
  order. If ``M`` does not divide the number of units ``n``, the remainder
  is processed as one smaller final block (no padding, no error). Blocks
  are strided (block ``j`` holds units ``j, j + n//M, ...``) so that a unit
  axis sharded over devices stays sharded inside every block. Independently
  of ``M``, per-unit gradients are formed a cache-sized chunk at a time, so
  the footprint of per-unit gradients is bounded even with ``M=None``.

  Sharding: the unit axis of ``batch`` and ``mask`` may be sharded over
  devices (``jax.sharding``; with explicit mesh axes, call under
  ``jax.set_mesh`` as for any gradient of a sharded batch). The sum is
  reduced across devices by XLA; no batch-sized all-gather. The parameters
  may be sharded too, e.g. over the ``"model"`` axis of a ``(data, model)``
  mesh with the batch over ``"data"`` (FSDP), with every method: each
  device computes the squared norms of its shard of every unit's gradient,
  and one all-reduce of those ``[units]`` squared norms over the parameter
  axis gives the full norms, so a unit is clipped by its whole gradient's
  norm and contributes at most ``l2_clip_norm`` however its gradient is
  spread over shards; no parameter or per-unit gradient is gathered, and
  the sum comes back sharded as the parameters are. On Explicit mesh axes
  the parameters' types carry their shardings and the methods follow them;
  on Auto axes XLA propagates them, so give your step's ``jax.jit`` the
  parameters' ``in_shardings`` / ``out_shardings`` as for any FSDP step.

  Args:
    loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` when
      ``has_aux``), the mean loss over a batch whose leaves have a leading
      example axis. Works with any parameter pytree of floating arrays,
      e.g. Flax Linen ``variables`` used through ``model.apply``, or Flax
      NNX state from ``nnx.split`` merged back with ``nnx.merge``.
    l2_clip_norm: clip norm C, a finite number > 0.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the per-example aux
      is returned in ``ClippedGradAux.aux``.
    unit: unit of privacy, ``"example"`` or ``"user"``.
    microbatch_size: ``None`` (all units in one block) or an integer >= 1,
      the number of units (examples or users) per sequential block.
    method: how the clipped sum is computed; all give the same result.
      ``"ghost"`` traces the loss and takes per-unit norms from the inputs
      and output cotangents at every place a parameter meets data, never
      forming a unit's gradient for dense, attention, einsum, embedding
      and conv parameters (see ``dpfl.ghost``; ``fn.explain(params,
      batch)`` says which parameters fell back to a per-unit gradient, and
      why); ``"materialize"`` forms per-unit gradients (a cache-sized chunk
      at a time); ``"reweight"`` computes per-unit norms, then one backward
      pass of the loss weighted by the clip factors (float32+ parameters
      only); ``"auto"`` (default) picks the cheapest by a static cost model
      (``dpfl.clip_cost.method_costs``).

  Returns:
    A :class:`ClippedGradFn`; calling it as ``fn(params, batch, mask=None)``
    returns ``(clipped_sum, aux)``: ``clipped_sum`` shaped like ``params``
    and ``aux`` a :class:`ClippedGradAux`. ``mask`` (bool, shape
    ``[examples]`` or ``[users, examples_per_user]``; nonzero = real)
    marks padding, so batches can have a static shape under ``jit``.

  Raises:
    ValueError: ``l2_clip_norm`` not finite or <= 0; ``unit``, ``method``
      unknown; ``microbatch_size`` < 1; and, when called, batch leaves
      without common leading unit axes or a ``mask`` of another shape.

  Example::

    grad_fn = clipped_grad(loss_fn, l2_clip_norm=1.0)
    clipped_sum, aux = jax.jit(grad_fn)(params, batch, mask=mask)
    # add N(0, (sigma * 1.0)^2) noise to clipped_sum, divide by batch size
  """
  if not isinstance(has_aux, bool):
    raise ValueError(f"has_aux must be True or False, got {has_aux!r}.")
  check.choice("unit", unit, UNITS)
  return clipped_sum(
      l2_clip_norm=l2_clip_norm,
      unit=unit,
      unit_loss=per_unit_loss(loss_fn, unit=unit, has_aux=has_aux),
      method=method,
      microbatch_size=microbatch_size,
  )
