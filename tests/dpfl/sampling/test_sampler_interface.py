"""The one sampler interface: pure draws, seeds, positions, descriptions (every sampler)."""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest

import dpfl
from dpfl import sampling

SAMPLERS = {
    "poisson_truncated": lambda seed: sampling.PoissonSampler(
        200, sampling_prob=0.1, max_batch_size=15, seed=seed),
    "poisson_padded": lambda seed: sampling.PoissonSampler(
        200, sampling_prob=0.1, max_batch_size=15, truncate=False, seed=seed),
    "shuffle": lambda seed: sampling.ShuffledSampler(103, batch_size=10, seed=seed),
    "cyclic": lambda seed: sampling.CyclicSampler(103, batch_size=10, multiple_of=4, seed=seed),
    "cyclic_poisson": lambda seed: sampling.CyclicPoissonSampler(
        200, num_groups=4, sampling_prob=0.2, seed=seed),
    "users": lambda seed: sampling.UserSampler(200, sampling_prob=0.1, multiple_of=4, seed=seed),
    "els": lambda seed: sampling.ElsSampler(200, sampling_prob=0.1, examples_per_user=3,
                                            seed=seed),
}
STEPS = 25  # more than two epochs / cycles of every sampler above

parametrize = pytest.mark.parametrize("make", SAMPLERS.values(), ids=SAMPLERS.keys())


def _same(a, b):
  return all(np.array_equal(x.indices, y.indices) and np.array_equal(x.mask, y.mask)
             for x, y in zip(a, b, strict=True))


def _flat(batches):
  return np.concatenate([b.indices[b.mask] for b in batches])


@parametrize
def test_is_a_sampler_with_consistent_sizes(make):
  s = make(0)
  assert isinstance(s, sampling.Sampler) and isinstance(s, dpfl.Sampler)
  d = s.describe()
  assert json.loads(json.dumps(d)) == d
  assert d["scheme"] in ("poisson", "truncated_poisson", "shuffle", "cyclic", "cyclic_poisson")
  assert d["unit"] in ("example", "user")
  assert d["population_size"] == s.population_size
  assert d["max_batch_size"] == s.max_batch_size
  assert s.expected_batch_size > 0
  batch = s()
  assert batch.indices.shape == batch.mask.shape and batch.mask.dtype == np.bool_
  assert len(batch.mask) % s.max_batch_size == 0


@parametrize
def test_calls_are_the_draws_of_the_own_seed_in_step_order(make):
  called = make(7)
  sequence = [called() for _ in range(STEPS)]
  assert called.position == STEPS
  fresh = make(7)
  assert _same(sequence, [fresh.draw(fresh.seed, t) for t in range(STEPS)])
  assert _same(sequence, itertools.islice(make(7), STEPS))


@parametrize
def test_draw_is_pure_and_independent_of_call_order(make):
  s = make(7)
  seed, other = s.seed, sampling.sampler_seed(8)
  forward = [s.draw(seed, t) for t in range(STEPS)]
  backward = [s.draw(seed, t) for t in reversed(range(STEPS))][::-1]
  # Interleaving another seed must not leak through any cache.
  interleaved = []
  for t in range(STEPS):
    s.draw(other, STEPS - t)
    interleaved.append(s.draw(seed, t))
  assert _same(forward, backward) and _same(forward, interleaved)
  assert s.position == 0 and s.num_overflows == 0 and s.num_truncated == 0
  assert _same(forward, [s.draw(7, t) for t in range(STEPS)])  # an int seed works too


@parametrize
def test_rebuilt_sampler_resumes_the_same_batches(make):
  # What resume needs: the same arguments (equal descriptions) and the saved
  # seed and position give exactly the batches the first run would have drawn.
  first = make(None)
  head = [first() for _ in range(12)]
  resumed = make(first.seed)
  assert resumed.describe() == first.describe()
  np.testing.assert_array_equal(resumed.seed, first.seed)
  resumed.position = first.position
  assert _same([first() for _ in range(13)], [resumed() for _ in range(13)])
  restarted = make(first.seed)
  assert _same(head, [restarted() for _ in range(12)])


