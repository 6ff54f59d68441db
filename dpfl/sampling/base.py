"""The sampler interface: ``Batch``, ``Sampler``, seeds, and the draws samplers share.

A sampler is a pure function of a seed and a step, wrapped in an object that
holds its configuration: ``draw(seed, step)`` is the batch of step ``step``
of the run whose sampling seed is ``seed``, the same on every machine and in
any call order. That is what makes a run resumable: the saved state of a
sampler is its seed and its position (the next step), nothing else.

Secrecy of the sample is part of the guarantee (amplification by sampling
assumes the adversary does not see which examples were drawn), so samplers
seed from OS entropy unless given an explicit seed. Every step's generator is
numpy's PCG64 seeded by a ``SeedSequence`` of the 128-bit seed with the
scheme and step as its spawn key; PCG64 is not a cryptographically secure
PRNG: adequate against an adversary who sees only the trained model, as in
standard DP-SGD practice.
"""

from __future__ import annotations

import abc
import math
import numbers
import secrets
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from accounting import validate as check

# Tail probability the default maximum batch size allows to be truncated.
DEFAULT_TRUNCATION_PROB = 1e-9

SEED_WORDS = 4  # a sampler seed is 4 uint32 words: 128 bits

# First word of every spawn key (``step_generator``): one per kind of draw, so
# no two kinds of draw share a stream. Exact Poisson draws share one domain
# whoever makes them: equal descriptions, same batches.
DOMAIN_POISSON_STEP = 1
DOMAIN_SHUFFLE_EPOCH = 2
DOMAIN_CYCLIC_ORDER = 3
DOMAIN_CYCLIC_POISSON_STEP = 4
DOMAIN_CYCLIC_POISSON_ORDER = 5


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


def sampler_seed(seed=None, *, name: str = "seed") -> np.ndarray:
  """A sampler seed: 128 bits as a ``uint32[4]`` array (word 0 the lowest).

  Args:
    seed: None (fresh OS entropy: the private default), an int in
      ``[0, 2**128)`` (every bit is kept: two seeds that differ in any bit
      give different batches), or a ``uint32`` array of shape ``[4]``, numpy
      or jax (taken as is, e.g. ``sampler.seed`` of a saved run).
    name: the argument name used in error messages.

  Returns:
    A new ``np.ndarray`` of dtype uint32 and shape ``(4,)``.

  Raises:
    ValueError: for negative or larger ints, bools, floats and other arrays.
  """
  if seed is None:
    return np.frombuffer(secrets.token_bytes(4 * SEED_WORDS), dtype="<u4").astype(np.uint32)
  if isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_)):
    value = int(seed)
    if 0 <= value < 2**(32 * SEED_WORDS):
      return np.array([(value >> (32 * i)) & 0xFFFFFFFF for i in range(SEED_WORDS)], np.uint32)
  elif (hasattr(seed, "dtype") and hasattr(seed, "shape") and seed.dtype == np.uint32
        and tuple(seed.shape) == (SEED_WORDS,)):
    return np.array(seed, np.uint32)  # a copy; also from a jax array (a restored state)
  raise ValueError(f"{name} must be None (OS entropy), an integer in [0, 2**128) or a uint32 "
                   f"array of shape ({SEED_WORDS},), got {seed!r}")


def step_generator(seed: np.ndarray, *spawn_key: int) -> np.random.Generator:
  """The generator of one draw: PCG64 from ``SeedSequence(seed, spawn_key)``.

  ``spawn_key`` names the draw (a scheme's domain, then e.g. the step), so
  every (seed, draw) pair has its own independent stream, computed without
  any earlier draw: numpy's documented way to derive independent streams.
  """
  sequence = np.random.SeedSequence(entropy=[int(w) for w in seed], spawn_key=spawn_key)
  return np.random.Generator(np.random.PCG64(sequence))


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
  # Sorted: the sample is a set, and sorted rows read faster from memmaps.
  indices[:size] = np.sort(chosen if members is None else members[chosen])
  return Batch(indices=indices, mask=np.arange(length) < size), overflowed


def round_up(length: int, multiple_of: int) -> int:
  """``length`` rounded up to a multiple of ``multiple_of``.

  A static batch length that is a multiple of the device count keeps the
  unit axis evenly shardable.
  """
  return multiple_of * math.ceil(length / multiple_of)


