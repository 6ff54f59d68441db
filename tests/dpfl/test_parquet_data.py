"""UserDataset.from_parquet: equal to the in-memory UserDataset, reads only the sampled rows,
and its memory is bounded by the batch, not the data set."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dpfl
from dpfl.data import UserDataset
from dpfl.parquet_data import ParquetUserDataset, write_parquet

K = 5


def _rows(n=300, num_users=30, seed=0):
  """Rows in no particular order; users hold 1..~25 rows (some above the cap K)."""
  rng = np.random.default_rng(seed)
  users = rng.integers(0, num_users, n) * 7 + 3  # sparse ids: rows are not ids
  x = rng.normal(size=(n, 2, 3)).astype(np.float32)
  y = (x.sum((1, 2)) > 0).astype(np.float32)
  return {"x": x, "y": y}, users


def _two_files(tmp_path, data, users, **kwargs):
  """The rows, unsorted, split over two files of small row groups (read in name order)."""
  half = users.shape[0] // 2
  for name, part in (("a.parquet", slice(0, half)), ("b.parquet", slice(half, None))):
    write_parquet(tmp_path / name, {c: v[part] for c, v in data.items()}, users[part],
                  user_id_column="uid", group_by_user=False, rows_per_group=16, **kwargs)
  return tmp_path


def _assert_batches_equal(a, b):
  assert a[0].keys() == b[0].keys()
  for name in a[0]:
    assert a[0][name].dtype == b[0][name].dtype, name
    np.testing.assert_array_equal(a[0][name], b[0][name], err_msg=name)
  np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("selection, seed", [("first", None), ("random", 7)])
def test_equals_the_in_memory_dataset(tmp_path, selection, seed):
  data, users = _rows()
  memory = UserDataset.from_arrays(data, users, examples_per_user=K, selection=selection,
                                   seed=seed)
  disk = UserDataset.from_parquet(_two_files(tmp_path, data, users), user_id_column="uid",
                                  examples_per_user=K, selection=selection, seed=seed)
  assert isinstance(disk, UserDataset) and isinstance(disk, ParquetUserDataset)
  np.testing.assert_array_equal(disk.user_ids, memory.user_ids)
  np.testing.assert_array_equal(disk.mask, memory.mask)
  np.testing.assert_array_equal(disk.counts, memory.counts)
  assert (disk.num_users, disk.num_examples, disk.num_dropped_examples) == (
      memory.num_users, memory.num_examples, memory.num_dropped_examples)
  assert memory.num_dropped_examples > 0  # the cap binds
  rng = np.random.default_rng(1)
  for _ in range(3):
    size = 12
    indices, mask = rng.integers(0, memory.num_users, size), rng.random(size) < 0.7
    _assert_batches_equal(disk.gather_users(indices, mask), memory.gather_users(indices, mask))
    indices = rng.choice(memory.num_examples, size, replace=False)
    _assert_batches_equal(disk.gather_examples(indices, mask),
                          memory.gather_examples(indices, mask))
  _assert_batches_equal(disk.examples(), memory.examples())
  loaded = disk.load()
  _assert_batches_equal((loaded.data, loaded.mask), (memory.data, memory.mask))
  subset = [4, 0, 9]
  _assert_batches_equal(disk.subset(subset).load().gather_users(np.arange(3), np.ones(3, bool)),
                        memory.subset(subset).gather_users(np.arange(3), np.ones(3, bool)))


def test_string_user_ids_and_every_row_padding(tmp_path):
  data, users = _rows(n=60, num_users=6)
  users = np.array([f"user-{u}" for u in users])
  write_parquet(tmp_path / "s.parquet", data, users, user_id_column="who")
  memory = UserDataset.from_arrays(data, users, examples_per_user=K)
  disk = UserDataset.from_parquet(tmp_path / "s.parquet", user_id_column="who",
                                  examples_per_user=K, columns=["x"])
  np.testing.assert_array_equal(disk.user_ids, memory.user_ids)
  indices, mask = np.array([2, 0, 5]), np.zeros(3, bool)  # padding only: reads no row
  before = disk.rows_read
  batch, example_mask = disk.gather_users(indices, mask)
  assert set(batch) == {"x"} and not example_mask.any()
  np.testing.assert_array_equal(batch["x"], memory.gather_users(indices, mask)[0]["x"])
  assert disk.rows_read - before <= K  # user 0's block, read once for padding


CONFIGS = {
    "uls": dict(batch_size=6),
    "els": dict(sampling_unit="example", batch_size=40),
}


def _loss(params, batch):
  logits = batch["x"].reshape(batch["x"].shape[0], -1) @ params["w"] + params["b"]
  return optax.sigmoid_binary_cross_entropy(logits, batch["y"]).mean()


def _train(dataset, **config):
  private = dpfl.make_private(_loss, optax.sgd(0.5), privacy_unit="user", dataset=dataset,
                              l2_clip_norm=1.0, num_steps=3, noise_multiplier=1.0,
                              delta=1e-5, key=0, seed=0, **config)
  state = private.init({"w": jnp.zeros(6), "b": jnp.zeros(())})
  step = private.make_step()
  for batch, mask in private.batches(dataset, state):
    state, _ = step(state, batch, mask)
  return {name: np.asarray(v) for name, v in state.params.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_equals_the_in_memory_dataset(tmp_path, name):
  data, users = _rows()
  memory = UserDataset.from_arrays(data, users, examples_per_user=K)
  disk = UserDataset.from_parquet(_two_files(tmp_path, data, users), user_id_column="uid",
                                  examples_per_user=K)
  want, got = _train(memory, **CONFIGS[name]), _train(disk, **CONFIGS[name])
  assert np.abs(want["w"]).max() > 1e-3  # trained, not trivially zero
  for leaf in want:  # the same batches through the same compiled step: the same bits
    np.testing.assert_array_equal(got[leaf], want[leaf], err_msg=leaf)


def test_a_batch_reads_only_its_rows(tmp_path):
  data, users = _rows(n=2000, num_users=100)
  write_parquet(tmp_path / "g.parquet", data, users, user_id_column="uid",
                rows_per_group=16)  # grouped by user
  disk = UserDataset.from_parquet(tmp_path / "g.parquet", user_id_column="uid",
                                  examples_per_user=K)
  disk.gather_users(np.array([0, 1]), np.array([True, False]))  # caches the padding filler
  indices, mask = np.array([3, 50, 7, 0]), np.array([True, True, True, False])
  rows, groups = disk.rows_read, disk.row_groups_read
  disk.gather_users(indices, mask)
  assert disk.rows_read - rows == disk.counts[indices[mask]].sum()
  # Grouped: a user's K kept rows are its first ones, in one or two groups.
  assert disk.row_groups_read - groups <= 2 * mask.sum()
  rows = disk.rows_read
  disk.gather_examples(np.array([5, 400, 17, 3]), np.array([True, True, False, True]))
  assert disk.rows_read - rows == 3


def _write_table(path, table):
  pq.write_table(table, path)
  return path


@pytest.mark.parametrize("case, match", [
    ("no file", "does not exist"),
    ("no id column", "missing"),
    ("id column in columns", "columns"),
    ("null id", "null"),
    ("string data", "numbers"),
    ("ragged lists", "lengths"),
    ("cap", "examples_per_user"),
    ("selection", "selection"),
])
def test_bad_input_names_the_argument(tmp_path, case, match):
  good = pa.table({"uid": [1, 2, 2], "x": [0.5, 1.0, 2.0]})
  kwargs = dict(user_id_column="uid", examples_per_user=2)
  path = _write_table(tmp_path / "good.parquet", good)
  if case == "no file":
    path = tmp_path / "nothing.parquet"
  elif case == "no id column":
    kwargs["user_id_column"] = "user"
  elif case == "id column in columns":
    kwargs["columns"] = ["uid", "x"]
  elif case == "null id":
    path = _write_table(tmp_path / "bad.parquet", pa.table({"uid": [1, None], "x": [0., 1.]}))
  elif case == "string data":
    path = _write_table(tmp_path / "bad.parquet", pa.table({"uid": [1, 2], "x": ["a", "b"]}))
  elif case == "ragged lists":
    path = _write_table(tmp_path / "bad.parquet",
                        pa.table({"uid": [1, 2], "x": [[1.0, 2.0], [3.0]]}))
  elif case == "cap":
    kwargs["examples_per_user"] = 0
  elif case == "selection":
    kwargs["selection"] = "last"
  with pytest.raises(ValueError, match=match):
    # Opening reads the ids and one row; a ragged row shows when it is read.
    UserDataset.from_parquet(path, **kwargs).examples()


def _pair(tmp_path, first, second):
  """Two files (a.parquet, b.parquet) of two rows each: a table's columns from dicts."""
  for name, columns in (("a.parquet", first), ("b.parquet", second)):
    pq.write_table(pa.table(columns), tmp_path / name)
  return tmp_path


