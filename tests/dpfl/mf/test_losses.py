"""Losses against direct dense computation and closed forms."""

import numpy as np
import pytest

import dpfl.mf as mf
from dpfl.mf import toeplitz

from mf_reference import brute_sensitivity, dense_losses, prefix_matrix


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_identity_closed_forms(n):
  s = mf.identity(n)
  assert s.sensitivity == 1.0
  assert s.max_loss == pytest.approx(n)
  assert s.mean_loss == pytest.approx((n + 1) / 2)


def test_identity_with_participations_scales_by_k():
  s = mf.identity(12, participation=(3, 4))
  assert s.max_loss == pytest.approx(3 * 12)
  assert s.mean_loss == pytest.approx(3 * 13 / 2)


def test_sqrt_coefficients_closed_form_and_square_is_prefix_sum():
  from math import comb
  n = 40
  c = toeplitz.sqrt_coefs(n)
  # (1 - x)^(-1/2) = sum_k binom(2k, k) / 4^k x^k.
  assert np.allclose(c, [comb(2 * k, k) / 4**k for k in range(n)], rtol=1e-13)
  C = mf.sqrt_toeplitz(n).matrix
  assert np.allclose(C @ C, prefix_matrix(n), atol=1e-12)


@pytest.mark.parametrize("n,k", [(8, 1), (12, 3), (16, 4)])
def test_losses_equal_dense_computation(n, k):
  A = prefix_matrix(n)
  b = n // k
  strategies = [mf.identity(n, participation=(k, b)), mf.sqrt_toeplitz(n, participation=(k, b)),
                mf.tree(n, participation=(k, b)),
                mf.optimize_blt(n, buffers=2, participation=(k, b)),
                mf.optimize_banded(n, bands=min(3, b), participation=(k, b)),
                mf.optimize_dense(n, participation=(k, b))]
  for s in strategies:
    C = mf.tree_matrix(n) if s.name == "tree" else s.matrix
    sens = brute_sensitivity(C, k, b)
    max_loss, mean_loss = dense_losses(C, A, sens)
    assert s.max_loss == pytest.approx(max_loss, rel=1e-9), s.name
    assert s.mean_loss == pytest.approx(mean_loss, rel=1e-9), s.name


def test_tree_square_factor_is_equivalent_to_the_node_matrix():
  n = 13
  nodes = mf.tree_matrix(n)
  assert nodes.shape == (13 + 7 + 4 + 2 + 1, 13)
  C = mf.tree(n).matrix
  assert np.allclose(np.triu(C, 1), 0)
  assert np.allclose(C.T @ C, nodes.T @ nodes)
  # Honaker's B = A T^+ and the causal B = A C^{-1} give the same noise covariance.
  A = prefix_matrix(n)
  B_nodes = A @ np.linalg.pinv(nodes)
  B_square = A @ np.linalg.inv(C)
  assert np.allclose(B_nodes @ B_nodes.T, B_square @ B_square.T)


def test_tree_on_a_power_of_two_has_log_levels():
  s = mf.tree(16)
  assert s.sensitivity == pytest.approx(np.sqrt(5))  # each leaf is in 5 nodes


def test_workload_matrices():
  n, beta = 6, 0.5
  rates = (1.0, 0.5, 0.5, 0.25, 2.0, 1.0)
  A = mf.Workload(n, momentum=beta, learning_rates=rates).matrix()
  # Direct simulation of theta_t = -sum_{s<=t} eta_s m_s, m_s = beta m_{s-1} + g_s.
  for j in range(n):
    g = np.zeros(n)
    g[j] = 1.0
    m, total, column = 0.0, 0.0, []
    for t in range(n):
      m = beta * m + g[t]
      total += rates[t] * m
      column.append(total)
    assert np.allclose(A[:, j], column)
  assert mf.Workload(n, momentum=beta).is_toeplitz
  assert not mf.Workload(n, learning_rates=rates).is_toeplitz
  assert np.allclose(mf.Workload(n).matrix(), prefix_matrix(n))


