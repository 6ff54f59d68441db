"""Cyclic DP-FTRL assumes the fixed-epoch pattern its fixed order really has, and says so."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accounting
import dpfl
import dpfl.mf as mf


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((x @ params - y) ** 2)


def _private(strategy, **kwargs):
  args = dict(l2_clip_norm=1.0, dataset_size=48, batch_size=4, delta=1e-5, num_steps=24,
              noise_multiplier=1.0, key=0, seed=0)
  return dpfl.make_private(loss_fn, optax.sgd(0.1), strategy=strategy, **{**args, **kwargs})


def test_named_strategy_is_built_and_accounted_for_fixed_epoch():
  pt = _private("tree")  # b = 48 / 4 = 12 steps per epoch, 2 epochs
  assert pt.ftrl.participation == (2, 12)
  assert pt.ftrl.strategy.participation.kind == "fixed-epoch"
  assert pt.ftrl.noise.participation == "fixed-epoch"
  C = pt.ftrl.strategy.matrix
  # Brute force over the 12 patterns r, r + 12 (the tree's Gram is non-negative).
  brute = max(float(np.linalg.norm(C[:, r::12].sum(axis=1))) for r in range(12))
  assert pt.ftrl.noise_sensitivity == pytest.approx(brute, rel=1e-12)
  assert pt.mechanism.participation == "fixed-epoch"
  minsep = mf.tree(24, participation=(2, 12)).sensitivity
  assert pt.ftrl.noise_sensitivity <= minsep * (1 + 1e-12)


def test_the_ledger_records_the_pattern(tmp_path):
  pt = _private("banded", strategy_options={"bands": 4})
  x = np.ones((48, 5), np.float32)
  y = np.zeros(48, np.float32)
  step = pt.make_step()
  state = pt.init(jnp.zeros(5))
  for i, (batch, mask) in enumerate(pt.batches((x, y), state)):
    state, _ = step(state, batch, mask)
    if i == 2:
      break
  (entry,) = pt.ledger.entries
  assert isinstance(entry, accounting.MatrixMechanism)
  assert entry.participation == "fixed-epoch"
  assert entry.to_dict()["participation"] == "fixed-epoch"


def test_given_strategies_keep_their_own_pattern():
  minsep = mf.optimize_banded(24, bands=4, participation=(2, 12))
  pt = _private(minsep)
  assert pt.ftrl.noise.participation == "min-sep" and pt.mechanism.participation == "min-sep"
  fixed = mf.optimize_banded(24, bands=4, participation=mf.FixedEpoch(2, 12))
  assert _private(fixed).mechanism.participation == "fixed-epoch"
  # A fixed-epoch sensitivity of another period does not describe this run's order.
  other = mf.optimize_banded(24, bands=4, participation=mf.FixedEpoch(4, 6))
  with pytest.raises(ValueError, match="fixed-epoch order of period 6"):
    _private(other)
