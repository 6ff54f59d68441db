"""Poisson sampling of examples, padded (and if needed truncated) to a static size."""

from __future__ import annotations

import numpy as np

from accounting import validate as check
from dpfl.sampling.base import (DOMAIN_POISSON_STEP, Batch, PoissonRateSampler,
                                padded_poisson_draw, step_generator)


class PoissonSampler(PoissonRateSampler):
  """Poisson sampling of examples, padded (and if needed truncated) to a static size.

  Each step includes every one of ``dataset_size`` examples independently
  with probability ``sampling_prob``. If more than ``max_batch_size`` are
  included, a uniformly random subset of ``max_batch_size`` of them is kept
  (calling the sampler counts it in ``num_truncated``). Implementation: the
  sample size K is drawn from Binomial(N, q) and a uniform K-subset chosen,
  which is the same distribution as N independent coin flips (given its
  size, a Poisson sample is a uniform subset) at O(K) cost; truncating draws
  min(K, max) directly.

  With ``truncate=False`` a draw above ``max_batch_size`` is instead padded
  to the next multiple of it (``padded_poisson_draw``: a longer static shape,
  so ``jit`` compiles once more; counted in ``num_overflows``); the sample
  is then exactly Poisson at every step.

  Privacy guarantee: whenever truncation is possible (``can_truncate``) this
  is exactly the sampling of dp-accounting's
  ``TruncatedSubsampledGaussianDpEvent`` (arXiv 2508.15089,
  ``accounting.TruncatedPoissonDpSgd``); with ``max_batch_size >=
  dataset_size`` or ``truncate=False`` it is plain Poisson sampling
  (``accounting.PoissonDpSgd``). ``describe()`` says which (``scheme``
  ``"truncated_poisson"`` or ``"poisson"``). The truncated event has no RDP
  back end in dp-accounting, so RDP accounting needs ``truncate=False`` (or
  ``max_batch_size >= dataset_size``).

  Args:
    dataset_size: number of examples N >= 1.
    sampling_prob: inclusion probability q in (0, 1].
    max_batch_size: static batch length >= 1; default
      ``default_max_batch_size(N, q)`` (exceeded with probability <= 1e-9).
    truncate: what a draw above ``max_batch_size`` does: True (default)
      keeps a uniform ``max_batch_size``-subset (static shape always);
      False pads it to the next multiple of ``max_batch_size`` (exact
      Poisson, rare recompile).
    seed: None (OS entropy: the private default), an int in [0, 2**128) or a
      ``uint32[4]`` array for reproducible runs; never use a fixed seed for a
      real private run.
    multiple_of: rounds ``max_batch_size`` up to a multiple of this (e.g. the
      number of devices the example axis is sharded over); the rounded size
      is the one truncation and ``describe()`` use.
  """

  def __init__(self, dataset_size: int, *, sampling_prob: float,
               max_batch_size: int | None = None, truncate: bool = True, seed=None,
               multiple_of: int = 1):
    dataset_size = check.positive_int("dataset_size", dataset_size)
    if not isinstance(truncate, bool):
      raise ValueError(f"truncate must be True or False, got {truncate!r}")
    self._truncate = truncate
    super().__init__(dataset_size, sampling_prob=sampling_prob, max_batch_size=max_batch_size,
                     multiple_of=multiple_of, seed=seed)

  @property
  def dataset_size(self) -> int:
    return self._population_size

  @property
  def truncate(self) -> bool:
    """Whether a draw above ``max_batch_size`` is truncated (else padded further)."""
    return self._truncate

  @property
  def can_truncate(self) -> bool:
    """Whether a draw can be truncated (it exceeds ``max_batch_size`` and ``truncate``)."""
    return self._truncate and self._max_batch_size < self._population_size

  def describe(self) -> dict:
    return {"scheme": "truncated_poisson" if self.can_truncate else "poisson",
            "unit": "example", "population_size": self._population_size,
            "sampling_prob": self._sampling_prob, "max_batch_size": self._max_batch_size}

  def _draw(self, seed: np.ndarray, step: int) -> tuple[Batch, bool]:
    rng = step_generator(seed, DOMAIN_POISSON_STEP, step)
    if not self.can_truncate:
      # Nothing is ever truncated: the exact Poisson draw every padded sampler makes.
      return padded_poisson_draw(rng, self._population_size, self._sampling_prob,
                                 self._max_batch_size, self._dtype)[0], False
    size = int(rng.binomial(self._population_size, self._sampling_prob))
    truncated = size > self._max_batch_size
    size = min(size, self._max_batch_size)
    chosen = rng.choice(self._population_size, size=size, replace=False)
    indices = np.zeros(self._max_batch_size, self._dtype)
    indices[:size] = np.sort(chosen)
    return Batch(indices=indices, mask=np.arange(self._max_batch_size) < size), truncated

  def __repr__(self) -> str:
    return (f"PoissonSampler(dataset_size={self._population_size}, "
            f"sampling_prob={self._sampling_prob}, max_batch_size={self._max_batch_size}, "
            f"truncate={self._truncate})")
