"""Batch selection for DP training, with static shapes for ``jit``.

Every sampler is a ``Sampler``: ``draw(seed, step)`` is a pure function
returning a ``Batch`` (a fixed-length vector of unit indices and a boolean
mask marking the real ones; the rest are padding that ``dpfl.clipped_grad``
must be told to ignore), ``describe()`` is its configuration, and calling it
draws the next step of its own seed (``seed`` and ``position`` are all the
state a resumed run needs). ``FixedSizeSampler`` and ``PoissonRateSampler``
hold what the fixed-size and the Poisson samplers below share.

* ``PoissonSampler``: Poisson sampling of examples, truncated to a maximum
  batch size when that maximum is below the dataset size (or padded further
  with ``truncate=False``).
* ``ShuffledSampler``: fixed-size batches from a shuffle per epoch.
* ``CyclicSampler``, ``CyclicPoissonSampler``: the fixed-order samplers of
  DP-FTRL (one order, or fixed groups Poisson-sampled in turn).
* ``UserSampler``, ``ElsSampler``: exact (never truncated) Poisson sampling
  of users (ULS) or of examples capped per user (ELS).
* ``gather``: the examples of a batch, from arrays or an indexable dataset.
"""

from dpfl.sampling.base import (DEFAULT_TRUNCATION_PROB, Batch, FixedSizeSampler,
                                PoissonRateSampler, Sampler, default_max_batch_size,
                                index_dtype, padded_poisson_draw, sampler_seed)
from dpfl.sampling.cyclic import CyclicPoissonSampler, CyclicSampler
from dpfl.sampling.gathering import gather, num_examples
from dpfl.sampling.poisson import PoissonSampler
from dpfl.sampling.shuffle import ShuffledSampler
from dpfl.sampling.users import DEFAULT_OVERFLOW_PROB, ElsSampler, UserSampler

__all__ = [
    "Batch", "CyclicPoissonSampler", "CyclicSampler", "DEFAULT_OVERFLOW_PROB",
    "DEFAULT_TRUNCATION_PROB", "ElsSampler", "FixedSizeSampler", "PoissonRateSampler",
    "PoissonSampler", "Sampler", "ShuffledSampler",
    "UserSampler", "default_max_batch_size", "gather", "index_dtype", "num_examples",
    "padded_poisson_draw", "sampler_seed",
]
