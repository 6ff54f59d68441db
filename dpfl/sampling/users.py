"""Poisson sampling for user-level DP: users (ULS) or capped examples (ELS).

Both samplers include each unit independently with probability
``sampling_prob`` and return a ``Batch`` (indices + mask) padded to a static
length, as ``PoissonSampler`` does, with one difference: they never
truncate. A draw larger than ``max_batch_size`` is padded to the next
multiple of ``max_batch_size`` instead (a new static shape, so ``jit``
compiles once more; with the default ``max_batch_size`` this happens with
probability <= ``DEFAULT_OVERFLOW_PROB`` = 1e-4 per step). Why: the
user-level mechanisms in ``accounting`` (``UlsDpSgd``, ``ElsDpSgd``) describe
plain Poisson sampling, and a truncated sample would need an accountant they
do not have. The sample is therefore exactly what the ledger says, at every
step.

* ``UserSampler`` samples users: accounted as ``accounting.UlsDpSgd``.
* ``ElsSampler`` samples examples out of users capped at ``examples_per_user``
  examples each: accounted as ``accounting.ElsDpSgd``, whose ε is user-level
  (a mixture of Gaussians per step).
"""

from __future__ import annotations

import numpy as np

from accounting import validate as check
from dpfl.sampling.base import (DOMAIN_POISSON_STEP, Batch, PoissonRateSampler,
                                padded_poisson_draw, step_generator)

# Per-step probability that a draw exceeds the default static length. An
# overflow costs one more compilation (for a longer shape, cached by jit
# afterwards), not data or privacy, so this can be far looser than the 1e-9
# that ``PoissonSampler`` allows for truncation; at small expected batches it
# cuts the padding (expected 24 of 500: static 44 instead of 57).
DEFAULT_OVERFLOW_PROB = 1e-4


class _PaddedPoissonSampler(PoissonRateSampler):
  """Poisson sampling of ``population_size`` units, padded, never truncated."""

  _unit = "unit"

  def __init__(self, population_size: int, *, sampling_prob: float,
               max_batch_size: int | None = None, multiple_of: int = 1, seed=None):
    super().__init__(check.positive_int(f"num_{self._unit}s", population_size),
                     sampling_prob=sampling_prob, max_batch_size=max_batch_size,
                     truncation_prob=DEFAULT_OVERFLOW_PROB, multiple_of=multiple_of, seed=seed)

  def describe(self) -> dict:
    return {"scheme": "poisson", "unit": self._unit, "population_size": self._population_size,
            "sampling_prob": self._sampling_prob, "max_batch_size": self._max_batch_size}

  def _draw(self, seed: np.ndarray, step: int) -> tuple[Batch, bool]:
    """Sorted indices, then padding (mask False); a rare longer shape, never truncated."""
    rng = step_generator(seed, DOMAIN_POISSON_STEP, step)
    batch, _ = padded_poisson_draw(rng, self._population_size, self._sampling_prob,
                                   self._max_batch_size, self._dtype)
    return batch, False

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self._population_size} {self._unit}s, sampling_prob="
            f"{self._sampling_prob}, max_batch_size={self._max_batch_size})")


class UserSampler(_PaddedPoissonSampler):
  """ULS: each user is included independently with probability ``sampling_prob``.

  Privacy guarantee: with one clipped contribution (norm <= C) per sampled
  user and N(0, (σC)²) noise on their sum, ``num_steps`` steps are
  ``accounting.UlsDpSgd(σ, q, num_steps)``: DP-SGD over users, for
  add/remove-one-user neighbours, however many examples a user holds.

  Args:
    num_users: number of users N >= 1.
    sampling_prob: q in (0, 1].
    max_batch_size: usual static number of user slots (default: exceeded
      with probability <= 1e-4 per step), rounded up to ``multiple_of``.
    multiple_of: e.g. the number of devices the user axis is sharded over.
    seed: None (OS entropy, the private default), an int in [0, 2**128) or a
      ``uint32[4]`` array.
  """

  _unit = "user"

  def __init__(self, num_users: int, *, sampling_prob: float, max_batch_size: int | None = None,
               multiple_of: int = 1, seed=None):
    super().__init__(num_users, sampling_prob=sampling_prob, max_batch_size=max_batch_size,
                     multiple_of=multiple_of, seed=seed)


class ElsSampler(_PaddedPoissonSampler):
  """ELS: each (capped) example is included independently with probability ``sampling_prob``.

  Privacy guarantee: if every user holds at most ``examples_per_user`` = k of
  the ``num_examples`` examples (true for a ``dpfl.data.UserDataset`` capped
  at k), each example's gradient is clipped to C and the sum gets
  N(0, (σC)²), then removing one user moves each step's sum by at most J·C,
  J ~ Binomial(k, q): ``num_steps`` steps are ``accounting.ElsDpSgd(σ, q,
  num_steps, k)``, a user-level guarantee.

  Args:
    num_examples: number of kept examples (``UserDataset.num_examples``).
    sampling_prob: q in (0, 1].
    examples_per_user: the cap k the accounting assumes.
    max_batch_size, multiple_of, seed: as for ``UserSampler``.
  """

  _unit = "example"

  def __init__(self, num_examples: int, *, sampling_prob: float, examples_per_user: int,
               max_batch_size: int | None = None, multiple_of: int = 1, seed=None):
    super().__init__(num_examples, sampling_prob=sampling_prob, max_batch_size=max_batch_size,
                     multiple_of=multiple_of, seed=seed)
    self._examples_per_user = check.positive_int("examples_per_user", examples_per_user)

  @property
  def examples_per_user(self) -> int:
    return self._examples_per_user

  def describe(self) -> dict:
    return {**super().describe(), "examples_per_user": self._examples_per_user}
