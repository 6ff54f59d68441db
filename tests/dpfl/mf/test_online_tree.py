"""The online tree (DP-FTRL, Kairouz et al. 2021): sensitivity, decoders, restarts, entry points.

References: TF Privacy's ``tree_aggregation_accountant_test.py`` (its expected
squared sensitivities, including the closed forms it derives them from),
brute force over every participation pattern, and dense linear algebra.
"""

import argparse
import itertools
import json
import math

import numpy as np
import pytest

import dpfl.mf as mf
from dpfl.mf import cli
from dpfl.mf.participation import Participation
from dpfl.mf.sensitivity import gram_sensitivity_squared
from dpfl.mf.online_tree import prefix_decoder


def _nodes(n):
  """Complete dyadic intervals inside [0, n), built independently of the library."""
  return [(j << level, (j + 1) << level) for level in range(20) for j in range(n)
          if (j + 1) << level <= n]


def _tree_sens_squared(n, k, b):
  """Through the Gram matrix, for (k, b) that ``dpfl.mf.participation`` does not
  build (it needs k * b = n): dpfl's sensitivity code on the online tree's Gram."""
  value, exact = gram_sensitivity_squared(mf.online_tree_gram(n), Participation(k, b))
  assert exact
  return value


def _brute_tree_sens_squared(n, k, b, nodes):
  """max over b-separated patterns of <= k steps of sum over nodes of (participations)^2."""
  best = 0
  for bits in itertools.product((0, 1), repeat=n):
    steps = [i for i, bit in enumerate(bits) if bit]
    if not steps or len(steps) > k or any(j - i < b for i, j in zip(steps, steps[1:])):
      continue
    best = max(best, sum(sum(lo <= s < hi for s in steps) ** 2 for lo, hi in nodes))
  return best


# --- TF Privacy's test vectors ---------------------------------------------------------------


def test_single_participation_at_1600_steps_is_tf_privacys_11():
  # compute_rdp_tree_restart with steps=1600 counts floor(log2 1600) + 1 = 11
  # nodes above a leaf; the padded tree has 2048 leaves and 12 levels.
  assert mf.online_tree(1600).sensitivity ** 2 == pytest.approx(11, rel=1e-12)
  assert mf.tree(1600).sensitivity ** 2 == pytest.approx(12, rel=1e-12)


@pytest.mark.parametrize("k,tf_min_sep,n,expected", [
    (8, 2, 24, 88),  # the paper's example where the greedy pattern is not the worst
    (1, 7, 8, 4), (3, 3, 9, 11), (3, 2, 7, 9),
])
def test_tf_privacy_toy_vectors(k, tf_min_sep, n, expected):
  # TF counts the steps *between* two participations: b = min_separation + 1.
  b = tf_min_sep + 1
  assert _tree_sens_squared(n, k, b) == pytest.approx(expected, rel=1e-12)
  if k * b == n:
    strategy = mf.online_tree(n, participation=(k, b))
    assert strategy.sensitivity ** 2 == pytest.approx(expected, rel=1e-12)
    assert strategy.sensitivity_exact


@pytest.mark.parametrize("n", [3, 8, 11, 19])
def test_every_step_participation_is_tf_privacys_closed_form(n):
  # A unit in every leaf: a complete subtree of depth d contributes
  # sum_l 2^(d-l) (2^l)^2 = 2^d (2^(d+1) - 1); one subtree per bit of n.
  depths = [d for d in range(n.bit_length()) if n >> d & 1]
  expected = sum(2 ** d * (2 ** (d + 1) - 1) for d in depths)
  strategy = mf.online_tree(n, participation=(n, 1))
  assert strategy.sensitivity ** 2 == pytest.approx(expected, rel=1e-12)
  assert strategy.sensitivity_exact
  # Two participations: two adjacent leaves of the deepest subtree.
  assert _tree_sens_squared(n, 2, 1) == pytest.approx(2 + 4 * (n.bit_length() - 1), rel=1e-12)


def test_issue_numbers_for_the_padded_tree_are_higher():
  for n, participation, online, padded in ((24, (8, 3), 88, 156), (3, (3, 1), 7, 17),
                                           (11, (11, 1), 127, 267)):
    assert mf.online_tree(n, participation=participation).sensitivity ** 2 == pytest.approx(online)
    assert mf.tree(n, participation=participation).sensitivity ** 2 == pytest.approx(padded)


