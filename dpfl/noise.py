"""The one noise path of dpfl: a streaming privatizer, as optax ``GradientTransformation``s.

``privatizer(strategy, ...)`` is the *release* step of every dpfl run: it
takes the sum of per-unit gradients, each clipped to L2 norm ``l2_clip_norm``
(``C``), adds noise of scale ``noise_multiplier * C`` (times the strategy's
sensitivity) and divides by the expected batch size. The strategy says how
the noise is correlated across steps (a ``NoiseStrategy``: the streaming form
of a matrix-factorization strategy, ``dpfl.mf.streaming`` builds them). DP-SGD
(Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1)
is the identity strategy, ``gaussian_noise``: iid ``N(0, (noise_multiplier *
C)^2 I)`` every step. All strategies share every line of this code (key
splitting, the draw, scaling, checks, the state type ``NoiseState``), as
jax-privacy's ``gaussian_privatizer`` is its matrix privatizer with the
identity. ``advance`` moves a state over steps whose noise must not be
released again (a resume).

Why the input is the clipped *sum* and the transform divides. The noise is
calibrated to the sensitivity of the sum (``C``: one unit added or removed
moves the sum by at most ``C``). If the caller averaged first and this
transform noised the average, the two scales would have to be matched by hand
at every call site, which is exactly how jax-privacy issue #383 happened (an
example calibrated noise for the clipped sum and added it to the mean: a
factor-of-B mismatch between the noise added and the noise accounted). Here
the scale is fixed inside one function, so the output always carries noise of
standard deviation ``noise_multiplier * C / expected_batch_size`` around the
input divided by ``expected_batch_size``. Feeding anything whose sensitivity
is at most ``C`` (a clipped sum, or even a clipped mean) is therefore at least
as private as accounted; only inputs with sensitivity above ``C`` (unclipped
or rescaled gradients) can break the guarantee.

Why the *expected* batch size. Under Poisson sampling the realised batch size
is itself a function of the private sample: dividing by it would release it
(and the resulting average has data-dependent sensitivity ``C / |B|``, which
the Gaussian-mechanism analysis does not cover). Dividing by the public
constant ``q * N`` is post-processing of the noisy sum, so it costs no
privacy. This is the "fixed-denominator estimator" of McMahan et al. 2018
("Learning Differentially Private Recurrent Language Models", arXiv
1710.06963, Sec. 3) and what Opacus does with ``expected_batch_size``.

Zero noise. ``noise_multiplier == 0`` is rejected rather than accepted as a
"debug mode": it gives no privacy, and the accountant cannot describe it
(``accounting`` mechanisms require a multiplier > 0), so a run configured
with it by mistake would train fine and report nothing sensible. A
non-private baseline on the same clipped sums is ``optax.scale(1 /
expected_batch_size)``, which says what it is.

Keys. The PRNG key lives in the transform's state as raw ``uint32`` key data
(a plain array: jit, vmap and checkpoint friendly). Every update splits it,
uses one half for this step's noise and keeps the other, so no two steps share
noise. By default the key comes from OS entropy when ``init`` runs; an
explicit ``key`` gives reproducible runs. An int key keeps every bit (JAX's
``jax.random.key(int)`` keeps 32 without x64; see ``dpfl._rng.key_data``).
After restoring a checkpoint call ``reseed``: see its docstring.

Replicas never share a key. Two states with one key release updates whose
difference cancels the noise, so every execution of ``init`` hands out its
own key (``dpfl._rng.init_keys``): ``jax.vmap(tx.init)(stacked_params)``
gives every replica its own, and so do ``lax.map`` / ``lax.scan`` over
``init``; an explicit key reproduces the same sequence of keys in every run
(the first ``init`` gets the key itself). ``update`` vmapped over updates
with a state that is not batched raises a ``ValueError``: every replica
would add the same noise. Not detectable: one state copied (e.g.
``jnp.stack``-ed or broadcast) into several replicas after ``init``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from accounting import validate as check
from dpfl import _rng, _sharding
from dpfl import adaptive as adaptive_clipping

# Folded into re-seeded keys: reseeding with key 0 (all-zero key data, the
# identity of the XOR mix) must still move off the checkpointed key.
_RESEED_DOMAIN = 0x5EED


class NoiseState(NamedTuple):
  """State of every dpfl noise transform (``privatizer``, ``gaussian_noise``, ``dpfl.mf``'s).

  A pytree of arrays: it jits, vmaps, shards and checkpoints as is. For
  DP-SGD (the identity strategy) its leaves are just ``key`` and ``count``.

  Attributes:
    key: raw ``uint32`` PRNG key data for the *next* step's noise.
    count: number of noisy updates released so far (int32 scalar).
    buffers: the strategy's model-sized buffers, a tuple of pytrees shaped
      like the updates (float32, or the leaf's dtype if wider): none for the
      identity strategy, ``m`` for BLT, ``num_bands - 1`` for banded.
    step_keys: None, or (strategies that regenerate past noise, e.g.
      ``dpfl.mf.dense_noise``) ``[n, *key_shape]`` raw key data of every
      step's noise so far (zeros for future steps).
    clip_norm: None (a fixed clip norm), or adaptive clipping's float32
      clip norm ``C_t`` of the next step (``dpfl.adaptive``): the next sum
      must be clipped to it, and its noise is scaled by it.
  """

  key: jax.Array
  count: jax.Array
  buffers: tuple[Any, ...] = ()
  step_keys: jax.Array | None = None
  clip_norm: jax.Array | None = None


# The public name of DP-SGD's noise state (``dpfl.GaussianNoiseState``): the
# one state type, whose ``buffers`` and ``step_keys`` stay empty for DP-SGD.
GaussianNoiseState = NoiseState

# State types whose ``key`` field ``reseed`` refreshes. Other noise transforms
# may add theirs with ``register_noise_state``.
_NOISE_STATE_TYPES: tuple[type, ...] = (NoiseState,)


def register_noise_state(state_type: type) -> type:
  """Marks a NamedTuple state type with a ``key`` field for ``reseed``.

  Usable as a class decorator by other noise transforms.

  Args:
    state_type: a NamedTuple class with a ``key`` field holding raw key data.

  Returns:
    ``state_type`` unchanged.
  """
  global _NOISE_STATE_TYPES
  if "key" not in getattr(state_type, "_fields", ()):
    raise ValueError(f"state_type must be a NamedTuple with a 'key' field, got {state_type!r}")
  if state_type not in _NOISE_STATE_TYPES:
    _NOISE_STATE_TYPES = _NOISE_STATE_TYPES + (state_type,)
  return state_type


def check_noise_multiplier(value) -> float:
  """A DP noise multiplier: > 0 (zero noise is refused with advice), finite, bounded."""
  if check.real("noise_multiplier", value) == 0:
    # Zero noise is no privacy; the accountant cannot describe it either
    # (accounting.PoissonDpSgd rejects it). A non-private baseline should say
    # so in code rather than pass a number that looks like a DP setting.
    raise ValueError(
        f"noise_multiplier must be a finite number > 0, got {value!r}: zero noise gives no "
        "privacy. For a non-private baseline on the same clipped sums use "
        "optax.scale(1 / expected_batch_size) instead of gaussian_noise.")
  return check.noise_multiplier("noise_multiplier", value)


# Noise is drawn and added in float32 (or wider): its scale, and the division
# by the batch size, must be normal float32 numbers, or every update is ±inf
# (scale overflows), exactly noise-free (scale 0), or NaN.
_FLOAT32 = np.finfo(np.float32)


def check_noise_scale(*, stddev: float, expected_batch_size: float, names: str) -> None:
  """Refuses noise scales that are not normal float32 numbers (see above)."""
  lo, hi = float(_FLOAT32.tiny), float(_FLOAT32.max)
  for what, value in ((f"{names} (the noise standard deviation)", stddev),
                      (f"({names}) / expected_batch_size (the noise scale of the update)",
                       stddev / expected_batch_size),
                      ("expected_batch_size", expected_batch_size),
                      ("1 / expected_batch_size", 1 / expected_batch_size)):
    if not (math.isfinite(value) and lo <= value <= hi):
      raise ValueError(f"{what} must be in [{lo:g}, {hi:g}] (normal float32, the precision "
                       f"noise is drawn in), got {value!r}")


def check_float_leaves(updates) -> None:
  """Refuses updates with a non-floating leaf, naming its path."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(
          f"updates must have real floating-point leaves; the leaf at "
          f"{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}")


# --- the one streaming privatizer ------------------------------------------------

# ``solve(t, z, buffers, step_keys) -> x``: row ``t`` of ``C x = z``, per leaf
# (``z``: this step's fresh noise, a list over leaves; ``buffers[j]``: the
# list of leaf ``j``'s buffers; ``step_keys``: the state's, or None).
Solve = Callable[[jax.Array, list, list, Any], list]
# ``carry(t, x, buffers) -> new buffers`` (same layout as ``buffers``).
Carry = Callable[[jax.Array, list, list], list]


@dataclasses.dataclass(frozen=True)
class NoiseStrategy:
  """How ``privatizer`` turns step ``t``'s fresh noise ``z_t`` into ``x_t = (C^{-1} z)_t``.

  The streaming form of a lower-triangular strategy ``C`` (the matrix
  mechanism, Denisov et al. 2022, arXiv 2202.08312): ``x_t`` from ``z_t`` and
  a small state. ``NoiseStrategy()`` is ``C = I`` with no end: DP-SGD
  (``IDENTITY``). ``dpfl.mf.streaming`` builds the others (``blt_strategy``,
  ``banded_strategy``, ``dense_strategy``, ``noise_strategy``).

  Attributes:
    num_steps: ``n``, the number of steps ``C`` has (and the mechanism is
      accounted for): an eager ``update`` at step ``>= n`` raises, a jitted
      one returns NaN. None: no end (C = I, DP-SGD).
    num_buffers: model-sized buffers the state keeps per leaf (>= 0).
    solve: ``solve(t, z, buffers, step_keys) -> x`` (see ``Solve``); None:
      ``x = z`` (``C = I``).
    carry: ``carry(t, x, buffers) -> new buffers``; None: buffers unchanged.
      Needed when ``num_buffers > 0``.
    store_step_keys: keep every step's key in ``state.step_keys`` (``n`` of
      them; needs ``num_steps``), so ``solve`` can regenerate past ``z_s``
      with ``normal_leaves``.
  """

  num_steps: int | None = None
  num_buffers: int = 0
  solve: Solve | None = None
  carry: Carry | None = None
  store_step_keys: bool = False

  def __post_init__(self):
    if self.num_steps is not None:
      object.__setattr__(self, "num_steps", check.positive_int("num_steps", self.num_steps))
    object.__setattr__(self, "num_buffers",
                       check.integer("num_buffers", self.num_buffers, low=0))
    if self.num_buffers and self.carry is None:
      raise ValueError(f"carry must be given for num_buffers={self.num_buffers} > 0 (how the "
                       "buffers move on), got None")
    if self.store_step_keys and self.num_steps is None:
      raise ValueError("store_step_keys=True needs num_steps (the number of keys to keep), "
                       "got num_steps=None")


# DP-SGD: iid noise, C = I, no last step.
IDENTITY = NoiseStrategy()


def noise_dtype(leaf) -> jnp.dtype:
  """The dtype noise for ``leaf`` is drawn and added in: float32, or wider."""
  return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def normal_leaves(step_key: jax.Array, leaves: Sequence[Any]) -> list[jax.Array]:
  """Step noise ``z`` for every leaf, exactly as ``privatizer`` draws it from ``step_key``.

  ``jax.random.split(step_key, len(leaves))``, then ``jax.random.normal`` of
  each leaf's shape in ``noise_dtype(leaf)`` (bit for bit, by a fused
  implementation). Lets a ``NoiseStrategy`` regenerate past steps' ``z``
  from ``state.step_keys``.

  Args:
    step_key: a typed key (``jax.random.wrap_key_data(raw)`` for raw data).
    leaves: arrays (or anything with ``shape`` and ``dtype``), one per leaf.
      A leaf whose sharding is known (a placed array, or a traced one under
      ``Explicit`` mesh axes) gets its noise drawn shard by shard with that
      sharding: the same values, never whole on one device.
  """
  leaf_keys = jax.random.split(step_key, max(len(leaves), 1))
  return [_sharding.alike(_rng.normal(k, jnp.shape(leaf), noise_dtype(leaf),
                                      _sharding.leaf_sharding(leaf)), leaf)
          for k, leaf in zip(leaf_keys, leaves)]


def _concrete_int(value) -> int | None:
  """``int(value)`` outside of tracing, None for a tracer (inside jit/vmap)."""
  if isinstance(value, jax.core.Tracer):
    return None
  return int(value)


def _materialize(xs: list, valid: jax.Array) -> list:
  """``xs`` written to memory once; NaN when ``valid`` is False (past step n).

  Why a ``cond``: each of ``x``'s consumers (m buffer updates, the output) is
  a separate loop, and XLA fuses the cheap sum ``z - sum_i omega_i s_i`` into
  every one of them, re-reading all m buffers m + 1 times; on CPU it ignores
  ``optimization_barrier`` for this. A conditional's result must be stored, so
  ``x`` is computed once (with the draw of ``z`` fused in) and read back.
  """
  return jax.lax.cond(valid, lambda xs: xs,
                      lambda xs: [jnp.full_like(x, jnp.nan) for x in xs], xs)


def _traced(*values) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in values)


