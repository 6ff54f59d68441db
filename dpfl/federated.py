"""ULS rounds with local steps (DP-FedAvg), vmapped over users, sharded over devices.

One round of user-level DP with user-level sampling (ULS; McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models", arXiv
1710.06963; Charles et al. 2024, arXiv 2407.07737):

1. sample users (``dpfl.sampling.UserSampler``);
2. each sampled user starts from the server parameters θ and runs
   ``local_steps`` steps of local SGD on their own examples, ending at θ_u;
3. each user's *pseudo-gradient* ``θ − θ_u`` is clipped to L2 norm ≤ C;
4. the clipped pseudo-gradients are summed, Gaussian noise is added and the
   sum divided by the expected number of users (``dpfl.gaussian_noise``);
5. a server optimizer (any optax optimizer) applies the noisy mean.

Sign convention. The server optimizer receives the pseudo-gradient
``θ − θ_u = −Δ_u`` (Δ_u = θ_u − θ the user's model delta), as in DiLoCo's
outer step (Douillard et al. 2023, arXiv 2311.08105): it points uphill like
a gradient, so ``optax.sgd(1.0)`` is FedAvg (θ ← θ + mean Δ), and
``optax.sgd(0.7, momentum=0.9, nesterov=True)`` is DiLoCo's outer Nesterov
step. With ``local_steps=1`` and plain SGD at local learning rate η, the
pseudo-gradient is exactly ``η · ∇L_u(θ)`` (L_u the user's mean loss), so a
round clipped at ``η·C`` equals ``η`` times the gradient path
(``dpfl.clipped_grad(..., unit="user")``) clipped at ``C``.

Steps 3 and 4 are ``dpfl.clipping.clipped_sum``, the clipping path of
``dpfl.clipped_grad``: a user's local training is one more kind of per-unit
update to clip and sum, with the same masks, NaN safety, microbatching,
statistics and clipping methods. Step 2 is ``jax.vmap``-ed over the users of
a batch (``[users, examples_per_user, ...]`` with a ``[users,
examples_per_user]`` mask), in cache-sized chunks of users run one after
another (``lax.scan``), so the ``[users, params]`` pseudo-gradients (and
per-user parameters and optimizer states) of only one chunk are live.

Sharding over devices. Put the user axis of the batch and mask on a mesh
(``user_mesh`` / ``shard_users`` here, or your own ``NamedSharding(mesh,
P("users"))``). Each device then trains its users locally and XLA reduces
the clipped sum across devices: the result equals the single-device one up
to float summation order. The parameters may stay replicated, or be sharded
over a second mesh axis (``(data, model)``, users over ``"data"``): then
every user's local steps run on sharded parameters, the norm of each
θ − θ_u is summed across parameter shards (one all-reduce of ``[users]``
squared norms) before clipping, and the sum comes back sharded as the
parameters are (see ``dpfl.clipped_grad``'s "Sharding").

Across hosts. Every process runs the same program after
``jax.distributed.initialize()`` (coordinator address, number of processes
and process id; detected automatically on Cloud TPU and SLURM). Build the
mesh over all devices of all hosts (``user_mesh()`` uses ``jax.devices()``,
which is global after initialisation) and make the user batch a global
array: ``shard_users`` uses ``jax.make_array_from_callback``, so each process
only materialises the rows of its own devices, provided every process holds
the same dataset and draws the same sample (``PrivateTraining.batches``
gathers only those rows, ``local_slots``: a ``UserDataset.from_parquet`` on
each process reads only its own users' rows from disk). Same sample and same noise on
every process means one shared secret: draw it on process 0 and broadcast it
with ``shared_secret_seed()`` (``jax.experimental.multihost_utils``), then pass
it as the sampler ``seed`` and the noise ``key``. The cross-host reduction of
the clipped sum is an XLA collective inside the compiled step; dpfl ships
no transport of its own.
"""

from __future__ import annotations

import secrets
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from accounting import validate as check
from dpfl import clipping
from dpfl.clip_methods import accumulation_dtype

PyTree = Any


def _local_optimizer(local_learning_rate, local_optimizer) -> optax.GradientTransformation:
  if (local_learning_rate is None) == (local_optimizer is None):
    raise ValueError("give exactly one of local_learning_rate (plain local SGD) and "
                     f"local_optimizer, got local_learning_rate={local_learning_rate!r}, "
                     f"local_optimizer={local_optimizer!r}")
  if local_optimizer is not None:
    if not isinstance(local_optimizer, optax.GradientTransformation):
      raise ValueError("local_optimizer must be an optax.GradientTransformation, got "
                       f"{local_optimizer!r}")
    return local_optimizer
  return optax.sgd(check.positive("local_learning_rate", local_learning_rate))


