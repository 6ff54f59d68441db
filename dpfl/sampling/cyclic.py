"""Cyclic batch selection for DP-FTRL: one fixed order, or fixed groups Poisson-sampled.

Matrix-factorization mechanisms are accounted for a participation pattern,
not for amplification by sampling, so their samplers fix which steps each
unit can take part in:

* ``CyclicSampler``: one fixed order repeated every epoch, each unit every
  ``b = N // B`` steps (``(k, b)``-participation);
* ``CyclicPoissonSampler``: the units split once into ``b`` fixed groups,
  step ``t`` Poisson-samples group ``t mod b`` (amplified banded MF).

The order (and so the groups) is a function of the seed alone: a run rebuilt
with the same seed, at any position, keeps the participation pattern its
strategy was optimized for. Their accounting is the matrix mechanism's
(``dpfl.ftrl``).
"""

from __future__ import annotations

import math

import numpy as np

from accounting import validate as check
from dpfl.sampling.base import (DOMAIN_CYCLIC_ORDER, DOMAIN_CYCLIC_POISSON_ORDER,
                                DOMAIN_CYCLIC_POISSON_STEP, Batch, FixedSizeSampler,
                                PoissonRateSampler, check_at_most_dataset_size, index_dtype,
                                padded_poisson_draw, step_generator)

UNITS = ("example", "user")


class _FixedOrder:
  """The uniformly random order of ``size`` units for a seed, cached for the last seed."""

  def __init__(self, size: int, domain: int):
    self._size, self._domain = size, domain
    self._dtype = index_dtype(size)
    self._cached: tuple[bytes, np.ndarray] | None = None

  def __call__(self, seed: np.ndarray) -> np.ndarray:
    key = seed.tobytes()
    if self._cached is None or self._cached[0] != key:
      rng = step_generator(seed, self._domain)
      self._cached = (key, rng.permutation(self._size).astype(self._dtype))
    return self._cached[1]


class CyclicSampler(FixedSizeSampler):
  """Fixed-size batches in one fixed order, repeated every epoch (DP-FTRL / DP-MF).

  One uniformly random permutation, a function of the seed only, is split
  into ``b = dataset_size // batch_size`` batches (the remainder never takes
  part); step ``t`` uses batch ``t mod b``. So every unit takes part in at
  most ``ceil(n / b)`` of ``n`` steps, any two exactly ``b`` apart: the
  ``(k, b)``-participation (``min_separation = b``) under which a matrix
  mechanism's sensitivity is computed (Choquette-Choo et al. 2023,
  "Multi-Epoch Matrix Factorization Mechanisms"). A shuffle per epoch
  (``ShuffledSampler``) would break it: a unit could take part in the last
  step of one epoch and the first of the next.

  Privacy guarantee: no amplification is claimed; the order is fixed before
  training (independently of the data) and the matrix mechanism's
  sensitivity covers every unit's participation pattern. ``participation``
  gives ``(k, b)`` for a run; ``dpfl.ftrl`` turns it into an
  ``accounting.MatrixMechanism``.

  Args:
    dataset_size: number of units N >= 1 (examples, or users for ULS).
    batch_size: units per step, in [1, N].
    multiple_of: pads each batch (mask False) to a multiple of this, e.g. the
      number of devices the unit axis is sharded over.
    seed: None (OS entropy, the private default), an int in [0, 2**128) or a
      ``uint32[4]`` array.
    unit: what the units are, ``"example"`` (default) or ``"user"``: reported
      by ``describe()``.
  """

  def __init__(self, dataset_size: int, *, batch_size: int, multiple_of: int = 1,
               seed=None, unit: str = "example"):
    self._unit = check.choice("unit", unit, UNITS)
    super().__init__(dataset_size, batch_size=batch_size, multiple_of=multiple_of, seed=seed)
    self._order = _FixedOrder(self._dataset_size, DOMAIN_CYCLIC_ORDER)

  def participation(self, num_steps: int) -> tuple[int, int]:
    """``(k, b)`` for a run of ``num_steps``: at most k steps per unit, b apart."""
    num_steps = check.positive_int("num_steps", num_steps)
    b = self.steps_per_epoch
    return math.ceil(num_steps / b), b

  def describe(self) -> dict:
    return {"scheme": "cyclic", "unit": self._unit, "population_size": self._dataset_size,
            "batch_size": self._batch_size, "max_batch_size": self._length,
            "steps_per_epoch": self.steps_per_epoch}

  def _draw(self, seed: np.ndarray, step: int) -> tuple[Batch, bool]:
    """Batch ``step mod b`` of the seed's fixed order, sorted, padded to ``max_batch_size``."""
    start = (step % self.steps_per_epoch) * self._batch_size
    indices = np.zeros(self._length, self._dtype)
    indices[:self._batch_size] = np.sort(self._order(seed)[start:start + self._batch_size])
    return Batch(indices=indices, mask=np.arange(self._length) < self._batch_size), False

  def __repr__(self) -> str:
    return (f"CyclicSampler(dataset_size={self._dataset_size}, batch_size={self._batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch})")