def privatizer(strategy: NoiseStrategy = IDENTITY, *, noise_multiplier: float,
               l2_clip_norm: float, expected_batch_size: float,
               sensitivity: float | None = None,
               key: Any = None, adaptive: Any = None) -> optax.GradientTransformation:
  """The one noise step of dpfl: ``(clipped_sum + s * x_t) / expected_batch_size``.

  ``s = noise_multiplier * l2_clip_norm * sensitivity`` and ``x_t = (C^{-1}
  z)_t`` for the strategy's ``C`` and iid ``N(0, 1)`` noise ``z``, streamed
  (see ``NoiseStrategy``). Every step splits the state's key as
  ``next_key, step_key = split(key)`` and draws ``z_t = normal_leaves(step_key,
  leaves)``; the identity strategy adds ``s * z_t``, which is DP-SGD
  (``gaussian_noise`` is this function with ``IDENTITY``), and every strategy
  draws the same ``z_t`` from the same key.

  Privacy guarantee: if every privacy unit changes each step's clipped sum by
  a vector of L2 norm at most ``l2_clip_norm`` and takes part in the steps of
  a participation pattern ``sensitivity`` (``sens(C)``; 1 for DP-SGD's
  per-step release) was computed for, the outputs are post-processing of ``C G
  + s Z``: a Gaussian mechanism with noise multiplier ``noise_multiplier``,
  also for adaptively chosen gradients (``C`` lower-triangular). DP-SGD:
  one Gaussian mechanism per step, accounted with the sampler's mechanism;
  otherwise ``accounting.MatrixMechanism``.

  Runtime values: ``noise_multiplier``, ``l2_clip_norm``, ``expected_batch_size``
  may be traced (``optax.inject_hyperparams`` schedules; clip the step's sum
  with the value this update uses, ``schedule(state.count)``), checked when
  concrete; a traced ``noise_multiplier`` <= 0 gives NaN, never less noise.
  ``adaptive`` (``dpfl.adaptive``): ``C_t`` lives in ``NoiseState.clip_norm``
  and scales the noise; ``update(..., clip_stats=aux)`` releases the noisy
  count that moves it (``dpfl.adaptive.next_clip_norm``, a third key split).

  Args:
    strategy: a ``NoiseStrategy``; default ``IDENTITY`` (DP-SGD).
    noise_multiplier: finite and > 0 (0 is rejected; see "Zero noise" in the
      module docstring).
    l2_clip_norm: the clip norm the input sums were clipped with; > 0.
    expected_batch_size: the public normaliser; > 0. Never the realised
      batch size, which would leak the sample size.
    sensitivity: ``sens(C)`` in units of the clip norm; > 0. None: 1.
    key: None (OS entropy each time ``init`` runs), or an ``int`` seed >= 0
      (every bit used) / ``jax.random.key``: the first ``init`` uses it, each
      later one ``jax.random.fold_in(key, n)`` (see the module docstring).
    adaptive: None (a fixed or scheduled C), or an
      ``accounting.adaptive.AdaptiveClip`` whose ``count_noise_stddev`` is set.

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``NoiseState``
    (adaptive: an ``optax.GradientTransformationExtraArgs`` taking
    ``clip_stats``).
  """
  if not isinstance(strategy, NoiseStrategy):
    raise ValueError(f"strategy must be a dpfl.noise.NoiseStrategy, got "
                     f"{type(strategy).__name__}")
  if adaptive is not None:
    l2_clip_norm = adaptive_clipping.check_options(adaptive).initial
  guard = _traced(noise_multiplier)
  if not guard:
    noise_multiplier = check_noise_multiplier(noise_multiplier)
  if not _traced(l2_clip_norm):
    l2_clip_norm = check.positive("l2_clip_norm", l2_clip_norm)
  factor, names = noise_multiplier, "noise_multiplier * l2_clip_norm"
  if sensitivity is not None:
    sensitivity = check.positive("sensitivity", sensitivity)
    factor, names = factor * sensitivity, names + " * sensitivity"
  if not _traced(expected_batch_size):
    expected_batch_size = check.positive("expected_batch_size", expected_batch_size)
  if not _traced(noise_multiplier, l2_clip_norm, expected_batch_size):
    check_noise_scale(stddev=factor * l2_clip_norm, expected_batch_size=expected_batch_size,
                      names=names)
  with jax.ensure_compile_time_eval():  # built inside jit by inject_hyperparams' update
    draw_key = _rng.init_keys(key)
  n, num_buffers = strategy.num_steps, strategy.num_buffers
  solve, carry, store_step_keys = strategy.solve, strategy.carry, strategy.store_step_keys

  def init_fn(params):
    key_data = draw_key(params)
    # Model-sized buffers are sharded like their parameter (when it is placed).
    zeros = lambda p: _sharding.zeros(jnp.shape(p), noise_dtype(p), _sharding.leaf_sharding(p))
    buffers = tuple(jax.tree.map(zeros, params) for _ in range(num_buffers))
    step_keys = None
    if store_step_keys:
      step_keys = jnp.zeros((n,) + tuple(jnp.shape(key_data)), jnp.uint32)
    clip_norm = None if adaptive is None else jnp.asarray(adaptive.initial, jnp.float32)
    return NoiseState(key=key_data, count=jnp.zeros([], jnp.int32), buffers=buffers,
                      step_keys=step_keys, clip_norm=clip_norm)

  def update_fn(updates, state, params=None, *, clip_stats=None):
    del params
    check_float_leaves(updates)
    if adaptive is not None and clip_stats is None:
      raise ValueError("adaptive clipping: update needs clip_stats= the ClippedGradAux of "
                       "the step's sum, clipped to the state's clip_norm")
    if n is not None:
      count = _concrete_int(state.count)
      if count is not None and count >= n:
        raise ValueError(
            f"this noise transform was built for num_steps={n} steps and its state is at "
            f"step {count}; the matrix mechanism (and its accounting) does not extend past "
            "its last step. Build a new transform (and account a new mechanism).")
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    key = _rng.unshared_key(jnp.asarray(state.key), updates)
    if adaptive is None:
      next_key, step_key = jax.random.split(jax.random.wrap_key_data(key))
      stddev, clip_norm = factor * l2_clip_norm, None
      if guard:  # a scheduled σ that is not > 0 must not release a noise-free sum
        ok = jnp.isfinite(noise_multiplier) & (noise_multiplier > 0)
        stddev = jnp.where(ok, stddev, jnp.nan)
    else:
      # A third, independent key for the count's noise.
      next_key, step_key, count_key = jax.random.split(jax.random.wrap_key_data(key), 3)
      # Noise for the larger of the state's C and the C the sum was clipped
      # to: a sum clipped to anything else is never under-noised.
      used = getattr(clip_stats, "l2_clip_norm", None)
      stddev = factor * (state.clip_norm if used is None else jnp.maximum(state.clip_norm, used))
      clip_norm = adaptive_clipping.next_clip_norm(state.clip_norm, clip_stats, count_key, adaptive,
                                 expected_batch_size)
    x = normal_leaves(step_key, leaves)
    buffers, step_keys, valid = state.buffers, state.step_keys, None
    if solve is not None or num_buffers:
      # Past the planned steps the tables are indexed at n - 1 (no
      # out-of-bounds reads) and the output is NaN.
      t = state.count if n is None else jnp.minimum(state.count, n - 1)
      if store_step_keys:
        step_keys = jax.lax.dynamic_update_index_in_dim(
            step_keys, jax.random.key_data(step_key), t, axis=0)
      flat = [treedef.flatten_up_to(b) for b in buffers]
      per_leaf = [[b[j] for b in flat] for j in range(len(leaves))]
      if n is not None:
        valid = state.count < n
      if solve is not None:
        x = solve(t, x, per_leaf, step_keys)
      if num_buffers:
        if valid is not None:
          x = _materialize(x, valid)
        new = carry(t, x, per_leaf)
        buffers = tuple(jax.tree.unflatten(treedef, [new[j][i] for j in range(len(leaves))])
                        for i in range(num_buffers))
    elif n is not None:
      valid = state.count < n
    out = []
    for leaf, x_leaf in zip(leaves, x):
      noisy = (leaf.astype(x_leaf.dtype) + stddev * x_leaf) / expected_batch_size
      if valid is not None:
        noisy = jnp.where(valid, noisy, jnp.nan)
      out.append(noisy.astype(leaf.dtype))
    new_state = NoiseState(key=jax.random.key_data(next_key),
                           count=optax.safe_increment(state.count), buffers=buffers,
                           step_keys=step_keys, clip_norm=clip_norm)
    return jax.tree.unflatten(treedef, out), new_state

  if adaptive is not None:
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return optax.GradientTransformation(init_fn, lambda u, s, p=None: update_fn(u, s, p))