_FLOATS2 = pa.list_(pa.float64(), 2)


@pytest.mark.parametrize("column, second, types", [
    # Read per batch, the second file's values were cast to the first's dtype
    # (0.5 -> 0) when a batch mixed both, and kept their own otherwise.
    ("x", {"uid": [3, 4], "x": pa.array([0.5, 2.75])}, ("double", "int64")),
    # Batch shapes depended on which users were sampled.
    ("x", {"uid": [3, 4], "x": pa.array([[1, 2, 3]] * 2, pa.list_(pa.int64(), 3))},
     ("fixed_size_list<element: int64>[3]", "fixed_size_list<element: int64>[2]")),
    # Id 1 and id "1" were two users: one person, two privacy units.
    ("uid", {"uid": ["1", "4"], "x": pa.array([5, 6])}, ("string", "int64")),
])
def test_files_must_agree_on_column_types(tmp_path, column, second, types):
  first = {"uid": [1, 2], "x": pa.array([1, 2], pa.int64())}
  if "fixed" in types[0]:
    first["x"] = pa.array([[1, 2], [3, 4]], pa.list_(pa.int64(), 2))
  path = _pair(tmp_path, first, second)
  message = (f"column '{column}' has type {types[0]} in '{path / 'b.parquet'}' but "
             f"{types[1]} in '{path / 'a.parquet'}'")
  with pytest.raises(ValueError, match=re.escape(message)):
    UserDataset.from_parquet(path, user_id_column="uid", examples_per_user=1)


