"""Adaptive (quantile) clipping: ``dpfl.adaptive_clip`` and the clip-norm update.

Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping" (arXiv 1905.03871). Pass the options as the clip norm::

    private = dpfl.make_private(loss_fn, optax.adam(1e-3), batch_size=256, ...,
                                l2_clip_norm=dpfl.adaptive_clip(initial=1.0))

and the clip norm ``C_t`` becomes part of the run's state (the noise state's
``clip_norm``: it is saved and restored with the ``PrivateState``). Each step
clips every unit to ``C_t``, adds noise of scale ``noise_multiplier * C_t``
(DP-FTRL: ``noise_multiplier * sens(C) * C_t`` times the correlated unit
noise), and from the same units' norms releases a noisy count of the
unclipped ones that moves ``C`` geometrically towards the
``target_quantile`` of the norms (``next_clip_norm``). Example level, ELS,
ULS (with local steps: the norms of the users' model deltas), DP-SGD and
DP-FTRL with cyclic participation.

Accounting (``accounting.adaptive``): the sum and the count are one Gaussian
mechanism on the same sampled units with noise multiplier ``σ_eff =
(σ^-2 + k (2 σ_b)^-2)^-1/2`` (k = 1 for DP-SGD, the participations of the
matrix mechanism for DP-FTRL); the plan records the options and the ledger
the mechanism with ``σ_eff``. With ``target_epsilon`` the gradient noise σ is
raised so that ``σ_eff`` meets it; with ``noise_multiplier`` that is the
gradient's σ, and ε is the (larger) ε of ``σ_eff``. ``dpfl epsilon
--count-noise-stddev`` reproduces it.

A user-written loop (``private.clipped_grad`` / ``private.optimizer``) must
clip with the state's C and hand the statistics to the noise::

    C = dpfl.adaptive.clip_norm(opt_state)
    grads, aux = private.clipped_grad(params, batch, mask=mask, l2_clip_norm=C)
    updates, opt_state = private.optimizer.update(grads, opt_state, params, clip_stats=aux)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from accounting.adaptive import AdaptiveClip, effective_noise_multiplier  # noqa: F401


def adaptive_clip(*, initial: float, target_quantile: float = 0.5, learning_rate: float = 0.2,
                  count_noise_stddev: float | None = None) -> AdaptiveClip:
  """Adaptive clipping options: give them to ``make_private`` as ``l2_clip_norm``.

  Args:
    initial: ``C_0`` > 0, the first step's clip norm.
    target_quantile: γ in (0, 1), the fraction of units to leave unclipped
      (default 0.5, the median norm: the paper's default).
    learning_rate: η > 0 of ``C ← C exp(-η (b - γ))`` (default 0.2, the
      paper's), ``b`` the noisy fraction of unclipped units.
    count_noise_stddev: σ_b > 0, the std of the noise on each step's count
      of unclipped units; None: ``0.05 * expected_batch_size`` (the paper's
      m / 20). Smaller costs more privacy (see ``accounting.adaptive``).

  Returns:
    An ``accounting.adaptive.AdaptiveClip``.

  Raises:
    ValueError: an option out of its range (named, with the range).
  """
  return AdaptiveClip(initial=initial, target_quantile=target_quantile,
                      learning_rate=learning_rate, count_noise_stddev=count_noise_stddev)


def clip_norm(opt_state: Any) -> jax.Array | None:
  """The clip norm ``C_t`` of the next step held in an optimizer state (None: a fixed C).

  Looks for the dpfl noise state (``NoiseState``) with a ``clip_norm`` in
  ``opt_state`` (e.g. ``PrivateState.opt_state``).
  """
  from dpfl.noise import NoiseState
  found = [node.clip_norm for node in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, NoiseState)) if isinstance(node, NoiseState)]
  found = [c for c in found if c is not None]
  if len(found) > 1:
    raise ValueError(f"opt_state holds {len(found)} adaptive noise states; expected one")
  return found[0] if found else None


class UnitCounts(NamedTuple):
  """The counts ``next_clip_norm`` reads (a ``dpfl.ClippedGradAux`` has them)."""

  num_units: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array


NO_UNITS = UnitCounts(*(np.zeros((), np.int32) for _ in range(3)))


def next_clip_norm(clip_norm: jax.Array, clip_stats: Any, count_key: jax.Array, adaptive: Any,
                   expected_batch_size: Any) -> jax.Array:
  """Adaptive clipping's ``C_{t+1}`` from the noised count of units left unclipped by ``C_t``.

  ``clip_stats`` is the ``dpfl.ClippedGradAux`` of the step's sum (clipped to
  ``clip_norm``): its units are the sampled ones, each counted once as
  ``1[finite norm <= C_t] - 1/2`` (sensitivity 1/2). Andrew et al. 2021,
  Algorithm 1 with the geometric update; see ``accounting.adaptive``.
  """
  num_units = jnp.asarray(clip_stats.num_units, jnp.float32)
  unclipped = num_units - jnp.asarray(clip_stats.num_clipped + clip_stats.num_nonfinite,
                                      jnp.float32)
  noisy = (unclipped - 0.5 * num_units
           + adaptive.count_noise_stddev * jax.random.normal(count_key, (), jnp.float32))
  fraction = noisy / expected_batch_size + 0.5
  step = -adaptive.learning_rate * (fraction - adaptive.target_quantile)
  return (clip_norm * jnp.exp(step)).astype(jnp.float32)


def check_options(adaptive: Any) -> AdaptiveClip:
  """``adaptive`` if it is an ``AdaptiveClip`` with ``count_noise_stddev`` set, else ValueError."""
  if not isinstance(adaptive, AdaptiveClip) or adaptive.count_noise_stddev is None:
    raise ValueError(f"adaptive must be an accounting.adaptive.AdaptiveClip with "
                     f"count_noise_stddev set (AdaptiveClip.resolved), got {adaptive!r}")
  return adaptive


def replay_update(transform: Any, state: Any):
  """The update ``dpfl.noise.advance`` replays skipped steps with.

  For adaptive clipping it keeps the state's ``clip_norm``: the skipped
  steps' counts were released with these very noise draws, so a C computed
  from a replay (on no units) would be a function of that noise alone and
  reveal the released counts. The saved C is a function of earlier releases
  only. Other states: ``transform.update``.
  """
  if getattr(state, "clip_norm", None) is None:
    return transform.update
  kept = state.clip_norm

  def update(updates, s):
    out, new = transform.update(updates, s, None, clip_stats=NO_UNITS)
    return out, new._replace(clip_norm=kept)

  return update
