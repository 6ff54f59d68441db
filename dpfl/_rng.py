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

import math

import numbers
import os
import secrets

import jax
import jax.numpy as jnp
from jax.experimental import io_callback
import numpy as np


def _key_data_shape() -> tuple[int, ...]:
  """Shape of one key's raw data under the current default PRNG impl."""
  return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def _urandom_words(shape: tuple[int, ...]) -> np.ndarray:
  size = int(np.prod(shape))
  return np.frombuffer(os.urandom(4 * size), dtype=np.uint32).reshape(shape)


def fresh_key_data() -> jax.Array:
  """Raw key data filled with OS entropy (every bit pattern is a valid key).

  The bytes come from ``os.urandom`` through ``jax.experimental.io_callback``,
  so the draw happens when the computation *runs*: a jitted ``init`` called
  twice gets two different keys, instead of one key baked in as a constant at
  trace time and replayed from the compilation cache. We do not use
  ``jax.random.key(int)``: it keeps only 32 bits of the seed when x64 is
  disabled, so independently seeded runs would collide after ~2^16 runs.
  """
  shape = _key_data_shape()
  return io_callback(lambda: _urandom_words(shape),
                     jax.ShapeDtypeStruct(shape, jnp.uint32), ordered=False)


def key_data(key, *, name: str = "key") -> jax.Array:
  """Raw uint32 key data from an int seed, a typed JAX key, or raw key data.

  Args:
    key: an ``int`` seed (as ``jax.random.key(seed)``), a typed key array
      (``jax.random.key``), or raw key data (``jax.random.PRNGKey``).
    name: the argument name used in error messages.

  Returns:
    A ``uint32`` array of the default impl's key-data shape.
  """
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.key_data(jax.random.key(int(key)))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise ValueError(f"{name} must be a single key (shape ()), got shape {key.shape}")
      return jax.random.key_data(key)
    if key.dtype == np.uint32 and tuple(key.shape) == _key_data_shape():
      return jnp.asarray(key)
  raise ValueError(
      f"{name} must be an int seed, a jax.random.key(...) or raw uint32 key data of "
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


def normal(leaf_key, shape, dtype) -> jax.Array:
  """Standard normal draws, bit for bit ``jax.random.normal(leaf_key, shape, dtype)``.

  ``jax.random.normal(leaf_key, shape, dtype)``. For float32 under the default
  (partitionable threefry) PRNG it is computed by the same steps written out:
  counter ``i`` (the row-major index, as ``iota_2x32_shape``) hashed with the
  key, ``bits = hi ^ lo``, then ``normal``'s uniform-to-Gaussian map.
  Used by every dpfl noise transform; tests check the equality for several shapes.
  """
  if not _fused_normal_applies(shape, dtype):
    return jax.random.normal(leaf_key, shape, dtype)
  key = jax.random.key_data(leaf_key)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):  # elementwise, so sharding-friendly
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
    stride *= shape[dim]
  hi, lo = _threefry2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32), index)
  float_bits = ((hi ^ lo) >> np.uint32(9)) | np.uint32(0x3F800000)
  floats = jax.lax.bitcast_convert_type(float_bits, jnp.float32) - np.float32(1)
  uniform = jax.lax.max(_UNIFORM_LOW, floats * _UNIFORM_SPAN + _UNIFORM_LOW)
  return _SQRT2 * jax.lax.erf_inv(uniform)
