"""Correlated noise for DP-FTRL / DP-MF, streamed one step at a time (optax).

A matrix-factorization mechanism (Denisov et al. 2022, "Improved Differential
Privacy for SGD via Optimal Private Linear Operators on Adaptive Streams",
arXiv 2202.08312; Choquette-Choo et al. 2023, arXiv 2211.06530) picks a
lower-triangular, invertible *strategy* ``C`` (n x n) and releases, over the
``n`` steps of training, ``C G + s Z`` where row ``t`` of ``G`` is step
``t``'s clipped gradient sum and ``Z`` has iid ``N(0, 1)`` entries. Training
consumes ``C^{-1}(C G + s Z) = G + s C^{-1} Z``, so step ``t`` adds the
correlated noise ``s (C^{-1} Z)_t`` to its clipped sum. The transforms here
generate that noise in a stream: ``(C^{-1} Z)_t`` from the fresh ``z_t`` and a
small state, never the n x n product. Each is a ``dpfl.noise.NoiseStrategy``
(``blt_strategy``, ``banded_strategy``, ``dense_strategy``; ``noise_strategy``
picks one for a strategy object) run by the one privatizer of dpfl,
``dpfl.noise.privatizer``, which DP-SGD's ``gaussian_noise`` runs too (with
the identity strategy): key handling, the draw, scaling, the step limit and
the state type ``NoiseState`` (alias ``CorrelatedNoiseState``) are its.

================  ==================================  ======================
strategy          state (besides key and count)       cost per step
================  ==================================  ======================
``identity_noise``  none (DP-SGD's iid noise)             one draw
``blt_noise``       ``m`` model-sized buffers             one draw + 2m axpys
``banded_noise``    ``b - 1`` model-sized buffers         one draw + b axpys
``dense_noise``     ``n`` PRNG keys (tiny)                ``t + 1`` draws at step t
================  ==================================  ======================

BLT (Dvijotham et al. 2024, arXiv 2404.16706): ``C`` is Toeplitz with
``c_0 = 1``, ``c_t = sum_i omega_i theta_i^(t-1)``; solving ``C x = z`` row by
row is ``x_t = z_t - sum_i omega_i s_i``, then ``s_i <- theta_i s_i + x_t``
(``s_i`` holds ``sum_{j<t} theta_i^(t-1-j) x_j``, so ``sum_i omega_i s_i`` is
``sum_{j<t} c_{t-j} x_j``). Banded: forward substitution that only looks
``b - 1`` rows back. Dense: ``x_t = sum_{s<=t} (C^{-1})_{ts} z_s``, regenerating
each past ``z_s`` from its stored key, O(params) memory but O(t * params)
work at step ``t``; when ``n * params`` floats fit in memory,
``banded_noise(matrix=C, num_bands=n)`` keeps the past ``x`` instead (``n - 1``
buffers, O(n * params) work per step, no regeneration).

Semantics. The input is the clipped *sum* (as for ``dpfl.noise.gaussian_noise``)
and step ``t`` returns ``(clipped_sum + s * x_t) / expected_batch_size`` with
``s = noise_multiplier * l2_clip_norm * sensitivity`` and ``x = C^{-1} z``.
Why the sum and the fixed denominator: see ``dpfl.noise``.

The noise ``z``. Every transform here is ``dpfl.noise.privatizer``, so ``z_t``
(per leaf, drawn in float32 or the leaf's dtype if wider) is *bit for bit* the noise ``gaussian_noise`` with the same key
would add at step ``t`` (scaled by its ``noise_multiplier * l2_clip_norm``).
``identity_noise`` therefore equals ``gaussian_noise`` with noise multiplier
``noise_multiplier * sensitivity``, and tests reconstruct ``Z`` from the key.

Keys, checkpoints, resumes. The key is raw ``uint32`` key data in the state,
split every step (no two steps share ``z``); OS entropy by default, an explicit
key for reproducible runs; vmapped or scanned ``init`` gives every replica its
own key, as ``dpfl.noise`` explains. The state type is registered with
``dpfl.noise.reseed`` (and ``dpfl.noise.advance`` moves it over steps
already released): after restoring a checkpoint call ``reseed`` so the
resumed steps draw fresh ``z`` (the buffers, and for ``dense_noise`` the keys
of past steps, are kept: they are what ties the new steps to the old ones).
Privacy of a resume: steps released after the checkpoint and before a crash
were released *again* by the resumed run with fresh noise. Both releases are
Gaussian mechanisms on rows of ``C G`` (so, if the resumed run keeps the
participation pattern, each has sensitivity at most ``sens(C) * l2_clip_norm``)
with independent noise; a ledger that composes the interrupted run and the
resumed run (``accounting.Ledger`` seals on load) is therefore a valid,
conservative account.

Past the last step. Each transform knows ``n`` and the state counts steps; the
mechanism is not defined (and not accounted) beyond step ``n``. An eager
``update`` at step ``>= n`` raises ``ValueError``; a jitted one cannot raise,
so it returns all-NaN updates, which release nothing and make the overrun
impossible to miss.

Speed. A BLT step is memory-bound: it reads and writes ``m`` float32 buffers
per parameter. Two things keep it near that floor. (1) ``x_t`` is computed
once and stored (a ``cond`` in the privatizer), instead of XLA recomputing it, and
re-reading every buffer, inside each buffer update. (2) ``z`` is drawn by a
fused, bit-identical implementation of ``jax.random.normal`` (``dpfl.noise.normal_leaves``): on
CPU JAX lowers the threefry hash to a rolled loop that streams its state
through memory five times, which costs more than the buffers. (3) Donate the
state (``make_step(donate=True)``): the buffers are then updated in place;
without donation every step allocates m fresh model-sized arrays. On a 2-core
CPU with 10M parameters a donated 4-buffer BLT step takes ~1.5x the time of a
donated ``gaussian_noise`` step, ~2.5x without donation
(``benchmarks/_mf_streaming.py``). Keeping the m buffers of a parameter
together (one ``[..., m]`` array) measured slower than m separate arrays.
"""


