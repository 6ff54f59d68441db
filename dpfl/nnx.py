"""Flax NNX models in dpfl: a clipped gradient that takes the model, as ``nnx.grad`` does.

An NNX training loop becomes private without ``nnx.split`` / ``nnx.merge``::

  private = dpfl.nnx.make_private(loss_fn, optax.adam(1e-2), l2_clip_norm=1.0, ...)
  optimizer = nnx.Optimizer(model, private.optimizer, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch, mask):
    grads, aux = private.clipped_grad(model, batch, mask)  # an nnx.State, like nnx.grad's
    optimizer.update(model, grads)

This module is an adapter, not a second implementation: the model is split
into its parameters (``wrt``, default ``nnx.Param``) and the rest, the loss
is re-expressed as ``loss(params, batch)`` on a model merged back inside each
unit's computation, and that loss goes through ``dpfl.clipped_grad`` (or, for
ULS with local steps, ``dpfl.federated.clipped_user_updates``): the same
clipping back-ends (``method=``), the same noise transform, the same plan
and accounting as ``dpfl.make_private``.

RNG streams (dropout). Each call draws one key from every ``nnx.RngStream``
of the model (as one forward pass of a plain step advances it), and each
unit's forward pass runs with that stream re-keyed to
``fold_in(step_key, example_index)`` (count 0), derived inside the ``vmap``:
every example's dropout mask is independent of every other's and of other
steps', and depends on no example's data. (ULS with local steps: an
example keeps its mask through the local steps of one round.)

Batch statistics. ``nnx.BatchNorm`` normalises each example by statistics
of the whole batch: one example's gradient then depends on the other
examples in the batch, so clipping it no longer bounds that example's
influence on the sum (and the running averages it writes are un-noised
functions of the data). Models holding ``nnx.BatchStat`` variables are
refused; use ``nnx.LayerNorm`` or ``nnx.GroupNorm``, which normalise within
one example. Other state written during the loss is refused for the same
reason (a write would be per-example and un-noised).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import errors as flax_errors
from flax import nnx

from dpfl import clipping
from dpfl.clipping import ClippedGradAux
from dpfl.privatize import make_private as _make_private
from dpfl.private_training import PrivateTraining as _PrivateTraining

__all__ = ["ClippedGradFn", "PrivateTraining", "clipped_grad", "make_private"]


_WRITES = (
    "loss_fn writes model state other than its RNG streams (e.g. a batch statistic, a "
    "counter, a sown value): under per-example clipping that write would be one "
    "example's, un-noised, so dpfl.nnx refuses it. Keep such state out of the training "
    "loss (LayerNorm / GroupNorm instead of BatchNorm)")


def _fold_in(keys: jax.Array, data: jax.Array) -> jax.Array:
  """``jax.random.fold_in`` for a key array of any shape (split streams hold several)."""
  if keys.shape == ():
    return jax.random.fold_in(keys, data)
  flat = jax.vmap(jax.random.fold_in, (0, None))(keys.reshape(-1), data)
  return flat.reshape(keys.shape)


def _refuse_batch_stats(model) -> None:
  stats = nnx.state(model, nnx.BatchStat)
  paths = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(stats)]
  if paths:
    raise ValueError(
        f"model holds batch statistics (nnx.BatchStat at {', '.join(paths)}): BatchNorm "
        "normalises each example by statistics of the whole batch, so one example's "
        "gradient depends on the others and clipping it no longer bounds its influence, "
        "and its running averages are un-noised functions of the data. Use nnx.LayerNorm "
        "or nnx.GroupNorm (they normalise within one example)")


def _untouched(model, wrt) -> list:
  """The values of the model's state that neither ``wrt`` nor an RNG stream holds."""
  other = nnx.All(nnx.Not(wrt), nnx.Not(nnx.RngState))
  return jax.tree.leaves(nnx.state(model, other))