@parametrize
def test_different_seeds_give_different_batches(make):
  def run(seed):
    s = make(seed)
    return _flat([s() for _ in range(STEPS)])
  assert not np.array_equal(run(1), run(2))
  assert not np.array_equal(run(None), run(None))  # OS entropy by default
  # All 128 bits count: seeds that differ only in bit 100 (or 127) differ.
  assert not np.array_equal(run(5), run(5 | (1 << 100)))
  assert not np.array_equal(run(5), run(5 | (1 << 127)))


def test_sampler_seed_keeps_all_128_bits():
  value = (0xDEADBEEF << 96) | (0x01234567 << 64) | (0x89ABCDEF << 32) | 0x0BADF00D
  words = sampling.sampler_seed(value)
  assert words.dtype == np.uint32 and words.shape == (4,)
  assert int.from_bytes(words.astype("<u4").tobytes(), "little") == value
  np.testing.assert_array_equal(sampling.sampler_seed(2**128 - 1), [2**32 - 1] * 4)
  np.testing.assert_array_equal(sampling.sampler_seed(np.uint64(3)), [3, 0, 0, 0])
  array = np.array([1, 2, 3, 4], np.uint32)
  taken = sampling.sampler_seed(array)
  np.testing.assert_array_equal(taken, array)
  taken[0] = 9  # a copy: the caller's array is not shared
  assert array[0] == 1
  np.testing.assert_array_equal(sampling.sampler_seed(jnp.asarray(array)), array)
  fresh = [sampling.sampler_seed() for _ in range(2)]
  assert fresh[0].shape == (4,) and not np.array_equal(*fresh)


@pytest.mark.parametrize("seed", [-1, 2**128, True, 1.0, np.float64(2), "7",
                                  np.array([1, 2, 3, 4], np.int64),
                                  np.array([1, 2, 3], np.uint32), [1, 2, 3, 4]])
def test_sampler_seed_refuses_bad_seeds(seed):
  with pytest.raises(ValueError, match=r"^seed must be None \(OS entropy\), an integer in "
                                       r"\[0, 2\*\*128\) or a uint32 array of shape \(4,\), got"):
    sampling.sampler_seed(seed)
  with pytest.raises(ValueError, match=r"^seed must be"):
    sampling.PoissonSampler(10, sampling_prob=0.5, seed=seed)


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_draw_and_position_refuse_bad_steps(step):
  s = sampling.ShuffledSampler(10, batch_size=2, seed=0)
  with pytest.raises(ValueError, match=r"^step must be an integer >= 0, got"):
    s.draw(s.seed, step)
  with pytest.raises(ValueError, match=r"^position must be an integer >= 0, got"):
    s.position = step
  with pytest.raises(ValueError, match=r"^seed must be given"):
    s.draw(None, 0)


def test_steps_may_be_numpy_or_jax_integers():
  # A training state's step count may be a numpy or jax scalar.
  s = sampling.ShuffledSampler(10, batch_size=2, seed=0)
  expected = s.draw(s.seed, 3).indices
  for step in (np.int64(3), np.array(3, np.int32), jnp.asarray(3)):
    np.testing.assert_array_equal(s.draw(s.seed, step).indices, expected)
  s.position = jnp.asarray(3)
  assert s.position == 3 and type(s.position) is int
  np.testing.assert_array_equal(s().indices, expected)


def test_top_level_names():
  for name in ["Sampler", "PoissonSampler", "ShuffledSampler", "CyclicSampler",
               "CyclicPoissonSampler", "UserSampler", "ElsSampler", "Batch", "gather"]:
    assert getattr(dpfl, name) is getattr(sampling, name)
