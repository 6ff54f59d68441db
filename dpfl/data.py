"""User-grouped datasets: each user's examples, capped at k, padded to ``[users, k, ...]``.

User-level DP protects everything one user contributed. Both algorithms of
Charles et al. 2024 ("Fine-Tuning Large Language Models with User-Level
Differential Privacy", arXiv 2407.07737) first cap every user at ``k``
examples: ELS's accounting assumes a user holds at most ``k`` examples, and
ULS's per-user computation needs a static shape under ``jit``.

A ``UserDataset`` holds the capped data as numpy arrays of shape
``[num_users, examples_per_user, ...]`` with a bool ``mask`` of shape
``[num_users, examples_per_user]`` (True: a real example; False: padding).
Build one from arrays plus a user-id column (``UserDataset.from_arrays``) or
from a mapping user -> arrays (``UserDataset.from_dict``); for data larger
than memory, ``UserDataset.from_parquet`` keeps the examples in Parquet files
and reads only each batch's rows (``dpfl.parquet_data``).

Which examples a capped user keeps (``selection``):

* ``"first"`` (default): the user's first ``k`` examples in input order.
* ``"random"``: a uniformly random ``k``-subset, drawn with ``seed`` (None:
  OS entropy), kept in input order.

The selection is a function of each user's own examples only, so it costs
no privacy whichever rule is used (it is part of the per-user computation
whose output the mechanism bounds); the seed only makes it reproducible.

User ids keep their identity and type: two ids are the same user exactly
when they are equal as ``dict`` keys, so ``1`` and ``'1'`` are two users
(numpy would turn ``[1, '1']`` into two equal strings; ``1``, ``1.0`` and
``np.int64(1)`` are one user, as they are one key of a dict). Ids must be
hashable and neither None nor NaN (NaN is not equal to itself, so it cannot
name one user). Users are ordered by sorted id when the ids are mutually
comparable, else by first appearance (``from_arrays``) or insertion order
(``from_dict``).

Users with zero examples are dropped and counted in ``num_dropped_users``:
they cannot affect any release, and keeping them would only waste padded
compute.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from accounting import validate as check
from dpfl import _rng

PyTree = Any
SELECTIONS = ("first", "random")


def _check_examples_per_user(value: Any) -> int:
  return check.positive_int("examples_per_user", value)  # the cap k


def _leading_size(data: PyTree, name: str) -> int:
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError(f"{name} must contain at least one array, got an empty pytree {data!r}")
  sizes = set()
  for leaf in leaves:
    if np.ndim(leaf) < 1:
      raise ValueError(f"{name} arrays must have a leading example axis; got a scalar leaf")
    sizes.add(np.shape(leaf)[0])
  if len(sizes) != 1:
    raise ValueError(f"{name} arrays must share one leading (example) size, got sizes "
                     f"{sorted(sizes)}")
  return sizes.pop()


def _object_array(items: list) -> np.ndarray:
  array = np.empty(len(items), dtype=object)
  for i, u in enumerate(items):  # element-wise: tuple ids stay tuples, not rows
    array[i] = u
  return array


def _id_array(ids: Any, name: str) -> np.ndarray:
  """A 1-D array of ids that keeps each id's type.

  A numeric/string dtype only where numpy loses nothing: an array-like with a
  non-object dtype, or a sequence whose ids all have one type. Mixed types
  (``[1, '1']``, which numpy would make two equal strings) stay Python
  objects. Rejects None and NaN ids, naming ``name``.
  """
  if isinstance(ids, (str, bytes, Mapping)):
    raise ValueError(f"{name} must be a 1-D column of ids, got {type(ids).__name__} {ids!r:.80}")
  if isinstance(ids, (list, tuple)):
    items = list(ids)
  else:
    array = np.asarray(ids)
    if array.ndim != 1:
      raise ValueError(f"{name} must be a 1-D column of ids, got shape {array.shape}")
    if array.dtype != object:
      if array.dtype.kind in "fc" and np.isnan(array).any():
        raise ValueError(f"{name} must not contain NaN ids (NaN != NaN, so it names no single "
                         f"user); found {int(np.isnan(array).sum())}")
      if array.dtype.kind in "mM" and np.isnat(array).any():
        raise ValueError(f"{name} must not contain NaT ids; found {int(np.isnat(array).sum())}")
      return array
    items = list(array)
  for u in items:
    if u is None:
      raise ValueError(f"{name} must not contain None ids")
    if isinstance(u, numbers.Number) and u != u:
      raise ValueError(f"{name} must not contain NaN ids (NaN != NaN, so it names no single "
                       f"user); got {u!r}")
  if len({type(u) for u in items}) == 1:
    try:
      array = np.asarray(items)
    except (ValueError, OverflowError):  # ragged tuples, ints beyond 64 bits
      array = None
    if array is not None and array.ndim == 1 and array.dtype != object:
      return array
  return _object_array(items)


def _group_ids(ids: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  """``(unique ids, inverse)`` with ``ids == unique[inverse]``.

  Sorted when the ids compare, else in order of first appearance.
  """
  if ids.dtype != object:
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, inverse.reshape(-1)
  first: dict[Any, int] = {}
  try:
    inverse = np.array([first.setdefault(u, len(first)) for u in ids], dtype=np.int64)
  except TypeError as err:
    raise ValueError(f"{name} must be hashable ids: {err}") from err
  unique = list(first)
  try:
    order = sorted(range(len(unique)), key=unique.__getitem__)
  except TypeError:  # ids that do not compare (e.g. 1 and 'a'): first appearance
    order = list(range(len(unique)))
  rank = np.empty(len(unique), dtype=np.int64)
  rank[order] = np.arange(len(unique))
  return _object_array([unique[i] for i in order]), rank[inverse]


def _kept_rows(inverse: np.ndarray, num_users: int, k: int,
               rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(rows, user, slot)`` of the kept examples: user-major, input order within a user."""
  n = inverse.shape[0]
  # Order examples by user; within a user by input position ("first") or by
  # a random key ("random"); the first k of each user are kept.
  within = np.arange(n) if rng is None else rng.random(n)
  order = np.lexsort((within, inverse))
  counts = np.bincount(inverse, minlength=num_users)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.arange(n) - starts[inverse[order]]
  keep = order[rank < k]
  keep = keep[np.lexsort((keep, inverse[keep]))]  # kept ones back in input order per user
  user = inverse[keep]
  kept_counts = np.minimum(counts, k)
  slot = np.arange(keep.size) - np.concatenate([[0], np.cumsum(kept_counts)[:-1]])[user]
  return keep, user, slot


