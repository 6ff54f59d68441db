"""make_private: a loop made private, its ε from the ledger equals the CLI's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accounting
import dpfl
from accounting import cli


def _data(n=200, d=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x @ rng.normal(size=d) > 0).astype(np.float32)
  return {"x": x, "y": y}


def loss_fn(params, batch):
  logits = batch["x"] @ params["w"] + params["b"]
  return optax.sigmoid_binary_cross_entropy(logits, batch["y"]).mean()


PARAMS = {"w": jnp.zeros(5), "b": jnp.zeros(())}


def test_loop_runs_and_ledger_epsilon_equals_cli(capsys):
  data = _data()
  private = dpfl.make_private(loss_fn, optax.sgd(0.5), l2_clip_norm=1.0, dataset_size=200,
                              batch_size=20, num_steps=30, noise_multiplier=1.5, delta=1e-5,
                              key=0, seed=0)
  opt_state = private.init(PARAMS)
  step = private.make_step()
  params = PARAMS
  eps_so_far = []
  for i, (batch, mask) in enumerate(private.batches(data)):
    params, opt_state, aux = step(params, opt_state, batch, mask)
    if i in (0, 9, 29):  # ε is available at any step
      eps_so_far.append(private.epsilon())
  assert private.ledger.num_steps == 30
  assert eps_so_far == sorted(eps_so_far) and eps_so_far[0] > 0
  assert np.isfinite(float(loss_fn(params, data)))
  # The same number `dpfl epsilon` gives for the same settings.
  argv = ["epsilon", "--noise-multiplier", "1.5", "--sampling-prob", str(20 / 200), "--steps",
          "30", "--delta", "1e-5", "--json"]
  if private.sampler.can_truncate:
    argv = ["epsilon", "--noise-multiplier", "1.5", "--dataset-size", "200", "--batch-size", "20",
            "--steps", "30", "--max-batch-size", str(private.sampler.max_batch_size),
            "--delta", "1e-5", "--json"]
  assert cli.main(argv) == 0
  from_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epsilon"]
  assert private.epsilon() == pytest.approx(from_cli, rel=1e-12)
  # ...and plain Poisson accounting differs only by the (accounted) truncation.
  plain = accounting.epsilon(accounting.PoissonDpSgd(1.5, 0.1, 30), delta=1e-5)
  assert private.epsilon() == pytest.approx(plain, rel=1e-4)


def test_target_epsilon_is_calibrated_and_met():
  private = dpfl.make_private(loss_fn, optax.adam(1e-2), l2_clip_norm=1.0, dataset_size=500,
                              batch_size=50, epochs=2, target_epsilon=2.0, delta=1e-5)
  assert private.num_steps == 20
  assert private.planned_epsilon() <= 2.0
  looser = dpfl.make_private(loss_fn, optax.adam(1e-2), l2_clip_norm=1.0, dataset_size=500,
                             batch_size=50, epochs=2,
                             noise_multiplier=private.noise_multiplier / 1.01, delta=1e-5)
  assert looser.planned_epsilon() > 2.0


def test_update_is_noisy_sum_over_expected_batch():
  # Per-example gradient of this loss is exactly 1 in "b": the clipped sum is
  # the count of sampled examples; the update must be that count over the
  # *expected* batch size plus N(0, (σC/B)^2) noise.
  def const_loss(params, batch):
    return jnp.mean(params["b"] * jnp.ones_like(batch["x"][:, 0]))
  sigma, clip, n, b = 2.0, 1.0, 100, 10
  private = dpfl.make_private(const_loss, optax.identity(), l2_clip_norm=clip, dataset_size=n,
                              batch_size=b, num_steps=1, noise_multiplier=sigma, delta=1e-5,
                              key=3, seed=3)
  params = {"b": jnp.zeros(())}
  opt_state = private.init(params)
  data = _data(n)
  residuals = []
  for _ in range(400):
    batch, mask = next(private.batches(data, 1))
    grads, aux = private.clipped_grad(params, batch, mask=mask)
    updates, opt_state = private.optimizer.update(grads, opt_state, params)
    residuals.append(float(updates["b"]) - int(mask.sum()) / b)
  std = np.std(residuals)
  expected = sigma * clip / b
  # 400 samples: the sample std is within 6 standard errors (~ 6/sqrt(800)) w.p. > 1 - 1e-8.
  assert abs(std / expected - 1) < 6 / np.sqrt(2 * 400)


def test_resume_with_saved_ledger_and_fresh_keys(tmp_path):
  kwargs = dict(l2_clip_norm=1.0, dataset_size=200, batch_size=20, num_steps=10,
                noise_multiplier=1.5, delta=1e-5)
  first = dpfl.make_private(loss_fn, optax.sgd(0.1), **kwargs)
  state = first.init(PARAMS)
  for _ in first.batches(_data(), 4):
    pass
  first.ledger.save(tmp_path / "ledger.json")
  resumed = dpfl.make_private(loss_fn, optax.sgd(0.1), ledger=accounting.Ledger.load(
      tmp_path / "ledger.json"), **kwargs)
  assert resumed.epsilon() == first.epsilon()
  fresh = resumed.reseed(state)
  assert not np.array_equal(np.asarray(fresh[0].key), np.asarray(state[0].key))
  for _ in resumed.batches(_data(), 6):
    pass
  assert resumed.ledger.num_steps == 10
  assert resumed.epsilon() >= first.planned_epsilon() * (1 - 1e-9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=1.0, target_epsilon=1.0), "exactly one of noise_multiplier"),
    (dict(), "exactly one of noise_multiplier"),
    (dict(noise_multiplier=1.0, epochs=1.0), "exactly one of num_steps and epochs"),
    (dict(noise_multiplier=1.0, delta=0.0), "delta"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, l2_clip_norm=0.0), "l2_clip_norm"),
    (dict(noise_multiplier=1.0, batch_size=0), "batch_size"),
    (dict(noise_multiplier=1.0, sampling_scheme="random"), "sampling_scheme"),
])
def test_bad_arguments(kwargs, match):
  base = dict(l2_clip_norm=1.0, dataset_size=100, batch_size=10, num_steps=5, delta=1e-5)
  base.update(kwargs)
  if "epochs" in kwargs:
    base.pop("num_steps", None)
    base["num_steps"] = 5
  with pytest.raises(ValueError, match=match):
    dpfl.make_private(loss_fn, optax.sgd(0.1), **base)


@pytest.mark.parametrize("strategy", [None, "identity"])
def test_clip_method_reaches_the_clipping(strategy):
  common = dict(l2_clip_norm=1.0, dataset_size=100, batch_size=10, num_steps=5,
                noise_multiplier=1.0, delta=1e-5, strategy=strategy)
  half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
  batch = jax.tree.map(lambda x: jnp.asarray(x[:4], jnp.bfloat16), _data(n=4))
  for method in ("auto", "materialize", "reweight"):
    private = dpfl.make_private(loss_fn, optax.sgd(0.1), clip_method=method, **common)
    assert private.clipped_grad.method == method
    if method == "reweight":
      # Behaviour, not just the attribute: the reweight method itself refuses
      # half-precision parameters when the clipped sum is computed.
      with pytest.raises(ValueError, match="method='reweight' needs float32"):
        private.clipped_grad(half, batch)
    else:
      total, _ = private.clipped_grad(half, batch)
      assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(total))
  assert dpfl.make_private(loss_fn, optax.sgd(0.1), **common).clipped_grad.method == "auto"


@pytest.mark.parametrize("clip_method", ["ghost", "strategy", None])
def test_bad_clip_method_names_the_argument_and_the_allowed_values(clip_method):
  with pytest.raises(ValueError, match="clip_method must be one of auto, materialize, "
                                       f"reweight; got {clip_method!r}"):
    dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=100,
                      batch_size=10, num_steps=5, noise_multiplier=1.0, delta=1e-5,
                      clip_method=clip_method)


def test_shuffled_scheme_accounts_without_amplification():
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=100,
                              batch_size=10, num_steps=25, noise_multiplier=2.0, delta=1e-5,
                              sampling_scheme="shuffle")
  for _ in private.batches(_data(100)):
    pass
  ref = accounting.epsilon(accounting.ShuffledDpSgd(2.0, 100, 10, 25), delta=1e-5)
  assert private.epsilon() == pytest.approx(ref, rel=1e-12)


def test_shuffled_epochs_are_whole_batches_accounted_as_dp_accounting_does():
  # 105 examples, batches of 10: an epoch is 105 // 10 = 10 full batches (the
  # remainder is dropped), so 2 epochs are 20 steps in which every example
  # takes part at most twice; ceil(2 * 105 / 10) = 21 would add a third
  # participation that never ran. Reference: two Gaussian mechanisms of
  # sensitivity C (zero-out neighbours, no amplification) compose to one
  # Gaussian with mu = sqrt(2) / sigma, whose exact delta(eps) is Balle & Wang
  # 2018's closed form; the PLD answer is an upper bound close to it.
  from scipy import optimize, stats
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=105,
                              batch_size=10, epochs=2, noise_multiplier=2.0, delta=1e-5,
                              sampling_scheme="shuffle")
  steps = sum(1 for _ in private.batches(_data(105)))
  assert steps == 20
  mu = np.sqrt(2) / 2.0
  def delta_at(eps):
    return (stats.norm.cdf(mu / 2 - eps / mu)
            - np.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - 1e-5)
  exact = optimize.brentq(delta_at, 0.0, 50.0, xtol=1e-12)
  assert exact * (1 - 1e-9) <= private.epsilon() <= exact * (1 + 1e-3)


def _rdp_epsilon(event, delta):
  from dp_accounting.rdp import rdp_privacy_accountant as rdp
  acc = rdp.RdpAccountant()
  acc.compose(event)
  return acc.get_epsilon(delta)


def test_rdp_accountant_gets_exact_poisson_and_its_epsilon():
  # dp-accounting's RDP back end has no truncated-Poisson event, so under
  # accountant="rdp" the sampler must never truncate; ε is then plain Poisson.
  import dp_accounting as dpa
  n, b, steps = 1438, 256, 5
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=n,
                              batch_size=b, num_steps=steps, noise_multiplier=1.0, delta=1e-5,
                              accountant="rdp", key=0, seed=0)
  assert not private.sampler.can_truncate
  assert private.sampler.max_batch_size < n  # still padded to a small static shape
  step, params, state = private.make_step(), PARAMS, private.init(PARAMS)
  for batch, mask in private.batches(_data(n)):
    params, state, _ = step(params, state, batch, mask)
  event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(b / n, dpa.GaussianDpEvent(1.0)),
                                  steps)
  assert private.epsilon() == pytest.approx(_rdp_epsilon(event, 1e-5), rel=1e-12)
  calibrated = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=n,
                                 batch_size=b, num_steps=steps, target_epsilon=3.0,
                                 delta=1e-5, accountant="rdp")
  assert calibrated.planned_epsilon() <= 3.0
  # The PLD default keeps truncating (static shape always), and accounts it.
  pld = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=n,
                          batch_size=b, num_steps=steps, noise_multiplier=1.0, delta=1e-5)
  assert isinstance(pld.mechanism, accounting.TruncatedPoissonDpSgd)


def test_rdp_overflowing_draw_gets_a_longer_shape_not_truncated():
  # max_batch_size far below the expected batch: every draw overflows.
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), l2_clip_norm=1.0, dataset_size=200,
                              batch_size=100, max_batch_size=8, num_steps=3,
                              noise_multiplier=1.0, delta=1e-5, accountant="rdp", seed=1)
  step, params, state = private.make_step(), PARAMS, private.init(PARAMS)
  for batch, mask in private.batches(_data()):
    assert len(mask) % 8 == 0 and mask.sum() > 8
    params, state, _ = step(params, state, batch, mask)
  assert private.sampler.num_overflows == 3 and private.sampler.num_truncated == 0
  assert isinstance(private.ledger.entries[0], accounting.PoissonDpSgd)


def test_rdp_refuses_a_ledger_with_truncated_steps_at_construction():
  kwargs = dict(l2_clip_norm=1.0, dataset_size=200, batch_size=20, num_steps=10,
                noise_multiplier=1.5, delta=1e-5)
  first = dpfl.make_private(loss_fn, optax.sgd(0.1), **kwargs)
  for _ in first.batches(_data(), 2):
    pass
  assert isinstance(first.ledger.entries[0], accounting.TruncatedPoissonDpSgd)
  with pytest.raises(ValueError, match="accountant must be 'pld'.*truncated_poisson"):
    dpfl.make_private(loss_fn, optax.sgd(0.1), ledger=first.ledger, accountant="rdp", **kwargs)


@pytest.mark.parametrize("kwargs,kind", [
    (dict(privacy_unit="user"), accounting.UlsDpSgd),
    (dict(strategy="tree"), accounting.MatrixMechanism),
    (dict(privacy_unit="user", strategy="tree"), accounting.UserMatrixMechanism),
    (dict(strategy="banded", sampling_scheme="poisson", batch_size=16),
     accounting.AmplifiedBandedMatrixMechanism),
])
def test_rdp_works_for_user_level_and_ftrl(kwargs, kind):
  base = dict(l2_clip_norm=1.0, dataset_size=200, batch_size=20, num_steps=8,
              noise_multiplier=1.5, delta=1e-5, accountant="rdp")
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), **{**base, **kwargs})
  assert isinstance(private.mechanism, kind)
  assert private.planned_epsilon() == pytest.approx(
      _rdp_epsilon(private.mechanism.dp_event(), 1e-5), rel=1e-12)


def test_readme_loop_with_unchanged_train_step_signature():
  # The README's "Make an existing training loop private" diff, after: the
  # loop's train_step(params, opt_state, batch) keeps its signature and
  # unpacks the (examples, mask) pair that private.batches yields.
  data, optimizer = _data(), optax.adam(1e-2)
  private = dpfl.make_private(loss_fn, optimizer, l2_clip_norm=1.0, target_epsilon=3.0,
                              delta=1e-5, dataset_size=200, batch_size=20, epochs=2)
  optimizer = private.optimizer
  params = PARAMS
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    examples, mask = batch
    grads, _ = private.clipped_grad(params, examples, mask=mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for batch in private.batches(data):
    params, opt_state = train_step(params, opt_state, batch)
  assert private.ledger.num_steps == private.num_steps == 20
  assert 0 < private.epsilon() <= 3.0
  assert np.isfinite(float(loss_fn(params, data)))
  assert not np.allclose(np.asarray(params["w"]), 0.0)