def advance(transform: optax.GradientTransformation, state: NoiseState, params_like: Any,
            num_steps: int) -> NoiseState:
  """``state`` moved on by ``num_steps`` steps, exactly as that many ``update`` calls would.

  The same keys, buffers, stored step keys and count as ``num_steps`` calls
  of ``transform.update`` (on any updates: the state does not depend on
  them), but the noise is never returned. For a resume: steps released
  before a crash must move a correlated-noise state on (the new steps'
  noise is tied to theirs through the buffers), and their noise must never
  be released again.

  Args:
    transform: the dpfl noise transform ``state`` belongs to (``privatizer``,
      ``gaussian_noise``, a ``dpfl.mf`` noise transform); not a chain.
    state: its ``NoiseState``.
    params_like: a pytree shaped like the updates (e.g. the params).
    num_steps: steps to skip, an integer >= 0.

  Returns:
    The new ``NoiseState``.

  Raises:
    ValueError: if ``state`` is not a ``NoiseState``, or the steps would go
      past a finite strategy's last step (as ``update`` would).
  """
  num_steps = check.integer("num_steps", num_steps, low=0)
  if not isinstance(state, NoiseState):
    raise ValueError(f"state must be a dpfl.noise.NoiseState (the state of a dpfl noise "
                     f"transform), got {type(state).__name__}")
  if not num_steps:
    return state
  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params_like)

  # Adaptive clipping keeps the saved C (see ``dpfl.adaptive.replay_update``).
  update = adaptive_clipping.replay_update(transform, state)

  @jax.jit
  def skip(state, updates, steps):
    # Only the state is returned, so XLA drops the output (and for DP-SGD
    # the whole draw): skipping costs the buffers' arithmetic at most.
    return jax.lax.fori_loop(0, steps, lambda _, s: update(updates, s)[1], state)

  state = skip(state, zeros, num_steps - 1)
  # The last step eagerly: update's count check raises past a finite end
  # (the count only grows, so any earlier step past it means this one is too).
  return update(zeros, state)[1]