# --- brute force ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 7, 12])
def test_sensitivity_matches_brute_force_over_every_pattern(n):
  nodes = _nodes(n)
  T = np.array([[lo <= i < hi for i in range(n)] for lo, hi in nodes], dtype=float)
  assert np.array_equal(mf.online_tree_gram(n), T.T @ T)
  assert np.array_equal(mf.online_tree_matrix(n).T @ mf.online_tree_matrix(n), T.T @ T)
  assert len(mf.online_tree_matrix(n)) == len(nodes) == 2 * n - bin(n).count("1")
  for k, b in {(1, n), (2, 1), (2, 3), (3, 2), (n, 1), (2, (n + 1) // 2)}:
    if b > n:
      continue
    expected = _brute_tree_sens_squared(n, k, b, nodes)
    assert _tree_sens_squared(n, k, b) == pytest.approx(expected, rel=1e-12)
    if k * b != n:
      continue
    for honaker in (True, False):
      strategy = mf.online_tree(n, participation=(k, b), honaker=honaker)
      assert strategy.sensitivity ** 2 == pytest.approx(expected, rel=1e-12)


def test_release_order_is_online():
  # Node v is released at its last leaf: row order never needs a future leaf.
  T = mf.online_tree_matrix(13)
  last = [int(np.nonzero(row)[0].max()) for row in T]
  assert last == sorted(last)


# --- decoders ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 6, 16, 37])
def test_plain_decoder_is_the_binary_decomposition(n):
  A = np.tril(np.ones((n, n)))
  T = mf.online_tree_matrix(n)
  B = prefix_decoder(n)
  assert np.array_equal(B @ T, A)
  popcount = np.array([bin(t + 1).count("1") for t in range(n)], dtype=float)
  plain = mf.online_tree(n, honaker=False)
  np.testing.assert_allclose(plain.row_errors(), popcount, rtol=1e-9)
  # The streamed per-step noise C^{-1} z has the plain tree's per-step covariance.
  C = plain.matrix
  assert not np.any(np.triu(C, 1))
  Cinv = np.linalg.inv(C)
  Ainv = np.linalg.inv(A)
  np.testing.assert_allclose(Cinv @ Cinv.T, Ainv @ B @ B.T @ Ainv.T, atol=1e-9 * n)
  assert plain.mean_loss == pytest.approx(
      plain.sensitivity ** 2 * popcount.mean(), rel=1e-9)
  assert plain.max_loss == pytest.approx(plain.sensitivity ** 2 * popcount.max(), rel=1e-9)


@pytest.mark.parametrize("n", [2, 6, 16, 37])
def test_honaker_decoder_is_least_squares_and_never_worse(n):
  A = np.tril(np.ones((n, n)))
  T = mf.online_tree_matrix(n)
  Bls = A @ np.linalg.pinv(T)
  honaker = mf.online_tree(n)
  np.testing.assert_allclose(honaker.row_errors(), np.sum(Bls ** 2, axis=1), rtol=1e-8)
  C = honaker.matrix
  assert not np.any(np.triu(C, 1))
  np.testing.assert_allclose(C.T @ C, T.T @ T, atol=1e-9 * n)
  plain = mf.online_tree(n, honaker=False)
  assert np.all(honaker.row_errors() <= plain.row_errors() * (1 + 1e-12))
  assert honaker.mean_loss < plain.mean_loss


# --- restart -------------------------------------------------------------------------------


@pytest.mark.parametrize("k,b", [(4, 3), (3, 5), (2, 8)])
def test_restart_every_epoch_costs_one_tree_depth_per_epoch(k, b):
  n = k * b
  for honaker in (True, False):
    strategy = mf.online_tree(n, participation=(k, b), restart_every=b, honaker=honaker)
    # TF Privacy's compute_rdp_tree_restart: sum over epochs of floor(log2 b) + 1.
    assert strategy.sensitivity ** 2 == pytest.approx(k * (math.floor(math.log2(b)) + 1))
    assert strategy.sensitivity_exact
  # Brute force on the block-diagonal tree.
  nodes = [(lo + e * b, hi + e * b) for e in range(k) for lo, hi in _nodes(b)]
  if n <= 16:
    assert _brute_tree_sens_squared(n, k, b, nodes) == pytest.approx(
        strategy.sensitivity ** 2)
  # Plain decoder: previous epochs' final prefix sums carry over.
  carried = [e * bin(b).count("1") + bin(r + 1).count("1") for e in range(k) for r in range(b)]
  np.testing.assert_allclose(strategy.row_errors(), carried, rtol=1e-9)


def test_restart_with_a_short_last_tree():
  strategy = mf.online_tree(10, restart_every=4)
  assert strategy.block_sizes() == [4, 4, 2]
  assert strategy.sensitivity ** 2 == pytest.approx(3)


@pytest.mark.parametrize("kwargs,name", [
    (dict(restart_every=0), "restart_every"), (dict(restart_every=11), "restart_every"),
    (dict(restart_every=2.5), "restart_every"), (dict(honaker="yes"), "honaker"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    mf.online_tree(10, **kwargs)
  with pytest.raises(ValueError, match="num_steps"):
    mf.online_tree(9000)


# --- entry points --------------------------------------------------------------------------


def _run(*argv):
  parser = argparse.ArgumentParser()
  cli.add_arguments(parser)
  return cli.run(parser.parse_args(list(argv)))


def test_cli_reports_the_library_numbers_with_the_usual_keys():
  identity = _run("--strategy", "identity", "--steps", "24")
  result = _run("--strategy", "online-tree", "--steps", "24", "--min-sep", "3")
  assert set(identity) <= set(result)
  assert result["decoder"] == "honaker" and result["restart"] is False
  direct = mf.online_tree(24, participation=(8, 3))
  assert result["sensitivity"] ** 2 == pytest.approx(88)
  assert result["mean_loss"] == pytest.approx(direct.mean_loss, rel=1e-12)
  json.dumps(result)
  assert "decoder" in cli.format_table(result)
  restarted = _run("--strategy", "online-tree", "--steps", "24", "--participations", "8",
                   "--restart", "--decoder", "plain", "--noise-multiplier", "2",
                   "--delta", "1e-6")
  assert restarted["sensitivity"] ** 2 == pytest.approx(8 * 2)
  assert restarted["noise_stddev"] == pytest.approx(2 * 4)
  import dp_accounting as dpa
  exact = dpa.get_epsilon_gaussian(2.0, 1e-6)
  assert exact <= restarted["epsilon"] <= exact * 1.005


@pytest.mark.parametrize("argv,flag", [
    (["--strategy", "tree", "--steps", "8", "--restart"], "--restart"),
    (["--strategy", "sqrt", "--steps", "8", "--decoder", "plain"], "--decoder"),
    (["--strategy", "online-tree", "--steps", "9000"], "--steps"),
])
def test_cli_bad_combinations_exit_2(argv, flag, capsys):
  from dpfl import cli as console
  assert console.main(["mf", *argv]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and flag in err[0]


# --- make_private --------------------------------------------------------------------------


def _make_private(**kwargs):
  import jax.numpy as jnp
  import optax

  import dpfl

  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((x @ params - y) ** 2)

  base = dict(l2_clip_norm=1.0, dataset_size=60, batch_size=10, delta=1e-5, num_steps=18,
              noise_multiplier=1.0, key=0, seed=0)
  return dpfl.make_private(loss_fn, optax.sgd(0.1), **{**base, **kwargs}), loss_fn


def test_make_private_trains_with_the_online_tree_and_accounts_its_sensitivity():
  import jax.numpy as jnp

  import accounting
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 3)).astype(np.float32)
  y = (x @ np.arange(3, dtype=np.float32)).astype(np.float32)
  # 6 batches per epoch, 3 epochs: (k, b) = (3, 6); a new tree per epoch.
  pt, _ = _make_private(strategy="online-tree",
                        strategy_options={"restart": True, "decoder": "plain"})
  assert pt.ftrl.participation == (3, 6)
  strategy = pt.ftrl.strategy
  assert isinstance(strategy, mf.OnlineTreeStrategy)
  assert strategy.restart_every == 6 and not strategy.honaker
  # TF Privacy's compute_rdp_tree_restart: (floor(log2 6) + 1) per epoch.
  assert pt.ftrl.noise_sensitivity ** 2 == pytest.approx(3 * 3)
  state = pt.init(jnp.zeros(3))
  step = pt.make_step()
  for batch, mask in pt.batches((x, y), state):
    state, _ = step(state, batch, mask)
  assert int(state.step) == 18 and np.all(np.isfinite(np.asarray(state.params)))
  (entry,) = pt.ledger.entries
  assert isinstance(entry, accounting.MatrixMechanism)
  assert entry.sensitivity == pytest.approx(3.0)
  # Without restarts, one tree of 18 leaves under (3, 6)-participation.
  single, _ = _make_private(strategy="online-tree")
  assert single.ftrl.noise_sensitivity ** 2 == pytest.approx(_tree_sens_squared(18, 3, 6))
  assert single.ftrl.strategy.honaker and single.ftrl.strategy.restart_every is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="blt", strategy_options={"restart": True}), "online-tree"),
    (dict(strategy="tree", strategy_options={"decoder": "plain"}), "online-tree"),
    (dict(strategy="online-tree", strategy_options={"decoder": "fast"}), "decoder"),
    (dict(strategy="online-tree", strategy_options={"restart": "yes"}), "restart"),
])
def test_make_private_bad_online_tree_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _make_private(**kwargs)
