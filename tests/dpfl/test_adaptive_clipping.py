"""Adaptive (quantile) clipping in training: C converges, bounds hold with C_t, C is saved."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import dpfl
from dpfl import adaptive, noise
from dpfl.data import UserDataset

DIM = 2000


def linear_loss(params, batch):
  # Example i's gradient is its own vector v_i: its norm is chosen by the test.
  return jnp.mean(batch["v"] @ params["w"])


def _vectors(rng, norms):
  directions = rng.normal(size=(len(norms), DIM))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  return (directions * np.asarray(norms)[:, None]).astype(np.float32)


@pytest.mark.parametrize("target_quantile", [0.5, pytest.param(0.9, marks=pytest.mark.slow)])
def test_clip_norm_converges_to_the_target_quantile_of_lognormal_norms(target_quantile):
  # Per-unit norms ~ LogNormal(0, 1): the γ-quantile is exp(Φ^-1(γ)). The
  # paper's geometric update (η = 0.2, σ_b = m/20) starts 20x too low.
  batch = 256
  options = dpfl.adaptive_clip(initial=0.05, target_quantile=target_quantile,
                               learning_rate=0.2, count_noise_stddev=0.05 * batch)
  tx = dpfl.gaussian_noise(noise_multiplier=1.0, l2_clip_norm=1.0,
                           expected_batch_size=batch, key=0, adaptive=options)
  grad_fn = dpfl.clipped_grad(lambda p, b: jnp.mean(b["n"] * p["w"]), l2_clip_norm=1.0,
                              method="materialize")
  params = {"w": jnp.zeros(())}

  def step(state, key):
    norms = jnp.exp(jax.random.normal(key, (batch,)))  # scalar gradients: |g_i| = norm
    grads, aux = grad_fn(params, {"n": norms}, l2_clip_norm=state.clip_norm)
    _, state = tx.update(grads, state, clip_stats=aux)
    return state, state.clip_norm

  _, clip_norms = jax.jit(lambda s: jax.lax.scan(step, s, jax.random.split(
      jax.random.key(1), 250)))(tx.init(params))
  # The fraction of the distribution left unclipped by C_t, exactly.
  covered = scipy.stats.norm.cdf(np.log(np.asarray(clip_norms[-100:])))
  # Stationary jitter of the covered fraction is ~0.02 (η·(sampling + count
  # noise) through an AR(1) in log C); 0.04 on the mean, 0.12 on any step.
  assert abs(covered.mean() - target_quantile) < 0.04
  assert np.max(np.abs(covered - target_quantile)) < 0.12


def test_each_unit_moves_the_sum_by_at_most_that_steps_clip_norm_and_noise_follows_it():
  rng = np.random.default_rng(0)
  norms = np.exp(rng.normal(0.0, 2.0, size=32))  # spread over 1e-3 .. 1e3
  data = {"v": _vectors(rng, norms)}
  private = dpfl.make_private(
      linear_loss, optax.sgd(1.0), batch_size=12, dataset_size=32, num_steps=3,
      noise_multiplier=2.0, delta=1e-5, key=3, seed=4, clip_method="materialize",
      l2_clip_norm=dpfl.adaptive_clip(initial=100.0, learning_rate=1.0, count_noise_stddev=1.0))
  state = private.init({"w": jnp.zeros(DIM)})
  step = private.make_step()
  grad_fn = jax.jit(lambda p, b, m, c: private.clipped_grad(p, b, mask=m, l2_clip_norm=c)[0])
  seen = []
  for batch, mask in private.batches(data, state):
    clip_norm = private.clip_norm(state)
    seen.append(clip_norm)
    full = grad_fn(state.params, batch, mask, clip_norm)["w"]
    for i in np.flatnonzero(np.asarray(mask)):  # brute force: remove each unit in turn
      without = grad_fn(state.params, batch, np.asarray(mask).copy() & (np.arange(mask.size) != i),
                        clip_norm)["w"]
      assert float(jnp.linalg.norm(full - without)) <= clip_norm * (1 + 1e-5)
    new, _ = step(state, batch, mask)
    # sgd(1): new = old - (sum + σ C_t z) / B, so the noise is B (old - new) - sum.
    noise = 12 * (state.params["w"] - new.params["w"]) - full
    # std of DIM draws: relative error ~1/sqrt(2 DIM) = 1.6%; 8% is a 5-sigma bound.
    assert float(jnp.std(noise)) == pytest.approx(2.0 * clip_norm, rel=0.08)
    state = new
  assert len(set(np.round(seen, 4))) == len(seen)  # C moved every step
  # The ledger accounts the pair (sum, count) as one Gaussian: σ_eff < σ.
  (entry,) = private.ledger.entries
  sigma_eff = (2.0 ** -2 + (2 * 1.0) ** -2) ** -0.5
  assert entry.noise_multiplier == pytest.approx(sigma_eff) and entry.num_steps == 3


@pytest.mark.parametrize("strategy", [None, pytest.param("blt", marks=pytest.mark.slow)])
def test_checkpoint_keeps_the_clip_norm(tmp_path, strategy):
  rng = np.random.default_rng(1)
  data = {"v": _vectors(rng, np.exp(rng.normal(size=32)))}
  kwargs = dict(batch_size=8, dataset_size=32, num_steps=8, noise_multiplier=1.0, delta=1e-5,
                seed=1, strategy=strategy, checkpoint_dir=tmp_path / "run",
                l2_clip_norm=dpfl.adaptive_clip(initial=5.0, learning_rate=0.5))
  private = dpfl.make_private(linear_loss, optax.sgd(0.1), **kwargs)
  params = {"w": jnp.zeros(DIM)}
  state = private.init(params)
  step = private.make_step()
  batches = private.batches(data, state)
  for _ in range(3):
    state, _ = step(state, *next(batches))
  private.save(tmp_path / "run", state)
  saved = private.clip_norm(state)
  after, _ = step(state, *next(batches))  # released, never saved: a crash follows
  assert private.clip_norm(after) != saved
  resumed = dpfl.make_private(linear_loss, optax.sgd(0.1), **kwargs)
  restored = resumed.restore(tmp_path / "run", params)
  # The saved C (a function of earlier releases only), not one replayed from
  # the lost step's noise; the steps go on from the ledger's count.
  assert resumed.clip_norm(restored) == saved
  assert int(restored.step) == 4
  state, _ = resumed.make_step()(restored, *next(resumed.batches(data, restored)))
  assert np.isfinite(resumed.clip_norm(state))


@pytest.mark.slow
def test_user_level_els_and_uls_with_local_steps_adapt_the_clip_norm():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.float32)
  users = UserDataset.from_arrays({"x": x, "y": y}, rng.integers(0, 30, 300), examples_per_user=5)

  def loss(params, batch):
    return optax.sigmoid_binary_cross_entropy(batch["x"] @ params["w"], batch["y"]).mean()

  for extra in (dict(sampling_unit="example", examples_per_user=5),
                dict(local_steps=2, local_learning_rate=0.5)):
    private = dpfl.make_private(
        loss, optax.sgd(1.0), privacy_unit="user", dataset=users, batch_size=10, num_steps=3,
        noise_multiplier=1.0, delta=1e-5, l2_clip_norm=dpfl.adaptive_clip(initial=10.0), **extra)
    assert private.plan.accounted_noise_multiplier < private.plan.noise_multiplier
    state = private.init({"w": jnp.zeros(4)})
    step = private.make_step()
    for batch, mask in private.batches(users, state):
      state, _ = step(state, batch, mask)
    assert private.clip_norm(state) < 10.0  # the norms here are far below 10: C shrinks
    assert private.epsilon() == pytest.approx(private.plan.epsilon(3), rel=1e-12)


def test_scheduled_clip_norm_through_inject_hyperparams():
  # The clip norm as a runtime value: optax schedules it, clipping and noise follow.
  schedule = optax.linear_schedule(1.0, 4.0, transition_steps=3)
  tx = optax.inject_hyperparams(dpfl.gaussian_noise, static_args=("key",))(
      noise_multiplier=1.0, l2_clip_norm=schedule, expected_batch_size=1.0, key=0)
  grad_fn = dpfl.clipped_grad(linear_loss, l2_clip_norm=1.0, method="materialize")
  params = {"w": jnp.zeros(DIM)}
  batch = {"v": _vectors(np.random.default_rng(3), [100.0])}

  @jax.jit
  def step(state):
    # The value this update uses (state.hyperparams holds the last step's).
    clip_norm = schedule(state.count)
    grads, _ = grad_fn(params, batch, l2_clip_norm=clip_norm)
    noisy, state = tx.update(grads, state)
    assert_used = state.hyperparams["l2_clip_norm"] == clip_norm
    return grads, noisy, state, jnp.where(assert_used, clip_norm, jnp.nan)

  state = tx.init(params)
  for t in range(4):
    grads, noisy, state, clip_norm = step(state)
    assert float(clip_norm) == pytest.approx(1.0 + t)
    assert float(jnp.linalg.norm(grads["w"])) == pytest.approx(1.0 + t, rel=1e-5)
    assert float(jnp.std(noisy["w"] - grads["w"])) == pytest.approx(1.0 + t, rel=0.08)


def test_bad_uses_are_refused():
  with pytest.raises(ValueError, match=r"initial must be .*> 0, got -1"):
    dpfl.adaptive_clip(initial=-1.0)
  with pytest.raises(ValueError, match="amplified banded"):
    dpfl.make_private(linear_loss, optax.sgd(0.1), batch_size=8, dataset_size=64,
                      num_steps=8, noise_multiplier=1.0, delta=1e-5, strategy="banded",
                      sampling_scheme="poisson", l2_clip_norm=dpfl.adaptive_clip(initial=1.0))
  tx = dpfl.gaussian_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=8,
                           adaptive=dpfl.adaptive_clip(initial=1.0, count_noise_stddev=1.0))
  with pytest.raises(ValueError, match="clip_stats"):
    tx.update({"w": jnp.zeros(3)}, tx.init({"w": jnp.zeros(3)}))
  with pytest.raises(ValueError, match="count_noise_stddev set"):
    dpfl.gaussian_noise(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=8,
                        adaptive=dpfl.adaptive_clip(initial=1.0))
  assert adaptive.clip_norm(tx.init({"w": jnp.zeros(3)})) == 1.0
  # A sum clipped to a larger C than the state's gets noise for that larger C.
  stats = adaptive.NO_UNITS._replace(num_units=8)
  big = dict(stats._asdict(), l2_clip_norm=jnp.float32(4.0))
  stats_big = type("Stats", (), big)()
  noisy, _ = tx.update({"w": jnp.zeros(DIM)}, tx.init({"w": jnp.zeros(DIM)}),
                       clip_stats=stats_big)
  assert float(jnp.std(noisy["w"])) * 8 == pytest.approx(4.0, rel=0.08)
  private = dpfl.make_private(linear_loss, optax.sgd(0.1), batch_size=8, dataset_size=64,
                              num_steps=8, noise_multiplier=1.0, delta=1e-5,
                              l2_clip_norm=dpfl.adaptive_clip(initial=1.0))
  with pytest.raises(ValueError, match="l2_clip_norm must be given with adaptive clipping"):
    private.clipped_grad({"w": jnp.zeros(DIM)}, {"v": jnp.zeros((8, DIM))})


def test_resume_roll_forward_keeps_the_saved_clip_norm():
  # Steps released after the last checkpoint are skipped (correlated noise
  # replays their draws); a C replayed from those draws would be a function
  # of the released counts' noise, so the saved C is kept.
  options = dpfl.adaptive_clip(initial=2.0, count_noise_stddev=1.0)
  tx = noise.privatizer(noise.NoiseStrategy(num_steps=6), noise_multiplier=1.0,
                        l2_clip_norm=1.0, expected_batch_size=4, key=0, adaptive=options)
  state = tx.init({"w": jnp.zeros(3)})
  moved = noise.advance(tx, state, {"w": jnp.zeros(3)}, 3)
  assert int(moved.count) == 3 and float(moved.clip_norm) == 2.0
  stats = adaptive.NO_UNITS._replace(num_units=4)  # four units, all clipped
  _, stepped = tx.update({"w": jnp.zeros(3)}, state, clip_stats=stats)
  assert float(stepped.clip_norm) != 2.0  # a real step does move it


@pytest.mark.parametrize("method", [pytest.param("materialize", marks=pytest.mark.slow),
                                    pytest.param("reweight", marks=pytest.mark.slow), "ghost"])
def test_every_clipping_method_takes_a_traced_clip_norm(method):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(12, 5)) * np.exp(2 * rng.normal(size=(12, 1))), jnp.float32)
  params = {"w": jnp.full((5, 3), 0.1), "b": jnp.zeros(3)}

  def loss(p, b):
    return jnp.mean(jnp.tanh(b["x"] @ p["w"] + p["b"]) ** 2)

  fn = dpfl.clipped_grad(loss, l2_clip_norm=1.0, method=method)
  traced = jax.jit(lambda c: fn(params, {"x": x}, l2_clip_norm=c)[0])
  concrete = fn(params, {"x": x}, l2_clip_norm=0.05)[0]
  for a, b in zip(jax.tree.leaves(traced(jnp.float32(0.05))), jax.tree.leaves(concrete)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  # A runtime C that is not > 0 clips everything to zero, never a negative weight.
  for bad in (-1.0, np.nan):
    assert all(float(jnp.abs(leaf).max()) == 0.0
               for leaf in jax.tree.leaves(traced(jnp.float32(bad))))
