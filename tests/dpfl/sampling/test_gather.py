"""Tests for dpfl.sampling.gather: arrays, pytrees and indexable datasets, padding."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpfl import sampling

INDICES = np.array([3, 1, 0, 0], np.int32)
MASK = np.array([True, True, False, False])


def test_gather_numpy_dict_and_padding_uses_row_zero():
  data = {"x": np.arange(30.0).reshape(10, 3), "y": np.arange(10) * 10}
  out = sampling.gather(data, INDICES, MASK)
  np.testing.assert_array_equal(out["x"], data["x"][[3, 1, 0, 0]])
  np.testing.assert_array_equal(out["y"], [30, 10, 0, 0])


def test_gather_jax_tuple_and_plain_array():
  x, y = jnp.arange(20.0).reshape(10, 2), jnp.arange(10)
  out_x, out_y = sampling.gather((x, y), INDICES, MASK)
  np.testing.assert_array_equal(out_x, np.asarray(x)[[3, 1, 0, 0]])
  np.testing.assert_array_equal(out_y, [3, 1, 0, 0])
  np.testing.assert_array_equal(sampling.gather(np.arange(10) + 5, INDICES, MASK), [8, 6, 5, 5])
  # Masked-out slots may hold any value; they are replaced by row 0.
  np.testing.assert_array_equal(
      sampling.gather(np.arange(10), np.array([2, -7, 99]), np.array([True, False, False])),
      [2, 0, 0])


class _Examples:
  """A torch-style dataset: len() and [i] returning dicts; counts fetches."""

  def __init__(self, size):
    self.size, self.fetched = size, []

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    self.fetched.append(i)
    return {"image": np.full((2, 2), float(i)), "label": np.int32(i)}


def test_gather_custom_indexable_stacks_items_and_skips_padding():
  data = _Examples(10)
  out = sampling.gather(data, INDICES, MASK)
  assert out["image"].shape == (4, 2, 2)
  np.testing.assert_array_equal(out["label"], [3, 1, 0, 0])
  np.testing.assert_array_equal(out["image"][:, 0, 0], [3.0, 1.0, 0.0, 0.0])
  assert sorted(data.fetched) == [0, 1, 3]  # padding fetched once, as the filler


def test_gather_list_of_tuples():
  data = [(np.array([i, i + 1.0]), np.int32(i)) for i in range(10)]
  features, labels = sampling.gather(data, INDICES, MASK)
  assert features.shape == (4, 2)
  np.testing.assert_array_equal(labels, [3, 1, 0, 0])


def test_gather_with_sampler_batch():
  data = {"x": np.arange(50)}
  batch = sampling.PoissonSampler(50, sampling_prob=0.3, seed=4)()
  out = sampling.gather(data, batch.indices, batch.mask)
  np.testing.assert_array_equal(out["x"][batch.mask], batch.indices[batch.mask])
  assert out["x"].shape == batch.indices.shape


@pytest.mark.parametrize("dataset", [np.zeros((0, 3)), {"x": np.zeros((0,))}, [], _Examples(0),
                                     {}])
def test_gather_empty_dataset(dataset):
  with pytest.raises(ValueError, match="dataset must contain"):
    sampling.gather(dataset, np.array([0]), np.array([False]))


@pytest.mark.parametrize("indices,mask,match", [
    (np.array([10]), np.array([True]), "indices must lie"),
    (np.array([-1]), np.array([True]), "indices must lie"),
    (np.array([[0]]), np.array([[True]]), "indices must be a 1-D"),
    (np.array([0.0]), np.array([True]), "indices must be a 1-D"),
    (np.array([0, 1]), np.array([True]), "mask must be"),
    (np.array([0]), np.array([1]), "mask must be"),
])
def test_gather_bad_indices_or_mask(indices, mask, match):
  with pytest.raises(ValueError, match=match):
    sampling.gather(np.arange(10), indices, mask)


def test_gather_mismatched_leading_sizes():
  with pytest.raises(ValueError, match="dataset arrays must share"):
    sampling.gather({"x": np.zeros(5), "y": np.zeros(6)}, np.array([0]), np.array([True]))
