"""ShuffledSampler: every epoch a fresh uniform permutation, fixed-size batches.

Statistical checks use fixed seeds and the bounds of ``sampling_stats``
(false-failure rate <= 1e-6 per check).
"""

import numpy as np
import pytest

from dpfl import sampling
from sampling_stats import assert_binomial_counts, draw_many


def test_shuffled_covers_each_example_once_per_epoch():
  n, batch = 103, 10
  sampler = sampling.ShuffledSampler(n, batch_size=batch, seed=3)
  assert sampler.steps_per_epoch == 10
  assert sampler.describe() == {"scheme": "shuffle", "unit": "example", "population_size": n,
                                "batch_size": batch, "max_batch_size": batch}
  epochs = []
  for _ in range(2000):
    indices, masks = draw_many(sampler, sampler.steps_per_epoch)
    assert masks.all() and indices.shape == (10, batch)
    flat = indices.ravel()
    assert len(np.unique(flat)) == flat.size == 100
    epochs.append(flat)
  assert not np.array_equal(epochs[0], epochs[1])
  # Fresh uniform shuffle each epoch: each example is in the first batch w.p. B/N.
  first = np.bincount(np.stack(epochs)[:, :batch].ravel(), minlength=n)
  assert_binomial_counts(first, len(epochs), batch / n)


def test_resumed_mid_epoch_finishes_the_same_epoch():
  # Step t is position t % b of epoch t // b's permutation, whoever draws it:
  # a run resumed mid-epoch still sees every example once in that epoch.
  first = sampling.ShuffledSampler(50, batch_size=7, seed=11)
  head = [first() for _ in range(10)]  # epoch 0 (7 steps) and 3 steps of epoch 1
  resumed = sampling.ShuffledSampler(50, batch_size=7, seed=first.seed)
  resumed.position = 10
  tail = [resumed() for _ in range(4)]
  epoch_1 = np.concatenate([b.indices for b in head[7:] + tail])
  assert len(np.unique(epoch_1)) == epoch_1.size == 49


@pytest.mark.parametrize("size,batch", [(0, 1), (10, 0), (10, 11), (10, 2.5)])
def test_shuffled_sampler_validation(size, batch):
  name = "dataset_size" if size < 1 else "batch_size"
  with pytest.raises(ValueError, match=rf"^{name} must be .*got"):
    sampling.ShuffledSampler(size, batch_size=batch)
