"""Issue 11, section 3 (training side): every bad input is a clear ValueError, fast.

Each test here failed before its fix: the input was accepted (and then ran
out of memory, ran for minutes, reported too small an ε, trained on the wrong
rows or released ±inf updates), or the same value was accepted by one entry
point and rejected by another.
"""

import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accounting
import dpfl
from dpfl import sampling
from dpfl.data import UserDataset
from dpfl import mf
from dpfl.mf import streaming
from dpfl.scaling import sweep


def loss_fn(params, batch):
  return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


PARAMS = {"w": jnp.zeros(3)}
BASE = dict(l2_clip_norm=1.0, batch_size=10, delta=1e-5, dataset_size=100)


def _data(n):
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(n, 3)).astype(np.float32),
          "y": rng.normal(size=n).astype(np.float32)}


def _users(num_examples=120, num_users=20, k=6):
  rng = np.random.default_rng(1)
  data = _data(num_examples)
  return UserDataset.from_arrays(data, rng.integers(0, num_users, num_examples),
                                 examples_per_user=k)


# --- 1. run length and target ε the accountant cannot answer in seconds --------


@pytest.mark.parametrize("privacy_unit", ["example", "user"])
def test_num_steps_beyond_the_accountable_range_is_refused(privacy_unit):
  # 1e9 steps: the composed PLD grid alone needs ~20 GB (planned_epsilon was killed).
  start = time.monotonic()
  with pytest.raises(ValueError, match=r"^num_steps must be an integer in \[1, \d+\], "
                                       r"got 1000000000"):
    dpfl.make_private(loss_fn, optax.sgd(0.1), noise_multiplier=1.0, num_steps=10**9,
                      privacy_unit=privacy_unit, **BASE)
  assert time.monotonic() - start < 30


def test_epochs_beyond_the_accountable_range_are_refused():
  # 1e8 epochs of 10 batches: 1e9 steps, named as the steps they make.
  with pytest.raises(ValueError, match=r"^num_steps \(from epochs=100000000\) must be an "
                                       r"integer in \[1, "):
    dpfl.make_private(loss_fn, optax.sgd(0.1), noise_multiplier=1.0, epochs=10**8, **BASE)


@pytest.mark.parametrize("privacy_unit", ["example", "user"])
def test_target_epsilon_beyond_the_calibrated_range_is_refused(privacy_unit):
  # target_epsilon=1e6 calibrated for 278 s before.
  start = time.monotonic()
  with pytest.raises(ValueError, match=r"^target_epsilon must be in \(0, 128\], got 1000000"):
    dpfl.make_private(loss_fn, optax.sgd(0.1), target_epsilon=1e6, num_steps=100,
                      privacy_unit=privacy_unit, **BASE)
  assert time.monotonic() - start < 30


# --- 2. a dataset with a larger cap than the ε was planned for ------------------


@pytest.mark.parametrize("sampling_unit", ["example", "user"])
def test_dataset_cap_above_examples_per_user_is_refused_at_construction(sampling_unit):
  users = _users(k=6)
  assert users.examples_per_user == 6
  with pytest.raises(ValueError, match=r"^examples_per_user must be >= the dataset's cap \(6\)"
                                       r".*got 2"):
    dpfl.make_private(loss_fn, optax.sgd(0.1), privacy_unit="user",
                      sampling_unit=sampling_unit, examples_per_user=2, dataset=users,
                      l2_clip_norm=1.0, batch_size=5, delta=1e-5, noise_multiplier=1.0,
                      num_steps=3)


def test_dataset_cap_at_or_below_examples_per_user_is_accepted():
  users = _users(k=6)
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), privacy_unit="user",
                              sampling_unit="example", examples_per_user=6, dataset=users,
                              l2_clip_norm=1.0, batch_size=5, delta=1e-5,
                              noise_multiplier=1.0, num_steps=3)
  assert private.mechanism.examples_per_user == 6


# --- 3. batches() from a dataset of another size than planned -------------------


@pytest.mark.parametrize("options", [dict(), dict(sampling_scheme="shuffle"),
                                     dict(strategy="identity")],
                         ids=["poisson", "shuffle", "cyclic-ftrl"])