def gaussian_noise(*, noise_multiplier: float, l2_clip_norm: float,
                   expected_batch_size: float, key: Any = None,
                   adaptive: Any = None) -> optax.GradientTransformation:
  """Adds Gaussian noise to a clipped gradient sum and averages it (DP-SGD).

  ``update(clipped_sum, state)`` returns, leaf by leaf,
  ``(clipped_sum + N(0, (noise_multiplier * l2_clip_norm)^2 I)) / expected_batch_size``
  with independent noise for every leaf and every step. Put it first in an
  ``optax.chain``, directly on the output of ``dpfl.clipped_grad``, e.g.
  ``optax.chain(gaussian_noise(...), optax.adam(1e-3))``. It is
  ``privatizer(IDENTITY, ...)``: the identity strategy of the one noise path.

  Privacy guarantee: if every privacy unit (example or user) changes
  ``clipped_sum`` by a vector of L2 norm at most ``l2_clip_norm`` (true for
  the output of ``dpfl.clipped_grad`` with that clip norm), each update is the
  Gaussian mechanism with noise multiplier ``noise_multiplier`` (sensitivity
  ``C``, noise standard deviation ``noise_multiplier * C``) followed by
  post-processing. Its ε depends on how batches were sampled: use the
  sampler's ``mechanism(...)`` description with ``accounting``.

  Noise is drawn in ``float32`` (or the leaf's dtype if wider), added in that
  precision and the result cast back to the leaf's dtype, so bf16/fp16 updates
  are not noised with low-precision samples.

  Args:
    noise_multiplier: ratio of the noise standard deviation to the clip norm;
      finite and > 0 (0 is rejected; see "Zero noise" in the
      module docstring).
    l2_clip_norm: the clip norm ``C`` the input sum was clipped with; > 0.
    expected_batch_size: the public normaliser, ``sampling_prob *
      dataset_size`` for Poisson sampling or the fixed batch size; > 0. Never
      the realised batch size, which would leak the sample size.
    key: None (default: fresh OS entropy each time ``init`` runs, so two
      transforms or two runs never share noise), or an ``int`` seed >= 0 (all
      of its bits are used) / ``jax.random.key`` for reproducible noise: the
      first ``init`` uses this key, each later one (another call, vmapped
      replica or scan iteration) ``jax.random.fold_in(key, n)``. In
      multi-process training all processes must hold the same key: pass one
      explicitly (e.g. ``dpfl.shared_secret_seed()``).
    adaptive: None, or adaptive clipping (see ``privatizer``).

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    ``GaussianNoiseState`` (``NoiseState`` with no buffers).
  """
  return privatizer(IDENTITY, noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                    expected_batch_size=expected_batch_size, key=key, adaptive=adaptive)