@dataclasses.dataclass(frozen=True)
class ClippedGradFn:
  """``fn(model, batch, mask=None) -> (clipped_sum, aux)`` for an NNX model.

  ``clipped_sum`` is an ``nnx.State`` shaped like ``nnx.state(model, wrt)``
  (what ``nnx.grad`` returns, ready for ``nnx.Optimizer.update``): the sum
  over units of each unit's gradient clipped to ``l2_clip_norm``; ``aux`` is
  ``dpfl.ClippedGradAux``. ``mask`` (``[examples]``, or ``[users,
  examples_per_user]``; False on padding) may also be given positionally,
  so a ``(batch, mask)`` pair from ``private.batches`` unpacks into the call.
  Each call advances every RNG stream of the model by one key.

  Attributes:
    loss_fn: ``loss_fn(model, batch)``, the per-unit loss.
    build: builds the run's clipped-gradient function from a pure loss
      (the one clipping path of ``dpfl.make_private`` / ``dpfl.clipped_grad``).
    l2_clip_norm: C, each unit's contribution bound.
    unit: ``"example"`` or ``"user"``.
    wrt: the NNX variable filter differentiated (default ``nnx.Param``).
    method: the clipping method (``"auto"``, ``"materialize"``, ...).

  Privacy guarantee: ``dpfl.clipped_grad``'s, for the loss of the model's
  ``wrt`` variables with the rest of the model (RNG streams re-keyed per
  example, as the module docstring says) held fixed: adding or removing
  one unit moves ``clipped_sum`` by at most ``l2_clip_norm``.
  """

  loss_fn: Callable[..., Any]
  build: Callable[[Callable[..., Any]], clipping.ClippedGradFn]
  l2_clip_norm: float
  unit: str
  wrt: Any = nnx.Param
  method: str = "auto"

  def _pure(self, model):
    """``(params, pure_loss)`` for one call on ``model``: ``pure_loss(params, (batch, index))``."""
    _refuse_batch_stats(model)
    # One key per stream and step, drawn as a forward pass would draw it (the
    # stream's count advances, also under nnx.jit, which writes it back).
    step_keys = {path: stream() for path, stream in nnx.iter_graph(model)
                 if isinstance(stream, nnx.RngStream)}
    graphdef, params, rngs, rest = nnx.split(model, self.wrt, nnx.RngState, ...)
    loss_fn, wrt = self.loss_fn, self.wrt

    def unit_rngs(index):
      """Every stream re-keyed to fold_in(step key, index), count 0."""
      def rekey(path, variable):
        stream, leaf = tuple(path[:-1]), path[-1]
        if stream not in step_keys:
          return variable  # not a stream's key or count: left as it is
        if leaf == "key":
          return variable.replace(_fold_in(step_keys[stream], index))
        return variable.replace(jnp.zeros_like(variable[...]))
      return nnx.map_state(rekey, rngs)

    # A fresh closure per call: a function JAX has traced once must not be
    # reused with other closed-over values (its trace may be cached).
    def pure_loss(params, indexed):
      batch, index = indexed
      unit_model = nnx.merge(graphdef, params, unit_rngs(index[0]), rest)
      before = _untouched(unit_model, wrt)
      try:
        out = loss_fn(unit_model, batch)
      except flax_errors.TraceContextError as error:  # NNX's own refusal of such a write
        raise ValueError(_WRITES) from error
      after = _untouched(unit_model, wrt)
      if len(before) != len(after) or any(a is not b for a, b in zip(before, after)):
        raise ValueError(_WRITES)
      return out

    return params, pure_loss

  def __call__(self, model, batch, mask: jax.Array | None = None
               ) -> tuple[nnx.State, ClippedGradAux]:
    params, pure_loss = self._pure(model)
    shape = clipping.batch_unit_shape(batch, self.unit)
    # Each example's index (user level: each slot of each user), for its RNG key.
    index = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32).reshape(shape)
    return self.build(pure_loss)(params, (batch, index), mask=mask)


def clipped_grad(loss_fn: Callable[..., Any], *, l2_clip_norm: float, wrt: Any = nnx.Param,
                 has_aux: bool = False, unit: str = "example",
                 microbatch_size: int | None = None, method: str = "auto") -> ClippedGradFn:
  """``dpfl.clipped_grad`` for NNX: like ``nnx.grad(loss_fn)``, but a clipped sum.

  Args:
    loss_fn: ``loss_fn(model, batch)``, the mean loss over a batch whose
      leaves have a leading example axis (``(loss, aux)`` with ``has_aux``);
      it is called one example at a time, on a copy of the model.
    l2_clip_norm: clip norm C, a finite number > 0.
    wrt: an ``nnx`` filter of the variables to differentiate (default
      ``nnx.Param``, as ``nnx.grad`` and ``nnx.Optimizer``); the rest is held
      fixed.
    has_aux, unit, microbatch_size, method: as for ``dpfl.clipped_grad``
      (every clipping method: ``"auto"``, ``"materialize"``, ``"reweight"``,
      ``"ghost"``).

  Returns:
    A :class:`ClippedGradFn`, ``fn(model, batch, mask=None) -> (clipped_sum,
    aux)`` with ``clipped_sum`` an ``nnx.State`` of the ``wrt`` variables.

  Formal guarantee: every unit's contribution has L2 norm <= ``l2_clip_norm``
  and depends only on that unit's data (per-example RNG keys depend on no
  data); masked and non-finite units contribute zero. Adding or removing one
  unit moves the sum by at most ``l2_clip_norm``.

  Raises:
    ValueError: as ``dpfl.clipped_grad``; when called, a model with
      ``nnx.BatchStat`` variables or a loss that writes model state.
  """
  def build(loss):
    return clipping.clipped_grad(loss, l2_clip_norm=l2_clip_norm, has_aux=has_aux, unit=unit,
                                 microbatch_size=microbatch_size, method=method)

  checked = build(lambda params, batch: 0.0)  # the arguments, checked now
  return ClippedGradFn(loss_fn=loss_fn, build=build, l2_clip_norm=checked.l2_clip_norm,
                       unit=checked.unit, wrt=wrt, method=method)


