"""Tests for dpfl.sampling: distributions, static shapes, accounting, gather.

Statistical checks use fixed seeds. Count checks use exact binomial
quantiles from scipy with a Bonferroni split, so each test's false-failure
rate is at most 1e-6 (stated per test); distribution checks use a chi-square
goodness-of-fit test at significance 1e-6.
"""

import math

import dp_accounting as dpa
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import accounting
from dpfl import sampling

ALPHA = 1e-6  # family-wise false-failure rate of each statistical test
DISC = 1e-3   # PLD grid for accounting comparisons (both sides use the same)


def _assert_binomial_counts(counts, trials, prob):
  """Every count is inside its two-sided Binomial(trials, prob) interval."""
  counts = np.asarray(counts)
  per_check = ALPHA / (2 * counts.size)  # Bonferroni over counts and both tails
  low = stats.binom.ppf(per_check, trials, prob)
  high = stats.binom.isf(per_check, trials, prob)
  assert counts.min() >= low and counts.max() <= high, (counts.min(), counts.max(), low, high)


def _assert_fits(observed_counts, probs):
  """Chi-square goodness of fit, pooling cells with expected count < 5."""
  observed_counts = np.asarray(observed_counts, float)
  expected = np.asarray(probs, float) * observed_counts.sum()
  obs_cells, exp_cells, acc_o, acc_e = [], [], 0.0, 0.0
  for o, e in zip(observed_counts, expected):
    acc_o, acc_e = acc_o + o, acc_e + e
    if acc_e >= 5:
      obs_cells.append(acc_o)
      exp_cells.append(acc_e)
      acc_o = acc_e = 0.0
  obs_cells[-1] += acc_o
  exp_cells[-1] += acc_e
  p_value = stats.chisquare(obs_cells, exp_cells).pvalue
  assert p_value > ALPHA, p_value


def _draw(sampler, num):
  batches = [sampler() for _ in range(num)]
  return np.stack([b.indices for b in batches]), np.stack([b.mask for b in batches])


def _inclusion_counts(indices, masks, dataset_size):
  return np.bincount(indices[masks], minlength=dataset_size)


def test_inclusion_rate_and_batch_size_distribution():
  n, q, draws = 100, 0.1, 20_000
  sampler = sampling.PoissonSampler(n, sampling_prob=q, max_batch_size=n, seed=0)
  indices, masks = _draw(sampler, draws)
  _assert_binomial_counts(_inclusion_counts(indices, masks, n), draws, q)
  sizes = masks.sum(axis=1)
  _assert_fits(np.bincount(sizes, minlength=n + 1), stats.binom.pmf(np.arange(n + 1), n, q))
  # Pairwise independence: examples 0 and 1 are sampled together with prob q^2.
  in_0 = np.any((indices == 0) & masks, axis=1)
  in_1 = np.any((indices == 1) & masks, axis=1)
  both = np.sum(in_0 & in_1)
  _assert_binomial_counts([both], draws, q * q)
  assert sampler.num_batches == draws and sampler.num_truncated == 0


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
  n, q, max_batch, draws = 20, 0.5, 5, 20_000
  sampler = sampling.PoissonSampler(n, sampling_prob=q, max_batch_size=max_batch, seed=2)
  indices, masks = _draw(sampler, draws)
  sizes = masks.sum(axis=1)
  # Realised size is min(K, max), K ~ Binomial(n, q).
  pmf = stats.binom.pmf(np.arange(max_batch + 1), n, q)
  pmf[max_batch] = stats.binom.sf(max_batch - 1, n, q)
  _assert_fits(np.bincount(sizes, minlength=max_batch + 1), pmf)
  # Truncation counter ~ Binomial(draws, P[K > max]).
  _assert_binomial_counts([sampler.num_truncated], draws, stats.binom.sf(max_batch, n, q))
  # Full batches (mostly truncated draws) are uniform max-subsets: each example
  # is in one with probability max/n. Keeping e.g. the smallest indices fails.
  full = sizes == max_batch
  counts = _inclusion_counts(indices[full], masks[full], n)
  _assert_binomial_counts(counts, int(full.sum()), max_batch / n)


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


def _dpa_epsilon(event, delta=1e-5):
  acc = dpa.pld.PLDAccountant(value_discretization_interval=DISC)
  acc.compose(event)
  return acc.get_epsilon(delta)