def test_toeplitz_path_equals_dense_path_with_momentum():
  n = 24
  wl = mf.Workload(n, momentum=0.9, learning_rates=(0.1,) * n)
  s = mf.sqrt_toeplitz(n, workload=wl)
  sens = np.linalg.norm(s.matrix, axis=0).max()  # single participation
  max_loss, mean_loss = dense_losses(s.matrix, wl.matrix(), sens)
  assert s.max_loss == pytest.approx(max_loss, rel=1e-10)
  assert s.mean_loss == pytest.approx(mean_loss, rel=1e-10)


def test_learning_rate_schedule_losses_equal_dense_computation():
  n = 16
  rates = tuple(np.linspace(1.0, 0.1, n))
  wl = mf.Workload(n, momentum=0.5, learning_rates=rates)
  for s in (mf.sqrt_toeplitz(n, workload=wl), mf.optimize_banded(n, bands=3, workload=wl),
            mf.optimize_dense(n, workload=wl), mf.tree(n, workload=wl)):
    C = mf.tree_matrix(n) if s.name == "tree" else s.matrix
    max_loss, mean_loss = dense_losses(C, wl.matrix(), s.sensitivity)
    assert s.max_loss == pytest.approx(max_loss, rel=1e-9), s.name
    assert s.mean_loss == pytest.approx(mean_loss, rel=1e-9), s.name


def test_blt_inverse_is_a_blt():
  n = 64
  s = mf.optimize_blt(n, buffers=3)
  decay, scale = s.inverse()
  from dpfl.mf.blt import blt_coefs
  assert np.allclose(blt_coefs(decay, scale, n), np.linalg.inv(s.matrix)[:, 0], atol=1e-10)
  # Streaming C^{-1} y with one buffer per decay (the recursion of arXiv 2404.16706).
  rng = np.random.default_rng(0)
  y = rng.normal(size=n)
  buffers = np.zeros(3)
  out = []
  for t in range(n):
    x = y[t] - s.output_scale @ buffers
    buffers = s.buffer_decay * buffers + x
    out.append(x)
  assert np.allclose(out, np.linalg.solve(s.matrix, y), atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_blt_recursive_row_errors_equal_dense_computation(seed):
  # BltStrategy computes B = A C^{-1} as an order-`buffers` recursive filter
  # (O(n m)); any BLT, not only optimized (interlaced) ones: negative scales
  # can give complex zeros, which the filter pairs.
  rng = np.random.default_rng(seed)
  n, m = int(rng.integers(2, 60)), int(rng.integers(1, 5))
  decay = np.sort(rng.uniform(0.05, 0.95, m))[::-1]
  scale = rng.uniform(-0.6, 0.8, m)
  for workload in (None, mf.Workload(n, momentum=0.8)):
    s = mf.BltStrategy(num_steps=n, participation=None, workload=workload,
                       buffer_decay=decay, output_scale=scale)
    A = s.workload.matrix()
    dense_rows = np.sum(np.square(A @ np.linalg.inv(s.matrix)), axis=1)
    assert np.allclose(s.row_errors(), dense_rows, rtol=1e-9, atol=1e-12)


def test_sqrt_inverse_closed_form():
  from dpfl.mf import toeplitz
  n = 300
  d = toeplitz.sqrt_inverse_coefs(n)
  assert np.allclose(d, toeplitz.inverse_coefs(toeplitz.sqrt_coefs(n), n), rtol=1e-12, atol=1e-15)
  # C^{-1} C^{-1} = A^{-1}: the first difference (1, -1, 0, ...).
  assert np.allclose(toeplitz.multiply(d, d, n), np.r_[1.0, -1.0, np.zeros(n - 2)], atol=1e-13)
  for workload in (None, mf.Workload(n, momentum=0.9)):
    s = mf.sqrt_toeplitz(n, workload=workload)
    assert np.allclose(s.row_errors(), toeplitz.row_errors(
        toeplitz.error_coefs(s.coefs, s.workload)), rtol=1e-10)
