"""dpfl.data.UserDataset: grouping, capping, padding, dropped users, errors."""

import numpy as np
import pytest

from dpfl.data import UserDataset, from_arrays, from_dict


def _brute_groups(ids, rows):
  """{user: [row values in input order]} by a plain loop."""
  groups = {}
  for i, r in zip(ids, rows):
    groups.setdefault(i, []).append(r)
  return groups


def test_from_arrays_keeps_first_k_in_order_and_pads_with_mask():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 12, size=200)
  rows = np.arange(200)
  data = {"row": rows, "x": rng.normal(size=(200, 3)).astype(np.float32)}
  ds = UserDataset.from_arrays(data, ids, examples_per_user=5)
  groups = _brute_groups(ids.tolist(), rows.tolist())
  assert ds.user_ids.tolist() == sorted(groups)
  assert ds.data["row"].shape == (len(groups), 5) and ds.data["x"].shape == (len(groups), 5, 3)
  for u, uid in enumerate(ds.user_ids.tolist()):
    expected = groups[uid][:5]
    got = ds.data["row"][u][ds.mask[u]].tolist()
    assert got == expected
    assert ds.mask[u].tolist() == [True] * len(expected) + [False] * (5 - len(expected))
    np.testing.assert_array_equal(ds.data["x"][u][ds.mask[u]], data["x"][expected])
    assert np.all(ds.data["x"][u][~ds.mask[u]] == 0)  # padding is zeros
  assert ds.num_examples == sum(min(5, len(g)) for g in groups.values())
  assert ds.num_dropped_examples == 200 - ds.num_examples
  assert ds.num_dropped_users == 0


def test_random_selection_is_a_seeded_subset_in_input_order():
  ids = np.repeat(np.arange(4), 50)
  rows = np.arange(200)
  a = from_arrays(rows, ids, examples_per_user=7, selection="random", seed=3)
  b = from_arrays(rows, ids, examples_per_user=7, selection="random", seed=3)
  c = from_arrays(rows, ids, examples_per_user=7, selection="random", seed=4)
  np.testing.assert_array_equal(a.data, b.data)
  assert not np.array_equal(a.data, c.data)
  for u in range(4):
    kept = a.data[u].tolist()
    assert kept == sorted(kept) and len(set(kept)) == 7
    assert all(50 * u <= r < 50 * (u + 1) for r in kept)
  # Not simply the first 7: over 4 users that would happen w.p. (1/C(50,7))^4.
  assert a.data[:, -1].max() > 7


def test_random_selection_is_uniform():
  # Each of a user's 10 examples is kept w.p. k/n = 0.3; 2000 users give
  # 2000 Bernoulli(0.3) draws per position: 6-sigma bound, false failure < 1e-8.
  ids = np.repeat(np.arange(2000), 10)
  ds = from_arrays(np.tile(np.arange(10), 2000), ids, examples_per_user=3,
                   selection="random", seed=0)
  freq = np.bincount(ds.data.reshape(-1), minlength=10) / 2000
  assert np.all(np.abs(freq - 0.3) < 6 * np.sqrt(0.3 * 0.7 / 2000))


def test_from_dict_drops_and_counts_empty_users():
  mapping = {"carol": {"x": np.ones((3, 2))}, "alice": {"x": np.zeros((0, 2))},
             "bob": {"x": np.arange(10.0).reshape(5, 2)}, "dave": {"x": np.zeros((0, 2))}}
  ds = from_dict(mapping, examples_per_user=4)
  assert ds.user_ids.tolist() == ["bob", "carol"]  # sorted, empty users dropped
  assert ds.num_dropped_users == 2
  assert ds.num_dropped_examples == 1
  assert ds.counts.tolist() == [4, 3]
  np.testing.assert_array_equal(ds.data["x"][0], np.arange(8.0).reshape(4, 2))


def test_from_arrays_counts_population_users_without_examples():
  ds = from_arrays(np.arange(6), [5, 5, 7, 7, 7, 9], examples_per_user=2, users=range(12))
  assert ds.num_users == 3 and ds.num_dropped_users == 9
  with pytest.raises(ValueError, match="users"):
    from_arrays(np.arange(3), [1, 2, 99], examples_per_user=2, users=[1, 2])


def test_gather_users_and_examples():
  ds = from_arrays({"v": np.arange(7)}, [0, 0, 1, 2, 2, 2, 2], examples_per_user=3)
  batch, mask = ds.gather_users(np.array([2, 0, 0]), np.array([True, True, False]))
  assert batch["v"].shape == (3, 3)
  assert mask.tolist() == [[True, True, True], [True, True, False], [False] * 3]
  assert batch["v"][0].tolist() == [3, 4, 5]
  flat, user = ds.examples()
  assert flat["v"].tolist() == [0, 1, 2, 3, 4, 5] and user.tolist() == [0, 0, 1, 2, 2, 2]
  assert ds.subset([2, 0]).user_ids.tolist() == [2, 0]


