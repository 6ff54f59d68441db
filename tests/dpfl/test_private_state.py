"""One plan, one state: PrivateState loops, budget, write-ahead ledger, save / restore.

References are independent of the code under test: ε from dp-accounting's PLD
accountant called directly on the event the run's sampling and noise define,
and the uninterrupted run itself for resume equality.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from jax.experimental import io_callback

import accounting
import dpfl
from accounting import cli as accounting_cli

N, DIM = 200, 4
PARAMS = {"w": jnp.zeros(DIM), "b": jnp.zeros(())}


def loss_fn(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2)


def _data(n=N):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, DIM)).astype(np.float32)
  return {"x": x, "y": (x @ np.arange(1, DIM + 1)).astype(np.float32)}


def _pld_epsilon(event, delta):
  acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  acc.compose(event)
  return acc.get_epsilon(delta)


def _run(private, data, state=None):
  state = private.init(PARAMS) if state is None else state
  step = private.make_step()
  for batch, mask in private.batches(data, state):
    state, _ = step(state, batch, mask)
  return state


def _private(**kwargs):
  args = dict(l2_clip_norm=1.0, delta=1e-5, dataset_size=N, batch_size=20)
  if kwargs.get("strategy") is None:
    # Padded to N: plain Poisson sampling, whose ε is fast to compute (the
    # truncated-Poisson PLD takes seconds; its accounting is tested elsewhere).
    args["max_batch_size"] = N
  args.update(kwargs)
  return dpfl.make_private(loss_fn, optax.sgd(0.1), **args)


# --- one plan, the same ε everywhere --------------------------------------------------


def test_state_loop_readme_loop_cli_and_ledger_agree_on_epsilon(tmp_path):
  data = _data()
  state_run = _private(noise_multiplier=1.3, num_steps=12, checkpoint_dir=tmp_path / "a")
  _run(state_run, data)
  readme_run = _private(noise_multiplier=1.3, num_steps=12)
  opt_state = readme_run.optimizer.init(PARAMS)
  params = PARAMS
  for batch, mask in readme_run.batches(data):
    grads, _ = readme_run.clipped_grad(params, batch, mask=mask)
    updates, opt_state = readme_run.optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  plan = state_run.plan
  assert plan == readme_run.plan
  # dp-accounting directly: Poisson-sampled Gaussian, 12 steps (no truncation
  # possible at this max batch size? the plan says which; build that event).
  q = 20 / N
  if plan.sampling.scheme == "truncated_poisson":
    event = dp_event.SelfComposedDpEvent(dp_event.TruncatedSubsampledGaussianDpEvent(
        dataset_size=N, sampling_probability=q, truncated_batch_size=plan.sampling.max_batch_size,
        noise_multiplier=1.3), 12)
  else:
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.3)), 12)
  reference = _pld_epsilon(event, 1e-5)
  ledger = accounting.Ledger.load(tmp_path / "a" / "ledger.json")
  values = [state_run.epsilon(), readme_run.epsilon(), ledger.epsilon(delta=1e-5),
            plan.epsilon()]
  assert values[0] == values[1] == values[2] == values[3]
  assert values[0] == pytest.approx(reference, rel=2e-3)
  assert values[0] >= reference * (1 - 2e-3)
  # The CLI, from the plan's own numbers.
  argv = ["epsilon", "--noise-multiplier", "1.3", "--steps", "12", "--delta", "1e-5", "--json"]
  if plan.sampling.scheme == "truncated_poisson":
    argv += ["--dataset-size", str(N), "--max-batch-size", str(plan.sampling.max_batch_size),
             "--sampling-prob", str(q)]
  else:
    argv += ["--sampling-prob", str(q)]
  import contextlib
  import io
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert accounting_cli.main(argv) == 0
  assert json.loads(out.getvalue())["epsilon"] == pytest.approx(values[0], rel=1e-9)


def test_own_data_loader_is_accounted_too():
  # The "epsilon reads 0" case: make_step fed by the user's own loader.
  private = _private(noise_multiplier=1.0, num_steps=10)
  state, step = private.init(PARAMS), private.make_step()
  data = _data()
  for i in range(7):
    batch = {k: v[i * 20:(i + 1) * 20] for k, v in data.items()}
    state, _ = step(state, batch, np.ones(20, bool))
  assert private.steps_done == 7
  assert private.epsilon() == pytest.approx(private.plan.epsilon(7), rel=1e-12)
  assert private.epsilon() > 0


def test_the_ledger_is_written_before_the_noise_of_a_step(tmp_path):
  seen = []

  def read_ledger(_):
    seen.append(accounting.Ledger.load(tmp_path / "run" / "ledger.json").num_steps)
    return np.zeros((), np.float32)

  def probe():  # runs after the noise is added, before the update leaves the step
    def update(updates, state, params=None):
      z = io_callback(read_ledger, jax.ShapeDtypeStruct((), jnp.float32), 0.0, ordered=True)
      return jax.tree.map(lambda u: u + z, updates), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  private = dpfl.make_private(loss_fn, optax.chain(probe(), optax.sgd(0.1)), l2_clip_norm=1.0,
                              delta=1e-5, dataset_size=N, batch_size=20, noise_multiplier=1.0,
                              num_steps=5, checkpoint_dir=tmp_path / "run")
  state, step = private.init(PARAMS), private.make_step()
  data = _data()
  for i in range(5):  # own loader: the noise transform records the step
    state, _ = step(state, {k: v[:20] for k, v in data.items()}, np.ones(20, bool))
  jax.block_until_ready(state)
  assert seen == [1, 2, 3, 4, 5]


# --- budget ----------------------------------------------------------------------------


def _finished(target=True):
  kwargs = dict(target_epsilon=2.0) if target else dict(noise_multiplier=1.0)
  private = _private(num_steps=6, **kwargs)
  state = _run(private, _data())
  return private, state


@pytest.mark.parametrize("target", [True, False])
def test_every_way_past_the_budget_raises_before_noise(target):
  private, state = _finished(target)
  data = _data()
  assert private.steps_done == 6 and int(state.step) == 6
  spent = private.epsilon()
  with pytest.raises(dpfl.BudgetExhaustedError, match="budget exhausted") as err:
    next(iter(private.batches(data, state)))  # iterating again
  assert err.value.spent == pytest.approx(spent) and err.value.limit == 6
  if target:
    assert err.value.target == 2.0 and "target epsilon=2" in str(err.value)
  with pytest.raises(dpfl.BudgetExhaustedError):
    next(iter(private.batches(data)))  # the (params, opt_state) loop's batches
  with pytest.raises(dpfl.BudgetExhaustedError):
    next(iter(private.batches(data, state, num_steps=1)))
  step = private.make_step()
  batch = {k: v[:20] for k, v in data.items()}
  with pytest.raises(dpfl.BudgetExhaustedError):
    step(state, batch, np.ones(20, bool))  # own loader: refused before the jitted step
  opt_state = state.opt_state
  grads, _ = private.clipped_grad(state.params, batch, mask=np.ones(20, bool))
  with pytest.raises(Exception, match="BudgetExhaustedError|budget exhausted"):
    out = private.optimizer.update(grads, opt_state, state.params)  # the noise step itself
    jax.block_until_ready(out)
  assert private.steps_done == 6 and private.epsilon() == spent


def test_asking_for_more_batches_than_planned_stops_at_the_plan():
  private = _private(noise_multiplier=1.0, num_steps=4)
  state, step = private.init(PARAMS), private.make_step()
  handed = 0
  with pytest.raises(dpfl.BudgetExhaustedError):
    for batch, mask in private.batches(_data(), state, num_steps=200):
      state, _ = step(state, batch, mask)
      handed += 1
  assert handed == 4 and private.steps_done == 4


def test_extend_is_explicit_checked_and_recorded(tmp_path):
  private = _private(noise_multiplier=1.0, num_steps=3, checkpoint_dir=tmp_path)
  state = _run(private, _data())
  private.extend(2)
  assert json.loads((tmp_path / "run.json").read_text())["extra_steps"] == 2
  state = _run(private, _data(), state)
  assert private.steps_done == 5 == int(state.step)
  assert private.epsilon() == pytest.approx(private.plan.epsilon(5), rel=1e-12)
  targeted = _private(target_epsilon=1.0, num_steps=3)
  with pytest.raises(dpfl.BudgetExhaustedError, match="target"):
    targeted.extend(100)
  ftrl = _private(noise_multiplier=1.0, epochs=1, strategy="blt")
  with pytest.raises(ValueError, match="planned rows"):
    ftrl.extend(ftrl.plan.noise.planned_steps + 1)


def test_a_stale_state_cannot_release_its_noise_again():
  private = _private(noise_multiplier=1.0, num_steps=5)
  state0, step = private.init(PARAMS), private.make_step()
  batch = {k: v[:20] for k, v in _data().items()}
  mask = np.ones(20, bool)
  state1, _ = step(state0, batch, mask)
  jax.block_until_ready(state1)
  with pytest.raises(Exception, match="stepped again|release its noise twice"):
    jax.block_until_ready(step(state0, batch, mask))


# --- checkpoints -------------------------------------------------------------------------


def _checkpointed(directory, stop_after, **kwargs):
  """Runs the plan, saving every 2 steps, and stops (a crash) after ``stop_after`` steps.

  Returns the run, its last state and the noise key of its last checkpoint.
  """
  private = _private(checkpoint_dir=directory, **kwargs)
  state, step = private.init(PARAMS), private.make_step()
  saved_key = np.asarray(state.opt_state[0].key)
  for i, (batch, mask) in enumerate(private.batches(_data(), state)):
    state, _ = step(state, batch, mask)
    if int(state.step) % 2 == 0:
      private.save(directory, state)
      saved_key = np.asarray(state.opt_state[0].key)
    if i + 1 == stop_after:
      break
  return private, state, saved_key


@pytest.mark.parametrize("kwargs", [
    dict(target_epsilon=3.0, num_steps=9),
    dict(noise_multiplier=1.0, epochs=1, strategy="blt"),
    dict(noise_multiplier=1.0, epochs=1, strategy="banded", sampling_scheme="poisson"),
], ids=["dp-sgd", "blt", "amplified-banded"])
def test_resume_gives_the_uninterrupted_epsilon_and_parameters(tmp_path, kwargs):
  key, seed = 7, 99
  full = _private(key=key, seed=seed, **kwargs)
  reference = _run(full, _data())
  planned = full.plan.num_steps
  # A clean stop at a checkpoint, resumed with the key the uninterrupted run
  # had there (keys fixed for the test): the same parameters.
  _, _, saved_key = _checkpointed(tmp_path / "clean", 2, key=key, seed=seed, **kwargs)
  resumed = _private(key=key, seed=seed, **kwargs)
  state = _run(resumed, _data(), resumed.restore(tmp_path / "clean", PARAMS, key=saved_key))
  for leaf, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(leaf, ref, rtol=1e-5, atol=1e-6)
  assert int(state.step) == planned == resumed.steps_done
  assert resumed.epsilon() == pytest.approx(full.epsilon(), rel=1e-12)
  # A crash one step after the checkpoint: that step counts as done, fresh keys.
  _checkpointed(tmp_path / "crash", 3, key=key, seed=seed, **kwargs)
  resumed = _private(key=key, seed=seed, **kwargs)
  state = resumed.restore(tmp_path / "crash", PARAMS)
  assert int(state.step) == 3
  state = _run(resumed, _data(), state)
  assert int(state.step) == planned == resumed.steps_done
  assert resumed.epsilon() == pytest.approx(full.epsilon(), rel=1e-12)


def test_restore_gives_fresh_keys_and_keeps_the_cyclic_order(tmp_path):
  kwargs = dict(noise_multiplier=1.0, epochs=2, strategy="blt", seed=5)
  private, state, _ = _checkpointed(tmp_path, 4, **kwargs)
  saved_key = np.asarray(state.opt_state[0].key)
  order = [private.sampler.draw(private.sampler.seed, t).indices for t in range(8)]
  keys = []
  for _ in range(2):
    again = _private(**kwargs)
    restored = again.restore(tmp_path, PARAMS)
    keys.append(np.asarray(restored.opt_state[0].key))
    assert int(restored.step) == 4
    seed = np.asarray(restored.sampler_seed)
    assert [again.sampler.draw(seed, t).indices.tolist() for t in range(8)] == \
        [o.tolist() for o in order]
  assert not np.array_equal(keys[0], saved_key) and not np.array_equal(keys[1], saved_key)
  assert not np.array_equal(keys[0], keys[1])


def test_restore_refuses_another_plan_and_a_reused_key(tmp_path):
  _checkpointed(tmp_path, 3, noise_multiplier=1.0, num_steps=6)
  other = _private(noise_multiplier=1.1, num_steps=6)
  with pytest.raises(ValueError, match="different plan: noise_multiplier"):
    other.restore(tmp_path, PARAMS)
  other = _private(noise_multiplier=1.0, num_steps=6, batch_size=25)
  with pytest.raises(ValueError, match="different plan: sampling"):
    other.restore(tmp_path, PARAMS)
  same = _private(noise_multiplier=1.0, num_steps=6)
  same.restore(tmp_path, PARAMS, key=123)
  with pytest.raises(ValueError, match="already used"):
    _private(noise_multiplier=1.0, num_steps=6).restore(tmp_path, PARAMS, key=123)
  fresh = _private(noise_multiplier=1.0, num_steps=6, checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="already holds a run"):
    fresh.init(PARAMS)


def test_user_level_runs_resume(tmp_path):
  users = dpfl.UserDataset.from_arrays(_data(), np.arange(N) % 40, examples_per_user=5)
  for unit, extra in (("user", dict(local_steps=2, local_learning_rate=0.1)),
                      ("example", {})):
    directory = tmp_path / unit
    kwargs = dict(privacy_unit="user", sampling_unit=unit, dataset=users, batch_size=8,
                  target_epsilon=4.0, num_steps=6, l2_clip_norm=1.0, delta=1e-5, **extra)
    private = dpfl.make_private(loss_fn, optax.sgd(0.5), checkpoint_dir=directory, **kwargs)
    state, step = private.init(PARAMS), private.make_step()
    for i, (batch, mask) in enumerate(private.batches(users, state)):
      state, _ = step(state, batch, mask)
      if i == 2:
        private.save(directory, state)
      if i == 3:
        break
    resumed = dpfl.make_private(loss_fn, optax.sgd(0.5), **kwargs)
    state = resumed.restore(directory, PARAMS)
    assert int(state.step) == 4
    step = resumed.make_step()
    for batch, mask in resumed.batches(users, state):
      state, _ = step(state, batch, mask)
    assert int(state.step) == 6 == resumed.steps_done
    assert resumed.epsilon() == pytest.approx(resumed.planned_epsilon(), rel=1e-12)
    assert resumed.epsilon() <= 4.0


def test_a_crash_before_the_first_checkpoint_can_be_resumed_twice(tmp_path):
  # Killed after make_private attached the ledger but before init saved the
  # step-0 checkpoint; then killed again after 3 DP-FTRL steps.
  kwargs = dict(noise_multiplier=1.0, epochs=1, strategy="blt", checkpoint_dir=tmp_path)
  _private(**kwargs)  # the first process dies here
  second = _private(**kwargs)
  state, step = second.restore(tmp_path, PARAMS), second.make_step()
  for i, (batch, mask) in enumerate(second.batches(_data(), state)):
    state, _ = step(state, batch, mask)
    if i == 2:
      break
  third = _private(**kwargs)
  state = _run(third, _data(), third.restore(tmp_path, PARAMS))
  assert int(state.step) == third.plan.num_steps == third.steps_done
  assert third.epsilon() == pytest.approx(third.planned_epsilon(), rel=1e-12)


@pytest.mark.parametrize("crash_at", [1, 5])
def test_restore_rolls_the_noise_buffers_to_the_released_steps(tmp_path, crash_at):
  # Crashed after the step-0 checkpoint (of a second init) or 3 steps after
  # the step-2 one: the restored BLT buffers are those the live run had after
  # its released steps.
  kwargs = dict(noise_multiplier=1.0, epochs=2, strategy="blt", checkpoint_dir=tmp_path)
  live = _private(**kwargs)
  live.init(PARAMS)
  state, step = live.init(PARAMS), live.make_step()  # the second init is the one used
  for i, (batch, mask) in enumerate(live.batches(_data(), state)):
    state, _ = step(state, batch, mask)
    if int(state.step) == 2:
      live.save(tmp_path, state)
    if int(state.step) == crash_at:
      break
  resumed = _private(**kwargs)
  restored = resumed.restore(tmp_path, PARAMS)
  assert int(restored.step) == crash_at
  live_noise, restored_noise = state.opt_state[0], restored.opt_state[0]
  assert int(restored_noise.count) == int(live_noise.count) == crash_at
  assert len(live_noise.buffers) > 0
  for a, b in zip(jax.tree.leaves(live_noise.buffers), jax.tree.leaves(restored_noise.buffers)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
  assert not np.array_equal(np.asarray(restored_noise.key), np.asarray(live_noise.key))
