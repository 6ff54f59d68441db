"""Randomness for privacy: OS-entropy defaults, explicit seeds on request.

A DP guarantee assumes the noise and the sample are unknown to the
adversary. A fixed default seed (``jax.random.key(0)``, ``np.random.seed(0)``)
makes both public, so every default here draws from the operating system's
entropy pool (``secrets`` / ``os.urandom``). An explicit seed or key is
honoured for reproducibility: that is the caller's informed choice.

JAX keys are stored as raw ``uint32`` key data (``jax.random.key_data``), not
typed key arrays, so optimizer states holding them are plain arrays that any
checkpointer can save.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import os
import secrets

import jax
import jax.numpy as jnp
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from dpfl import _sharding


def _key_data_shape() -> tuple[int, ...]:
  """Shape of one key's raw data under the current default PRNG impl."""
  return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def _urandom_words(shape: tuple[int, ...]) -> np.ndarray:
  size = int(np.prod(shape))
  return np.frombuffer(os.urandom(4 * size), dtype=np.uint32).reshape(shape)


def _replica_probe(tree) -> jax.Array:
  """A bool per leaf of ``tree``, computed from the leaf: batched wherever it is.

  Passed to the key callbacks below only so that ``jax.vmap`` over ``tree``
  batches the callback (one call per replica, see ``io_callback``'s batching
  rule) instead of calling it once and broadcasting one key to every replica.
  A full reduction rather than a slice, so sharded leaves need no reshape.
  """
  leaves = jax.tree.leaves(tree)

  def probe(leaf):
    leaf = jnp.asarray(leaf)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return jnp.any(leaf != 0)
  return jnp.stack([probe(leaf) for leaf in leaves] or [jnp.bool_(False)])


def _on_mesh_of(draw, like):
  """``draw(like)``, replicated over the mesh ``like`` is sharded on when called eagerly.

  A host callback run eagerly on mesh-sharded arrays returns an array on one
  device (``{maximal device=0}``) that later eager ops cannot combine with
  the mesh, and that in a multi-process run only process 0 holds. Compiled
  with a replicated output sharding instead, the callback runs once, on the
  first device, and every device of every process receives its result: all
  processes hold the same key (process 0's draw), as one multi-process run
  must. Under a trace (``like`` abstract) or without a mesh: ``draw(like)``.
  """
  leaves = jax.tree.leaves(like)
  if not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
    for leaf in leaves:
      sharding = getattr(leaf, "sharding", None)
      if isinstance(sharding, NamedSharding):
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        return jax.jit(draw, out_shardings=replicated)(like)
  return draw(like)


def _fresh_key_data_like(like) -> jax.Array:
  shape = _key_data_shape()
  return io_callback(lambda _: _urandom_words(shape), jax.ShapeDtypeStruct(shape, jnp.uint32),
                     _replica_probe(like), ordered=False)


def fresh_key_data(like=None) -> jax.Array:
  """Raw key data filled with OS entropy (every bit pattern is a valid key).

  The bytes come from ``os.urandom`` through ``jax.experimental.io_callback``,
  so the draw happens when the computation *runs*: a jitted ``init`` called
  twice gets two different keys, instead of one key baked in as a constant at
  trace time and replayed from the compilation cache; under ``lax.map`` /
  ``lax.scan`` every iteration draws anew. We do not use
  ``jax.random.key(int)``: it keeps only 32 bits of the seed when x64 is
  disabled, so independently seeded runs would collide after ~2^16 runs.

  Args:
    like: optional pytree (e.g. the params ``init`` receives): under
      ``jax.vmap`` over it, every replica draws its own key. Without it a
      vmapped draw happens once and every replica shares the key.
  """
  if like is None:
    shape = _key_data_shape()
    return io_callback(lambda: _urandom_words(shape), jax.ShapeDtypeStruct(shape, jnp.uint32),
                       ordered=False)
  return _on_mesh_of(_fresh_key_data_like, like)


def init_keys(key, *, name: str = "key"):
  """The key source of a noise transform: ``draw(params)`` gives each ``init`` its key.

  ``key=None``: every execution of ``init`` draws fresh OS entropy
  (``fresh_key_data``). An explicit ``key``: the first execution returns its
  key data unchanged (runs are reproducible, and match ``jax.random.key``),
  execution ``n >= 1`` returns ``fold_in(key, n)``. Executions are counted at
  run time by a host callback, so each of several states made from one
  transform gets its own noise stream wherever they come from: a second
  ``init`` call, a second run of a jitted ``init``, every iteration of a
  ``lax.map`` / ``lax.scan`` over ``init``, and every replica of
  ``jax.vmap(init)`` over batched params (in replica order). Two replicas
  sharing a key would release updates whose difference cancels the noise.

  Args:
    key: None, or anything ``key_data`` accepts.
    name: the argument name used in error messages.

  Returns:
    A function ``draw(params) -> uint32 key data``, traceable.
  """
  if key is None:
    return fresh_key_data
  # Kept on the host; every draw makes a new array, so a donated state never
  # deletes the transform's own copy of the key.
  base = np.asarray(key_data(key, name=name))
  counter = itertools.count()

  def next_index(_):
    # Wraps after 2^32 inits of one transform: far beyond any real use.
    return np.uint32(next(counter) % 2**32)

  def draw_index(params) -> jax.Array:
    index = io_callback(next_index, jax.ShapeDtypeStruct((), jnp.uint32),
                        _replica_probe(params), ordered=False)
    first = jnp.asarray(base)
    folded = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(first), index))
    return jnp.where(index == 0, first, folded)

  def draw(params) -> jax.Array:
    return _on_mesh_of(draw_index, params)

  return draw