def test_mixed_type_ids_keep_identity_and_type():
  # numpy would turn [1, '1'] into two equal strings: one user instead of two.
  ds = from_arrays(np.arange(4), [1, "1", "a", "a"], examples_per_user=3)
  assert ds.num_users == 3
  assert [(type(u), u) for u in ds.user_ids.tolist()] == [(int, 1), (str, "1"), (str, "a")]
  assert ds.counts.tolist() == [1, 1, 2]
  # Ids that do not compare keep their order of first appearance.
  rng = np.random.default_rng(1)
  pool = [1, "1", 2, "b", (1, 2), b"1"]
  ids = [pool[i] for i in rng.integers(0, len(pool), size=60)]
  ds = from_arrays(np.arange(60), ids, examples_per_user=100)
  groups = _brute_groups(ids, range(60))
  assert [(type(u), u) for u in ds.user_ids.tolist()] == [(type(u), u) for u in groups]
  for u, uid in enumerate(ds.user_ids.tolist()):
    assert ds.data[u][ds.mask[u]].tolist() == groups[uid]


def test_mixed_numeric_ids_are_dict_keys_and_sorted():
  # 1 and 1.0 are one dict key, hence one user; comparable ids are sorted.
  ds = from_arrays(np.arange(5), [3, 1.0, 1, 2.5, 3], examples_per_user=3)
  assert ds.user_ids.tolist() == [1, 2.5, 3]
  assert [r[m].tolist() for r, m in zip(ds.data, ds.mask)] == [[1, 2], [3], [0, 4]]


def test_from_dict_keeps_id_types():
  ds = from_dict({1: np.ones(2), "a": np.zeros(3), "1": np.zeros(1)}, examples_per_user=3)
  assert [(type(u), u) for u in ds.user_ids.tolist()] == [(int, 1), (str, "a"), (str, "1")]
  assert ds.counts.tolist() == [2, 3, 1]


def test_population_with_mixed_type_ids():
  ds = from_arrays(np.arange(3), [1, "1", 1], examples_per_user=2, users=[1, "1", "2"])
  assert ds.num_users == 2 and ds.num_dropped_users == 1
  with pytest.raises(ValueError, match="listed in users"):
    from_arrays(np.arange(3), [1, "1", 1], examples_per_user=2, users=[1, 2])


@pytest.mark.parametrize("call,match", [
    (lambda: from_arrays(np.arange(5), np.arange(4), examples_per_user=2), "user_ids"),
    (lambda: from_arrays(np.arange(5), np.zeros((5, 1)), examples_per_user=2), "user_ids"),
    (lambda: from_arrays(np.arange(5), np.arange(5), examples_per_user=0), "examples_per_user"),
    (lambda: from_arrays(np.arange(5), np.arange(5), examples_per_user=1.5), "examples_per_user"),
    (lambda: from_arrays(np.zeros((0, 3)), np.zeros(0), examples_per_user=2), "empty"),
    (lambda: from_arrays({}, [], examples_per_user=2), "data"),
    (lambda: from_arrays({"a": np.ones(3), "b": np.ones(4)}, [0, 1, 2], examples_per_user=1),
     "leading"),
    (lambda: from_arrays(np.ones(3), [0, 1, 2], examples_per_user=1, selection="last"),
     "selection"),
    (lambda: from_dict({}, examples_per_user=2), "mapping"),
    (lambda: from_dict({"a": np.zeros((0, 2))}, examples_per_user=2), "empty"),
    (lambda: from_dict({"a": np.ones(2)}, examples_per_user=-1), "examples_per_user"),
    (lambda: from_dict({"a": np.ones((2, 3)), "b": np.ones((2, 4))}, examples_per_user=2),
     "shapes"),
    # None and NaN name no user (NaN != NaN): a clear error, not a numpy
    # TypeError or every NaN silently made one user.
    (lambda: from_arrays(np.arange(3), [None, 1, 1], examples_per_user=1), "user_ids.*None"),
    (lambda: from_arrays(np.arange(3), ["a", None, "a"], examples_per_user=1),
     "user_ids.*None"),
    (lambda: from_arrays(np.arange(3), [np.nan, np.nan, 1.0], examples_per_user=1),
     "user_ids.*NaN"),
    (lambda: from_arrays(np.arange(3), np.array([np.nan, 2.0, np.nan]), examples_per_user=1),
     "user_ids.*NaN"),
    (lambda: from_arrays(np.arange(3), ["a", float("nan"), 1], examples_per_user=1),
     "user_ids.*NaN"),
    (lambda: from_arrays(np.arange(3), [[1], [2], [1]], examples_per_user=1), "user_ids.*hash"),
    (lambda: from_arrays(np.arange(2), [1, 2], examples_per_user=1, users=[1, 2, None]),
     "users.*None"),
    (lambda: from_dict({None: np.ones(2), "a": np.ones(1)}, examples_per_user=1),
     "mapping.*None"),
    (lambda: from_dict({float("nan"): np.ones(2)}, examples_per_user=1), "mapping.*NaN"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()
