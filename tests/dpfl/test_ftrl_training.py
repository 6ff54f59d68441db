"""DP-FTRL through make_private: sampling pattern, noise structure and accounting agree."""

import math

import dp_accounting as dpa
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accounting
import dpfl
import dpfl.mf as mf
from dpfl import ftrl, sampling
from dpfl.data import UserDataset


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((x @ params - y) ** 2)


def _data(n=400, d=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x, (x @ np.arange(d, dtype=np.float32)).astype(np.float32)


def _gaussian_epsilon(sigma, delta):
  accountant = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
  accountant.compose(dpa.GaussianDpEvent(sigma))
  return accountant.get_epsilon(delta)


# --- example level ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["identity", "tree", "sqrt", "banded", "blt", "dense"])
def test_every_strategy_trains_and_accounts_as_one_gaussian(name):
  x, y = _data()
  pt = dpfl.make_private(loss_fn, optax.sgd(0.05, momentum=0.9), l2_clip_norm=1.0,
                         dataset_size=400, batch_size=50, delta=1e-5, num_steps=20,
                         noise_multiplier=1.3, strategy=name, key=0, seed=0)
  assert isinstance(pt.sampler, sampling.CyclicSampler)
  plan = pt.ftrl
  assert plan.participation == (3, 8) and plan.planned_steps == 24
  assert plan.strategy.participation == (3, 8)
  step = pt.make_step()
  state = pt.init(jnp.zeros(5))
  for batch, mask in pt.batches((x, y), state):
    state, _ = step(state, batch, mask)
  assert int(state.step) == 20 and np.all(np.isfinite(np.asarray(state.params)))
  (entry,) = pt.ledger.entries
  assert isinstance(entry, accounting.MatrixMechanism)
  assert entry.num_steps == 20 and entry.planned_steps == 24
  assert entry.max_participations == 3 and entry.min_separation == 8
  assert entry.sensitivity == pytest.approx(plan.strategy.sensitivity)
  assert pt.epsilon() == pytest.approx(_gaussian_epsilon(1.3, 1e-5), rel=2e-3)
  assert pt.epsilon() >= _gaussian_epsilon(1.3, 1e-5) * (1 - 1e-9)


def test_sensitivity_used_is_the_brute_force_one():
  # A run small enough to enumerate every participation pattern.
  pt = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=40,
                         batch_size=10, delta=1e-5, num_steps=16, noise_multiplier=1.0,
                         strategy="blt", strategy_options={"buffers": 2}, key=0, seed=0)
  k, b = pt.ftrl.participation
  assert (k, b) == (4, 4)
  C = pt.ftrl.strategy.matrix
  brute = mf.brute_force_sensitivity(C, mf.participation(16, min_separation=4))
  assert pt.ftrl.noise_sensitivity == pytest.approx(brute, rel=1e-9)
  assert pt.mechanism.sensitivity == pytest.approx(brute, rel=1e-9)


def test_noise_has_the_inverse_strategy_covariance():
  # Zero gradients: each update is -(σ C sens / B) (C^{-1} z)_t with z iid N(0, 1)
  # per coordinate; many coordinates estimate its covariance across steps.
  dim, steps, batch, sigma = 40_000, 12, 10, 0.7
  x = np.zeros((40, dim), np.float32)

  def zero_loss(params, batch):
    return jnp.sum(params * 0.0) + 0.0 * jnp.sum(batch)

  pt = dpfl.make_private(zero_loss, optax.sgd(1.0), l2_clip_norm=2.0, dataset_size=40,
                         batch_size=batch, delta=1e-5, num_steps=steps,
                         noise_multiplier=sigma, strategy="sqrt", key=3, seed=0)
  step = pt.make_step()
  state = pt.init(jnp.zeros(dim))
  noises = []
  for b, mask in pt.batches(x, state):
    params = state.params
    state, _ = step(state, b, mask)
    noises.append(-np.asarray(state.params - params))
  X = np.stack(noises) / (sigma * 2.0 * pt.ftrl.noise_sensitivity / batch)
  C = pt.ftrl.strategy.matrix
  Cinv = np.linalg.inv(C)
  expected = Cinv @ Cinv.T
  empirical = X @ X.T / dim
  assert np.max(np.abs(empirical - expected[:steps, :steps])) < 0.05


def test_target_epsilon_calibrates_never_above():
  pt = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=400,
                         batch_size=40, delta=1e-5, epochs=3, target_epsilon=2.0,
                         strategy="blt", key=0, seed=0)
  assert pt.num_steps == 30 and pt.ftrl.participation == (3, 10)
  eps = _gaussian_epsilon(pt.noise_multiplier, 1e-5)
  assert eps <= 2.0 and eps > 1.98
  assert pt.planned_epsilon() <= 2.0