def reseed(opt_state: Any, *, key: Any = None) -> Any:
  """Replaces the key of every dpfl noise state in an optax state.

  Why: a checkpoint stores the key that the *next* step will use. A run that
  crashed after the checkpoint had already released noisy updates drawn from
  that key; resuming from the checkpoint with the same key would draw the very
  same noise again for different gradients, and the difference of two such
  releases cancels the noise (no privacy for those steps). Call
  ``opt_state = reseed(restored_opt_state)`` right after restoring.

  Walks any optax state (``chain`` tuples, ``inject_hyperparams``,
  ``multi_transform``, ...) and replaces each ``NoiseState`` (and each type
  registered with ``register_noise_state``) key; counts, buffers and stored
  step keys are kept.

  Privacy guarantee: with ``key=None`` each new key is fresh OS entropy, so
  the resumed run's noise is independent of everything drawn before. With an
  explicit ``key`` the new key is a deterministic mix of the old key and
  ``key``: reproducible, and fresh only if ``key`` differs between resumes
  (use e.g. the restart count).

  Args:
    opt_state: an optax state containing at least one dpfl noise state.
    key: None (OS entropy; under ``jax.vmap`` a fresh key per replica) or
      an ``int`` >= 0 (every bit used) / ``jax.random.key`` to fold in.

  Returns:
    ``opt_state`` with new keys (the input is not modified).

  Raises:
    ValueError: if ``opt_state`` holds no dpfl noise state (e.g. it was
      restored as plain dicts), since silently doing nothing would re-use noise.
  """
  extra = None if key is None else _rng.key_data(key)
  found = 0

  def replace(node):
    nonlocal found
    if not isinstance(node, _NOISE_STATE_TYPES):
      return node
    found += 1
    if extra is None:
      # Probed with the old key: under vmap every replica draws its own.
      new_key = _rng.fresh_key_data(like=node.key)
    else:
      mixed = jnp.bitwise_xor(jnp.asarray(node.key, jnp.uint32), extra)
      new_key = jax.random.key_data(
          jax.random.fold_in(jax.random.wrap_key_data(mixed), _RESEED_DOMAIN))
    return node._replace(key=new_key)

  out = jax.tree.map(replace, opt_state, is_leaf=lambda x: isinstance(x, _NOISE_STATE_TYPES))
  if not found:
    raise ValueError(
        "opt_state must contain a dpfl noise state (GaussianNoiseState) to reseed; "
        f"found none in {type(opt_state).__name__}. If it was restored from a "
        "checkpoint, restore it with the optimizer's init(params) as the target.")
  return out