@pytest.mark.parametrize("size", [99, 101])
def test_batches_refuse_a_dataset_of_another_size(options, size):
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), noise_multiplier=1.0, num_steps=3,
                              **BASE, **options)
  with pytest.raises(ValueError, match=rf"^dataset has {size} examples but the run was "
                                       r"planned .*dataset_size=100"):
    next(private.batches(_data(size)))
  assert len(private.ledger.entries) == 0  # nothing drawn, nothing recorded
  batch, mask = next(private.batches(_data(100)))  # the planned size still works
  assert mask.shape[0] == batch["x"].shape[0]


def test_batches_refuse_a_sequence_of_another_size():
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), noise_multiplier=1.0, num_steps=3,
                              **BASE)
  rows = [{"x": np.zeros(3, np.float32), "y": np.float32(0)}] * 150
  with pytest.raises(ValueError, match=r"^dataset has 150 examples"):
    next(private.batches(rows))


@pytest.mark.parametrize("sampling_unit", ["example", "user"])
def test_user_level_batches_refuse_a_dataset_of_another_size(sampling_unit):
  planned, other = _users(num_users=20), _users(num_examples=200, num_users=40)
  private = dpfl.make_private(loss_fn, optax.sgd(0.1), privacy_unit="user",
                              sampling_unit=sampling_unit, dataset=planned, l2_clip_norm=1.0,
                              batch_size=5, delta=1e-5, noise_multiplier=1.0, num_steps=3)
  with pytest.raises(ValueError, match=r"must equal dataset_size"):
    next(private.batches(other))


# --- 4. noise scales that are not normal float32 numbers ------------------------


@pytest.mark.parametrize("kwargs,names", [
    (dict(noise_multiplier=1e10, l2_clip_norm=1e300, expected_batch_size=10.0),
     r"noise_multiplier \* l2_clip_norm"),
    (dict(noise_multiplier=1e10, l2_clip_norm=1e30, expected_batch_size=10.0),  # > float32
     r"noise_multiplier \* l2_clip_norm"),
    (dict(noise_multiplier=1e-30, l2_clip_norm=1e-20, expected_batch_size=1.0),  # 0 in float32
     r"noise_multiplier \* l2_clip_norm"),
    (dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1e-320),
     r"\(noise_multiplier \* l2_clip_norm\) / expected_batch_size"),
    (dict(noise_multiplier=1.0, l2_clip_norm=1e-30, expected_batch_size=1e20),
     r"\(noise_multiplier \* l2_clip_norm\) / expected_batch_size"),
    (dict(noise_multiplier=1.0, l2_clip_norm=1e-30, expected_batch_size=1e-39),
     r"expected_batch_size"),
])
def test_noise_scale_outside_float32_is_refused(kwargs, names):
  with pytest.raises(ValueError, match=rf"^{names} .*must be in \[.*\] \(normal float32"):
    dpfl.gaussian_noise(**kwargs, key=0)
  with pytest.raises(ValueError, match=r"must be in \[.*\] \(normal float32"):
    streaming.blt_noise(buffer_decay=[0.5], output_scale=[0.1], num_steps=4, key=0,
                        sensitivity=1.0, **kwargs)


def test_make_private_refuses_an_overflowing_noise_scale():
  with pytest.raises(ValueError, match=r"^noise_multiplier \* l2_clip_norm"):
    dpfl.make_private(loss_fn, optax.sgd(0.1), noise_multiplier=1e10, num_steps=3,
                      **{**BASE, "l2_clip_norm": 1e300})


def test_a_normal_noise_scale_gives_finite_updates():
  # The bounds are not too tight: a large but representable scale stays finite.
  noise = dpfl.gaussian_noise(noise_multiplier=1e10, l2_clip_norm=1e20,
                              expected_batch_size=1.0, key=0)
  updates, _ = noise.update(PARAMS, noise.init(PARAMS))
  assert np.all(np.isfinite(np.asarray(updates["w"])))


# --- 5. numpy scalars and 0-d arrays are numbers everywhere ---------------------