def check_at_most_dataset_size(name: str, value, dataset_size: int) -> int:
  """A count of units per step or per group: an integer in ``[1, dataset_size]``."""
  count = check.positive_int(name, value)
  if count > dataset_size:
    raise ValueError(f"{name} must be in [1, dataset_size={dataset_size}], got {value!r}")
  return count


def check_index(name: str, value) -> int:
  """A step index: an integer >= 0 (a Python or numpy int, or a 0-d integer array)."""
  if (hasattr(value, "dtype") and np.ndim(value) == 0
      and np.issubdtype(value.dtype, np.integer)):
    value = int(value)  # e.g. the step count of a (jax) training state
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
  return int(value)


class Sampler(abc.ABC):
  """Batch selection as a pure function of (seed, step), with a position for loops.

  ``draw(seed, step)`` is pure: same seed and step, same ``Batch``.
  Subclasses implement it as ``_draw``, plus ``describe`` (the JSON-able
  configuration) and the sizes below.
  Calling the sampler (``sampler()``, or iterating it) is the stateful
  convenience: it draws step ``position`` of the sampler's own ``seed`` and
  advances ``position``, so ``[sampler() for _ in range(k)]`` equals
  ``[sampler.draw(sampler.seed, t) for t in range(k)]``. To resume a run,
  build the sampler with the same arguments and seed and set ``position``
  to the number of steps already taken.

  Args:
    seed: None (OS entropy, the private default), an int in ``[0, 2**128)``
      or a ``uint32[4]`` array (see ``sampler_seed``). Never use a fixed seed
      for a real private run: the sample must stay secret.
  """

  def __init__(self, seed=None):
    self._seed = sampler_seed(seed)
    self._position = 0
    # Diagnostics of the draws made by calling the sampler (not by ``draw``):
    # draws longer than ``max_batch_size`` (a new static shape, so a
    # recompile) and draws truncated to it (PoissonSampler only).
    self.num_overflows = 0
    self.num_truncated = 0

  @property
  @abc.abstractmethod
  def population_size(self) -> int:
    """The number of sampling units (examples, or users)."""

  @property
  @abc.abstractmethod
  def expected_batch_size(self) -> float:
    """The public normaliser of the noisy sum (never the realised batch size)."""

  @property
  @abc.abstractmethod
  def max_batch_size(self) -> int:
    """The usual static batch length."""

  def draw(self, seed: np.ndarray, step: int) -> Batch:
    """The batch of step ``step`` (0-based) of the run whose sampling seed is ``seed``.

    Pure and deterministic: no state is read or written, so any step can be
    drawn in any order, on any machine, with the same result.

    Args:
      seed: a sampler seed (anything ``sampler_seed`` accepts except None).
      step: the step index, an integer >= 0.
    """
    if seed is None:
      raise ValueError("seed must be given to draw (it is deterministic: use sampler.seed), "
                       "got None")
    return self._draw(sampler_seed(seed), check_index("step", step))[0]

  @abc.abstractmethod
  def _draw(self, seed: np.ndarray, step: int) -> tuple[Batch, bool]:
    """``draw`` for a checked seed and step, and whether the draw was truncated."""

  @abc.abstractmethod
  def describe(self) -> dict:
    """The sampling configuration as a JSON-able dict.

    Keys: ``scheme`` (``"poisson"``, ``"truncated_poisson"``, ``"shuffle"``,
    ``"cyclic"`` or ``"cyclic_poisson"``), ``unit`` (``"example"`` or
    ``"user"``), ``population_size``, and the scheme's parameters. Two
    samplers with equal descriptions draw the same batches from the same seed.
    """

  @property
  def seed(self) -> np.ndarray:
    """The ``uint32[4]`` seed this sampler was built with (a copy)."""
    return self._seed.copy()

  @property
  def position(self) -> int:
    """The step the next ``sampler()`` call draws (the number of steps taken)."""
    return self._position

  @position.setter
  def position(self, value: int) -> None:
    self._position = check_index("position", value)

  def __call__(self) -> Batch:
    """Draws step ``position`` of this sampler's seed and advances ``position``."""
    batch, truncated = self._draw(self._seed, self._position)
    self._position += 1
    self.num_truncated += truncated
    self.num_overflows += len(batch.mask) > self.max_batch_size
    return batch

  def __iter__(self) -> Iterator[Batch]:
    """An endless stream of batches from ``position`` on; stop after your number of steps."""
    while True:
      yield self()