@jax.custom_batching.custom_vmap
def _unshared(key: jax.Array, probe: jax.Array) -> jax.Array:
  del probe
  return key


@_unshared.def_vmap
def _unshared_rule(axis_size, in_batched, key, probe):
  del axis_size
  key_batched, probe_batched = in_batched
  if not key_batched and probe_batched:
    raise ValueError(
        "the noise state's key is shared by every vmapped replica (the state is not batched "
        "while the updates are): every replica would add the same noise, and the difference "
        "of two replicas' updates would cancel it. Give every replica its own state, "
        "states = jax.vmap(tx.init)(stacked_params), and vmap update over it too "
        "(jax.vmap(tx.update)(updates, states)).")
  # Bound again so that an enclosing vmap checks its own axis as well.
  return _unshared(key, probe), key_batched


def unshared_key(key: jax.Array, updates) -> jax.Array:
  """``key`` unchanged; raises at trace time if vmapped replicas would share it.

  Under ``jax.vmap`` over ``updates`` with ``key`` (the noise state) not
  batched, every replica would draw the same noise: a ``ValueError`` says how
  to give each replica its own state. Free outside vmap (the check is a
  batching rule; the probe is dead code that XLA removes).
  """
  return _unshared(key, _replica_probe(updates))


def _int_key_data(seed: int, name: str) -> np.ndarray:
  """Key data that depends on every bit of ``seed`` (an int >= 0).

  Under the default threefry impl a key is two 32-bit words, so seeds below
  2**64 map one-to-one onto key data ``[seed >> 32, seed & 0xFFFFFFFF]``:
  what ``jax.random.key(seed)`` gives with ``jax_enable_x64`` (and also
  without it for seeds below 2**32). ``jax.random.key(seed)`` without x64
  keeps only the low 32 bits: 2**32 seeds can be scanned in hours, so a
  63-bit secret would have 32 bits of strength. Higher 32-bit words of longer
  seeds (e.g. 128-bit secrets) are folded in one by one with
  ``jax.random.fold_in``: every bit still changes the key, though a key holds
  at most 64 bits of entropy. Other PRNG impls start from
  ``jax.random.key(low word)`` and fold in every higher word.
  """
  if seed < 0:
    raise ValueError(f"{name} must be an integer >= 0 (or a jax.random.key), got {seed!r}")
  words = []
  rest = seed
  while True:
    words.append(rest & 0xFFFFFFFF)
    rest >>= 32
    if not rest:
      break
  if jax.config.jax_default_prng_impl == "threefry2x32" and _key_data_shape() == (2,):
    data = np.array([words[1] if len(words) > 1 else 0, words[0]], np.uint32)
    higher = words[2:]
  else:
    data = np.asarray(jax.random.key_data(jax.random.key(words[0])))
    higher = words[1:]
  for word in higher:
    data = np.asarray(jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(data)), np.uint32(word))))
  return data


def key_data(key, *, name: str = "key") -> jax.Array:
  """Raw uint32 key data from an int seed, a typed JAX key, or raw key data.

  Args:
    key: an ``int`` seed >= 0 of any size, every bit of which is kept (see
      ``_int_key_data``; for seeds below 2**32 the key is
      ``jax.random.key(seed)``); a typed key array (``jax.random.key``); or raw
      key data (``jax.random.PRNGKey``). Note that ``jax.random.key(seed)``
      itself drops the bits of ``seed`` above 32 unless x64 is enabled: pass
      large seeds to dpfl as ints.
    name: the argument name used in error messages.

  Returns:
    A ``uint32`` array of the default impl's key-data shape.

  Raises:
    ValueError: for a negative int (no one bit pattern is the obvious
      meaning: JAX maps -1 to different keys with and without x64) or
      anything that is not a key.
  """
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jnp.asarray(_int_key_data(int(key), name))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise ValueError(f"{name} must be a single key (shape ()), got shape {key.shape}")
      return jax.random.key_data(key)
    if key.dtype == np.uint32 and tuple(key.shape) == _key_data_shape():
      return jnp.asarray(key)
  raise ValueError(
      f"{name} must be an int seed >= 0, a jax.random.key(...) or raw uint32 key data of "
      f"shape {_key_data_shape()}, got {key!r}")


def numpy_generator(seed, *, name: str = "seed") -> np.random.Generator:
  """A numpy Generator: OS entropy when ``seed`` is None, else seeded.

  Args:
    seed: None (fresh OS entropy, the private default) or an int >= 0.
    name: the argument name used in error messages.

  Returns:
    A ``np.random.Generator`` (PCG64).
  """
  if seed is None:
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f"{name} must be None (OS entropy) or an integer >= 0, got {seed!r}")
  return np.random.Generator(np.random.PCG64(int(seed)))


