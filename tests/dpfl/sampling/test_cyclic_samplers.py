"""CyclicSampler and CyclicPoissonSampler: one fixed order (a function of the seed).

Statistical checks use fixed seeds and the bounds of ``sampling_stats``
(false-failure rate <= 1e-6 per check, stated per test).
"""

import numpy as np
import pytest

from dpfl import sampling
from sampling_stats import assert_binomial_counts, assert_fits, inclusion_counts


def test_cyclic_blocks_are_disjoint_cover_and_repeat():
  s = sampling.CyclicSampler(103, batch_size=10, seed=1)
  assert s.steps_per_epoch == 10 and s.participation(25) == (3, 10)
  draws = [s() for _ in range(30)]
  first = np.concatenate([d.indices for d in draws[:10]])
  assert len(set(first.tolist())) == first.size == 100  # each kept unit once, 3 left out
  for t, draw in enumerate(draws):
    assert draw.mask.all() and np.all(np.diff(draw.indices) > 0)
    assert np.array_equal(draw.indices, draws[t % 10].indices)
  # The order is a function of the seed only: step t of any draw is block t mod b.
  np.testing.assert_array_equal(s.draw(s.seed, 10**9 + 3).indices, draws[3].indices)
  padded = sampling.CyclicSampler(103, batch_size=10, multiple_of=4, seed=1)()
  assert padded.indices.shape == (12,) and padded.mask.sum() == 10
  np.testing.assert_array_equal(padded.indices[:10], draws[0].indices)


def test_cyclic_order_is_uniform():
  # Over many seeds, unit i lands in block 0 with probability B / N and
  # among the left-out units with probability (N mod B) / N. Two checks:
  # false-failure rate <= 2e-6.
  n, batch, seeds = 23, 5, 4000
  s = sampling.CyclicSampler(n, batch_size=batch, seed=0)
  block_0, covered = np.zeros(n), np.zeros(n)
  for seed in range(seeds):
    blocks = [s.draw(seed, t).indices for t in range(s.steps_per_epoch)]
    block_0[blocks[0]] += 1
    covered[np.concatenate(blocks)] += 1
  assert_binomial_counts(block_0, seeds, batch / n)
  assert_binomial_counts(seeds - covered, seeds, (n % batch) / n)


def test_cyclic_describe_and_unit():
  s = sampling.CyclicSampler(100, batch_size=9, multiple_of=4, seed=0, unit="user")
  assert s.describe() == {"scheme": "cyclic", "unit": "user", "population_size": 100,
                          "batch_size": 9, "max_batch_size": 12, "steps_per_epoch": 11}
  with pytest.raises(ValueError, match=r"^unit must be one of example, user; got 'users'"):
    sampling.CyclicSampler(100, batch_size=9, unit="users")


def test_cyclic_poisson_draws_each_member_of_the_active_group_at_rate_q():
  # Each unit of a kept group: Binomial(draws / b, q) inclusions; the 2 left
  # over never. Sizes ~ Binomial(N // b, q). Two checks: false-failure <= 2e-6.
  n, groups, q, draws = 402, 4, 0.3, 4000
  s = sampling.CyclicPoissonSampler(n, num_groups=groups, sampling_prob=q, seed=0)
  assert s.group_size == 100 and s.expected_batch_size == pytest.approx(30)
  assert s.describe() == {"scheme": "cyclic_poisson", "unit": "example", "population_size": n,
                          "num_groups": groups, "sampling_prob": q,
                          "max_batch_size": s.max_batch_size}
  batches = [s() for _ in range(draws)]
  members = [set() for _ in range(groups)]
  counts = np.zeros(n, int)
  sizes = []
  for t, batch in enumerate(batches):
    real = batch.indices[batch.mask]
    assert np.all(np.diff(real) > 0)
    members[t % groups].update(real.tolist())
    counts += inclusion_counts(real, np.ones(real.size, bool), n)
    sizes.append(real.size)
  for i in range(groups):
    assert len(members[i]) == 100
    for j in range(i):
      assert not members[i] & members[j]
  kept = np.zeros(n, bool)
  kept[list(set().union(*members))] = True
  assert kept.sum() == 400 and np.all(counts[~kept] == 0)
  assert_binomial_counts(counts[kept], draws // groups, q)
  from scipy import stats
  assert_fits(np.bincount(sizes, minlength=101), stats.binom.pmf(np.arange(101), 100, q))


def test_cyclic_poisson_groups_survive_a_restart():
  first = sampling.CyclicPoissonSampler(200, num_groups=5, sampling_prob=1.0, seed=9)
  groups = [first().indices for _ in range(5)]
  resumed = sampling.CyclicPoissonSampler(200, num_groups=5, sampling_prob=1.0, seed=first.seed)
  resumed.position = 7
  np.testing.assert_array_equal(resumed().indices, groups[2])
