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
  import dp_accounting as dpa
  from dp_accounting.pld import pld_privacy_accountant
  data = _data()
  private = dpfl.make_private(loss_fn, optax.sgd(0.5), l2_clip_norm=1.0, dataset_size=200,
                              batch_size=20, num_steps=30, noise_multiplier=1.5, delta=1e-5,
                              key=0, seed=0)
  state = private.init(PARAMS)
  step = private.make_step()
  eps_so_far = []
  for i, (batch, mask) in enumerate(private.batches(data, state)):
    state, aux = step(state, batch, mask)
    if i in (0, 9, 29):  # ε is available at any step
      eps_so_far.append(private.epsilon())
  assert private.ledger.num_steps == private.steps_done == int(state.step) == 30
  assert eps_so_far == sorted(eps_so_far) and eps_so_far[0] > 0
  assert np.isfinite(float(loss_fn(state.params, data)))
  # The plan is the run as described: truncated Poisson of the given sizes.
  plan = private.plan
  assert (plan.sampling.scheme, plan.sampling.population_size, plan.sampling.batch_size,
          plan.noise_multiplier, plan.num_steps) == ("truncated_poisson", 200, 20, 1.5, 30)
  assert plan.sampling.max_batch_size < 200
  # Independently: dp-accounting's PLD accountant on the DpEvent of exactly
  # that mechanism (truncated Poisson-subsampled Gaussian, composed 30 times).
  event = dpa.SelfComposedDpEvent(dpa.TruncatedSubsampledGaussianDpEvent(
      200, 0.1, plan.sampling.max_batch_size, 1.5), 30)
  reference = pld_privacy_accountant.PLDAccountant()
  reference.compose(event)
  assert private.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
  # The same number `dpfl epsilon` gives for the same plan (flags from the plan).
  s = plan.sampling
  argv = ["epsilon", "--noise-multiplier", repr(plan.noise_multiplier),
          "--dataset-size", str(s.population_size), "--batch-size", str(s.batch_size),
          "--max-batch-size", str(s.max_batch_size), "--steps", str(plan.num_steps),
          "--delta", repr(plan.delta), "--accountant", plan.accountant, "--json"]
  assert cli.main(argv) == 0
  from_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epsilon"]
  assert private.epsilon() == pytest.approx(from_cli, rel=1e-12)
  assert plan.epsilon() == pytest.approx(from_cli, rel=1e-12)
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
                              batch_size=b, num_steps=400, noise_multiplier=sigma, delta=1e-5,
                              key=3, seed=3)
  params = {"b": jnp.zeros(())}
  opt_state = private.optimizer.init(params)
  data = _data(n)
  residuals = []
  clipped_grad = jax.jit(private.clipped_grad)
  for batch, mask in private.batches(data):
    grads, aux = clipped_grad(params, batch, mask=mask)
    updates, opt_state = private.optimizer.update(grads, opt_state, params)
    residuals.append(float(updates["b"]) - int(mask.sum()) / b)
  std = np.std(residuals)
  expected = sigma * clip / b
  # 400 samples: the sample std is within 6 standard errors (~ 6/sqrt(800)) w.p. > 1 - 1e-8.
  assert abs(std / expected - 1) < 6 / np.sqrt(2 * 400)