def _local_batches(data: PyTree, mask: jax.Array, local_batch_size: int | None):
  """A user's examples as ``[num_local_batches, b, ...]`` (one batch if None)."""
  k = mask.shape[0]
  if local_batch_size is None or local_batch_size >= k:
    return jax.tree.map(lambda x: x[None], data), mask[None]
  if k % local_batch_size:
    raise ValueError(f"local_batch_size must divide examples_per_user ({k}), got "
                     f"{local_batch_size}")
  split = lambda x: x.reshape((k // local_batch_size, local_batch_size) + x.shape[1:])
  return jax.tree.map(split, data), split(mask)


def clipped_user_updates(loss_fn, *, l2_clip_norm: float, local_steps: int,
                         local_learning_rate: float | None = None,
                         local_optimizer: optax.GradientTransformation | None = None,
                         local_batch_size: int | None = None, has_aux: bool = False,
                         microbatch_size: int | None = None,
                         method: str = "auto") -> clipping.ClippedGradFn:
  """The sum over users of each user's clipped pseudo-gradient after local training.

  For each user u with unmasked examples, starting from ``params`` (θ):
  ``local_steps`` steps of ``local_optimizer`` (default: plain SGD at
  ``local_learning_rate``) on the user's mean loss (over their unmasked
  examples, or over local batch ``t mod (k / local_batch_size)`` of them at
  step t), ending at θ_u. Returns

      clipped_sum = sum over users u of clip(θ − θ_u),
      clip(v) = v * min(1, l2_clip_norm / ||v||_2),

  the norm taken over the whole parameter pytree. ``θ − θ_u`` is the
  negative model delta (see the module docstring for the sign convention).

  Privacy guarantee: each user's contribution has L2 norm <= ``l2_clip_norm``
  (the very vector whose norm is measured is scaled) and depends only on that
  user's examples; users with no unmasked example, and users whose update is
  not finite, contribute exactly zero. Adding or removing one user therefore
  moves ``clipped_sum`` by at most ``l2_clip_norm``, whatever the number of
  examples or local steps: the sensitivity ``accounting.UlsDpSgd`` assumes.

  Args:
    loss_fn: ``loss_fn(params, batch)``, the mean loss over a batch with a
      leading example axis (``(loss, aux)`` with ``has_aux``).
    l2_clip_norm: C > 0, the per-user clip norm of the pseudo-gradient.
    local_steps: number of local optimizer steps per user, >= 1.
    local_learning_rate / local_optimizer: give one; the local optimizer
      starts from a fresh state for every user and round.
    local_batch_size: None (every local step uses all the user's examples)
      or a divisor of ``examples_per_user``.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux of the first local
      step is returned in ``ClippedGradAux.aux``.
    microbatch_size: users per sequential block (bounds memory).
    method: the clipping method (``dpfl.clip_methods``): ``"auto"`` (picks
      ``"materialize"``) or ``"materialize"``, which clips the very vector
      θ − θ_u it measured. ``"reweight"`` and ``"ghost"`` raise
      ``ValueError``: they compute the sum from the gradient of a
      clip-weighted sum of unit losses, and θ − θ_u after
      local steps is not the gradient of a loss (it is a nonlinear function
      of the whole local trajectory), so there is no such loss; besides,
      each user's θ_u exists in memory anyway.

  Returns:
    A ``dpfl.clipping.ClippedGradFn`` (``unit="user"``): calling it as
    ``fn(params, batch, mask=mask)`` with batch leaves
    ``[users, examples_per_user, ...]`` returns ``(clipped_sum, aux)``;
    ``aux.grad_norms`` are the pseudo-gradient norms and ``aux.values`` each
    user's loss at the first local step (their mean loss at ``params`` when
    ``local_batch_size`` is None).
  """
  check.choice("method", method, clipping.METHODS)
  if method in ("reweight", "ghost"):
    raise ValueError(
        f"method={method!r} does not apply to DP-FedAvg's local-step updates: it computes "
        "the clipped sum as the gradient of a clip-weighted sum of unit losses, and a "
        "user's θ − θ_u after local steps is not the gradient of a loss. Use "
        f"method='materialize' or 'auto' (allowed: {', '.join(clipping.METHODS)}).")
  local_steps = check.positive_int("local_steps", local_steps)
  local_opt = _local_optimizer(local_learning_rate, local_optimizer)
  if local_batch_size is not None:
    local_batch_size = check.positive_int("local_batch_size", local_batch_size)
  if not isinstance(has_aux, bool):
    raise ValueError(f"has_aux must be True or False, got {has_aux!r}")
  user_loss = clipping.per_unit_loss(loss_fn, unit="user", has_aux=has_aux)

  def local_update(params, data, mask):
    # Padded slots take the user's first real example (masked out of the
    # loss), so a local batch of padding only never runs on garbage data
    # whose NaN could leak into the gradient through 0 * NaN.
    index = jnp.where(mask, jnp.arange(mask.shape[0]), jnp.argmax(mask))
    data = jax.tree.map(lambda x: x[index], data)
    batches, masks = _local_batches(data, mask, local_batch_size)
    num_batches = masks.shape[0]
    grad_fn = jax.value_and_grad(user_loss, has_aux=True)

    def step(carry, t):
      p, state = carry
      i = t % num_batches
      pick = lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
      (loss, aux), grads = grad_fn(p, jax.tree.map(pick, batches), pick(masks))
      updates, state = local_opt.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), (loss, aux)

    # Start from a per-user copy of θ (same values, batched like the user's
    # data): under an Explicit mesh, a scan inside vmap cannot broadcast an
    # unbatched carry to the batched, sharded one (JAX 0.10 raises "Resource
    # axis ... not found in mesh: ()").
    batched_false = jnp.zeros((), bool) & mask[0]
    start = jax.tree.map(lambda p: jnp.where(batched_false, jnp.zeros_like(p), p), params)
    (final, _), (losses, auxes) = jax.lax.scan(
        step, (start, local_opt.init(start)), jnp.arange(local_steps))
    # θ − θ_u in float32 or wider: for half-precision parameters the
    # difference of two nearby values is exact there, not in bf16.
    acc = lambda a: a.astype(accumulation_dtype(a.dtype))
    pseudo = jax.tree.map(lambda a, b: acc(a) - acc(b), params, final)
    return pseudo, losses[0], jax.tree.map(lambda a: a[0], auxes)

  return clipping.clipped_sum(l2_clip_norm=l2_clip_norm, unit="user",
                              unit_update=local_update, method=method,
                              microbatch_size=microbatch_size)


# --- devices and hosts -----------------------------------------------------------

def user_mesh(num_devices: int | None = None, *, axis_name: str = "users") -> jax.sharding.Mesh:
  """A 1-D mesh over ``num_devices`` devices (default: all, of all hosts) for the user axis.

  The axis type is ``Auto``: jitted steps need no ``jax.set_mesh`` and XLA
  places the cross-device sum itself. (``dpfl.clipped_grad`` and
  ``clipped_user_updates`` also accept ``Explicit`` meshes, used under
  ``jax.set_mesh``.)

  Args:
    num_devices: how many of ``jax.devices()`` to use (default: all).
    axis_name: the name of the mesh's one axis.

  Returns:
    A ``jax.sharding.Mesh`` of shape ``(num_devices,)``.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices!r}")
  return jax.make_mesh((n,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def shard_users(tree: PyTree, mesh: jax.sharding.Mesh, *,
                axis_name: str | None = None) -> PyTree:
  """Places the leading (user or example) axis of every leaf across ``mesh``.

  Built with ``jax.make_array_from_callback``: every process passes the same
  host array and each keeps only its own devices' rows, so this works on one
  host and across hosts alike. The leading size must be divisible by the
  mesh axis size (``UserSampler(multiple_of=...)`` pads to that).

  Args:
    tree: a pytree of host arrays with one leading (user or example) axis.
    mesh: the mesh to place it on (e.g. ``dpfl.user_mesh()``).
    axis_name: the mesh axis to split the leading axis over (default: the
      mesh's first).

  Returns:
    The same pytree of ``jax.Array``s, the leading axis sharded over
    ``axis_name`` and replicated over the other axes.
  """
  axis_name = mesh.axis_names[0] if axis_name is None else axis_name
  sharding = NamedSharding(mesh, PartitionSpec(axis_name))
  size = mesh.shape[axis_name]

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % size:
      raise ValueError(f"the leading axis ({x.shape[0]}) must be divisible by the number of "
                       f"devices on mesh axis {axis_name!r} ({size})")
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def local_slots(size: int, mesh: jax.sharding.Mesh, *, axis_name: str | None = None,
                devices: Any = None) -> np.ndarray:
  """bool ``[size]``: the slots of a leading axis that ``shard_users`` places on ``devices``.

  ``shard_users`` reads, on each process, only the rows its own devices hold;
  gathering just these slots (``UserDataset.gather_users(indices, mask &
  local_slots(...))``) makes each process read only its share of a batch.

  Args:
    size: the leading (user or example) size of the batch.
    mesh, axis_name: as for ``shard_users``.
    devices: the devices whose slots to mark (default: this process's).
  """
  axis_name = mesh.axis_names[0] if axis_name is None else axis_name
  sharding = NamedSharding(mesh, PartitionSpec(axis_name))
  if devices is None:
    indices = sharding.addressable_devices_indices_map((size,)).values()
  else:
    placed = sharding.devices_indices_map((size,))
    indices = [placed[device] for device in devices]
  out = np.zeros(size, bool)
  for index in indices:
    out[index] = True
  return out


def shared_secret_seed() -> int:
  """A 128-bit secret from OS entropy, the same on every process.

  Process 0 draws it and ``jax.experimental.multihost_utils`` broadcasts it,
  so multi-host runs draw the same user sample and the same noise on every
  process without making the seed public. On one process it is simply fresh
  OS entropy. Use it as the sampler ``seed`` and the noise ``key``: the
  sampler (numpy's PCG64) keeps all 128 bits, and dpfl's int keys keep every
  bit too (``jax.random.key(seed)`` would keep 32 of them without x64), so
  the noise key has the full 64 bits a threefry key holds.

  Returns:
    A non-negative int below 2**128, equal on every process.
  """
  words = np.frombuffer(secrets.token_bytes(16), dtype=np.uint32).copy()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    words = np.asarray(multihost_utils.broadcast_one_to_all(words))
  return int.from_bytes(words.astype("<u4").tobytes(), "little")