class CyclicPoissonSampler(PoissonRateSampler):
  """Cyclic Poisson sampling for amplified banded MF.

  Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorizations"
  (arXiv 2306.08153), Alg. 2: one uniformly random permutation, a function
  of the seed only, splits the units into ``num_groups = b`` groups of
  ``N // b`` (the remainder never takes part); step ``t`` includes every unit
  of group ``t mod b`` independently with probability ``sampling_prob`` and
  no other unit. Padded to a static size with a mask.

  A draw above ``max_batch_size`` is padded to the next multiple of it (a
  new shape, one recompile) rather than truncated, so the sample is exactly
  Poisson, as the amplified-banded accounting
  (``accounting.AmplifiedBandedMatrixMechanism``) assumes.

  Args:
    dataset_size: N >= 1.
    num_groups: b, in [1, N] (the strategy's number of bands).
    sampling_prob: q in (0, 1], per unit of the active group.
    max_batch_size: usual static length (default: exceeded with probability
      <= 1e-9 per step).
    seed: None (OS entropy), an int in [0, 2**128) or a ``uint32[4]`` array.
    unit: ``"example"`` (default) or ``"user"``, reported by ``describe()``.
    multiple_of: rounds ``max_batch_size`` up to a multiple of this (e.g. the
      number of devices the unit axis is sharded over).
  """

  def __init__(self, dataset_size: int, *, num_groups: int, sampling_prob: float,
               max_batch_size: int | None = None, seed=None, unit: str = "example",
               multiple_of: int = 1):
    dataset_size = check.positive_int("dataset_size", dataset_size)
    self._groups = check_at_most_dataset_size("num_groups", num_groups, dataset_size)
    self._unit = check.choice("unit", unit, UNITS)
    self._group_size = dataset_size // self._groups
    super().__init__(dataset_size, sampling_prob=sampling_prob,
                     max_batch_size=max_batch_size, candidates=self._group_size,
                     multiple_of=multiple_of, seed=seed)
    self._order = _FixedOrder(dataset_size, DOMAIN_CYCLIC_POISSON_ORDER)

  @property
  def dataset_size(self) -> int:
    return self._population_size

  @property
  def num_groups(self) -> int:
    return self._groups

  @property
  def group_size(self) -> int:
    return self._group_size

  def describe(self) -> dict:
    return {"scheme": "cyclic_poisson", "unit": self._unit,
            "population_size": self._population_size, "num_groups": self._groups,
            "sampling_prob": self._sampling_prob, "max_batch_size": self._max_batch_size}

  def _draw(self, seed: np.ndarray, step: int) -> tuple[Batch, bool]:
    """Poisson sample of group ``step mod b``, sorted, then padding (mask False)."""
    group = step % self._groups
    members = self._order(seed)[group * self._group_size:(group + 1) * self._group_size]
    rng = step_generator(seed, DOMAIN_CYCLIC_POISSON_STEP, step)
    batch, _ = padded_poisson_draw(rng, self._group_size, self._sampling_prob,
                                   self._max_batch_size, self._dtype, members)
    return batch, False

  def __repr__(self) -> str:
    return (f"CyclicPoissonSampler(dataset_size={self._population_size}, num_groups="
            f"{self._groups}, sampling_prob={self._sampling_prob})")
