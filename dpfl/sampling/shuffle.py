"""Fixed-size batches from a fresh shuffle every epoch."""

from __future__ import annotations

import numpy as np

from dpfl.sampling.base import DOMAIN_SHUFFLE_EPOCH, Batch, FixedSizeSampler, step_generator


class ShuffledSampler(FixedSizeSampler):
  """Fixed-size batches from a fresh shuffle every epoch (remainder dropped).

  An epoch is ``dataset_size // batch_size`` steps; each starts with a new
  uniformly random permutation, so every example appears in at most one batch
  per epoch (the ``dataset_size % batch_size`` left over sit the epoch out).
  The permutation of epoch ``e`` depends on the seed and ``e`` only, so step
  ``t`` is position ``t % steps_per_epoch`` of epoch ``t // steps_per_epoch``
  however the run got there (a resumed run continues the same epoch).

  Privacy guarantee: no amplification is claimed (``accounting.ShuffledDpSgd``):
  each example takes part in at most ``ceil(num_steps / steps_per_epoch)``
  Gaussian mechanisms with sensitivity C.

  Args:
    dataset_size: number of examples N >= 1.
    batch_size: examples per batch, in [1, N].
    seed: None (OS entropy, the private default), an int in [0, 2**128) or a
      ``uint32[4]`` array.
    multiple_of: pads each batch (mask False) to a multiple of this, e.g. the
      number of devices the example axis is sharded over.
  """

  def __init__(self, dataset_size: int, *, batch_size: int, seed=None, multiple_of: int = 1):
    super().__init__(dataset_size, batch_size=batch_size, multiple_of=multiple_of, seed=seed)
    self._cached: tuple[bytes, int, np.ndarray] | None = None  # (seed, epoch, permutation)

  def describe(self) -> dict:
    return {"scheme": "shuffle", "unit": "example", "population_size": self._dataset_size,
            "batch_size": self._batch_size, "max_batch_size": self._length}

  def _permutation(self, seed: np.ndarray, epoch: int) -> np.ndarray:
    # One epoch cached: a loop draws the steps of an epoch in a row.
    key = seed.tobytes()
    if self._cached is None or self._cached[:2] != (key, epoch):
      rng = step_generator(seed, DOMAIN_SHUFFLE_EPOCH, epoch)
      self._cached = (key, epoch, rng.permutation(self._dataset_size).astype(self._dtype))
    return self._cached[2]

  def _draw(self, seed: np.ndarray, step: int) -> tuple[Batch, bool]:
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self._batch_size
    indices = np.zeros(self._length, self._dtype)
    indices[:self._batch_size] = self._permutation(seed, epoch)[start:start + self._batch_size]
    return Batch(indices=indices, mask=np.arange(self._length) < self._batch_size), False

  def __repr__(self) -> str:
    return f"ShuffledSampler(dataset_size={self._dataset_size}, batch_size={self._batch_size})"
