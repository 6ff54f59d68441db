"""Batch selection for DP training, with static shapes for ``jit``.

Samplers run on the host (numpy) and return a ``Batch``: a fixed-length
vector of example indices and a boolean mask marking the real examples; the
rest are padding that ``dpfl.clipped_grad`` must be told to ignore (pass the
mask). Every sampler can describe what it did to the accountant
(``sampler.mechanism(...)``), so the ε reported is the ε of the sampling that
actually ran:

* ``PoissonSampler``: Poisson sampling, truncated to a maximum batch size
  when that maximum is below the dataset size; accounted as
  ``accounting.TruncatedPoissonDpSgd`` (dp-accounting's
  ``TruncatedSubsampledGaussianDpEvent``) or, when truncation is impossible
  (or turned off: a larger draw is padded further instead),
  ``accounting.PoissonDpSgd``.
* ``ShuffledSampler``: fixed-size batches from a shuffle per epoch; accounted
  as ``accounting.ShuffledDpSgd``, which claims no amplification.
* ``dpfl.cyclic_sampling``: the fixed-order samplers of DP-FTRL, accounted
  by the matrix mechanism.

Secrecy of the sample is part of the guarantee (amplification by sampling
assumes the adversary does not see which examples were drawn), so samplers
seed from OS entropy unless given an explicit seed. The generator is numpy's
PCG64, which is not a cryptographically secure PRNG: adequate against an
adversary who sees only the trained model, as in standard DP-SGD practice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

import accounting
from accounting import validate as check
from dpfl import _rng

# Tail probability the default maximum batch size allows to be truncated.
DEFAULT_TRUNCATION_PROB = 1e-9


class Batch(NamedTuple):
  """Indices of one batch, padded to a static length.

  Attributes:
    indices: int array ``[max_batch_size]``; padded slots hold index 0.
    mask: bool array ``[max_batch_size]``; True for real examples. The number
      of True entries is private (it reveals the sample size): use it only
      inside the DP computation, never to normalise or log.
  """

  indices: np.ndarray
  mask: np.ndarray


def index_dtype(dataset_size: int):
  """The narrowest index dtype (int32, else int64) that holds ``dataset_size`` rows."""
  return np.int32 if dataset_size <= np.iinfo(np.int32).max else np.int64


def default_max_batch_size(dataset_size: int, sampling_prob: float, *,
                           truncation_prob: float = DEFAULT_TRUNCATION_PROB) -> int:
  """Smallest maximum batch size that truncates with probability <= ``truncation_prob``.

  The exact upper quantile of Binomial(dataset_size, sampling_prob), capped at
  ``dataset_size``. A "mean + 6 standard deviations" rule would match it for
  large expected batches but under-covers small ones, where the binomial tail
  is heavier than the normal one (mean 1: P[truncate] ~ 1e-5 per step). At
  the default 1e-9, a run of a million steps truncates with probability
  <= 1e-3. Truncation costs no privacy (it is accounted either way), only the
  dropped examples' signal; a larger maximum costs padding compute.

  Args:
    dataset_size: number of examples N >= 1.
    sampling_prob: Poisson rate q in (0, 1].
    truncation_prob: allowed per-step probability that a draw exceeds it.

  Returns:
    ``m`` in [1, N] with P[Binomial(N, q) > m] <= truncation_prob (minimal).
  """
  from scipy import stats  # deferred: only needed to build a sampler
  n = check.positive_int("dataset_size", dataset_size)
  q = check.probability("sampling_prob", sampling_prob)
  truncation_prob = check.open_unit("truncation_prob", truncation_prob)
  sf = lambda m: stats.binom.sf(m, n, q)  # P[Binomial(n, q) > m]
  guess = stats.binom.isf(truncation_prob, n, q)
  m = n if not math.isfinite(guess) else int(min(max(guess, 0), n))
  # isf works in floating point; settle the boundary exactly with sf.
  while m < n and sf(m) > truncation_prob:
    m += 1
  while m > 0 and sf(m - 1) <= truncation_prob:
    m -= 1
  return max(1, m)


def padded_poisson_draw(rng: np.random.Generator, population: int, sampling_prob: float,
                        length: int, dtype, members: np.ndarray | None = None
                        ) -> tuple[Batch, bool]:
  """One exact Poisson sample of ``population`` units, padded, never truncated.

  Draws the size from Binomial(population, q) and a uniform subset of that
  size (the distribution of independent coin flips), sorted, then padding
  (mask False) up to ``length``, or to the next multiple of ``length`` when
  the sample is larger (a new static shape, never a truncated sample).
  ``members`` maps positions to unit indices (default: the identity).
  Returns the batch and whether it overflowed ``length``.
  """
  size = int(rng.binomial(population, sampling_prob))
  overflowed = size > length
  if overflowed:
    length *= math.ceil(size / length)
  chosen = rng.choice(population, size=size, replace=False)
  indices = np.zeros(length, dtype)
  indices[:size] = np.sort(chosen if members is None else members[chosen])
  return Batch(indices=indices, mask=np.arange(length) < size), overflowed


class PoissonSampler:
  """Poisson sampling of examples, padded (and if needed truncated) to a static size.

  Each call includes every one of ``dataset_size`` examples independently
  with probability ``sampling_prob``. If more than ``max_batch_size`` are
  included, a uniformly random subset of ``max_batch_size`` of them is kept
  and ``num_truncated`` counts it. Implementation: the sample size K is drawn
  from Binomial(N, q) and a uniform K-subset chosen, which is the same
  distribution as N independent coin flips (given its size, a Poisson sample
  is a uniform subset) at O(K) cost; truncating draws min(K, max) directly.

  With ``truncate=False`` a draw above ``max_batch_size`` is instead padded
  to the next multiple of it (``padded_poisson_draw``: a longer static shape,
  so ``jit`` compiles once more) and ``num_overflows`` counts it; the sample
  is then exactly Poisson at every step.

  Privacy guarantee: this is exactly the sampling of dp-accounting's
  ``TruncatedSubsampledGaussianDpEvent`` (arXiv 2508.15089), which
  ``mechanism()`` reports whenever truncation is possible; with
  ``max_batch_size >= dataset_size`` or ``truncate=False`` it is plain
  Poisson sampling (``PoissonDpSgd``). Either way the accounting matches what
  ran. The truncated event has no RDP back end in dp-accounting, so RDP
  accounting needs ``truncate=False`` (or ``max_batch_size >= dataset_size``).

  Args:
    dataset_size: number of examples N >= 1.
    sampling_prob: inclusion probability q in (0, 1].
    max_batch_size: static batch length >= 1; default
      ``default_max_batch_size(N, q)`` (exceeded with probability <= 1e-9).
    truncate: what a draw above ``max_batch_size`` does: True (default)
      keeps a uniform ``max_batch_size``-subset (static shape always);
      False pads it to the next multiple of ``max_batch_size`` (exact
      Poisson, rare recompile).
    seed: None (OS entropy: the private default) or an int for reproducible
      runs; never use a fixed seed for a real private run.
  """

  def __init__(self, dataset_size: int, *, sampling_prob: float,
               max_batch_size: int | None = None, truncate: bool = True,
               seed: int | None = None):
    self._dataset_size = check.positive_int("dataset_size", dataset_size)
    self._sampling_prob = check.probability("sampling_prob", sampling_prob)
    if max_batch_size is None:
      max_batch_size = default_max_batch_size(self._dataset_size, self._sampling_prob)
    self._max_batch_size = check.positive_int("max_batch_size", max_batch_size)
    if not isinstance(truncate, bool):
      raise ValueError(f"truncate must be True or False, got {truncate!r}")
    self._truncate = truncate
    self._rng = _rng.numpy_generator(seed)
    self._dtype = index_dtype(self._dataset_size)
    self.num_batches = 0
    self.num_truncated = 0
    self.num_overflows = 0

  @property
  def dataset_size(self) -> int:
    return self._dataset_size

  @property
  def sampling_prob(self) -> float:
    return self._sampling_prob

  @property
  def max_batch_size(self) -> int:
    return self._max_batch_size

  @property
  def expected_batch_size(self) -> float:
    """``q * N``: the public normaliser for ``dpfl.noise.gaussian_noise``."""
    return self._sampling_prob * self._dataset_size

  @property
  def truncate(self) -> bool:
    """Whether a draw above ``max_batch_size`` is truncated (else padded further)."""
    return self._truncate

  @property
  def can_truncate(self) -> bool:
    """Whether a draw can be truncated (it exceeds ``max_batch_size`` and ``truncate``)."""
    return self._truncate and self._max_batch_size < self._dataset_size

  def __call__(self) -> Batch:
    """Draws the next batch (see the class docstring for its distribution)."""
    if not self._truncate:
      batch, overflowed = padded_poisson_draw(self._rng, self._dataset_size,
                                              self._sampling_prob, self._max_batch_size,
                                              self._dtype)
      self.num_overflows += overflowed
      self.num_batches += 1
      return batch
    size = int(self._rng.binomial(self._dataset_size, self._sampling_prob))
    if size > self._max_batch_size:
      size = self._max_batch_size
      self.num_truncated += 1
    chosen = self._rng.choice(self._dataset_size, size=size, replace=False)
    # Sorted: the sample is a set, and sorted rows read faster from memmaps.
    indices = np.zeros(self._max_batch_size, self._dtype)
    indices[:size] = np.sort(chosen)
    mask = np.arange(self._max_batch_size) < size
    self.num_batches += 1
    return Batch(indices=indices, mask=mask)

  def __iter__(self) -> Iterator[Batch]:
    """An endless stream of batches; stop after your number of steps."""
    while True:
      yield self()

  def mechanism(self, *, noise_multiplier: float,
                num_steps: int) -> accounting.Mechanism:
    """The accounting description of ``num_steps`` DP-SGD steps on these batches.

    Args:
      noise_multiplier: σ of the noise added to each clipped sum (> 0).
      num_steps: number of noisy releases made from batches of this sampler.

    Returns:
      ``accounting.TruncatedPoissonDpSgd`` when a draw can be truncated
      (``can_truncate``), else ``accounting.PoissonDpSgd``.
    """
    if self.can_truncate:
      return accounting.TruncatedPoissonDpSgd(
          noise_multiplier=noise_multiplier, sampling_prob=self._sampling_prob,
          dataset_size=self._dataset_size, max_batch_size=self._max_batch_size,
          num_steps=num_steps)
    return accounting.PoissonDpSgd(noise_multiplier=noise_multiplier,
                                   sampling_prob=self._sampling_prob, num_steps=num_steps)

  def __repr__(self) -> str:
    return (f"PoissonSampler(dataset_size={self._dataset_size}, "
            f"sampling_prob={self._sampling_prob}, max_batch_size={self._max_batch_size}, "
            f"truncate={self._truncate})")


class ShuffledSampler:
  """Fixed-size batches from a fresh shuffle every epoch (remainder dropped).

  An epoch is ``dataset_size // batch_size`` steps; each starts with a new
  uniformly random permutation, so every example appears in at most one batch
  per epoch (the ``dataset_size % batch_size`` left over sit the epoch out).

  Privacy guarantee: no amplification is claimed. ``mechanism()`` returns
  ``accounting.ShuffledDpSgd``: each example takes part in at most
  ``ceil(num_steps / steps_per_epoch)`` Gaussian mechanisms with sensitivity C.
  That count assumes epochs start at step 0; a run resumed mid-epoch with a
  new sampler must be recorded as two phases.

  Args:
    dataset_size: number of examples N >= 1.
    batch_size: examples per batch, in [1, N].
    seed: None (OS entropy, the private default) or an int for reproducibility.
  """

  def __init__(self, dataset_size: int, *, batch_size: int, seed: int | None = None):
    self._dataset_size = check.positive_int("dataset_size", dataset_size)
    self._batch_size = check.positive_int("batch_size", batch_size)
    if self._batch_size > self._dataset_size:
      raise ValueError(f"batch_size must be in [1, dataset_size={self._dataset_size}], "
                       f"got {batch_size!r}")
    self._rng = _rng.numpy_generator(seed)
    self._dtype = index_dtype(self._dataset_size)
    self._permutation: np.ndarray | None = None
    self.num_batches = 0

  @property
  def dataset_size(self) -> int:
    return self._dataset_size

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def expected_batch_size(self) -> int:
    """The fixed batch size (public), the normaliser for ``gaussian_noise``."""
    return self._batch_size

  @property
  def steps_per_epoch(self) -> int:
    return self._dataset_size // self._batch_size

  def __call__(self) -> Batch:
    """The next batch; reshuffles at the start of every epoch."""
    position = self.num_batches % self.steps_per_epoch
    if position == 0:
      self._permutation = self._rng.permutation(self._dataset_size).astype(self._dtype)
    start = position * self._batch_size
    indices = self._permutation[start:start + self._batch_size].copy()
    self.num_batches += 1
    return Batch(indices=indices, mask=np.ones(self._batch_size, bool))

  def __iter__(self) -> Iterator[Batch]:
    """An endless stream of batches; stop after your number of steps."""
    while True:
      yield self()

  def mechanism(self, *, noise_multiplier: float, num_steps: int) -> accounting.Mechanism:
    """The accounting description (``accounting.ShuffledDpSgd``) of ``num_steps`` steps.

    Args:
      noise_multiplier: σ of the noise added to each clipped sum (> 0).
      num_steps: number of noisy releases made from batches of this sampler.

    Returns:
      ``accounting.ShuffledDpSgd`` for this dataset and batch size.
    """
    return accounting.ShuffledDpSgd(noise_multiplier=noise_multiplier,
                                    dataset_size=self._dataset_size,
                                    batch_size=self._batch_size, num_steps=num_steps)

  def __repr__(self) -> str:
    return f"ShuffledSampler(dataset_size={self._dataset_size}, batch_size={self._batch_size})"


def _is_example_sequence(dataset) -> bool:
  """True for indexable datasets of examples; False for pytrees of arrays."""
  if isinstance(dataset, (np.ndarray, jax.Array, Mapping, tuple)):
    return False
  return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def num_examples(dataset: Any) -> int:
  """The number of examples in ``dataset``, in the sense ``gather`` indexes it.

  ``len(dataset)`` for an indexable sequence of examples; the shared leading
  size of the arrays for a pytree of arrays.
  """
  return len(dataset) if _is_example_sequence(dataset) else _pytree_len(dataset)


def _pytree_len(dataset) -> int:
  leaves = jax.tree.leaves(dataset)
  if not leaves:
    raise ValueError("dataset must contain at least one array, got an empty pytree")
  sizes = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError("dataset arrays must have a leading example axis; got a scalar leaf")
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(f"dataset arrays must share one leading size, got sizes {sorted(sizes)}")
  return sizes.pop()


def _stack(items: list) -> Any:
  try:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)
  except ValueError as err:
    raise ValueError("dataset items must all have the same structure and shapes to be "
                     f"stacked into a batch: {err}") from err


def gather(dataset: Any, indices: np.ndarray, mask: np.ndarray) -> Any:
  """The examples at ``indices`` stacked along a leading axis; padding filled by row 0.

  ``dataset`` is either a pytree of arrays sharing a leading example axis (a
  numpy/jax array, a dict or tuple of them: rows are taken by fancy indexing)
  or any other object with ``__len__`` and ``__getitem__`` (a list, a
  torch-style dataset) whose items are arrays or dicts/tuples of arrays (the
  items are fetched and stacked with numpy; padded slots are not fetched).

  Privacy: slots where ``mask`` is False hold a copy of example 0, so shapes
  and dtypes are valid for the model. They MUST be masked out of the gradient
  (pass ``mask`` to ``dpfl.clipped_grad``): unmasked, example 0 would
  contribute once per padded slot and exceed the stated sensitivity.

  Args:
    dataset: pytree of arrays or indexable dataset, with at least one example.
    indices: 1-D integer array (e.g. ``Batch.indices``).
    mask: bool array of the same shape; True marks real examples, whose
      indices must lie in [0, len(dataset)).

  Returns:
    The batch: the same structure as ``dataset`` (or its items) with leading
    axis ``len(indices)``.
  """
  indices = np.asarray(indices)
  mask = np.asarray(mask)
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} "
                     f"and dtype {indices.dtype}")
  if mask.shape != indices.shape or mask.dtype != np.bool_:
    raise ValueError(f"mask must be a bool array of shape {indices.shape} like indices, "
                     f"got shape {mask.shape} and dtype {mask.dtype}")
  sequence = _is_example_sequence(dataset)
  size = len(dataset) if sequence else _pytree_len(dataset)
  if size == 0:
    raise ValueError("dataset must contain at least one example, got an empty dataset")
  real = indices[mask]
  if real.size and (real.min() < 0 or real.max() >= size):
    raise ValueError(f"indices must lie in [0, {size}) where mask is True, got values in "
                     f"[{real.min()}, {real.max()}]")
  safe = np.where(mask, indices, 0)
  if not sequence:
    return jax.tree.map(lambda leaf: leaf[safe], dataset)
  filler = dataset[0]
  return _stack([dataset[int(i)] if keep else filler for i, keep in zip(safe, mask)])
