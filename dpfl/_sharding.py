"""Following the user's parameter shardings: what a leaf is sharded like, and keeping it so.

The user places their parameters with ``NamedSharding``s on a mesh (e.g. a
``(data, model)`` mesh, weights split over ``model``); dpfl follows them: the
optimizer state, the MF noise buffers and the noise draws take each
parameter's sharding, and a step keeps the state's shardings. Two mesh axis
types, two APIs: under ``Explicit`` axes an array's *type* carries its
sharding (``jax.typeof(x).sharding``) and ``jax.sharding.reshard`` changes it;
under ``Auto`` axes only concrete arrays know their sharding and, inside
``jit``, ``jax.lax.with_sharding_constraint`` tells the compiler.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _spec_axes(spec: PartitionSpec) -> set:
  axes = set()
  for entry in spec:
    if entry is None:
      continue
    axes.update(entry if isinstance(entry, tuple) else (entry,))
  return axes


def is_explicit(sharding: NamedSharding) -> bool:
  """Whether ``sharding`` splits over any ``Explicit`` mesh axis (its arrays' types say so)."""
  mesh = sharding.mesh
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  return any(types.get(axis) == AxisType.Explicit for axis in _spec_axes(sharding.spec))


def leaf_sharding(x: Any) -> NamedSharding | None:
  """The ``NamedSharding`` ``x`` is known to have, or None.

  A concrete array: its own (if named). A traced one: the sharding its type
  carries under ``Explicit`` mesh axes; under ``Auto`` axes a tracer knows
  none (the compiler propagates shardings; see ``constrain``).
  """
  if isinstance(x, jax.core.Tracer):
    try:
      sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
      return None
    if isinstance(sharding, NamedSharding) and not sharding.mesh.empty and is_explicit(sharding):
      return sharding
    return None
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
    return sharding
  return None


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
  """``x`` laid out as ``sharding`` (None: unchanged), under either axis type.

  Explicit axes: ``reshard`` (a no-op when ``x``'s type already says so);
  Auto axes: ``with_sharding_constraint``.
  """
  if sharding is None:
    return x
  if is_explicit(sharding):
    if leaf_sharding(x) == sharding:
      return x
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def constrain_tree(tree: Any, shardings: Any) -> Any:
  """``constrain`` leaf by leaf; ``shardings`` has ``tree``'s structure (None leaves allowed)."""
  leaves, treedef = jax.tree.flatten(tree)
  flat = treedef.flatten_up_to(shardings)
  return jax.tree.unflatten(treedef, [constrain(x, s) for x, s in zip(leaves, flat)])


def tree_shardings(tree: Any) -> Any:
  """``leaf_sharding`` of every leaf (None where unknown), in ``tree``'s structure."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [leaf_sharding(x) for x in leaves])


def params_mesh(params: Any) -> jax.sharding.Mesh | None:
  """The mesh of the first parameter placed with a ``NamedSharding`` (None: none is)."""
  for leaf in jax.tree.leaves(params):
    sharding = leaf_sharding(leaf)
    if sharding is not None and isinstance(sharding.mesh, jax.sharding.Mesh):
      return sharding.mesh
  return None


def follow_params(state_shapes: Any, params: Any, mesh: jax.sharding.Mesh) -> Any:
  """A ``NamedSharding`` for every leaf of an optimizer state, following the params'.

  Optimizer states hold copies of the parameter tree as subtrees (optax's
  moments ``mu['w']``, dpfl's MF buffers): a state leaf whose key path ends
  with a parameter's path and has its shape takes that parameter's sharding
  (the longest such path). Every other leaf (keys, counts, stored step keys,
  scalars) is replicated on ``mesh``.

  Args:
    state_shapes: the state's leaves (arrays or ``jax.ShapeDtypeStruct``s).
    params: the placed parameters.
    mesh: the parameters' mesh.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  by_path = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    sharding = leaf_sharding(leaf)
    by_path.append((tuple(path), tuple(jax.numpy.shape(leaf)), sharding or replicated))
  by_path.sort(key=lambda item: -len(item[0]))

  def pick(path, leaf):
    path, shape = tuple(path), tuple(jax.numpy.shape(leaf))
    for param_path, param_shape, sharding in by_path:
      if shape == param_shape and path[len(path) - len(param_path):] == param_path:
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state_shapes)


def zeros(shape, dtype, sharding: NamedSharding | None) -> jax.Array:
  """``jnp.zeros(shape, dtype)`` made shard by shard with ``sharding`` (None: as jnp.zeros)."""
  if sharding is None:
    return jax.numpy.zeros(shape, dtype)
  if is_explicit(sharding):
    return jax.numpy.zeros(shape, dtype, out_sharding=sharding)
  return jax.numpy.zeros(shape, dtype, device=sharding)


def alike(x: jax.Array, like: Any) -> jax.Array:
  """``x``, laid out as ``like`` is inside ``jit`` under ``Auto`` axes (else unchanged).

  A traced array under ``Auto`` axes knows no sharding of its own, but the
  compiler gives ``like`` one (propagated from the jit's inputs): tie ``x``'s
  to it (``shard_alike``) so e.g. a noise draw is made shard by shard wherever
  its gradient lives.
  """
  if (isinstance(x, jax.core.Tracer) and isinstance(like, jax.core.Tracer)
      and leaf_sharding(like) is None and jax.numpy.shape(x) == jax.numpy.shape(like)):
    return shard_alike(x, like)[0]
  return x
