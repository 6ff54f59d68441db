"""Sensitivity: every exact method against brute force over all participation patterns."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dpfl.mf as mf
from dpfl.mf import sensitivity as sens_lib
from dpfl.mf import toeplitz

from mf_reference import brute_sensitivity, patterns

# (n, k): b = n / k. Small enough that all 2^n vectors are enumerated.
SETTINGS = [(6, 1), (6, 2), (6, 3), (8, 2), (8, 4), (9, 3), (10, 5), (12, 3), (12, 4)]


@pytest.mark.parametrize("n,k", SETTINGS)
@pytest.mark.parametrize("make", [mf.identity, mf.tree, mf.sqrt_toeplitz])
def test_fixed_strategies_match_brute_force(make, n, k):
  strategy = make(n, participation=(k, n // k))
  expected = brute_sensitivity(strategy.matrix, k, n // k)
  assert strategy.sensitivity == pytest.approx(expected, rel=1e-12)
  assert strategy.sensitivity_exact


def test_tree_sensitivity_uses_the_node_matrix():
  # The square factor has the same Gram matrix as the node-by-step tree matrix,
  # so the brute force over the original tree must agree too.
  for n, k in [(8, 2), (12, 3), (7, 7)]:
    b = n // k
    nodes = mf.tree_matrix(n)
    assert mf.tree(n, participation=(k, b)).sensitivity == pytest.approx(
        brute_sensitivity(nodes, k, b), rel=1e-12)


@pytest.mark.parametrize("n,k", [(8, 1), (8, 2), (12, 3), (12, 4)])
def test_optimized_strategies_match_brute_force(n, k):
  b = n // k
  for strategy in (mf.optimize_blt(n, buffers=2, participation=(k, b)),
                   mf.optimize_banded(n, bands=min(3, b), participation=(k, b)),
                   mf.optimize_banded(n, bands=min(2, b), participation=(k, b), toeplitz=True),
                   mf.optimize_dense(n, participation=(k, b))):
    assert strategy.sensitivity == pytest.approx(brute_sensitivity(strategy.matrix, k, b),
                                                 rel=1e-9), strategy.name
    assert strategy.sensitivity_exact


def test_library_brute_force_is_the_definition():
  rng = np.random.default_rng(0)
  C = np.tril(rng.normal(size=(9, 9)))
  for k in (1, 3):
    p = mf.participation(9, num_participations=k)
    assert mf.brute_force_sensitivity(C, p) == pytest.approx(brute_sensitivity(C, k, 9 // k))


def test_identity_sensitivity_is_sqrt_participations():
  for n, k in [(10, 1), (12, 4), (100, 10)]:
    assert mf.identity(n, participation=(k, n // k)).sensitivity == pytest.approx(math.sqrt(k))


def test_pattern_enumeration_counts_match_the_definition():
  for n, k in [(8, 2), (9, 3), (10, 2)]:
    p = mf.participation(n, num_participations=k)
    expected = sum(1 for u in patterns(n, k, n // k)) - 1  # minus the empty pattern
    assert sens_lib.count_patterns(n, p) == expected
    listed = sum(len(sens_lib.patterns(n, p, size)) for size in range(1, k + 1))
    assert listed == expected


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(SETTINGS), st.integers(0, 2**32 - 1))
def test_toeplitz_rule_on_random_decreasing_coefficients(setting, seed):
  n, k = setting
  rng = np.random.default_rng(seed)
  coefs = np.sort(rng.uniform(0, 1, size=n))[::-1]
  coefs[0] = 1.0
  p = mf.participation(n, num_participations=k)
  value = toeplitz.sensitivity_squared(coefs, p, n)
  assert math.sqrt(value) == pytest.approx(
      brute_sensitivity(toeplitz.materialize(coefs, n), k, n // k), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([s for s in SETTINGS if s[1] > 1]), st.integers(0, 2**32 - 1))
def test_banded_rule_on_random_band_entries(setting, seed):
  # Any signs: columns that can share a pattern are orthogonal, so only column norms matter.
  n, k = setting
  b = n // k
  rng = np.random.default_rng(seed)
  bands = int(rng.integers(1, b + 1))
  diagonals = rng.normal(size=(bands, n))
  diagonals[0] = np.abs(diagonals[0]) + 0.1
  strategy = mf.BandedStrategy(num_steps=n, participation=(k, b), workload=None,
                               diagonals=diagonals)
  assert strategy.sensitivity == pytest.approx(brute_sensitivity(strategy.matrix, k, b),
                                               rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([s for s in SETTINGS if s[1] > 1]), st.integers(0, 2**32 - 1))
def test_general_gram_method_on_random_nonnegative_matrices(setting, seed):
  n, k = setting
  rng = np.random.default_rng(seed)
  C = np.tril(rng.uniform(0, 1, size=(n, n))) + np.eye(n)
  p = mf.participation(n, num_participations=k)
  value, exact = sens_lib.gram_sensitivity_squared(C.T @ C, p)
  assert exact
  assert math.sqrt(value) == pytest.approx(brute_sensitivity(C, k, n // k), rel=1e-12)
  # The Alg. 4 fallback (forced by allowing no enumeration) is a valid upper bound.
  bound, _ = sens_lib.gram_sensitivity_squared(C.T @ C, p, max_patterns=0)
  assert bound >= value * (1 - 1e-12)


def test_mixed_signs_give_the_absolute_value_bound_flagged_inexact():
  # Columns 0 and 2 can share a pattern (b = 2) and have a negative inner product:
  # the 0/1 definition sees 0, the abs-value bound (valid for vector contributions) 2.
  C = np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [-1, 0, 1, 0], [0, 0, 0, 1]])
  p = mf.participation(4, num_participations=2)
  value, exact = sens_lib.gram_sensitivity_squared(C.T @ C, p)
  assert not exact
  assert value == pytest.approx(2 + 1 + 2 * 1)  # |X| summed over pattern {0, 2}
  assert value >= brute_sensitivity(C, 2, 2) ** 2


def test_max_pattern_sum_matches_enumeration():
  rng = np.random.default_rng(1)
  for n, k in [(8, 2), (12, 3), (12, 4)]:
    x = rng.uniform(size=n)
    p = mf.participation(n, num_participations=k)
    expected = max(u @ x for u in patterns(n, k, n // k))
    assert sens_lib.max_pattern_sum(x, p) == pytest.approx(expected)