def test_resume_from_a_checkpoint_with_fresh_keys(tmp_path):
  # The resume: save / restore continues the same plan with fresh noise keys.
  kwargs = dict(l2_clip_norm=1.0, dataset_size=200, batch_size=20, num_steps=10,
                noise_multiplier=1.5, delta=1e-5)
  first = dpfl.make_private(loss_fn, optax.sgd(0.1), **kwargs)
  state = first.init(PARAMS)
  step = first.make_step()
  for batch, mask in first.batches(_data(), state, num_steps=4):
    state, _ = step(state, batch, mask)
  first.save(tmp_path / "run", state)
  resumed = dpfl.make_private(loss_fn, optax.sgd(0.1), **kwargs)
  restored = resumed.restore(tmp_path / "run", PARAMS)
  assert resumed.steps_done == int(restored.step) == 4
  assert resumed.epsilon() == first.epsilon()
  assert not np.array_equal(np.asarray(restored.opt_state[0].key),
                            np.asarray(state.opt_state[0].key))
  step = resumed.make_step()
  remaining = 0
  for batch, mask in resumed.batches(_data(), restored):
    restored, _ = step(restored, batch, mask)
    remaining += 1
  assert remaining == 6  # the planned steps minus those done
  assert resumed.ledger.num_steps == 10
  assert resumed.epsilon() == pytest.approx(first.planned_epsilon(), rel=1e-12)


def test_a_saved_ledger_composes_a_new_run_after_an_earlier_one(tmp_path):
  # Not a resume: a new run (its own plan) on the same data, composed after
  # the earlier run's ledger; reseed gives its (params, opt_state) loop fresh keys.
  kwargs = dict(l2_clip_norm=1.0, dataset_size=200, batch_size=20, noise_multiplier=1.5,
                delta=1e-5)
  first = dpfl.make_private(loss_fn, optax.sgd(0.1), num_steps=4, **kwargs)
  opt_state = first.optimizer.init(PARAMS)
  for _ in first.batches(_data()):
    pass
  first.ledger.save(tmp_path / "ledger.json")
  second = dpfl.make_private(loss_fn, optax.sgd(0.1), num_steps=6, ledger=accounting.Ledger.load(
      tmp_path / "ledger.json"), **kwargs)
  assert second.epsilon() == first.epsilon()
  fresh = second.reseed(opt_state)
  assert not np.array_equal(np.asarray(fresh[0].key), np.asarray(opt_state[0].key))
  for _ in second.batches(_data()):
    pass
  assert [e.num_steps for e in second.ledger.entries] == [4, 6]
  ten_steps = dpfl.make_private(loss_fn, optax.sgd(0.1), num_steps=10, **kwargs)
  assert second.epsilon() >= ten_steps.planned_epsilon() * (1 - 1e-9)


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


@pytest.mark.parametrize("clip_method", ["Ghost", "strategy", None])
def test_bad_clip_method_names_the_argument_and_the_allowed_values(clip_method):
  with pytest.raises(ValueError, match="clip_method must be one of auto, materialize, "
                                       f"reweight, ghost; got {clip_method!r}"):
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
  step, state = private.make_step(), private.init(PARAMS)
  for batch, mask in private.batches(_data(n), state):
    state, _ = step(state, batch, mask)
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
  step, state = private.make_step(), private.init(PARAMS)
  overflows = 0
  for batch, mask in private.batches(_data(), state):
    # Longer than max_batch_size, padded to a multiple of it, every example kept.
    assert len(mask) % 8 == 0 and mask.sum() > 8
    overflows += len(mask) > 8
    state, _ = step(state, batch, mask)
  assert overflows == 3
  assert isinstance(private.ledger.entries[0], accounting.PoissonDpSgd)


def test_rdp_refuses_a_ledger_with_truncated_steps_at_construction():
  kwargs = dict(l2_clip_norm=1.0, dataset_size=200, batch_size=20, num_steps=10,
                noise_multiplier=1.5, delta=1e-5)
  first = dpfl.make_private(loss_fn, optax.sgd(0.1), **kwargs)
  for _ in first.batches(_data(), num_steps=2):
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
  # Iterating batches() again (which used to run on past the target) is
  # refused before a batch is handed out, naming the spent and the target ε.
  with pytest.raises(dpfl.BudgetExhaustedError, match="target epsilon=3") as refused:
    next(private.batches(data))
  assert refused.value.target == 3.0 and refused.value.spent == private.epsilon()
  assert private.ledger.num_steps == 20
  assert np.isfinite(float(loss_fn(params, data)))
  assert not np.allclose(np.asarray(params["w"]), 0.0)
