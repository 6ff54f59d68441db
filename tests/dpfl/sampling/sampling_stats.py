"""Statistical checks shared by the sampler tests.

Count checks use exact binomial quantiles from scipy with a Bonferroni split,
so each call's false-failure rate is at most ``ALPHA``; distribution checks
use a chi-square goodness-of-fit test at significance ``ALPHA``.
"""

import numpy as np
from scipy import stats

ALPHA = 1e-6  # false-failure rate of each statistical check


def assert_binomial_counts(counts, trials, prob):
  """Every count is inside its two-sided Binomial(trials, prob) interval."""
  counts = np.asarray(counts)
  per_check = ALPHA / (2 * counts.size)  # Bonferroni over counts and both tails
  low = stats.binom.ppf(per_check, trials, prob)
  high = stats.binom.isf(per_check, trials, prob)
  assert counts.min() >= low and counts.max() <= high, (counts.min(), counts.max(), low, high)


def assert_fits(observed_counts, probs):
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


def draw_many(sampler, num):
  """``num`` calls of ``sampler``: stacked indices and masks (fixed-length batches)."""
  batches = [sampler() for _ in range(num)]
  return np.stack([b.indices for b in batches]), np.stack([b.mask for b in batches])


def inclusion_counts(indices, masks, population):
  return np.bincount(indices[masks], minlength=population)
