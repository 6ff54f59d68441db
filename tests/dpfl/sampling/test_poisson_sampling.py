"""PoissonSampler: inclusion law, truncation or further padding, static shapes.

Statistical checks use fixed seeds and the bounds of ``sampling_stats``
(false-failure rate <= 1e-6 per check, stated per test where there are more).
"""

import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from scipy import stats

from dpfl import sampling
from sampling_stats import assert_binomial_counts, assert_fits, draw_many, inclusion_counts


def test_inclusion_rate_and_batch_size_distribution():
  # Four checks: false-failure rate <= 4e-6.
  n, q, draws = 100, 0.1, 20_000
  sampler = sampling.PoissonSampler(n, sampling_prob=q, max_batch_size=n, seed=0)
  indices, masks = draw_many(sampler, draws)
  assert_binomial_counts(inclusion_counts(indices, masks, n), draws, q)
  sizes = masks.sum(axis=1)
  assert_fits(np.bincount(sizes, minlength=n + 1), stats.binom.pmf(np.arange(n + 1), n, q))
  # Pairwise independence: examples 0 and 1 are sampled together with prob q^2.
  in_0 = np.any((indices == 0) & masks, axis=1)
  in_1 = np.any((indices == 1) & masks, axis=1)
  both = np.sum(in_0 & in_1)
  assert_binomial_counts([both], draws, q * q)
  # Steps are independent draws: example 0 in steps t and t + 1 with prob q^2.
  assert_binomial_counts([np.sum(in_0[1:] & in_0[:-1])], draws - 1, q * q)
  assert sampler.position == draws and sampler.num_truncated == 0


def test_static_shapes_and_padding():
  sampler = sampling.PoissonSampler(50, sampling_prob=0.2, max_batch_size=30, seed=1)
  for batch in (sampler() for _ in range(200)):
    assert batch.indices.shape == (30,) and batch.mask.shape == (30,)
    assert batch.indices.dtype == np.int32 and batch.mask.dtype == np.bool_
    size = batch.mask.sum()
    assert np.all(batch.mask[:size]) and not np.any(batch.mask[size:])
    real = batch.indices[batch.mask]
    assert np.all(np.diff(real) > 0) and real.min(initial=0) >= 0 and real.max(initial=0) < 50
    assert np.all(batch.indices[~batch.mask] == 0)


def test_truncation_keeps_max_and_a_uniform_subset():
  # Three checks: false-failure rate <= 3e-6.
  n, q, max_batch, draws = 20, 0.5, 5, 20_000
  sampler = sampling.PoissonSampler(n, sampling_prob=q, max_batch_size=max_batch, seed=2)
  indices, masks = draw_many(sampler, draws)
  sizes = masks.sum(axis=1)
  # Realised size is min(K, max), K ~ Binomial(n, q).
  pmf = stats.binom.pmf(np.arange(max_batch + 1), n, q)
  pmf[max_batch] = stats.binom.sf(max_batch - 1, n, q)
  assert_fits(np.bincount(sizes, minlength=max_batch + 1), pmf)
  # Truncation counter ~ Binomial(draws, P[K > max]).
  assert_binomial_counts([sampler.num_truncated], draws, stats.binom.sf(max_batch, n, q))
  # Full batches (mostly truncated draws) are uniform max-subsets: each example
  # is in one with probability max/n. Keeping e.g. the smallest indices fails.
  full = sizes == max_batch
  counts = inclusion_counts(indices[full], masks[full], n)
  assert_binomial_counts(counts, int(full.sum()), max_batch / n)


def _tail(n, q, m):
  """P[Binomial(n, q) > m] by summing the pmf in log space (independent of scipy)."""
  log_q, log_1mq = math.log(q), math.log1p(-q) if q < 1 else -math.inf
  total = 0.0
  for j in range(m + 1, n + 1):
    log_term = (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                + j * log_q + ((n - j) * log_1mq if n > j else 0.0))
    total += math.exp(log_term)
  return total


@pytest.mark.parametrize("n,q", [(60_000, 256 / 60_000), (1000, 0.001), (1797, 0.05),
                                 (10, 0.9), (5, 1.0)])
def test_default_max_batch_size_is_minimal_binomial_quantile(n, q):
  m = sampling.PoissonSampler(n, sampling_prob=q, seed=0).max_batch_size
  if m < n:
    assert _tail(n, q, m) <= sampling.DEFAULT_TRUNCATION_PROB < _tail(n, q, m - 1)
  else:
    assert m == n and _tail(n, q, n - 1) > sampling.DEFAULT_TRUNCATION_PROB


