"""Brute-force clipped sums shared by the clipping tests (not collected).

The reference never goes through dpfl: a Python loop calls ``jax.grad`` of the
user's own ``loss_fn`` on one unit at a time (one example as a batch of one,
or one user's real examples as a batch), then clips and sums in float64
NumPy. Masked units are skipped; a unit whose gradient norm is not finite is
counted and contributes nothing, as ``clipped_grad``'s guarantee says.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

# Float32 tolerance of a clipped sum, relative to the largest coordinate-wise
# sum of |terms|: a float32 sum's error is a few ulps of its summands, not of
# the result (a coordinate that cancels to ~0 keeps the summands' absolute
# error), and the summation order changes with method, vmap width,
# microbatching, sharding and the CPU. 1e-5 is ~84 float32 ulps; a real
# defect (a unit dropped, a wrong clip factor) moves the sum by O(1).
F32_RTOL = 1e-5


def flat(tree: Any) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], dtype=np.float64)


class Reference(NamedTuple):
  total: np.ndarray      # the clipped sum, float64
  abs_sum: np.ndarray    # coordinate-wise sum of |clipped contribution|
  norms: np.ndarray      # [units] gradient norm; 0 for masked units, inf/nan for broken ones
  values: np.ndarray     # [units] unit loss; 0 for masked units
  num_units: int         # unmasked units (users with >= 1 real example)
  num_clipped: int       # finite unmasked units with norm > C
  num_nonfinite: int     # unmasked units with a non-finite norm


@functools.cache
def _value_and_grad(loss_fn: Callable, has_aux: bool):
  if has_aux:
    scalar = lambda p, b: loss_fn(p, b)[0]
  else:
    scalar = loss_fn
  return jax.jit(jax.value_and_grad(scalar))


def unit_gradients(loss_fn, params, batch, *, unit="example", mask=None, has_aux=False):
  """[(value, flat gradient) or None for a masked unit] by a loop over units.

  ``unit="example"``: ``loss_fn`` on ``batch[i:i+1]``. ``unit="user"``:
  ``batch`` leaves are ``[users, k, ...]`` and ``loss_fn`` (a mean over its
  batch) is called on user ``u``'s real examples only, which is the user's
  mean loss computed without dpfl's masking.
  """
  value_and_grad = _value_and_grad(loss_fn, has_aux)
  n = jax.tree.leaves(batch)[0].shape[0]
  out = []
  for i in range(n):
    if unit == "example":
      if mask is not None and not mask[i]:
        out.append(None)
        continue
      one = jax.tree.map(lambda x: x[i : i + 1], batch)
    else:
      real = np.flatnonzero(mask[i])
      if real.size == 0:
        out.append(None)
        continue
      one = jax.tree.map(lambda x: x[i][real], batch)
    value, grad = value_and_grad(params, one)
    out.append((float(value), flat(grad)))
  return out


def brute_force(loss_fn, params, batch, l2_clip_norm, *, unit="example", mask=None,
                has_aux=False) -> Reference:
  """Sum over unmasked units of clip(g_u), by an explicit loop, in float64."""
  if mask is not None:
    mask = np.asarray(mask) != 0
  units = unit_gradients(loss_fn, params, batch, unit=unit, mask=mask, has_aux=has_aux)
  size = flat(params).shape
  total, abs_sum = np.zeros(size), np.zeros(size)
  norms, values = [], []
  counted = clipped = nonfinite = 0
  for item in units:
    if item is None:
      norms.append(0.0)
      values.append(0.0)
      continue
    value, g = item
    counted += 1
    with np.errstate(over="ignore", invalid="ignore"):
      norm = math.sqrt(float(np.sum(g * g)))
    norms.append(norm)
    values.append(value)
    if not np.isfinite(norm):
      nonfinite += 1
      continue
    clipped += norm > l2_clip_norm
    contribution = g * min(1.0, l2_clip_norm / norm) if norm > 0 else g
    total += contribution
    abs_sum += np.abs(contribution)
  return Reference(total, abs_sum, np.array(norms), np.array(values), counted, clipped,
                   nonfinite)


def split_clip_norm(norms: np.ndarray, margin: float = 1e-3) -> float:
  """A clip norm between the two middle finite norms: about half the units clipped.

  The geometric mean of the neighbours, which must differ by more than
  ``margin`` (relative) so that a float32 norm cannot land on the other side.
  """
  finite = np.sort(norms[np.isfinite(norms) & (norms > 0)])
  assert finite.size >= 2, norms
  k = finite.size // 2
  low, high = finite[k - 1], finite[k]
  assert high > low * (1 + margin), (low, high)
  return float(math.sqrt(low * high))


def assert_sum_close(got, want, abs_sum, *, rtol=F32_RTOL):
  """got ~ want, two clipped sums whose terms have coordinate-wise |sum| abs_sum."""
  np.testing.assert_allclose(flat(got), want, rtol=rtol, atol=rtol * float(np.max(abs_sum)))
