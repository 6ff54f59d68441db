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
import numpy as np
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
  """Whether ``sharding``'s mesh has ``Explicit`` axes (its arrays' types carry it).

  True for a replicated ``P()`` on such a mesh too: there a
  ``with_sharding_constraint`` only asserts, and ``reshard`` is what lays out.
  """
  return AxisType.Explicit in tuple(sharding.mesh.axis_types)


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
  moments ``mu``, dpfl's MF buffers): a state subtree with the params' tree
  structure and their shapes takes the params' shardings, leaf by leaf.
  Leaves in no such subtree (a masked or partial copy) take the sharding of
  the parameter whose key path their own ends with, if they are floating
  point with its shape; every other leaf (keys, counts, the sampler seed,
  scalars, factored statistics) is replicated on ``mesh``.

  Args:
    state_shapes: the state's leaves (arrays or ``jax.ShapeDtypeStruct``s).
    params: the placed parameters.
    mesh: the parameters' mesh.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  params_def = jax.tree.structure(params)
  param_leaves = params_def.flatten_up_to(params)
  param_shardings = [leaf_sharding(leaf) or replicated for leaf in param_leaves]
  param_shapes = [tuple(jax.numpy.shape(leaf)) for leaf in param_leaves]

  def floating(leaf) -> bool:
    return jax.numpy.issubdtype(getattr(leaf, "dtype", None) or jax.numpy.result_type(leaf),
                                jax.numpy.floating)

  def params_like(node) -> bool:
    if jax.tree.structure(node) != params_def:
      return False
    leaves = params_def.flatten_up_to(node)
    return all(floating(leaf) and tuple(jax.numpy.shape(leaf)) == shape
               for leaf, shape in zip(leaves, param_shapes))

  by_path = sorted(
      ((tuple(path), shape, sharding) for (path, _), shape, sharding in zip(
          jax.tree_util.tree_flatten_with_path(params)[0], param_shapes, param_shardings)),
      key=lambda item: -len(item[0]))

  def pick(path, node):
    if params_like(node):
      return jax.tree.unflatten(params_def, param_shardings)
    path, shape = tuple(path), tuple(jax.numpy.shape(node))
    if floating(node):
      for param_path, param_shape, sharding in by_path:
        if param_path and shape == param_shape and path[len(path) - len(param_path):] == param_path:
          return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state_shapes, is_leaf=params_like)


def unit_axes(x: Any) -> set:
  """The Explicit mesh axes ``x``'s leading (unit) axis is split over (empty: none known)."""
  sharding = leaf_sharding(x)
  if sharding is None or not is_explicit(sharding) or not len(sharding.spec):
    return set()
  return _spec_axes(PartitionSpec(sharding.spec[0]))


def refuse_params_on(params: Any, axes: set) -> None:
  """Refuses parameters split over any of the Explicit mesh ``axes`` the units are split over.

  Per-unit gradients are laid out ``[units@data, *param]``: a parameter
  axis also on ``data`` would name one mesh axis twice, which Explicit
  sharding types refuse deep inside the clipping. (Auto axes work: XLA
  re-lays such parameters out itself.)
  """
  if not axes:
    return
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    sharding = leaf_sharding(leaf)
    if sharding is None or not is_explicit(sharding):
      continue
    shared = sorted(axes & _spec_axes(sharding.spec))
    if shared:
      raise ValueError(
          f"params{jax.tree_util.keystr(path)} is sharded over the mesh axis {shared[0]!r} "
          f"({sharding.spec}) that the batch's unit axis is split over; on an Explicit mesh "
          "parameters may be split over the other axes only (e.g. a 'model' axis of a "
          "(data, model) mesh). Shard it over another axis, or use Auto axis types")


def check_data_axis_free(params: Any, mesh: jax.sharding.Mesh) -> None:
  """``refuse_params_on`` the mesh's first (data) axis, when that axis is Explicit."""
  data = mesh.axis_names[0]
  if dict(zip(mesh.axis_names, mesh.axis_types)).get(data) == AxisType.Explicit:
    refuse_params_on(params, {data})


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


def global_arrays(tree, mesh=None):
  """``tree`` with its process-local arrays made global: replicated over the run's mesh.

  In a multi-process run, state built eagerly (e.g. an optimizer's step
  count) lives on each process's own device; orbax saves only global arrays.
  Every process runs the same program, so those values agree and the array
  is one replicated global array. The mesh is ``mesh``, else the mesh of the
  first leaf sharded on one; on one process (or with no mesh) ``tree`` as is.
  """
  leaves = jax.tree.leaves(tree)
  if mesh is None:
    mesh = next((leaf.sharding.mesh for leaf in leaves
                 if isinstance(getattr(leaf, "sharding", None), NamedSharding)), None)
  if jax.process_count() == 1 or mesh is None:
    return tree
  replicated = NamedSharding(mesh, PartitionSpec())

  def put(leaf):
    if not isinstance(leaf, jax.Array) or not leaf.is_fully_addressable:
      return leaf
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

  return jax.tree.map(put, tree)