def test_default_beats_six_sigma_rule_for_small_expected_batches():
  n, q = 1000, 0.001
  six_sigma = math.ceil(n * q + 6 * math.sqrt(n * q * (1 - q)))
  assert _tail(n, q, six_sigma) > 1e-6  # why the rule is not the default
  assert sampling.PoissonSampler(n, sampling_prob=q).max_batch_size > six_sigma


def test_describe_truncated_when_truncation_possible():
  sampler = sampling.PoissonSampler(200, sampling_prob=0.05, max_batch_size=20)
  assert sampler.can_truncate
  assert sampler.describe() == {"scheme": "truncated_poisson", "unit": "example",
                                "population_size": 200, "sampling_prob": 0.05,
                                "max_batch_size": 20}


def test_describe_poisson_when_truncation_impossible():
  sampler = sampling.PoissonSampler(100, sampling_prob=0.02, max_batch_size=100)
  assert not sampler.can_truncate and sampler.describe()["scheme"] == "poisson"
  # Default maximum for q = 0.9 of 10 examples is the whole dataset.
  assert not sampling.PoissonSampler(10, sampling_prob=0.9).can_truncate


def test_untruncated_draws_are_exact_poisson_padded_further():
  # truncate=False: a draw above the maximum gets a longer shape (a multiple
  # of it), never fewer examples, so sizes are Binomial(n, q) in full and the
  # accounting is plain Poisson. False-failure rate <= 2e-6 (two checks).
  n, q, max_batch, draws = 20, 0.5, 5, 20_000
  sampler = sampling.PoissonSampler(n, sampling_prob=q, max_batch_size=max_batch,
                                    truncate=False, seed=5)
  assert not sampler.truncate and not sampler.can_truncate
  sizes = []
  for batch in (sampler() for _ in range(draws)):
    size = int(batch.mask.sum())
    assert batch.indices.shape == batch.mask.shape
    assert len(batch.mask) == max_batch * max(1, math.ceil(size / max_batch))
    assert np.all(batch.mask[:size]) and not np.any(batch.mask[size:])
    real = batch.indices[batch.mask]
    assert np.all(np.diff(real) > 0) and real.min(initial=0) >= 0 and real.max(initial=0) < n
    sizes.append(size)
  assert_fits(np.bincount(sizes, minlength=n + 1), stats.binom.pmf(np.arange(n + 1), n, q))
  assert sampler.num_truncated == 0 and sampler.position == draws
  assert sampler.num_overflows == sum(size > max_batch for size in sizes)
  assert sampler.describe()["scheme"] == "poisson"
  with pytest.raises(ValueError, match="truncate"):
    sampling.PoissonSampler(n, sampling_prob=q, truncate="no")


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(n=st.integers(1, 300), q=st.floats(1e-3, 1.0),
                  max_batch=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_batches_are_valid_masked_subsets(n, q, max_batch, seed):
  sampler = sampling.PoissonSampler(n, sampling_prob=q, max_batch_size=max_batch, seed=seed)
  for _ in range(5):
    batch = sampler()
    real = batch.indices[batch.mask]
    assert batch.indices.shape == (max_batch,)
    assert len(np.unique(real)) == real.size <= min(n, max_batch)
    assert np.all((0 <= real) & (real < n))


# --- validation ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(dataset_size=0, sampling_prob=0.1), "dataset_size"),
    (dict(dataset_size=-3, sampling_prob=0.1), "dataset_size"),
    (dict(dataset_size=2.5, sampling_prob=0.1), "dataset_size"),
    (dict(dataset_size=10, sampling_prob=0.0), "sampling_prob"),
    (dict(dataset_size=10, sampling_prob=1.5), "sampling_prob"),
    (dict(dataset_size=10, sampling_prob=float("nan")), "sampling_prob"),
    (dict(dataset_size=10, sampling_prob=0.1, max_batch_size=0), "max_batch_size"),
    (dict(dataset_size=10, sampling_prob=0.1, seed=-1), "seed"),
    (dict(dataset_size=10, sampling_prob=0.1, seed="x"), "seed"),
])
def test_poisson_sampler_validation(kwargs, name):
  size = kwargs.pop("dataset_size")
  with pytest.raises(ValueError, match=rf"^{name} must be .*got"):
    sampling.PoissonSampler(size, **kwargs)
