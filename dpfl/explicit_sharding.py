"""Shardings of arrays on an Explicit mesh, for the clipping code.

Under ``jax.sharding.AxisType.Explicit`` mesh axes (``jax.make_mesh``'s
default) an array's type carries its sharding, and an operation whose
output sharding is ambiguous (a contraction over a sharded axis, a reshape
merging a sharded axis) must be told it. The clipping methods keep the
unit axis sharded as the batch is and every other axis as the parameters
are; these helpers read and give those shardings. Under Auto axes (or no
mesh) every helper returns ``None`` / its input: XLA propagates shardings
itself, from the step's ``in_shardings`` / ``out_shardings``.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax


def of(x: Any) -> jax.sharding.NamedSharding | None:
  """``x``'s NamedSharding if its mesh has Explicit axes, else None.

  ``x`` an array, a tracer or a ``jax.ShapeDtypeStruct``.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
  else:
    sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return sharding


def of_dims(x: jax.Array, dims: Iterable[int | None]) -> jax.sharding.NamedSharding | None:
  """Explicit sharding of ``x``'s axes ``dims`` in that order (None: a new,
  unsharded axis), e.g. the output sharding of a contraction; else None."""
  sharding = of(x)
  if sharding is None:
    return None
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  return jax.sharding.NamedSharding(
      sharding.mesh,
      jax.sharding.PartitionSpec(*(None if d is None else spec[d] for d in dims)))


def like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """``x`` resharded to ``ref``'s Explicit sharding (unchanged otherwise)."""
  sharding = of(ref)
  if sharding is None or jax.typeof(x).sharding == sharding:
    return x
  return jax.sharding.reshard(x, sharding)


def units_unsharded(x: jax.Array) -> jax.Array:
  """``x`` with its leading (unit) axis gathered, other axes as they are."""
  sharding = of(x)
  if sharding is None or not sharding.spec or sharding.spec[0] is None:
    return x
  spec = jax.sharding.PartitionSpec(None, *sharding.spec[1:])
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, spec))