def test_epochs_are_passes_over_the_cyclic_order():
  # 1438 // 256 = 5 steps per epoch (not 1438 / 256 = 5.6).
  pt = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=1438,
                         batch_size=256, delta=1e-5, epochs=40, noise_multiplier=1.0,
                         strategy="identity", key=0, seed=0)
  assert pt.num_steps == 200 and pt.ftrl.participation == (40, 5)
  pt = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=1438,
                         batch_size=256, delta=1e-5, epochs=2.5, noise_multiplier=1.0,
                         strategy="identity", key=0, seed=0)
  assert pt.num_steps == 13 and pt.ftrl.participation == (3, 5)


def test_amplified_banded_with_cyclic_poisson_sampling():
  x, y = _data(1000)
  pt = dpfl.make_private(loss_fn, optax.sgd(0.05), l2_clip_norm=1.0, dataset_size=1000,
                         batch_size=50, delta=1e-5, num_steps=30, noise_multiplier=1.0,
                         strategy="banded", sampling_scheme="poisson",
                         strategy_options={"bands": 4}, key=0, seed=0)
  assert isinstance(pt.sampler, sampling.CyclicPoissonSampler)
  assert pt.sampler.num_groups == 4 and pt.sampler.sampling_prob == pytest.approx(0.2)
  assert pt.ftrl.amplified and pt.ftrl.strategy.num_bands == 4
  assert pt.ftrl.noise_sensitivity == pytest.approx(max(pt.ftrl.strategy.column_norms()))
  step = pt.make_step()
  state = pt.init(jnp.zeros(5))
  for batch, mask in pt.batches((x, y), state):
    state, _ = step(state, batch, mask)
  (entry,) = pt.ledger.entries
  assert isinstance(entry, accounting.AmplifiedBandedMatrixMechanism)
  assert entry.num_steps == 30 and entry.num_bands == 4
  # DP-SGD with q = 0.2 over ceil(30 / 4) = 8 steps, dp-accounting directly.
  acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
  acc.compose(dpa.PoissonSampledDpEvent(0.2, dpa.GaussianDpEvent(1.0)), 8)
  assert pt.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=5e-3)


def test_a_strategy_object_is_checked_against_the_run():
  good = mf.optimize_banded(24, bands=4, participation=(3, 8))
  pt = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=400,
                         batch_size=50, delta=1e-5, num_steps=24, noise_multiplier=1.0,
                         strategy=good, key=0, seed=0)
  assert pt.ftrl.strategy is good
  single = mf.optimize_banded(24, bands=4)  # sensitivity for one participation
  with pytest.raises(ValueError, match="participation"):
    dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=400,
                      batch_size=50, delta=1e-5, num_steps=24, noise_multiplier=1.0,
                      strategy=single)
  with pytest.raises(ValueError, match="num_steps must be 24"):
    dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=400,
                      batch_size=50, delta=1e-5, num_steps=20, noise_multiplier=1.0,
                      strategy=mf.optimize_banded(20, bands=4, participation=(2, 10)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="bogus"), "strategy must be one of"),
    (dict(strategy="blt", sampling_scheme="shuffle"), "sampling_scheme must be 'cyclic'"),
    (dict(sampling_scheme="cyclic"), "'cyclic' needs a strategy"),
    (dict(strategy_options={"buffers": 2}), "strategy_options apply"),
    (dict(strategy="blt", strategy_options={"buffer": 2}), "unknown keys"),
    (dict(strategy="blt", strategy_options={"buffers": 0}), "buffers"),
    (dict(strategy="blt", strategy_options={"momentum": 1.0}), "momentum"),
    (dict(strategy="blt", strategy_options={"objective": "median"}), "objective"),
    (dict(strategy="banded", strategy_options={"bands": 9}), "bands"),
    (dict(strategy="blt", sampling_scheme="poisson"), "needs a banded strategy"),
    (dict(strategy="blt", max_batch_size=60), "max_batch_size"),
])
def test_bad_ftrl_arguments(kwargs, match):
  base = dict(l2_clip_norm=1.0, dataset_size=400, batch_size=50, delta=1e-5, num_steps=24,
              noise_multiplier=1.0)
  with pytest.raises(ValueError, match=match):
    dpfl.make_private(loss_fn, optax.sgd(0.1), **{**base, **kwargs})