class FixedSizeSampler(Sampler):
  """``batch_size`` of the ``dataset_size`` units every step, in epochs.

  What ``ShuffledSampler`` and ``CyclicSampler`` share: a public, fixed
  batch size (so the noise normaliser is the batch size itself), a static
  length rounded up to ``multiple_of``, and epochs of
  ``dataset_size // batch_size`` steps (the remainder sits each epoch out).
  Subclasses say which units make up each step (``_draw``).

  Args:
    dataset_size: number of units N >= 1.
    batch_size: units per step, in [1, N].
    multiple_of: pads each batch (mask False) to a multiple of this.
    seed: as for ``Sampler``.
  """

  def __init__(self, dataset_size: int, *, batch_size: int, multiple_of: int = 1, seed=None):
    self._dataset_size = check.positive_int("dataset_size", dataset_size)
    self._batch_size = check_at_most_dataset_size("batch_size", batch_size, self._dataset_size)
    self._length = round_up(self._batch_size, check.positive_int("multiple_of", multiple_of))
    self._dtype = index_dtype(self._dataset_size)
    super().__init__(seed)

  @property
  def dataset_size(self) -> int:
    return self._dataset_size

  @property
  def population_size(self) -> int:
    return self._dataset_size

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def max_batch_size(self) -> int:
    """The static batch length (``batch_size`` rounded up to ``multiple_of``)."""
    return self._length

  @property
  def expected_batch_size(self) -> int:
    """The fixed batch size (public): the normaliser for ``dpfl.noise.gaussian_noise``."""
    return self._batch_size

  @property
  def steps_per_epoch(self) -> int:
    """Batches per pass over the units (the remainder never takes part)."""
    return self._dataset_size // self._batch_size


class PoissonRateSampler(Sampler):
  """Each candidate unit of a step is included independently with probability ``sampling_prob``.

  What the Poisson samplers share (``PoissonSampler``, ``CyclicPoissonSampler``,
  ``UserSampler``, ``ElsSampler``): the rate, the usual static length (by
  default the one a Binomial(candidates, q) draw exceeds with probability
  ``truncation_prob``), and the public noise normaliser ``q * candidates``.
  Subclasses validate the population under their own argument name.

  Args:
    population_size: the number of units, already validated.
    candidates: the units each step samples from (default: all of them).
    sampling_prob: q in (0, 1].
    max_batch_size: usual static length >= 1, or None for the default;
      rounded up to ``multiple_of``.
    truncation_prob: the per-step probability the default length is exceeded.
    multiple_of: e.g. the number of devices the unit axis is sharded over.
    seed: as for ``Sampler``.
  """

  def __init__(self, population_size: int, *, sampling_prob: float,
               max_batch_size: int | None = None, candidates: int | None = None,
               truncation_prob: float = DEFAULT_TRUNCATION_PROB, multiple_of: int = 1,
               seed=None):
    self._population_size = population_size
    self._candidates = population_size if candidates is None else candidates
    self._sampling_prob = check.probability("sampling_prob", sampling_prob)
    multiple_of = check.positive_int("multiple_of", multiple_of)
    if max_batch_size is None:
      max_batch_size = default_max_batch_size(self._candidates, self._sampling_prob,
                                              truncation_prob=truncation_prob)
    self._max_batch_size = round_up(check.positive_int("max_batch_size", max_batch_size),
                                    multiple_of)
    self._dtype = index_dtype(population_size)
    super().__init__(seed)

  @property
  def population_size(self) -> int:
    return self._population_size

  @property
  def sampling_prob(self) -> float:
    return self._sampling_prob

  @property
  def max_batch_size(self) -> int:
    """The usual static batch length."""
    return self._max_batch_size

  @property
  def expected_batch_size(self) -> float:
    """``q * candidates`` (N, or ``N // b`` for cyclic Poisson): the public noise normaliser."""
    return self._sampling_prob * self._candidates
