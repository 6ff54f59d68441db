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

import math
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


def _groups(old: tuple[int, ...], new: tuple[int, ...]) -> list:
  """A reshape as pairs (old axes, new axes): the shortest runs of
  consecutive axes with equal sizes (products)."""
  out, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    gi, gj, pi, pj = [], [], 1, 1
    if i < len(old):
      gi, pi, i = [i], old[i], i + 1
    if j < len(new):
      gj, pj, j = [j], new[j], j + 1
    while pi != pj:
      if pi < pj:
        gi.append(i)
        pi, i = pi * old[i], i + 1
      else:
        gj.append(j)
        pj, j = pj * new[j], j + 1
    out.append((gi, gj))
  return out


def reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``x.reshape(shape)``, keeping an Explicit sharding where a reshape can.

  A run of axes merged into one keeps the sharding of its major axis when
  the others are unsharded; an axis split into several gives its sharding to
  the major one when that divides evenly; anything else becomes unsharded
  (gathered: correct, and not on the clipping methods' paths, whose merged
  axes are a layer's token or feature axes next to an unsharded one).
  """
  shape = tuple(int(d) for d in shape)
  sharding = of(x)
  if sharding is None or tuple(x.shape) == shape or 0 in shape:
    return x.reshape(shape)
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  mesh_sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
  out = [None] * len(shape)
  for gi, gj in _groups(tuple(x.shape), shape):
    if not gi or not gj:
      continue
    # Size-1 axes do not count as major: (1, n) -> (n,) is no merge.
    gi = [a for a in gi if x.shape[a] != 1] or gi
    gj = [a for a in gj if shape[a] != 1] or gj
    major = spec[gi[0]]
    if major is None or any(spec[a] is not None for a in gi[1:]):
      continue
    names = (major,) if isinstance(major, str) else tuple(major)
    if shape[gj[0]] % math.prod(mesh_sizes[n] for n in names) == 0:
      out[gj[0]] = major
  return jax.lax.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*out)))