def test_running_past_the_matrix_is_refused_before_the_step():
  # A matrix mechanism is planned for its n rows: a step past them (which
  # used to start a second, composed entry silently) is refused before its
  # batch is handed out or its noise drawn, and the plan cannot be extended.
  x, y = _data()
  pt = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=400,
                         batch_size=100, delta=1e-5, num_steps=4, noise_multiplier=2.0,
                         strategy="identity", key=0, seed=0)
  assert pt.ftrl.planned_steps == 4
  step, state = pt.make_step(), pt.init(jnp.zeros(5))
  handed = 0
  with pytest.raises(dpfl.BudgetExhaustedError, match="4 of 4 steps done"):
    for batch, mask in pt.batches((x, y), state, num_steps=6):
      handed += 1
      state, _ = step(state, batch, mask)
  assert handed == 4 and int(state.step) == 4
  # A step with a batch of its own is refused too (nothing recorded: 4 steps done).
  with pytest.raises(dpfl.BudgetExhaustedError):
    step(state, batch, mask)
  with pytest.raises(ValueError, match="4 planned rows; it cannot run 6 steps"):
    pt.extend(2)
  (entry,) = pt.ledger.entries
  assert entry.num_steps == 4 and pt.steps_done == 4
  acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
  acc.compose(dpa.GaussianDpEvent(2.0), 1)  # the identity matrix: one Gaussian of σ
  assert pt.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=2e-3)


# --- user level (federated DP-FTRL) -----------------------------------------------------


def _users(num_examples=600, num_users=60, k=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_examples, 4)).astype(np.float32)
  y = (x @ rng.normal(size=4)).astype(np.float32)
  return UserDataset.from_arrays({"x": x, "y": y}, rng.integers(0, num_users, num_examples),
                                 examples_per_user=k)


def user_loss(params, batch):
  return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)


@pytest.mark.parametrize("local_steps", [None, 2])
def test_federated_dp_ftrl(local_steps):
  ds = _users()
  extra = {} if local_steps is None else dict(local_steps=2, local_learning_rate=0.1)
  pt = dpfl.make_private(user_loss, optax.sgd(0.5, momentum=0.9), privacy_unit="user",
                         dataset=ds, l2_clip_norm=1.0, batch_size=10, delta=1e-5,
                         num_steps=12, noise_multiplier=1.0, strategy="blt",
                         strategy_options={"momentum": 0.9}, key=0, seed=0, **extra)
  n_users = ds.num_users
  b = n_users // 10
  assert pt.ftrl.participation == (math.ceil(12 / b), b)
  step = pt.make_step()
  state = pt.init(jnp.zeros(4))
  rounds = []
  for batch, mask in pt.batches(ds, state):
    state, _ = step(state, batch, mask)
    rounds.append(mask.any(axis=1).sum())
  assert all(r == 10 for r in rounds)
  (entry,) = pt.ledger.entries
  assert isinstance(entry, accounting.UserMatrixMechanism) and entry.num_steps == 12
  assert pt.ledger.privacy_unit == "user"
  assert pt.epsilon() == pytest.approx(_gaussian_epsilon(1.0, 1e-5), rel=2e-3)


def test_federated_dp_ftrl_rejects_els_and_poisson():
  ds = _users()
  common = dict(privacy_unit="user", dataset=ds, l2_clip_norm=1.0, batch_size=10, delta=1e-5,
                num_steps=12, noise_multiplier=1.0, strategy="blt")
  with pytest.raises(ValueError, match="sampling_unit='user'"):
    dpfl.make_private(user_loss, optax.sgd(0.1), sampling_unit="example", **common)
  with pytest.raises(ValueError, match="'cyclic'"):
    dpfl.make_private(user_loss, optax.sgd(0.1), sampling_scheme="poisson", **common)


def test_plan_for_every_name_matches_mf():
  for name in ftrl.STRATEGIES:
    s = ftrl.build_strategy(name, planned_steps=12, participation=(3, 4), options={})
    assert s.num_steps == 12 and tuple(s.participation) == (3, 4)
    assert math.isfinite(s.sensitivity) and s.sensitivity >= 1.0 - 1e-9


def test_donated_steps_match_undonated_and_keep_the_key():
  # Donation reuses params / optimizer-state memory (the BLT buffers) in
  # place; results are identical, and the transform's explicit key survives
  # (init after a donated step used to find its key array deleted).
  x, y = _data()
  runs = []
  for donate in (False, True):
    pt = dpfl.make_private(loss_fn, optax.sgd(0.05, momentum=0.9), l2_clip_norm=1.0,
                           dataset_size=400, batch_size=50, delta=1e-5, num_steps=8,
                           noise_multiplier=1.0, strategy="blt", key=5, seed=0)
    step = pt.make_step(donate=donate)
    state = pt.init(jnp.zeros(5))
    for batch, mask in pt.batches((x, y), state):
      state, _ = step(state, batch, mask)
    pt.optimizer.init(jnp.zeros(5))  # the explicit key is still usable
    runs.append(np.asarray(state.params))
  np.testing.assert_array_equal(runs[0], runs[1])
  with pytest.raises(ValueError, match="donate=True needs jit=True"):
    pt.make_step(jit=False, donate=True)