def test_types_that_read_alike_are_one_type(tmp_path):
  # Dictionary-encoded and plain strings give the same ids; large and plain
  # lists the same values: neither is a mismatch.
  first = {"uid": pa.array(["a", "b"]).dictionary_encode(),
           "x": pa.array([[1.0], [2.0]], pa.list_(pa.float64()))}
  second = {"uid": pa.array(["a", "c"], pa.large_string()),
            "x": pa.array([[3.0], [4.0]], pa.large_list(pa.float64()))}
  disk = UserDataset.from_parquet(_pair(tmp_path, first, second), user_id_column="uid",
                                  examples_per_user=2)
  np.testing.assert_array_equal(disk.user_ids, ["a", "b", "c"])
  np.testing.assert_array_equal(disk.counts, [2, 1, 1])


def test_a_directory_scan_skips_underscore_and_dot_paths(tmp_path):
  root = tmp_path / "_out"  # the given directory's own name does not count
  data, users = {"x": np.arange(4.0)}, np.array([1, 2, 2, 3])
  for part in ("part-0.parquet", "_temporary/0/part-0.parquet", ".staging/part-0.parquet",
               "sub/.part-1.parquet", "sub/_part-2.parquet", "sub/part-3.parquet"):
    (root / part).parent.mkdir(parents=True, exist_ok=True)
    write_parquet(root / part, data, users)
  disk = UserDataset.from_parquet(root, user_id_column="user_id", examples_per_user=4)
  assert disk.files == (str(root / "part-0.parquet"), str(root / "sub/part-3.parquet"))
  assert disk.num_examples == 8
  (root / "part-0.parquet").unlink()
  (root / "sub/part-3.parquet").unlink()
  with pytest.raises(ValueError, match="skipped"):
    UserDataset.from_parquet(root, user_id_column="user_id", examples_per_user=4)


@pytest.mark.parametrize("case", ["flat", "null list", "null in a list", "no statistics"])
def test_a_null_in_a_data_column_is_refused_at_open(tmp_path, case):
  # Before, it showed only when a batch read its row: mid-run, after the
  # step's privacy cost was spent. The null is in the last row group.
  x, kwargs = pa.array([1.0, 2.0, 3.0, None]), {}
  if case == "null list":
    x = pa.array([[1.0, 2.0]] * 3 + [None], _FLOATS2)
  elif case == "null in a list":
    x = pa.array([[1.0, 2.0]] * 3 + [[4.0, None]], _FLOATS2)
  elif case == "no statistics":
    kwargs["write_statistics"] = False
  pq.write_table(pa.table({"uid": [0, 1, 2, 3], "x": x, "ok": [1, 2, 3, 4]}),
                 tmp_path / "d.parquet", row_group_size=2, **kwargs)
  message = f"column 'x' holds 1 nulls in '{tmp_path / 'd.parquet'}' (row group 1)"
  with pytest.raises(ValueError, match=re.escape(message)):
    UserDataset.from_parquet(tmp_path, user_id_column="uid", examples_per_user=1)
  # A column not used is not checked.
  UserDataset.from_parquet(tmp_path, user_id_column="uid", examples_per_user=1,
                           columns=["ok"])