from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from accounting import validate as check
from dpfl import noise
from dpfl.mf.blt import check_blt_parameters

# The one state type of dpfl's noise transforms, under the name this module
# has always given it.
CorrelatedNoiseState = noise.NoiseState

__all__ = ["CorrelatedNoiseState", "banded_noise", "banded_strategy", "blt_noise",
           "blt_strategy", "dense_noise", "dense_strategy", "identity_noise", "matrix_noise",
           "noise_strategy"]


# --- argument checks of the strategies' matrices -------------------------------------


def _as_float_array(name: str, value, ndim: int) -> np.ndarray:
  try:
    arr = np.array(value, dtype=np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be a real {ndim}-D array, got {value!r}") from err
  if arr.ndim != ndim:
    raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite, got {arr!r}")
  return arr


def _check_lower_triangular(name: str, matrix) -> np.ndarray:
  """A finite, square, lower-triangular matrix with a nonzero diagonal."""
  arr = _as_float_array(name, matrix, 2)
  n = arr.shape[0]
  if arr.shape != (n, n) or n < 1:
    raise ValueError(f"{name} must be a square n x n matrix with n >= 1, got shape {arr.shape}")
  # Exactly zero above the diagonal: the stream solves the lower triangle only,
  # so any mass above it would make the noise differ from the accounted C^{-1} z.
  upper = np.argwhere(np.triu(arr, 1) != 0)
  if upper.size:
    i, j = upper[0]
    raise ValueError(f"{name} must be lower-triangular; entry [{i}, {j}] above the "
                     f"diagonal is {arr[i, j]!r}")
  zero_diag = np.flatnonzero(np.diag(arr) == 0)
  if zero_diag.size:
    i = zero_diag[0]
    raise ValueError(f"{name} must be invertible (nonzero diagonal); entry [{i}, {i}] is 0")
  return arr


def _lower_bandwidth(matrix: np.ndarray) -> int:
  """Smallest b with matrix[i, j] == 0 whenever i - j >= b."""
  rows, cols = np.nonzero(matrix)
  return int(np.max(rows - cols)) + 1 if rows.size else 1


# --- the streaming strategies ---------------------------------------------------------


def blt_strategy(*, buffer_decay: Sequence[float], output_scale: Sequence[float],
                 num_steps: int) -> noise.NoiseStrategy:
  """The stream of a BLT: ``x_t = z_t - sum_i omega_i s_i``, ``s_i <- theta_i s_i + x_t``.

  Args:
    buffer_decay: ``theta``, shape ``[m]``, each in (-1, 1)
      (``dpfl.mf.blt.check_blt_parameters``, as for ``BltStrategy``).
    output_scale: ``omega``, shape ``[m]``, finite.
    num_steps: ``n``, the number of steps the mechanism is accounted for.

  Returns:
    A ``dpfl.noise.NoiseStrategy`` with ``num_steps = n`` and ``m`` buffers
    per leaf. It releases nothing itself: ``dpfl.noise.privatizer`` runs it
    (``blt_noise`` states that transform's guarantee).
  """
  theta, omega = check_blt_parameters(buffer_decay, output_scale)
  num_steps = check.positive_int("num_steps", num_steps)
  theta_f, omega_f = [float(v) for v in theta], [float(v) for v in omega]

  def solve(t, z, buffers, step_keys):
    del t, step_keys
    xs = []
    for z_leaf, s in zip(z, buffers):
      x = z_leaf
      for w, s_i in zip(omega_f, s):
        x = x - w * s_i
      xs.append(x)
    return xs

  def carry(t, xs, buffers):
    del t
    return [[th * s_i + x for th, s_i in zip(theta_f, s)] for x, s in zip(xs, buffers)]

  return noise.NoiseStrategy(num_steps=num_steps, num_buffers=len(theta_f), solve=solve,
                             carry=carry)


def _band_tables(matrix: np.ndarray | None, diagonals: np.ndarray | None,
                 num_bands: int | None) -> tuple[np.ndarray, np.ndarray, int]:
  """(coefs [n, b-1] with coefs[t, j-1] = C[t, t-j], 1 / diag(C) [n], b)."""
  if (matrix is None) == (diagonals is None):
    raise ValueError("give exactly one of matrix (n x n) and diagonals ([num_bands, n])")
  if matrix is not None:
    matrix = _check_lower_triangular("matrix", matrix)
    n = matrix.shape[0]
    needed = _lower_bandwidth(matrix)
    if num_bands is None:
      num_bands = needed
    num_bands = check.positive_int("num_bands", num_bands)
    if num_bands > n:
      raise ValueError(f"num_bands must be <= n = {n}, got {num_bands}")
    if needed > num_bands:
      raise ValueError(f"num_bands={num_bands} but matrix has nonzeros {needed - 1} "
                       f"diagonals below the main one; num_bands must be >= {needed}")
    diagonals = np.zeros((num_bands, n))
    for d in range(num_bands):
      diagonals[d, :n - d] = np.diagonal(matrix, -d)
  else:
    diagonals = _as_float_array("diagonals", diagonals, 2)
    if num_bands is not None and num_bands != diagonals.shape[0]:
      raise ValueError(f"num_bands must equal diagonals.shape[0] = {diagonals.shape[0]}, "
                       f"got {num_bands!r}")
    num_bands, n = diagonals.shape
    if num_bands < 1 or n < 1 or num_bands > n:
      raise ValueError(f"diagonals must have shape [num_bands, n] with 1 <= num_bands <= n, "
                       f"got {diagonals.shape}")
    zero_diag = np.flatnonzero(diagonals[0] == 0)
    if zero_diag.size:
      i = zero_diag[0]
      raise ValueError(f"diagonals must describe an invertible C; diagonals[0, {i}] is 0")
  coefs = np.zeros((n, max(num_bands - 1, 0)))
  for j in range(1, num_bands):
    coefs[j:, j - 1] = diagonals[j, :n - j]  # C[t, t - j] = diagonals[j, t - j]
  return coefs, 1.0 / diagonals[0], num_bands


def banded_strategy(*, matrix: Any = None, diagonals: Any = None,
                    num_bands: int | None = None) -> noise.NoiseStrategy:
  """The stream of a banded ``C``: forward substitution over the last ``b - 1`` rows.

  ``x_t = (z_t - sum_{j=1}^{b-1} C[t, t-j] x_{t-j}) / C[t, t]``, with the
  ``C[t, t-j]`` and ``1 / C[t, t]`` held in float32.

  Args:
    matrix: ``C``, n x n, lower-triangular (exactly zero above the diagonal),
      nonzero diagonal; or None if ``diagonals`` is given.
    diagonals: alternatively ``[num_bands, n]`` with ``diagonals[d, j] =
      C[j + d, j]`` (``dpfl.mf.BandedStrategy.diagonals``), ``1 <= num_bands
      <= n``, ``diagonals[0]`` nonzero. Exactly one of the two is given.
    num_bands: ``b``; default: the bandwidth of ``matrix`` (or
      ``diagonals.shape[0]``, which a given value must equal). With
      ``matrix``, a larger value (at most ``n``) is allowed (more buffers), a
      smaller one is an error.

  Returns:
    A ``dpfl.noise.NoiseStrategy`` with ``num_steps = n`` and ``b - 1``
    buffers per leaf (newest first). It releases nothing itself:
    ``dpfl.noise.privatizer`` runs it (``banded_noise`` states that
    transform's guarantee).
  """
  coefs, inv_diag, num_bands = _band_tables(matrix, diagonals, num_bands)
  coefs_f32 = jnp.asarray(coefs, jnp.float32)
  inv_diag_f32 = jnp.asarray(inv_diag, jnp.float32)

  def solve(t, z, buffers, step_keys):
    del step_keys
    row, scale = coefs_f32[t], inv_diag_f32[t]
    xs = []
    for z_leaf, past in zip(z, buffers):  # past[j - 1] holds x_{t-j}
      x = z_leaf
      for j, x_past in enumerate(past):
        x = x - row[j].astype(x.dtype) * x_past
      xs.append(x * scale.astype(x.dtype))
    return xs

  def carry(t, xs, buffers):
    del t
    # Shift: new x first, the oldest dropped (unchanged arrays, no arithmetic).
    return [[x] + list(past[:-1]) for x, past in zip(xs, buffers)]

  return noise.NoiseStrategy(num_steps=inv_diag.shape[0], num_buffers=num_bands - 1,
                             solve=solve, carry=carry)


def dense_strategy(*, matrix: Any) -> noise.NoiseStrategy:
  """The stream of any lower-triangular ``C``: ``x_t = sum_{s<=t} (C^{-1})_{ts} z_s``.

  Past ``z_s`` are regenerated from the step keys the state keeps.
  ``C^{-1}`` is computed in float64, then rounded to float32.

  Args:
    matrix: ``C``, n x n, lower-triangular with a nonzero diagonal.

  Returns:
    A ``dpfl.noise.NoiseStrategy`` with ``num_steps = n``, no buffers and
    ``store_step_keys=True``. It releases nothing itself:
    ``dpfl.noise.privatizer`` runs it (``dense_noise`` states that
    transform's guarantee).

  Raises:
    ValueError: if ``matrix`` is not of that form, or ``C^{-1}`` overflows.
  """
  matrix = _check_lower_triangular("matrix", matrix)
  num_steps = matrix.shape[0]
  inverse = scipy.linalg.solve_triangular(matrix, np.eye(num_steps), lower=True)
  if not np.all(np.isfinite(inverse)):
    raise ValueError("matrix must be invertible; its inverse overflows (ill-conditioned C)")
  inverse_f32 = jnp.asarray(np.tril(inverse), jnp.float32)

  def solve(t, z, buffers, step_keys):
    del buffers
    row = inverse_f32[t]
    # z_t was just drawn; add the regenerated z_s, s < t. The step keys of
    # past steps were stored when those steps ran, so these are the same z_s.
    acc = [row[t].astype(z_leaf.dtype) * z_leaf for z_leaf in z]

    def body(s, acc):
      past = noise.normal_leaves(jax.random.wrap_key_data(step_keys[s]), z)
      return [a + row[s].astype(p.dtype) * p for a, p in zip(acc, past)]

    return jax.lax.fori_loop(0, t, body, acc)

  return noise.NoiseStrategy(num_steps=num_steps, solve=solve, store_step_keys=True)


def _strategy_matrix(strategy) -> np.ndarray:
  matrix = getattr(strategy, "matrix", strategy)
  return np.asarray(matrix() if callable(matrix) else matrix)


def noise_strategy(strategy: Any, *, num_steps: int | None = None) -> noise.NoiseStrategy:
  """The cheapest stream a strategy ``C`` allows, as a ``dpfl.noise.NoiseStrategy``.

  * ``buffer_decay`` and ``output_scale`` attributes (``dpfl.mf.BltStrategy``):
    ``blt_strategy``;
  * a ``diagonals`` attribute (``dpfl.mf.BandedStrategy``): ``banded_strategy``;
  * otherwise its ``matrix`` (or ``strategy`` itself as an n x n array): the
    identity (with ``n`` steps) if ``C = I``, ``banded_strategy`` if ``C``
    has fewer than ``n`` nonzero diagonals, else ``dense_strategy``.

  Args:
    strategy: a ``dpfl.mf`` strategy, any object with the attributes above,
      or an n x n lower-triangular array.
    num_steps: ``n``; default ``strategy.num_steps`` or the matrix size. Must
      match the strategy's when both are known (required for a BLT-like
      object without ``num_steps``).

  Returns:
    A ``dpfl.noise.NoiseStrategy``: ``blt_strategy``'s, ``banded_strategy``'s,
    ``dense_strategy``'s, or ``NoiseStrategy(num_steps=n)`` (the identity).
    It carries no sensitivity: the privatizer that runs it is given
    ``sens(C)`` (as ``matrix_noise`` does), and the guarantee is that
    transform's.
  """
  own_steps = getattr(strategy, "num_steps", None)
  if num_steps is None:
    num_steps = own_steps
  elif own_steps is not None and num_steps != own_steps:
    raise ValueError(f"num_steps must match strategy.num_steps = {own_steps}, got {num_steps!r}")
  if hasattr(strategy, "buffer_decay") and hasattr(strategy, "output_scale"):
    if num_steps is None:
      raise ValueError("num_steps must be given for a BLT strategy without .num_steps")
    return blt_strategy(buffer_decay=strategy.buffer_decay,
                        output_scale=strategy.output_scale, num_steps=num_steps)
  if getattr(strategy, "diagonals", None) is not None:
    diagonals = np.asarray(strategy.diagonals)
    if num_steps is not None and diagonals.ndim == 2 and diagonals.shape[1] != num_steps:
      raise ValueError(f"num_steps must equal the strategy's size {diagonals.shape[1]}, "
                       f"got {num_steps!r}")
    return banded_strategy(diagonals=diagonals)
  matrix = _check_lower_triangular("matrix", _strategy_matrix(strategy))
  n = matrix.shape[0]
  if num_steps is not None and num_steps != n:
    raise ValueError(f"num_steps must equal the strategy matrix size {n}, got {num_steps!r}")
  if np.array_equal(matrix, np.eye(n)):
    return noise.NoiseStrategy(num_steps=n)
  if _lower_bandwidth(matrix) < n:
    return banded_strategy(matrix=matrix)
  return dense_strategy(matrix=matrix)


# --- the transforms: the one privatizer with these strategies --------------------------


_SHARED_ARGS_DOC = """
    noise_multiplier: ``sigma``, the ratio of the noise standard deviation to
      the sensitivity ``sens(C) * l2_clip_norm`` of ``C G``; finite and > 0.
    l2_clip_norm: the clip norm ``C_clip`` the input sums were clipped with; > 0.
    sensitivity: ``sens(C)``, the largest L2 norm of ``C u`` over the
      participation patterns ``u`` one privacy unit may have (in units of the
      clip norm; e.g. ``strategy.sensitivity`` from ``dpfl.mf``); > 0.
    expected_batch_size: the public normaliser (``sampling_prob * N``, or the
      fixed batch size, or the number of users per round); > 0.
    key: None (OS entropy each time ``init`` runs), or an ``int`` seed >= 0
      (every bit used) / ``jax.random.key`` for reproducible noise: the first
      ``init`` uses this key, each later one (another call, vmapped replica
      or scan iteration) ``jax.random.fold_in(key, n)``, as in
      ``dpfl.noise.gaussian_noise``. Multi-process training must pass the
      same explicit key on every process.
"""

_GUARANTEE_DOC = """
  Privacy guarantee: if every privacy unit changes each step's clipped sum by a
  vector of L2 norm at most ``l2_clip_norm``, and takes part in the steps of
  one of the participation patterns ``sensitivity`` was computed for, then the
  ``n`` outputs are post-processing of ``C G + s Z`` with
  ``s = noise_multiplier * l2_clip_norm * sensitivity``: ONE Gaussian mechanism
  whose sensitivity is ``sensitivity * l2_clip_norm``, i.e. with noise
  multiplier ``noise_multiplier``, also when gradients are chosen adaptively
  (``C`` lower-triangular; Denisov et al. 2022, arXiv 2202.08312). Account it with
  ``accounting.MatrixMechanism(noise_multiplier, sensitivity, planned_steps=n,
  ...)``.
"""


def _docstring(fn):
  """Fills the ``{shared_args}`` and ``{guarantee}`` blocks of a docstring."""
  fn.__doc__ = fn.__doc__.replace("{shared_args}", _SHARED_ARGS_DOC.strip("\n")).replace(
      "{guarantee}", _GUARANTEE_DOC.strip())
  return fn


@_docstring
def identity_noise(*, num_steps: int, noise_multiplier: float, l2_clip_norm: float,
                   sensitivity: float, expected_batch_size: float,
                   key: Any = None) -> optax.GradientTransformation:
  """Independent noise (``C = I``, DP-SGD) with the matrix mechanism's scaling.

  Output at step ``t``: ``(clipped_sum + s * z_t) / expected_batch_size``,
  exactly ``dpfl.noise.gaussian_noise`` with noise multiplier
  ``noise_multiplier * sensitivity`` (and the same key), plus the step limit.
  With ``k`` participations ``sensitivity = sqrt(k)``.

  {guarantee}

  Args:
    num_steps: ``n``, the number of steps the mechanism is accounted for.
{shared_args}

  Returns:
    An ``optax.GradientTransformation`` with ``CorrelatedNoiseState``.
  """
  strategy = noise.NoiseStrategy(num_steps=check.positive_int("num_steps", num_steps))
  return noise.privatizer(strategy, noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                     sensitivity=sensitivity, expected_batch_size=expected_batch_size, key=key)


@_docstring
def blt_noise(*, buffer_decay: Sequence[float], output_scale: Sequence[float], num_steps: int,
              noise_multiplier: float, l2_clip_norm: float, sensitivity: float,
              expected_batch_size: float, key: Any = None) -> optax.GradientTransformation:
  """Correlated noise ``C^{-1} z`` of a buffered linear Toeplitz (BLT) strategy.

  ``C`` is lower-triangular Toeplitz with ``c_0 = 1`` and
  ``c_t = sum_i output_scale_i * buffer_decay_i^(t-1)`` (Dvijotham, McMahan,
  Pillutla, Steinke, Thakurta 2024, arXiv 2404.16706; McMahan et al. 2024,
  arXiv 2408.08868). Step ``t`` computes ``x_t = z_t - sum_i omega_i s_i``,
  outputs ``(clipped_sum + s * x_t) / expected_batch_size`` and updates
  ``s_i <- theta_i s_i + x_t``: ``m = len(buffer_decay)`` model-sized float32
  buffers, a few fused multiply-adds per parameter besides the draw of ``z``.

  {guarantee}

  Args:
    buffer_decay: ``theta``, shape ``[m]``, each in (-1, 1) (the range
      ``dpfl.mf.BltStrategy`` allows: one check, ``check_blt_parameters``).
    output_scale: ``omega``, shape ``[m]``, finite.
    num_steps: ``n``, the number of steps ``sensitivity`` was computed for.
{shared_args}

  Returns:
    An ``optax.GradientTransformation`` with ``CorrelatedNoiseState``
    (``len(state.buffers) == m``).
  """
  strategy = blt_strategy(buffer_decay=buffer_decay, output_scale=output_scale,
                          num_steps=num_steps)
  return noise.privatizer(strategy, noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                     sensitivity=sensitivity, expected_batch_size=expected_batch_size, key=key)


@_docstring
def banded_noise(*, matrix: Any = None, diagonals: Any = None, num_bands: int | None = None,
                 noise_multiplier: float, l2_clip_norm: float, sensitivity: float,
                 expected_batch_size: float, key: Any = None) -> optax.GradientTransformation:
  """Correlated noise ``C^{-1} z`` of a banded lower-triangular strategy.

  ``C[t, s] = 0`` for ``t - s >= num_bands`` (Toeplitz or not). Forward
  substitution: ``x_t = (z_t - sum_{j=1}^{b-1} C[t, t-j] x_{t-j}) / C[t, t]``,
  keeping the last ``b - 1`` values of ``x`` (model-sized float32 buffers,
  newest first). ``num_bands = n`` works for any lower-triangular ``C``, at
  ``n - 1`` buffers.

  {guarantee}

  Args:
    matrix: ``C``, n x n, lower-triangular, nonzero diagonal; or None if
      ``diagonals`` is given.
    diagonals: alternatively ``[num_bands, n]`` with ``diagonals[d, j] =
      C[j + d, j]`` (``dpfl.mf.BandedStrategy.diagonals``): no n x n matrix.
    num_bands: ``b``; default: the bandwidth of ``matrix``. A larger value is
      allowed (more buffers), a smaller one is an error.
{shared_args}

  Returns:
    An ``optax.GradientTransformation`` with ``CorrelatedNoiseState``
    (``len(state.buffers) == num_bands - 1``).
  """
  strategy = banded_strategy(matrix=matrix, diagonals=diagonals, num_bands=num_bands)
  return noise.privatizer(strategy, noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                     sensitivity=sensitivity, expected_batch_size=expected_batch_size, key=key)


@_docstring
def dense_noise(*, matrix: Any, noise_multiplier: float, l2_clip_norm: float,
                sensitivity: float, expected_batch_size: float,
                key: Any = None) -> optax.GradientTransformation:
  """Correlated noise ``C^{-1} z`` of any lower-triangular strategy, in O(params) memory.

  Step ``t`` regenerates ``z_0 .. z_{t-1}`` from their keys (kept in the state,
  ``n`` tiny key arrays) and returns ``x_t = sum_{s<=t} (C^{-1})_{ts} z_s``
  with ``C^{-1}`` precomputed in float64. Memory: O(params); work at step
  ``t``: ``t + 1`` draws of model-sized noise, so a run costs ``~n^2 / 2``
  draws. The trade-off: ``banded_noise(matrix=C, num_bands=n)`` keeps the
  past ``x`` instead, ``n - 1`` model-sized buffers and ``n`` multiply-adds
  per step: use it when ``n * params`` floats fit in memory, this otherwise.
  (``reseed`` changes only the key of future steps; past keys are kept, since
  ``x_t`` needs the ``z_s`` that were actually used.)

  {guarantee}

  Args:
    matrix: ``C``, n x n, lower-triangular with a nonzero diagonal.
{shared_args}

  Returns:
    An ``optax.GradientTransformation`` with ``CorrelatedNoiseState``.
  """
  return noise.privatizer(dense_strategy(matrix=matrix), noise_multiplier=noise_multiplier,
                     l2_clip_norm=l2_clip_norm, sensitivity=sensitivity,
                     expected_batch_size=expected_batch_size, key=key)


def matrix_noise(strategy: Any, *, noise_multiplier: float, l2_clip_norm: float,
                 expected_batch_size: float, sensitivity: float | None = None,
                 num_steps: int | None = None, key: Any = None,
                 adaptive: Any = None) -> optax.GradientTransformation:
  """The streaming correlated-noise transform for a strategy ``C``.

  ``dpfl.noise.privatizer`` with ``noise_strategy(strategy)``: the cheapest
  stream the strategy allows (``blt_noise`` for a BLT, ``banded_noise`` for a
  banded or banded-enough ``C``, ``identity_noise`` for ``C = I``, else
  ``dense_noise``). See those functions for the semantics.

  Privacy guarantee: if every privacy unit changes each step's clipped sum
  by a vector of L2 norm at most ``l2_clip_norm``, and takes part in the
  steps of one of the participation patterns ``sensitivity`` (default
  ``strategy.sensitivity``) was computed for, then the ``n`` outputs are
  post-processing of ``C G + s Z`` with
  ``s = noise_multiplier * l2_clip_norm * sensitivity``: ONE Gaussian
  mechanism whose sensitivity is ``sensitivity * l2_clip_norm``, i.e. with
  noise multiplier ``noise_multiplier``, also when gradients are chosen
  adaptively (``C`` lower-triangular; Denisov et al. 2022, arXiv
  2202.08312). Account it with ``accounting.MatrixMechanism(noise_multiplier,
  sensitivity, planned_steps=n, ...)``, with the participation the
  sensitivity was computed under.

  Args:
    strategy: a ``dpfl.mf`` strategy, any object with the attributes
      ``noise_strategy`` looks for, or an n x n lower-triangular array.
    noise_multiplier: ``sigma``; > 0.
    l2_clip_norm: the clip norm of the input sums; > 0.
    expected_batch_size: the public normaliser; > 0.
    sensitivity: ``sens(C)`` under the run's participation pattern; default
      ``strategy.sensitivity`` (required for a plain array).
    num_steps: ``n``; default ``strategy.num_steps`` or the matrix size. Must
      match the strategy's when both are known.
    key: None (OS entropy) or an ``int`` / ``jax.random.key``.
    adaptive: None, or adaptive clipping (``dpfl.noise.privatizer``'s).

  Returns:
    An ``optax.GradientTransformation`` with ``CorrelatedNoiseState``.
  """
  own_steps = getattr(strategy, "num_steps", None)
  if num_steps is not None and own_steps is not None and num_steps != own_steps:
    raise ValueError(f"num_steps must match strategy.num_steps = {own_steps}, got {num_steps!r}")
  if sensitivity is None:
    sensitivity = getattr(strategy, "sensitivity", None)
    if sensitivity is None:
      raise ValueError("sensitivity must be given for a strategy without a .sensitivity "
                       "attribute (sens(C) under the run's participation pattern)")
  return noise.privatizer(noise_strategy(strategy, num_steps=num_steps),
                     noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                     sensitivity=sensitivity, expected_batch_size=expected_batch_size, key=key,
                     adaptive=adaptive)