KINDS = {
    "python": lambda v: v,
    "np.int64": lambda v: np.int64(v) if float(v).is_integer() else np.float64(v),
    "np.float32": np.float32,
    "np.array": np.array,
}


def _make_private(**overrides):
  kwargs = dict(noise_multiplier=1.0, num_steps=3, **BASE)
  kwargs.update(overrides)
  return dpfl.make_private(loss_fn, optax.sgd(0.1), **kwargs)


def _make_private_user(**overrides):
  kwargs = dict(noise_multiplier=1.0, num_steps=3, privacy_unit="user",
                sampling_unit="example", examples_per_user=2, **BASE)
  kwargs.update(overrides)
  return dpfl.make_private(loss_fn, optax.sgd(0.1), **kwargs)


def _gaussian_noise(**overrides):
  kwargs = dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=10, key=0)
  kwargs.update(overrides)
  return dpfl.gaussian_noise(**kwargs)


def _blt_noise(**overrides):
  kwargs = dict(noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=10, key=0,
                sensitivity=1.0, buffer_decay=[0.5], output_scale=[0.1], num_steps=4)
  kwargs.update(overrides)
  return streaming.blt_noise(**kwargs)


# (entry point, argument, an accepted value, a rejected value, the message's range)
CASES = [
    (_make_private, "dataset_size", 1000, 0, r"an integer >= 1"),
    (_make_private, "batch_size", 10, 0, r"an integer in \[1, 100\]"),
    (_make_private, "num_steps", 3, 0, r"an integer in \[1, \d+\]"),
    (_make_private, "delta", 1e-5, 1, r"in \(0, 1\)"),
    (_make_private, "noise_multiplier", 1, -1, r"a finite number > 0"),
    (_make_private, "target_epsilon", 8, 0, r"in \(0, 128\]"),
    (_make_private, "l2_clip_norm", 1, 0, r"a finite number > 0"),
    (_make_private, "epochs", 1, 0, r"a finite number > 0"),
    (_make_private_user, "dataset_size", 1000, 0, r"an integer >= 1"),
    (_make_private_user, "examples_per_user", 2, 0, r"an integer >= 1"),
    (_make_private_user, "delta", 1e-5, 1, r"in \(0, 1\)"),
    (_make_private_user, "noise_multiplier", 1, 0, r"a finite number > 0"),
    (_make_private_user, "num_steps", 3, 0, r"an integer in \[1, \d+\]"),
    (lambda **kw: dpfl.clipped_grad(loss_fn, **kw), "l2_clip_norm", 1, 0,
     r"a finite number > 0"),
    (lambda **kw: dpfl.clipped_grad(loss_fn, l2_clip_norm=1.0, **kw), "microbatch_size", 2, 0,
     r"an integer >= 1"),
    (_gaussian_noise, "noise_multiplier", 1, -1, r"a finite number > 0"),
    (_gaussian_noise, "l2_clip_norm", 1, 0, r"a finite number > 0"),
    (_gaussian_noise, "expected_batch_size", 10, 0, r"a finite number > 0"),
    (_blt_noise, "noise_multiplier", 1, -1, r"a finite number > 0"),
    (_blt_noise, "num_steps", 4, 0, r"an integer >= 1"),
    (lambda **kw: sampling.PoissonSampler(sampling_prob=0.1, **kw), "dataset_size", 100, 0,
     r"an integer >= 1"),
    (lambda **kw: sampling.PoissonSampler(100, **kw), "sampling_prob", 1, 0,
     r"in \(0, 1\]"),
    (lambda **kw: sampling.ShuffledSampler(100, **kw), "batch_size", 10, 0, r"an integer >= 1"),
    (lambda **kw: sampling.CyclicSampler(100, **kw), "batch_size", 10, 0,
     r"an integer >= 1"),
    (lambda **kw: sampling.ElsSampler(100, sampling_prob=0.1, **kw),
     "examples_per_user", 2, 0, r"an integer >= 1"),
    (lambda **kw: UserDataset.from_arrays(_data(10), np.arange(10), **kw),
     "examples_per_user", 2, 0, r"an integer >= 1"),
    (lambda **kw: sampling.default_max_batch_size(100, 0.1, **kw), "truncation_prob", 1e-9, 1,
     r"in \(0, 1\)"),
    (lambda **kw: _run_config(**kw), "batch_size", 8, 0, r"an integer >= 1"),
    (lambda **kw: _run_config(**kw), "delta", 1e-6, 0, r"in \(0, 1\)"),
    (lambda **kw: _run_config(**kw), "l2_clip_norm", 1, 0, r"a finite number > 0"),
    (lambda **kw: mf.Workload(**kw), "num_steps", 8, 0, r"an integer >= 1"),
]