def test_mechanism_truncated_when_truncation_possible():
  sampler = sampling.PoissonSampler(200, sampling_prob=0.05, max_batch_size=20)
  mech = sampler.mechanism(noise_multiplier=2.0, num_steps=10)
  assert mech == accounting.TruncatedPoissonDpSgd(noise_multiplier=2.0, sampling_prob=0.05,
                                                  dataset_size=200, max_batch_size=20,
                                                  num_steps=10)
  expected = _dpa_epsilon(dpa.SelfComposedDpEvent(
      dpa.TruncatedSubsampledGaussianDpEvent(dataset_size=200, sampling_probability=0.05,
                                             truncated_batch_size=20, noise_multiplier=2.0),
      10))
  assert accounting.epsilon(mech, delta=1e-5, discretization=DISC) == pytest.approx(
      expected, rel=1e-9)


def test_mechanism_poisson_when_truncation_impossible():
  sampler = sampling.PoissonSampler(100, sampling_prob=0.02, max_batch_size=100)
  assert not sampler.can_truncate
  mech = sampler.mechanism(noise_multiplier=1.1, num_steps=50)
  assert mech == accounting.PoissonDpSgd(noise_multiplier=1.1, sampling_prob=0.02, num_steps=50)
  expected = _dpa_epsilon(dpa.SelfComposedDpEvent(
      dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(1.1)), 50))
  assert accounting.epsilon(mech, delta=1e-5, discretization=DISC) == pytest.approx(
      expected, rel=1e-9)
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
  _assert_fits(np.bincount(sizes, minlength=n + 1), stats.binom.pmf(np.arange(n + 1), n, q))
  assert sampler.num_truncated == 0 and sampler.num_batches == draws
  assert sampler.num_overflows == sum(size > max_batch for size in sizes)
  assert sampler.mechanism(noise_multiplier=1.1, num_steps=7) == accounting.PoissonDpSgd(
      noise_multiplier=1.1, sampling_prob=q, num_steps=7)
  with pytest.raises(ValueError, match="truncate"):
    sampling.PoissonSampler(n, sampling_prob=q, truncate="no")


def test_mechanism_shuffled_counts_epochs_without_amplification():
  sampler = sampling.ShuffledSampler(1000, batch_size=64)
  mech = sampler.mechanism(noise_multiplier=1.1, num_steps=100)
  assert isinstance(mech, accounting.ShuffledDpSgd)
  # 15 steps per epoch: 100 steps touch 7 epochs, so 7 Gaussian releases per example.
  expected = _dpa_epsilon(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(1.1), 7))
  assert accounting.epsilon(mech, delta=1e-5, discretization=DISC) == pytest.approx(
      expected, rel=1e-9)


def test_mechanism_rejects_bad_noise_multiplier():
  with pytest.raises(ValueError, match="noise_multiplier"):
    sampling.PoissonSampler(10, sampling_prob=0.5).mechanism(noise_multiplier=0, num_steps=1)


def test_shuffled_covers_each_example_once_per_epoch():
  n, batch = 103, 10
  sampler = sampling.ShuffledSampler(n, batch_size=batch, seed=3)
  assert sampler.steps_per_epoch == 10
  epochs = []
  for _ in range(2000):
    indices, masks = _draw(sampler, sampler.steps_per_epoch)
    assert masks.all() and indices.shape == (10, batch)
    flat = indices.ravel()
    assert len(np.unique(flat)) == flat.size == 100
    epochs.append(flat)
  assert not np.array_equal(epochs[0], epochs[1])
  # Fresh uniform shuffle each epoch: each example is in the first batch w.p. B/N.
  first = np.bincount(np.stack(epochs)[:, :batch].ravel(), minlength=n)
  _assert_binomial_counts(first, len(epochs), batch / n)


def test_seeds_and_os_entropy():
  def sequence(seed):
    s = sampling.PoissonSampler(1000, sampling_prob=0.05, seed=seed)
    return np.concatenate([s().indices for _ in range(5)])
  np.testing.assert_array_equal(sequence(7), sequence(7))
  assert not np.array_equal(sequence(7), sequence(8))
  assert not np.array_equal(sequence(None), sequence(None))
  shuffled = [sampling.ShuffledSampler(1000, batch_size=10)().indices for _ in range(2)]
  assert not np.array_equal(*shuffled)


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


