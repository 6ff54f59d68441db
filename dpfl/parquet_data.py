"""User-grouped data larger than memory: a ``UserDataset`` over Parquet files.

``UserDataset.from_parquet(path, user_id_column=..., examples_per_user=...)``
opens one or more Parquet files and returns a ``ParquetUserDataset``. Opening
reads only the user-id column, one row group at a time, and builds an index:
the users (ordered as ``from_arrays`` orders them), and for every user the
rows it keeps under the cap ``k`` (chosen exactly as ``from_arrays`` chooses
them, ``selection`` and ``seed`` included). A batch then reads only the rows
of the sampled users (ULS, ``gather_users``) or the sampled examples (ELS,
``gather_examples``): the row groups that hold them, one at a time, and
``take`` of those rows. Batches equal those of ``UserDataset.from_arrays`` on
the same rows in file order.

Checks at open, from the files' metadata (reading no data where it
suffices): every file holds the id and data columns, each with the first
file's type (a list's size included; dictionary encoding, 64-bit offsets and
list field names aside), so a batch's dtypes and shapes never depend on which
users were sampled and id 1 and id "1" never split one person into two
users; and no data column holds a null, from each row group's statistics
(``null_count``). Where those cannot tell (a file written without
statistics, or a variable-length list column, whose count includes empty
lists) that row group's column is read once at open, one row group at a
time. The id column is read whole anyway (nulls refused). In a directory,
``*.parquet`` files under a path component starting with ``_`` or ``.``
(Spark's ``_temporary/``, hidden staging folders) are skipped, as
``pyarrow.dataset`` skips them.

Memory: the index holds the user ids and one int64 per kept example (plus
the id column while it is built, once); a batch needs the batch itself plus
one row group of the data columns. The data set's size never enters. Write
files with bounded row groups (``write_parquet`` does): a row group is the
unit Parquet reads.

I/O: the rows may be stored in any order; grouped by user (rows sorted by
user id, as ``write_parquet(..., group_by_user=True)`` writes them), a
sampled user's rows lie in one or two row groups, so a batch of B users
reads at most ~2B row groups instead of possibly every one.

Multi-process runs: ``PrivateTraining.batches`` gathers, on each process,
only the batch slots that its own devices hold (``dpfl.federated.local_slots``);
slots of other processes are read by those processes.

pyarrow is the reader: it is the reference Parquet implementation (Apache
Arrow's), well kept, and reads a single row group's chosen columns, which is
what random access to users needs. It is an optional extra:
``pip install 'dpfl[parquet]'``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from accounting import validate as check
from dpfl.data import SELECTIONS, UserDataset, cap_users, user_indices

PyTree = Any
DEFAULT_ROWS_PER_GROUP = 4096


def _pyarrow():
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError as err:  # pragma: no cover - pyarrow is in the test extra
    raise ImportError("UserDataset.from_parquet needs pyarrow: pip install 'dpfl[parquet]' "
                      "(or pip install 'pyarrow>=15')") from err
  return pa, pq


def _parquet_files(path: str | os.PathLike) -> list[str]:
  root = pathlib.Path(os.fspath(path))
  if root.is_file():
    return [str(root)]
  if root.is_dir():
    # As pyarrow.dataset: a path component starting with "_" or "." (Spark's
    # _temporary/, hidden staging folders) is not data.
    files = sorted(str(p) for p in root.rglob("*.parquet") if p.is_file() and not any(
        part.startswith(("_", ".")) for part in p.relative_to(root).parts))
    if files:
      return files
    raise ValueError(f"path {os.fspath(path)!r} is a directory without *.parquet files "
                     "(paths with a component starting with '_' or '.' are skipped)")
  raise ValueError(f"path must be a Parquet file or a directory of them, got "
                   f"{os.fspath(path)!r}, which does not exist")


def _to_numpy(column, name: str) -> np.ndarray:
  """A pyarrow column as ``[rows, ...]``: (fixed-size) lists of numbers become trailing axes."""
  pa, _ = _pyarrow()
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  rows, dims = len(column), []
  while pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type) \
      or pa.types.is_large_list(column.type):
    if column.null_count:
      raise ValueError(f"column {name!r} holds nulls; every row needs a value")
    if pa.types.is_fixed_size_list(column.type):
      size = column.type.list_size
    else:
      lengths = np.unique(np.diff(np.asarray(column.offsets)))
      if lengths.size > 1:
        raise ValueError(f"column {name!r} holds lists of lengths {lengths.tolist()}; a "
                         "column must have one shape per row")
      size = int(lengths[0]) if lengths.size else 0
    dims.append(size)
    column = column.flatten()
  if pa.types.is_dictionary(column.type):
    column = column.dictionary_decode()
  if column.null_count:
    raise ValueError(f"column {name!r} holds nulls; every row needs a value")
  if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
          or pa.types.is_boolean(column.type)):
    raise ValueError(f"column {name!r} has type {column.type}; data columns must hold "
                     "numbers or booleans (or fixed-length lists of them)")
  return column.to_numpy(zero_copy_only=False).reshape((rows, *dims))


def _type_key(t) -> str:
  """What a type reads as: dictionary encoding, 64-bit offsets, list field names aside."""
  pa, _ = _pyarrow()
  if pa.types.is_dictionary(t):
    return _type_key(t.value_type)
  if pa.types.is_fixed_size_list(t):
    return f"fixed_size_list<{_type_key(t.value_type)}>[{t.list_size}]"
  if pa.types.is_list(t) or pa.types.is_large_list(t):
    return f"list<{_type_key(t.value_type)}>"
  if pa.types.is_large_string(t):
    return "string"
  if pa.types.is_large_binary(t):
    return "binary"
  return str(t)


def _check_schema(handle, name: str, first: dict[str, Any] | None,
                  used: Sequence[str]) -> dict[str, Any]:
  """The used columns' types in one file (metadata only), refused if unlike the first file's."""
  schema = handle.schema_arrow
  missing = [c for c in used if c not in schema.names]
  if missing:
    raise ValueError(f"columns {missing} are missing from {name!r}; it has "
                     f"{sorted(schema.names)}")
  types = {c: schema.field(c).type for c in used}
  for c, t in (first or {}).items():
    if _type_key(types[c]) != _type_key(t[1]):
      raise ValueError(f"column {c!r} has type {types[c]} in {name!r} but {t[1]} in "
                       f"{t[0]!r}; every file must give a column one type (cast them)")
  return {c: (name, t) for c, t in types.items()}


def _nulls(column) -> int:
  """Null values of a (nested list) column, at every nesting level."""
  pa, _ = _pyarrow()
  if isinstance(column, pa.ChunkedArray):
    return sum(_nulls(chunk) for chunk in column.chunks)
  count = column.null_count
  while pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type) \
      or pa.types.is_large_list(column.type):
    column = column.flatten()  # drops null lists' slots; counted above
    count += column.null_count
  return count


def _check_no_nulls(handle, name: str, columns: Sequence[str]) -> None:
  """Refuses a null in the data ``columns`` of one file, from its metadata where it can.

  Per row group and Parquet leaf column: a required leaf (max definition
  level 0) holds no nulls; a leaf whose statistics count 0 nulls holds none;
  a flat column whose statistics count nulls holds them. Otherwise (no
  statistics, or a list column whose count also includes empty lists) that
  row group's column is read once and checked.
  """
  metadata, schema = handle.metadata, handle.schema
  # A leaf wrongly given to a column (names with dots) costs at most a read.
  paths = [schema.column(i).path for i in range(metadata.num_columns)]
  leaves = {c: [i for i, p in enumerate(paths) if p == c or p.startswith(c + ".")]
            for c in columns}
  for g in range(metadata.num_row_groups):
    group = metadata.row_group(g)
    for c in columns:
      read = False
      for i in leaves[c]:
        if schema.column(i).max_definition_level == 0:
          continue
        stats = group.column(i).statistics
        if stats is not None and stats.has_null_count and stats.null_count == 0:
          continue
        if stats is not None and stats.has_null_count and schema.column(i).path == c:
          raise ValueError(f"column {c!r} holds {stats.null_count} nulls in {name!r} (row "
                           f"group {g}); every row needs a value")
        read = True
      if read:
        nulls = _nulls(handle.read_row_group(g, columns=[c], use_threads=False).column(0))
        if nulls:
          raise ValueError(f"column {c!r} holds {nulls} nulls in {name!r} (row group {g}); "
                           "every row needs a value")


class ParquetUserDataset(UserDataset):
  """A ``UserDataset`` whose examples stay in Parquet files until a batch needs them.

  Build one with ``UserDataset.from_parquet``. It has ``UserDataset``'s
  interface (``num_users``, ``num_examples``, ``counts``, ``mask``,
  ``user_ids``, ``gather_users``, ``gather_examples``, ``examples``,
  ``subset``) except ``data``: the arrays are on disk (``load()`` reads them
  all into an in-memory ``UserDataset``). ``rows_read`` and
  ``row_groups_read`` count the I/O so far.
  """

  def __init__(self, *, files: Sequence[str], user_id_column: str, columns: Sequence[str],
               group_starts: np.ndarray, group_file: np.ndarray, group_index: np.ndarray,
               user_ids: np.ndarray, rows: np.ndarray, counts: np.ndarray,
               examples_per_user: int, num_dropped_examples: int = 0,
               num_dropped_users: int = 0):
    # UserDataset is frozen; this subclass sets its own fields once, here.
    init = lambda name, value: object.__setattr__(self, name, value)
    init("files", tuple(files))
    init("user_id_column", user_id_column)
    init("columns", tuple(columns))
    init("_group_starts", group_starts)  # [G + 1] first global row of each row group
    init("_group_file", group_file)
    init("_group_index", group_index)
    init("user_ids", user_ids)
    init("_rows", rows)  # kept global rows, user-major (examples() order)
    init("_counts", counts)
    init("_offsets", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    init("examples_per_user", int(examples_per_user))
    init("num_dropped_users", int(num_dropped_users))
    init("num_dropped_examples", int(num_dropped_examples))
    init("_handles", {})
    init("_fillers", {})
    init("rows_read", 0)
    init("row_groups_read", 0)

  # --- opening ----------------------------------------------------------------

  @classmethod
  def open(cls, path: str | os.PathLike, *, user_id_column: str, examples_per_user: int,
           columns: Sequence[str] | None = None, selection: str = "first",
           seed: int | None = None) -> "ParquetUserDataset":
    """Indexes the Parquet file(s) at ``path``, reading only the user-id column.

    First checks the files' metadata (types, nulls: see the module docstring).

    Args:
      path, user_id_column, examples_per_user, columns, selection, seed: as
        in ``UserDataset.from_parquet``.

    Returns:
      The ``ParquetUserDataset`` (its first kept row read, to check the
      columns' types).

    Raises:
      ValueError: no such file, a missing column, a column whose type differs
        between files (naming both files and types), a null user id or data
        value (naming the file, column and row group), an empty data set, or
        the ``from_arrays`` argument errors.
    """
    _, pq = _pyarrow()
    k = check.positive_int("examples_per_user", examples_per_user)
    if selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    files = _parquet_files(path)
    if not isinstance(user_id_column, str):
      raise ValueError(f"user_id_column must be a column name (str), got {user_id_column!r}")
    names = pq.ParquetFile(files[0]).schema_arrow.names
    if columns is None:
      columns = [c for c in names if c != user_id_column]
    else:
      columns = [columns] if isinstance(columns, str) else list(columns)
      if not columns or user_id_column in columns:
        raise ValueError(f"columns must name at least one data column other than "
                         f"user_id_column {user_id_column!r}, got {columns!r}")
    if not columns:
      raise ValueError(f"the files hold no data column besides {user_id_column!r}")
    ids, group_starts, group_file, group_index = [], [0], [], []
    first = None
    for name in files:  # metadata only (but see _check_no_nulls), before the ids are read
      handle = pq.ParquetFile(name)
      types = _check_schema(handle, name, first, [user_id_column, *columns])
      first = first or types
      _check_no_nulls(handle, name, columns)
    for f, name in enumerate(files):
      handle = pq.ParquetFile(name)
      for g in range(handle.metadata.num_row_groups):
        column = handle.read_row_group(g, columns=[user_id_column]).column(0)
        if column.null_count:
          raise ValueError(f"user_id_column {user_id_column!r} holds {column.null_count} "
                           f"null ids in {name!r} (row group {g})")
        ids.append(column.to_numpy(zero_copy_only=False))
        group_starts.append(group_starts[-1] + len(column))
        group_file.append(f)
        group_index.append(g)
    if group_starts[-1] == 0:
      raise ValueError(f"path {os.fspath(path)!r} holds no rows (an empty dataset)")
    ids = np.concatenate(ids)
    unique, rows, counts = cap_users(ids, examples_per_user=k, selection=selection, seed=seed)
    del ids
    dataset = cls(files=files, user_id_column=user_id_column, columns=columns,
                  group_starts=np.asarray(group_starts, np.int64),
                  group_file=np.asarray(group_file, np.int64),
                  group_index=np.asarray(group_index, np.int64), user_ids=unique,
                  rows=rows.astype(np.int64), counts=counts, examples_per_user=k,
                  num_dropped_examples=int(group_starts[-1] - rows.size))
    dataset._filler("example")  # reads one row: checks the columns' types now
    return dataset

  # --- UserDataset's interface -------------------------------------------------

  @property
  def data(self):
    raise AttributeError("a ParquetUserDataset keeps its data on disk: read batches with "
                         "gather_users / gather_examples, or everything with load()")

  @property
  def num_users(self) -> int:
    return int(self._counts.shape[0])

  @property
  def num_examples(self) -> int:
    return int(self._rows.shape[0])

  @property
  def counts(self) -> np.ndarray:
    return self._counts

  @property
  def mask(self) -> np.ndarray:
    """bool ``[num_users, examples_per_user]``, computed from ``counts`` (no I/O)."""
    return np.arange(self.examples_per_user) < self._counts[:, None]

  def gather_users(self, indices: np.ndarray, mask: np.ndarray) -> tuple[PyTree, np.ndarray]:
    """A ULS batch read from disk: the users at ``indices`` as ``([B, k, ...], mask [B, k])``.

    Reads only the rows of the users where ``mask`` is True; equals
    ``UserDataset.gather_users`` of the in-memory data set (padding slots
    hold user 0's examples, read once and kept).

    Args:
      indices: ``[B]`` user rows (e.g. ``Batch.indices``).
      mask: ``[B]`` bool, False for padding slots.

    Returns:
      ``(batch, example_mask)``: a dict column -> ``[B, k, ...]`` array and
      bool ``[B, k]``.
    """
    safe, mask = self._checked_indices(indices, mask, self.num_users)
    k, counts = self.examples_per_user, self._counts
    real = safe[mask]
    starts = self._offsets[real]
    lengths = counts[real]
    # The kept rows of the real users and their (slot, position) in the batch.
    which = np.repeat(np.arange(real.size), lengths)
    within = np.arange(which.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    values = self._read(self._rows[starts[which] + within])
    filler = self._filler("user") if not mask.all() else None
    batch = {}
    for name, column in values.items():
      out = np.zeros((safe.size, k) + column.shape[1:], column.dtype)
      out[np.nonzero(mask)[0][which], within] = column
      if filler is not None:
        out[~mask] = filler[name]
      batch[name] = out
    example_mask = (np.arange(k) < counts[safe][:, None]) & mask[:, None]
    return batch, example_mask

  def gather_examples(self, indices: np.ndarray, mask: np.ndarray) -> tuple[PyTree, np.ndarray]:
    """An ELS batch read from disk: kept examples by flat index, ``([B, ...], mask [B])``.

    Reads only the examples where ``mask`` is True; equals
    ``UserDataset.gather_examples`` of the in-memory data set (padding slots
    hold example 0, read once and kept).
    """
    safe, mask = self._checked_indices(indices, mask, self.num_examples)
    values = self._read(self._rows[safe[mask]])
    filler = self._filler("example") if not mask.all() else None
    batch = {}
    for name, column in values.items():
      out = np.empty((safe.size,) + column.shape[1:], column.dtype)
      if filler is not None:
        out[~mask] = filler[name]
      out[mask] = column
      batch[name] = out
    return batch, mask

  def examples(self) -> tuple[PyTree, np.ndarray]:
    """Every kept example, flattened (reads the whole data set: for small ones)."""
    return self._read(self._rows), np.repeat(np.arange(self.num_users), self._counts)

  def load(self) -> UserDataset:
    """The whole data set as an in-memory ``UserDataset`` (reads everything)."""
    data, mask = self.gather_users(np.arange(self.num_users), np.ones(self.num_users, bool))
    return UserDataset(data=data, mask=mask, user_ids=self.user_ids,
                       examples_per_user=self.examples_per_user,
                       num_dropped_users=self.num_dropped_users,
                       num_dropped_examples=self.num_dropped_examples)

  def subset(self, indices: Any) -> "ParquetUserDataset":
    """The users at ``indices`` (e.g. a held-out split), same cap and files; no I/O."""
    idx = user_indices(indices, self.num_users)
    rows = np.concatenate([self._rows[self._offsets[u]:self._offsets[u + 1]] for u in idx])
    return ParquetUserDataset(
        files=self.files, user_id_column=self.user_id_column, columns=self.columns,
        group_starts=self._group_starts, group_file=self._group_file,
        group_index=self._group_index, user_ids=self.user_ids[idx], rows=rows,
        counts=self._counts[idx], examples_per_user=self.examples_per_user)

  def __repr__(self) -> str:
    return (f"ParquetUserDataset({len(self.files)} file(s), num_users={self.num_users}, "
            f"examples_per_user={self.examples_per_user}, num_examples={self.num_examples}, "
            f"num_dropped_examples={self.num_dropped_examples})")

  # --- reading ------------------------------------------------------------------

  def _filler(self, kind: str) -> dict[str, np.ndarray]:
    """What the in-memory gathers put in padding slots: user 0's block, or example 0."""
    if kind not in self._fillers:
      if kind == "user":
        self._fillers[kind] = {name: column[0] for name, column in self.gather_users(
            np.zeros(1, np.int64), np.ones(1, bool))[0].items()}
      else:
        self._fillers[kind] = {name: column[0]
                               for name, column in self._read(self._rows[:1]).items()}
    return self._fillers[kind]

  def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The data columns at global ``rows`` (any order), one row group read at a time."""
    pa, pq = _pyarrow()
    out: dict[str, np.ndarray] = {}
    if rows.size == 0:
      filler = self._filler("example")
      return {name: np.empty((0,) + v.shape, v.dtype) for name, v in filler.items()}
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    group = np.searchsorted(self._group_starts, ordered, side="right") - 1
    bounds = np.flatnonzero(np.diff(group)) + 1
    for part in np.split(np.arange(rows.size), bounds):
      g = int(group[part[0]])
      file = int(self._group_file[g])
      if file not in self._handles:
        self._handles[file] = pq.ParquetFile(self.files[file])
      # One thread: pyarrow's decoding threads would each keep memory of their own.
      table = self._handles[file].read_row_group(int(self._group_index[g]),
                                                 columns=list(self.columns), use_threads=False)
      taken = table.take(pa.array(ordered[part] - self._group_starts[g]))
      del table  # only the taken rows outlive the row group
      for name in self.columns:
        column = _to_numpy(taken.column(name), name)
        if name not in out:
          out[name] = np.empty((rows.size,) + column.shape[1:], column.dtype)
        elif out[name].shape[1:] != column.shape[1:]:
          raise ValueError(f"column {name!r} has rows of shapes {out[name].shape[1:]} and "
                           f"{column.shape[1:]}; a column must have one shape per row")
        out[name][order[part]] = column
      object.__setattr__(self, "rows_read", self.rows_read + len(part))
      object.__setattr__(self, "row_groups_read", self.row_groups_read + 1)
    return out


def write_parquet(path: str | os.PathLike, data: dict[str, Any], user_ids: Any, *,
                  user_id_column: str = "user_id", group_by_user: bool = True,
                  rows_per_group: int = DEFAULT_ROWS_PER_GROUP) -> None:
  """Writes in-memory examples to a Parquet file that ``from_parquet`` reads efficiently.

  Arrays with trailing axes become (nested) fixed-size list columns. With
  ``group_by_user`` the rows are sorted by user id (stable: a user's rows
  keep their order, so ``selection="first"`` keeps the same examples), so a
  user's rows share a row group or two. To write more rows than fit in memory,
  call ``pyarrow.parquet.ParquetWriter`` yourself with bounded row groups.

  Args:
    path: the file to write.
    data: dict column name -> ``[n, ...]`` numeric array.
    user_ids: ``[n]`` the user of each row (numbers or strings).
    user_id_column: the name of the id column.
    group_by_user: sort the rows by user id first.
    rows_per_group: rows per row group (bounds the memory of reading one).
  """
  pa, pq = _pyarrow()
  rows_per_group = check.positive_int("rows_per_group", rows_per_group)
  ids = np.asarray(user_ids)
  order = np.argsort(ids, kind="stable") if group_by_user else np.arange(ids.shape[0])
  table = {user_id_column: pa.array(ids[order])}
  for name, array in data.items():
    array = np.asarray(array)[order]
    if array.shape[0] != ids.shape[0]:
      raise ValueError(f"data[{name!r}] has {array.shape[0]} rows, user_ids has "
                       f"{ids.shape[0]}; they must match")
    column = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
      column = pa.FixedSizeListArray.from_arrays(column, size)
    table[name] = column
  pq.write_table(pa.table(table), os.fspath(path), row_group_size=rows_per_group)