def _run_config(**overrides):
  kwargs = dict(model="s50k", batch_size=8, noise_multiplier=1.0, steps=10, learning_rate=0.1)
  kwargs.update(overrides)
  return sweep.RunConfig(**kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry,name,good,bad,allowed", CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_same_value_same_verdict_for_every_number_type(entry, name, good, bad, allowed, kind):
  overrides = {name: KINDS[kind](good)}
  if name == "target_epsilon":
    overrides["noise_multiplier"] = None
  if name == "epochs":
    overrides["num_steps"] = None
  entry(**overrides)  # accepted as the Python number is
  overrides[name] = KINDS[kind](bad)
  with pytest.raises(ValueError, match=rf"^{name}( \([^)]*\))? must be {allowed}, got "):
    entry(**overrides)


@pytest.mark.parametrize("entry,name", [(_make_private, "dataset_size"),
                                        (_make_private, "noise_multiplier"),
                                        (_gaussian_noise, "l2_clip_norm")])
@pytest.mark.parametrize("bad", [True, "1", float("nan"), float("inf"), np.array([1.0])])
def test_non_numbers_are_refused(entry, name, bad):
  with pytest.raises(ValueError, match=rf"^{name} must be "):
    entry(**{name: bad})


# --- 6. a ledger of another privacy unit or accountant ---------------------------


def test_example_level_run_refuses_a_user_level_ledger():
  ledger = accounting.Ledger()
  ledger.record(accounting.UlsDpSgd(noise_multiplier=1.0, sampling_prob=0.1, num_steps=2))
  with pytest.raises(ValueError, match=r"^privacy_unit='example' does not match this ledger, "
                                       r"which records 'user'-level privacy"):
    _make_private(ledger=ledger)


def test_user_level_run_refuses_an_example_level_ledger():
  ledger = accounting.Ledger()
  ledger.record(accounting.PoissonDpSgd(noise_multiplier=1.0, sampling_prob=0.1, num_steps=2))
  with pytest.raises(ValueError, match=r"^privacy_unit='user' does not match this ledger, which records "
                                       r"'example'-level privacy"):
    _make_private_user(ledger=ledger, sampling_unit="user", examples_per_user=None)


def test_user_level_rdp_run_refuses_els_entries():
  ledger = accounting.Ledger()
  ledger.record(accounting.ElsDpSgd(noise_multiplier=1.0, sampling_prob=0.1, num_steps=2,
                                    examples_per_user=2))
  with pytest.raises(ValueError, match=r"^accountant must be 'pld' for this ledger: it records els"):
    _make_private_user(ledger=ledger, sampling_unit="user", examples_per_user=None,
                       accountant="rdp")
  # Under PLD the same ledger extends (ELS and ULS are both user-level).
  _make_private_user(ledger=ledger, sampling_unit="user", examples_per_user=None)


def test_ledger_must_be_a_ledger():
  with pytest.raises(ValueError, match=r"^ledger must be an accounting.Ledger, got dict"):
    _make_private(ledger={"entries": []})


def test_numpy_integers_give_the_same_sweep_run_id():
  # Stored as Python ints: the id hashes the config's JSON, which has no np.int64.
  plain = _run_config(batch_size=8, steps=10)
  numpy = _run_config(batch_size=np.int64(8), steps=np.int64(10))
  assert sweep.run_id(numpy, "corpus") == sweep.run_id(plain, "corpus")