def cap_users(user_ids: Any, *, examples_per_user: int, selection: str = "first",
              seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The users of an id column and the rows each keeps, as ``from_arrays`` chooses them.

  Args:
    user_ids: ``[n]`` the user of each row (see ``UserDataset.from_arrays``).
    examples_per_user, selection, seed: as in ``UserDataset.from_arrays``.

  Returns:
    ``(ids, rows, counts)``: ``ids [U]`` the users in ``UserDataset`` row
    order; ``rows`` the kept rows (indices into ``user_ids``), user-major and
    in input order within a user (the order of ``UserDataset.examples``);
    ``counts [U]`` kept rows per user (1..k).
  """
  k = _check_examples_per_user(examples_per_user)
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
  ids = _id_array(user_ids, "user_ids")
  if ids.shape[0] == 0:
    raise ValueError("user_ids must hold at least one id, got an empty dataset")
  unique, inverse = _group_ids(ids, "user_ids")
  rng = _rng.numpy_generator(seed) if selection == "random" else None
  rows, user, _ = _kept_rows(inverse, unique.shape[0], k, rng)
  return unique, rows, np.bincount(user, minlength=unique.shape[0])


def user_indices(indices: Any, num_users: int) -> np.ndarray:
  """``indices`` of users, checked (a non-empty 1-D integer array in [-num_users,
  num_users)) and with negative ones wrapped, as ``UserDataset.subset`` takes them."""
  idx = np.asarray(indices)
  if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"indices must be a non-empty 1-D integer array, got {indices!r}")
  if idx.min() < -num_users or idx.max() >= num_users:
    raise ValueError(f"indices must lie in [0, {num_users}), got [{idx.min()}, {idx.max()}]")
  return idx % num_users


@dataclasses.dataclass(frozen=True, eq=False)
class UserDataset:
  """Users' examples, capped at ``examples_per_user`` and padded to a static shape.

  Attributes:
    data: pytree of numpy arrays with leading axes ``[num_users,
      examples_per_user]``; padded slots hold zeros.
    mask: bool ``[num_users, examples_per_user]``, True for real examples.
      Every user has at least one real example.
    user_ids: ``[num_users]`` the users' ids, in row order.
    examples_per_user: the cap k (>= every user's kept count).
    num_dropped_users: users given with zero examples, dropped.
    num_dropped_examples: examples beyond the cap, not kept.
  """

  data: PyTree
  mask: np.ndarray
  user_ids: np.ndarray
  examples_per_user: int
  num_dropped_users: int = 0
  num_dropped_examples: int = 0

  @property
  def num_users(self) -> int:
    return int(self.mask.shape[0])

  @property
  def num_examples(self) -> int:
    """Number of kept (capped) examples, the population ELS samples from."""
    return int(self.mask.sum())

  @property
  def counts(self) -> np.ndarray:
    """``[num_users]`` kept examples per user (1..k)."""
    return self.mask.sum(axis=1)

  # --- building ---------------------------------------------------------------

  @classmethod
  def from_arrays(cls, data: PyTree, user_ids: Any, *, examples_per_user: int,
                  selection: str = "first", seed: int | None = None,
                  users: Sequence[Any] | None = None) -> "UserDataset":
    """Groups examples by a user-id column.

    Args:
      data: pytree of arrays sharing a leading example axis of length n.
      user_ids: ``[n]`` the user of each example: any hashable ids, not None
        or NaN; ids of mixed types keep their type (see the module docstring).
      examples_per_user: the cap k >= 1.
      selection: ``"first"`` or ``"random"`` (see the module docstring).
      seed: for ``selection="random"``: None (OS entropy) or an int.
      users: optionally the whole population of user ids. Users listed here
        without any example are dropped and counted in
        ``num_dropped_users``; every id in ``user_ids`` must be listed.

    Returns:
      A ``UserDataset``.

    Raises:
      ValueError: ``user_ids`` not of length n, ``examples_per_user`` < 1,
        an empty dataset, an unknown ``selection``, ids outside ``users``, or
        None, NaN or unhashable ids in ``user_ids`` or ``users``.
    """
    k = _check_examples_per_user(examples_per_user)
    if selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    n = _leading_size(data, "data")
    ids = _id_array(user_ids, "user_ids")
    if ids.shape[0] != n:
      raise ValueError(f"user_ids must be a 1-D column with one id per example (length {n}, "
                       f"the leading size of data), got shape {ids.shape}")
    if n == 0:
      raise ValueError("data must hold at least one example, got an empty dataset")
    unique, inverse = _group_ids(ids, "user_ids")
    dropped = 0
    if users is not None:
      population, _ = _group_ids(_id_array(users, "users"), "users")
      # Set membership: the same notion of "same id" as the grouping above.
      listed = set(population.tolist())
      unknown = [u for u in unique.tolist() if u not in listed]
      if unknown:
        raise ValueError(f"user_ids must all be listed in users; {len(unknown)} are not, "
                         f"e.g. {unknown[:3]}")
      dropped = int(population.size - unique.size)
    rng = _rng.numpy_generator(seed) if selection == "random" else None
    return cls._build(data, inverse, unique, k, rng, dropped)

  @classmethod
  def from_dict(cls, mapping: Mapping[Any, PyTree], *, examples_per_user: int,
                selection: str = "first", seed: int | None = None) -> "UserDataset":
    """Builds from ``{user_id: pytree of arrays [n_user, ...]}``.

    Users whose arrays have zero rows are dropped and counted. All users'
    pytrees must have the same structure and trailing shapes.

    Args:
      mapping: user id -> that user's examples.
      examples_per_user, selection, seed: as in ``from_arrays``.

    Returns:
      A ``UserDataset``.

    Raises:
      ValueError: an empty mapping, every user empty, ``examples_per_user``
        < 1, users with different structures / shapes, or a None or NaN key.
    """
    k = _check_examples_per_user(examples_per_user)
    if selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not isinstance(mapping, Mapping) or not mapping:
      raise ValueError(f"mapping must be a non-empty mapping user -> arrays, got {mapping!r}")
    keys = list(mapping)
    _id_array(keys, "mapping keys (user ids)")  # rejects None / NaN ids
    try:
      keys = sorted(keys)
    except TypeError:  # ids that do not compare: insertion order
      pass
    sizes = [_leading_size(mapping[u], f"mapping[{u!r}]") for u in keys]
    kept = [u for u, s in zip(keys, sizes) if s > 0]
    if not kept:
      raise ValueError(f"mapping must hold at least one example; all {len(keys)} users have "
                       "zero examples (empty dataset)")
    treedef = jax.tree.structure(mapping[kept[0]])
    for u in kept:
      if jax.tree.structure(mapping[u]) != treedef:
        raise ValueError(f"mapping values must share one structure; user {u!r} has "
                         f"{jax.tree.structure(mapping[u])}, expected {treedef}")
    try:
      data = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]),
                          *[mapping[u] for u in kept])
    except ValueError as err:
      raise ValueError(f"mapping values must have the same trailing shapes: {err}") from err
    counts = [s for s in sizes if s > 0]
    inverse = np.repeat(np.arange(len(kept)), counts)
    ids = _id_array(kept, "mapping keys (user ids)")
    rng = _rng.numpy_generator(seed) if selection == "random" else None
    return cls._build(data, inverse, ids, k, rng, len(keys) - len(kept))

  @classmethod
  def _build(cls, data, inverse: np.ndarray, ids: np.ndarray, k: int,
             rng: np.random.Generator | None, dropped_users: int) -> "UserDataset":
    n, num_users = inverse.shape[0], ids.shape[0]
    keep, user, slot = _kept_rows(inverse, num_users, k, rng)
    mask = np.zeros((num_users, k), bool)
    mask[user, slot] = True

    def pad(leaf):
      leaf = np.asarray(leaf)
      out = np.zeros((num_users, k) + leaf.shape[1:], leaf.dtype)
      out[user, slot] = leaf[keep]
      return out

    return cls(data=jax.tree.map(pad, data), mask=mask, user_ids=ids, examples_per_user=k,
               num_dropped_users=int(dropped_users),
               num_dropped_examples=int(n - keep.size))

  @classmethod
  def from_parquet(cls, path: str | os.PathLike, *, user_id_column: str,
                   examples_per_user: int, columns: Sequence[str] | None = None,
                   selection: str = "first", seed: int | None = None) -> "UserDataset":
    """Users' examples in Parquet files, read from disk a batch at a time.

    See ``dpfl.parquet_data.ParquetUserDataset`` (needs pyarrow: ``pip install
    'dpfl[parquet]'``). Users, caps and batches equal those of ``from_arrays``
    on the same rows (in file order) with the same ``selection`` and ``seed``.

    Args:
      path: a Parquet file, or a directory of them (``*.parquet``, read in
        sorted path order; paths with a component starting with ``_`` or
        ``.``, such as Spark's ``_temporary/``, are skipped).
      user_id_column: the column holding each row's user id.
      examples_per_user: the cap k >= 1.
      columns: the data columns (default: every column but the user id).
      selection, seed: as in ``from_arrays``.

    Returns:
      A ``ParquetUserDataset`` (a ``UserDataset`` whose data stay on disk).
    """
    from dpfl import parquet_data  # deferred: pyarrow is an optional extra
    return parquet_data.ParquetUserDataset.open(
        path, user_id_column=user_id_column, examples_per_user=examples_per_user,
        columns=columns, selection=selection, seed=seed)

  # --- access -----------------------------------------------------------------

  def subset(self, indices: Any) -> "UserDataset":
    """The users at ``indices`` (e.g. a held-out split), same cap."""
    idx = user_indices(indices, self.num_users)
    return dataclasses.replace(self, data=jax.tree.map(lambda x: x[idx], self.data),
                               mask=self.mask[idx], user_ids=self.user_ids[idx],
                               num_dropped_users=0, num_dropped_examples=0)

  def gather_users(self, indices: np.ndarray, mask: np.ndarray) -> tuple[PyTree, np.ndarray]:
    """A ULS batch: the users at ``indices`` as ``([B, k, ...], mask [B, k])``.

    Slots where ``mask`` (``[B]``, e.g. ``Batch.mask``) is False are padding
    users: their example mask is all False, so ``dpfl.clipped_grad(...,
    unit="user")`` gives them zero weight.

    Args:
      indices: ``[B]`` user rows (``Batch.indices``).
      mask: ``[B]`` bool, False for padding slots (``Batch.mask``).

    Returns:
      ``(batch, example_mask)``: ``data``'s pytree with leaves ``[B, k, ...]``
      (padding slots hold user 0's), and bool ``[B, k]``.
    """
    safe, mask = self._checked_indices(indices, mask, self.num_users)
    batch = jax.tree.map(lambda x: x[safe], self.data)
    return batch, self.mask[safe] & mask[:, None]

  def gather_examples(self, indices: np.ndarray, mask: np.ndarray) -> tuple[PyTree, np.ndarray]:
    """An ELS batch: kept examples by flat index (``examples()`` order) as ``([B, ...], mask)``.

    Slots where ``mask`` is False hold a copy of example 0 (as
    ``dpfl.sampling.gather`` fills them) and must be masked out.

    Args:
      indices: ``[B]`` indices in ``[0, num_examples)`` (``Batch.indices``).
      mask: ``[B]`` bool, False for padding slots (``Batch.mask``).

    Returns:
      ``(batch, mask)``: ``data``'s pytree with leaves ``[B, ...]``, and ``mask``.
    """
    safe, mask = self._checked_indices(indices, mask, self.num_examples)
    user, slot = self._example_positions
    return jax.tree.map(lambda x: x[user[safe], slot[safe]], self.data), mask

  @functools.cached_property
  def _example_positions(self) -> tuple[np.ndarray, np.ndarray]:
    return np.nonzero(self.mask)

  @staticmethod
  def _checked_indices(indices, mask, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices with 0 where mask is False, mask)`` after checking them against ``size``."""
    indices, mask = np.asarray(indices), np.asarray(mask, bool)
    if indices.ndim != 1 or mask.shape != indices.shape:
      raise ValueError(f"indices and mask must be 1-D of one shape, got {indices.shape} and "
                       f"{mask.shape}")
    real = indices[mask]
    if real.size and (real.min() < 0 or real.max() >= size):
      raise ValueError(f"indices must lie in [0, {size}) where mask is True, got values in "
                       f"[{real.min()}, {real.max()}]")
    return np.where(mask, indices, 0), mask

  def examples(self) -> tuple[PyTree, np.ndarray]:
    """The kept examples flattened for ELS: ``(data [num_examples, ...], user_index)``.

    User-major order (user 0's kept examples first); ``user_index[i]`` is the
    row (not the id) of example i's user.
    """
    user, slot = np.nonzero(self.mask)
    return jax.tree.map(lambda x: x[user, slot], self.data), user

  def __repr__(self) -> str:
    return (f"UserDataset(num_users={self.num_users}, examples_per_user="
            f"{self.examples_per_user}, num_examples={self.num_examples}, "
            f"num_dropped_users={self.num_dropped_users}, "
            f"num_dropped_examples={self.num_dropped_examples})")


from_arrays = UserDataset.from_arrays
from_dict = UserDataset.from_dict