# jax.random.normal's float32 pipeline: uniform on [nextafter(-1, 0), 1) from the
# top 23 bits, then sqrt(2) * erf_inv.
_UNIFORM_LOW = np.nextafter(np.float32(-1), np.float32(0))
_UNIFORM_SPAN = np.float32(1) - _UNIFORM_LOW
_SQRT2 = np.float32(np.sqrt(2))
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(key0, key1, count_hi, count_lo):
  """Threefry-2x32, 20 rounds (Salmon et al. 2011), as straight-line array ops.

  The same function as JAX's ``threefry2x32`` primitive, whose CPU lowering is a
  rolled loop of 5 iterations that writes both full-size words to memory each
  time; written out here, XLA fuses the hash into its consumer (4-5x faster
  draws on CPU, and the correlated-noise buffers update in the same pass).
  """
  ks = (key0, key1, key0 ^ key1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = count_hi + ks[0], count_lo + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
      x1 = x0 ^ x1
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _fused_normal_applies(shape, dtype) -> bool:
  return (dtype == jnp.float32 and math.prod(shape) < 2**32
          and jax.config.jax_default_prng_impl == "threefry2x32"
          and jax.config.jax_threefry_partitionable)


def normal(leaf_key, shape, dtype, sharding=None) -> jax.Array:
  """Standard normal draws, bit for bit ``jax.random.normal(leaf_key, shape, dtype)``.

  ``jax.random.normal(leaf_key, shape, dtype)``. For float32 under the default
  (partitionable threefry) PRNG it is computed by the same steps written out:
  counter ``i`` (the row-major index, as ``iota_2x32_shape``) hashed with the
  key, ``bits = hi ^ lo``, then ``normal``'s uniform-to-Gaussian map.
  Used by every dpfl noise transform; tests check the equality for several shapes.

  Args:
    leaf_key: a typed key.
    shape, dtype: of the draw.
    sharding: None, or the ``NamedSharding`` of the leaf the noise is for:
      the counters are made with it, so every device hashes only its own
      shard's counters (the draw is elementwise) and no device holds the
      whole draw; the values are those of the unsharded draw.
  """
  fused = _fused_normal_applies(shape, dtype)
  if sharding is None:
    return _fused_normal(leaf_key, tuple(shape), None) if fused else jax.random.normal(
        leaf_key, shape, dtype)
  args = (leaf_key, tuple(shape), sharding) if fused else (leaf_key, tuple(shape),
                                                           jnp.dtype(dtype), sharding)
  draw = _sharded_fused_normal if fused else _sharded_library_normal
  if (not isinstance(leaf_key, jax.core.Tracer) and _sharding.is_explicit(sharding)
      and isinstance(sharding.mesh, jax.sharding.Mesh)):
    # An eager draw for a leaf on an Explicit mesh: jit needs the mesh as context.
    with jax.set_mesh(sharding.mesh):
      return draw(*args)
  return draw(*args)


def _fused_normal(leaf_key, shape, sharding) -> jax.Array:
  key = jax.random.key_data(leaf_key)
  explicit = sharding is not None and _sharding.is_explicit(sharding)

  def iota(dim):
    if explicit:  # the counters' type is sharded: each device makes its own
      return jax.lax.broadcasted_iota(jnp.uint32, shape, dim, out_sharding=sharding)
    return _sharding.constrain(jax.lax.broadcasted_iota(jnp.uint32, shape, dim), sharding)

  index = None
  stride = 1
  for dim in reversed(range(len(shape))):  # elementwise, so sharding-friendly
    term = iota(dim) * np.uint32(stride)
    index = term if index is None else index + term
    stride *= shape[dim]
  if index is None:  # a scalar leaf
    index = jnp.zeros(shape, jnp.uint32)
  index = _sharding.constrain(index, sharding) if sharding is not None else index
  hi, lo = _threefry2x32(key[0], key[1], jnp.zeros_like(index), index)
  float_bits = ((hi ^ lo) >> np.uint32(9)) | np.uint32(0x3F800000)
  floats = jax.lax.bitcast_convert_type(float_bits, jnp.float32) - np.float32(1)
  uniform = jax.lax.max(_UNIFORM_LOW, floats * _UNIFORM_SPAN + _UNIFORM_LOW)
  out = _SQRT2 * jax.lax.erf_inv(uniform)
  return out if sharding is None else _sharding.constrain(out, sharding)


# Jitted when sharded, so that an eager call (outside any jit) also draws
# shard by shard instead of making the whole counter array on one device.
_sharded_fused_normal = jax.jit(_fused_normal, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _sharded_library_normal(leaf_key, shape, dtype, sharding) -> jax.Array:
  # Other dtypes / PRNG impls: jax.random.normal, its output laid out like the
  # leaf (partitionable threefry draws shard-locally; others may not).
  return _sharding.constrain(jax.random.normal(leaf_key, shape, dtype), sharding)