# --- gather -----------------------------------------------------------------

INDICES = np.array([3, 1, 0, 0], np.int32)
MASK = np.array([True, True, False, False])


def test_gather_numpy_dict_and_padding_uses_row_zero():
  data = {"x": np.arange(30.0).reshape(10, 3), "y": np.arange(10) * 10}
  out = sampling.gather(data, INDICES, MASK)
  np.testing.assert_array_equal(out["x"], data["x"][[3, 1, 0, 0]])
  np.testing.assert_array_equal(out["y"], [30, 10, 0, 0])


def test_gather_jax_tuple_and_plain_array():
  x, y = jnp.arange(20.0).reshape(10, 2), jnp.arange(10)
  out_x, out_y = sampling.gather((x, y), INDICES, MASK)
  np.testing.assert_array_equal(out_x, np.asarray(x)[[3, 1, 0, 0]])
  np.testing.assert_array_equal(out_y, [3, 1, 0, 0])
  np.testing.assert_array_equal(sampling.gather(np.arange(10) + 5, INDICES, MASK), [8, 6, 5, 5])
  # Masked-out slots may hold any value; they are replaced by row 0.
  np.testing.assert_array_equal(
      sampling.gather(np.arange(10), np.array([2, -7, 99]), np.array([True, False, False])),
      [2, 0, 0])


class _Examples:
  """A torch-style dataset: len() and [i] returning dicts; counts fetches."""

  def __init__(self, size):
    self.size, self.fetched = size, []

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    self.fetched.append(i)
    return {"image": np.full((2, 2), float(i)), "label": np.int32(i)}


def test_gather_custom_indexable_stacks_items_and_skips_padding():
  data = _Examples(10)
  out = sampling.gather(data, INDICES, MASK)
  assert out["image"].shape == (4, 2, 2)
  np.testing.assert_array_equal(out["label"], [3, 1, 0, 0])
  np.testing.assert_array_equal(out["image"][:, 0, 0], [3.0, 1.0, 0.0, 0.0])
  assert sorted(data.fetched) == [0, 1, 3]  # padding fetched once, as the filler


def test_gather_list_of_tuples():
  data = [(np.array([i, i + 1.0]), np.int32(i)) for i in range(10)]
  features, labels = sampling.gather(data, INDICES, MASK)
  assert features.shape == (4, 2)
  np.testing.assert_array_equal(labels, [3, 1, 0, 0])


def test_gather_with_sampler_batch():
  data = {"x": np.arange(50)}
  batch = sampling.PoissonSampler(50, sampling_prob=0.3, seed=4)()
  out = sampling.gather(data, batch.indices, batch.mask)
  np.testing.assert_array_equal(out["x"][batch.mask], batch.indices[batch.mask])
  assert out["x"].shape == batch.indices.shape


@pytest.mark.parametrize("dataset", [np.zeros((0, 3)), {"x": np.zeros((0,))}, [], _Examples(0),
                                     {}])
def test_gather_empty_dataset(dataset):
  with pytest.raises(ValueError, match="dataset must contain"):
    sampling.gather(dataset, np.array([0]), np.array([False]))


@pytest.mark.parametrize("indices,mask,match", [
    (np.array([10]), np.array([True]), "indices must lie"),
    (np.array([-1]), np.array([True]), "indices must lie"),
    (np.array([[0]]), np.array([[True]]), "indices must be a 1-D"),
    (np.array([0.0]), np.array([True]), "indices must be a 1-D"),
    (np.array([0, 1]), np.array([True]), "mask must be"),
    (np.array([0]), np.array([1]), "mask must be"),
])
def test_gather_bad_indices_or_mask(indices, mask, match):
  with pytest.raises(ValueError, match=match):
    sampling.gather(np.arange(10), indices, mask)


def test_gather_mismatched_leading_sizes():
  with pytest.raises(ValueError, match="dataset arrays must share"):
    sampling.gather({"x": np.zeros(5), "y": np.zeros(6)}, np.array([0]), np.array([True]))


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


@pytest.mark.parametrize("size,batch", [(0, 1), (10, 0), (10, 11), (10, 2.5)])
def test_shuffled_sampler_validation(size, batch):
  name = "dataset_size" if size < 1 else "batch_size"
  with pytest.raises(ValueError, match=rf"^{name} must be .*got"):
    sampling.ShuffledSampler(size, batch_size=batch)
