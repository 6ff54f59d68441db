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