def _model_loss_only(params, batch):
  raise ValueError("this run's loss takes an NNX model: call private.clipped_grad(model, "
                   "batch, mask) in an nnx.Optimizer loop (dpfl.nnx); init / make_step take "
                   "parameter pytrees (dpfl.make_private)")


@dataclasses.dataclass(eq=False)
class PrivateTraining:
  """A planned private run for an NNX loop (what :func:`make_private` returns).

  Attributes:
    run: the ``dpfl.PrivateTraining`` of the same plan (sampler, noise,
      journal), which this wraps.
    clipped_grad: :class:`ClippedGradFn`, ``(model, batch, mask) ->
      (nnx.State, aux)``.
  """

  run: _PrivateTraining
  clipped_grad: ClippedGradFn

  @property
  def optimizer(self) -> optax.GradientTransformation:
    """``optax.chain(noise, your_optimizer)``: give it to ``nnx.Optimizer``."""
    return self.run.optimizer

  @property
  def plan(self):
    return self.run.plan

  @property
  def ledger(self):
    return self.run.ledger

  @property
  def noise_multiplier(self) -> float:
    return self.run.noise_multiplier

  @property
  def l2_clip_norm(self) -> float:
    return self.run.l2_clip_norm

  @property
  def delta(self) -> float:
    return self.run.delta

  @property
  def num_steps(self) -> int:
    return self.run.num_steps

  @property
  def steps_done(self) -> int:
    return self.run.steps_done

  def batches(self, dataset: Any, num_steps: int | None = None):
    """``(batch, mask)`` pairs of the steps that remain (``dpfl.PrivateTraining.batches``)."""
    return self.run.batches(dataset, num_steps=num_steps)

  def epsilon(self, delta: float | None = None) -> float:
    """ε spent so far (every step recorded before its noise is drawn)."""
    return self.run.epsilon(delta)

  def planned_epsilon(self) -> float:
    return self.run.planned_epsilon()

  def extend(self, num_steps: int) -> None:
    self.run.extend(num_steps)


def make_private(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation, *,
                 wrt: Any = nnx.Param, **kwargs) -> PrivateTraining:
  """``dpfl.make_private`` for an NNX model and ``nnx.Optimizer`` loop.

  Args:
    loss_fn: ``loss_fn(model, batch)``, the mean loss over a batch
      (``(loss, aux)`` with ``has_aux``).
    optimizer: any optax optimizer; ``private.optimizer`` (noise, then it)
      goes to ``nnx.Optimizer(model, private.optimizer, wrt=wrt)``.
    wrt: the ``nnx`` filter of the trained variables (default ``nnx.Param``).
    **kwargs: every keyword of ``dpfl.make_private`` (clip norm, sampling,
      target ε or noise multiplier, δ, privacy unit ELS / ULS, strategy,
      ``clip_method``, ...): the same plan, noise and accounting.

  Returns:
    A :class:`PrivateTraining`: ``optimizer``, ``clipped_grad(model, batch,
    mask)``, ``batches(data)``, ``epsilon()``, ``plan``.

  Privacy guarantee: ``dpfl.make_private``'s; ``epsilon()`` is the ε of the
  same plan (``dpfl epsilon`` prints it).
  """
  run = _make_private(_model_loss_only, optimizer, **kwargs)
  if getattr(run.plan, "adaptive", None) is not None:
    # The adaptive C lives in the optimizer state and the noise step needs
    # the clipped sum's counts (``clip_stats``): not wired through
    # nnx.Optimizer.update yet, so refused rather than run with a stale C.
    raise ValueError("l2_clip_norm: dpfl.nnx.make_private takes a fixed clip norm, not "
                     "dpfl.adaptive_clip(...) (use dpfl.make_private for adaptive clipping)")
  grad = ClippedGradFn(loss_fn=loss_fn, build=run.clipped_grad_for,
                       l2_clip_norm=run.l2_clip_norm, unit=run.sampling_unit, wrt=wrt,
                       method=kwargs.get("clip_method", "auto"))
  return PrivateTraining(run=run, clipped_grad=grad)