def test_the_null_check_reads_no_data_when_statistics_suffice(tmp_path, monkeypatch):
  columns = {"uid": [0, 1, 2, 3], "x": pa.array([[1.0, 2.0]] * 4, _FLOATS2),
             # Statistics count empty lists as nulls: such a column is read once.
             "e": pa.array([[]] * 4, pa.list_(pa.float64()))}
  pq.write_table(pa.table(columns), tmp_path / "d.parquet", row_group_size=2)
  reads = []
  original = pq.ParquetFile.read_row_group
  monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, columns=None, **kw: (
      reads.append(tuple(columns)), original(self, g, columns=columns, **kw))[1])
  disk = UserDataset.from_parquet(tmp_path, user_id_column="uid", examples_per_user=1)
  # Per row group: "e" (checked), the ids; then one row of the data (the padding filler).
  assert reads == [("e",), ("e",), ("uid",), ("uid",), ("x", "e")]
  assert disk.gather_users(np.arange(2), np.ones(2, bool))[0]["e"].shape == (2, 1, 0)


# --- multi-device: each process gathers only its own slots --------------------------------

_SHARDED_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import dpfl
    from dpfl.data import UserDataset
    from dpfl.federated import local_slots, shard_users, user_mesh
    from dpfl.parquet_data import write_parquet

    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 400)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    data = {"x": x, "y": np.sin(x).sum(1)}
    write_parquet(sys.argv[1], data, users, user_id_column="uid", rows_per_group=32)
    disk = UserDataset.from_parquet(sys.argv[1], user_id_column="uid", examples_per_user=6)
    memory = UserDataset.from_arrays(data, users, examples_per_user=6)
    mesh = user_mesh()
    out = {"all local": local_slots(8, mesh).tolist()}
    # As if this process held only the mesh's first two devices.
    mine = list(mesh.devices.flat[:2])
    local = local_slots(8, mesh, devices=mine)
    out["two devices"] = local.tolist()
    indices, mask = np.array([0, 5, 9, 13, 20, 21, 30, 39]), np.ones(8, bool)
    disk.gather_users(indices[:1], ~mask[:1])  # caches the padding filler
    before = disk.rows_read
    partial = disk.gather_users(indices, mask & local)
    out["rows read"] = [disk.rows_read - before, int(disk.counts[indices[local]].sum())]
    full, part = shard_users(disk.gather_users(indices, mask), mesh), shard_users(partial, mesh)
    same = []
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(part)):
      shards = {s.device: np.asarray(s.data) for s in b.addressable_shards}
      same += [np.array_equal(np.asarray(s.data), shards[s.device])
               for s in a.addressable_shards if s.device in mine]
    out["own shards equal"] = [bool(all(same)), len(same)]

    def loss(params, batch):
      return jnp.mean((jnp.tanh(batch["x"] @ params["w"]) - batch["y"]) ** 2)

    def train(dataset, **config):
      private = dpfl.make_private(loss, optax.sgd(0.5), privacy_unit="user", dataset=dataset,
                                  l2_clip_norm=0.3, num_steps=3, noise_multiplier=1.0,
                                  delta=1e-5, key=3, seed=4, mesh=mesh, **config)
      state, step = private.init({"w": jnp.zeros(5)}), private.make_step()
      for batch, example_mask in private.batches(dataset, state):
        state, _ = step(state, batch, example_mask)
      return np.asarray(state.params["w"]).tolist()

    for name, config in {"uls": dict(batch_size=10),
                         "els": dict(sampling_unit="example", batch_size=30)}.items():
      out[name] = [train(memory, **config), train(disk, **config)]
    print(json.dumps(out))
    """
)


def _child(code, *args, xla_flags="", **env_vars):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}"
  proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_batches_gather_only_this_process_slots(tmp_path):
  out = _child(_SHARDED_CHILD, tmp_path / "users.parquet",
               xla_flags="--xla_force_host_platform_device_count=4")
  assert out["all local"] == [True] * 8
  assert out["two devices"] == [True] * 4 + [False] * 4  # 2 slots per device, in mesh order
  read, expected = out["rows read"]
  assert read == expected > 0  # only the users of this process's slots
  assert out["own shards equal"] == [True, 6]  # x, y and the mask on each of 2 devices
  for name in ("uls", "els"):
    memory, disk = out[name]
    assert np.max(np.abs(memory)) > 1e-3
    np.testing.assert_array_equal(disk, memory, err_msg=name)


# --- memory: a data set several times larger than the memory the run allows itself -------

_MEMORY_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import jax.numpy as jnp, numpy as np, optax, pyarrow as pa, pyarrow.parquet as pq
    import dpfl

    directory, megabytes = sys.argv[1], float(sys.argv[2])
    features, rows_per_group, k = 256, 2048, 16
    schema = pa.schema([("user", pa.int64()), ("x", pa.list_(pa.float32(), features)),
                        ("y", pa.float32())])

    def reset_peak():  # VmHWM := the current RSS (Linux >= 4.0)
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def peak_mb():
      # VmHWM, not ru_maxrss: exec keeps the forking parent's RSS in ru_maxrss,
      # so a child of a big pytest process would start with the parent's peak.
      with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**10

    def rss_mb():
      with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def write(path, megabytes):
      # Written a row group at a time (grouped by user): the writer never holds the data.
      rows, rng = int(megabytes * 2**20) // (4 * features), np.random.default_rng(0)
      with pq.ParquetWriter(path, schema, use_dictionary=False, compression="none") as writer:
        for start in range(0, rows, rows_per_group):
          n = min(rows_per_group, rows - start)
          users = np.sort(rng.integers(start // 24, (start + n) // 24 + 1, n))
          x = rng.standard_normal((n, features), dtype=np.float32)
          writer.write_table(pa.table({
              "user": users, "y": x[:, :4].sum(1),
              "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), features)},
              schema=schema))
      return path

    def loss(params, batch):
      return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    def train(dataset, **config):
      private = dpfl.make_private(loss, optax.sgd(0.1), privacy_unit="user", dataset=dataset,
                                  l2_clip_norm=1.0, num_steps=3, noise_multiplier=1.0,
                                  delta=1e-5, key=0, seed=0, **config)
      state, step = private.init({"w": jnp.zeros(features)}), private.make_step()
      for batch, mask in private.batches(dataset, state):
        state, _ = step(state, batch, mask)
      return float(jnp.abs(state.params["w"]).max())

    def run(path, phases):
      dataset = dpfl.UserDataset.from_parquet(path, user_id_column="user", examples_per_user=k)
      phases["open"] = peak_mb()
      moved = [train(dataset, batch_size=64, max_batch_size=96)]
      phases["uls"] = peak_mb()
      moved.append(train(dataset, sampling_unit="example", batch_size=512, max_batch_size=640))
      phases["els"] = peak_mb()
      return dataset, moved

    # Warm-up on a small file with the same shapes: compilation and pyarrow's
    # thread pools cost the same whatever the data size, so they are not counted.
    run(write(os.path.join(directory, "small.parquet"), 4), {})
    big = write(os.path.join(directory, "big.parquet"), megabytes)
    phases = {"base": rss_mb()}
    reset_peak()
    dataset, moved = run(big, phases)
    print(json.dumps({"data_mb": os.path.getsize(big) / 2**20, "base_rss_mb": phases["base"],
                      "peak_mb": peak_mb(), "phases": phases, "moved": moved,
                      "rows_read": dataset.rows_read, "num_examples": dataset.num_examples}))
    """
)


@pytest.mark.parametrize("megabytes", [
    160, pytest.param(640, marks=pytest.mark.slow)])
def test_peak_memory_is_bounded_by_the_batch_not_the_data(tmp_path, megabytes):
  # One malloc arena and one compute thread: glibc's per-thread arenas and
  # per-thread BLAS / XLA buffers would add a varying 0-40 MB that has nothing
  # to do with the data path.
  out = _child(_MEMORY_CHILD, tmp_path, megabytes, MALLOC_ARENA_MAX="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               xla_flags="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  assert out["data_mb"] >= megabytes
  assert min(out["moved"]) > 0  # both runs trained on what they read
  # ULS reads <= 3 x 96 users x 16 rows, ELS <= 3 x 640 rows: a sliver of the data.
  assert out["rows_read"] <= 3 * (96 * 16 + 640) < out["num_examples"] / 10
  increase = out["peak_mb"] - out["base_rss_mb"]
  print(f"{out['data_mb']:.0f} MB on disk: peak RSS rose {increase:.1f} MB")
  assert increase < out["data_mb"] / 4, out["phases"]  # peak RSS after each phase
