"""UserSampler (ULS) and ElsSampler (ELS): exact Poisson, padded, never truncated."""

import math

import numpy as np
import pytest
import scipy.stats

from dpfl.sampling import ElsSampler, UserSampler


@pytest.mark.parametrize("sampler_cls,kwargs", [
    (UserSampler, {}), (ElsSampler, {"examples_per_user": 3})])
@pytest.mark.parametrize("max_batch_size", [None, 4])
def test_sampler_inclusion_rate_is_q_and_never_truncates(sampler_cls, kwargs, max_batch_size):
  # 300 draws of Poisson(q=0.05) over N=400 units: the total count is
  # Binomial(120000, 0.05); a 6-sigma bound fails with probability < 2e-9.
  n, q, draws = 400, 0.05, 300
  sampler = sampler_cls(n, sampling_prob=q, max_batch_size=max_batch_size, seed=7, **kwargs)
  counts = np.zeros(n)
  for _ in range(draws):
    batch = sampler()
    real = batch.indices[batch.mask]
    assert len(batch.mask) % sampler.max_batch_size == 0
    assert batch.mask[:real.size].all() and not batch.mask[real.size:].any()
    assert len(set(real.tolist())) == real.size and np.all(np.diff(real) > 0)
    counts[real] += 1
  total = counts.sum()
  assert abs(total - n * q * draws) < 6 * math.sqrt(n * draws * q * (1 - q))
  # Per unit: Binomial(300, 0.05); max over 400 units below the 1e-9 upper
  # quantile (union bound: false failure < 4e-7), and every unit is reachable.
  assert counts.max() <= scipy.stats.binom.isf(1e-9, draws, q)
  if max_batch_size == 4:  # mean 20 per draw > 4: overflow padded, not truncated
    assert sampler.num_overflows > 0.99 * draws
  assert sampler.num_truncated == 0


def test_sampler_pads_to_a_multiple_of_the_device_count():
  sampler = UserSampler(100, sampling_prob=0.1, max_batch_size=9, multiple_of=4, seed=0)
  assert sampler.max_batch_size == 12
  assert sampler.describe() == {"scheme": "poisson", "unit": "user", "population_size": 100,
                                "sampling_prob": 0.1, "max_batch_size": 12}
  els = ElsSampler(100, sampling_prob=0.1, examples_per_user=3, max_batch_size=9, seed=0)
  assert els.describe() == {"scheme": "poisson", "unit": "example", "population_size": 100,
                            "sampling_prob": 0.1, "max_batch_size": 9, "examples_per_user": 3}
