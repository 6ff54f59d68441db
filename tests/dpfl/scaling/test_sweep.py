"""``dpfl sweep``: results lines, ε from accounting, resume, and flag errors."""

import json
import math

import pytest

import accounting
from dpfl import cli
from dpfl.sampling import default_max_batch_size
from dpfl.scaling import corpus as corpus_lib
from dpfl.scaling import models, results, shards, sweep

SWEEP = ("sweep", "dpfl.scaling.sweep_cli")
# A tiny corpus and run: 60 stdlib files, 4 sequences of 16 tokens each.
TINY = ["--models", "s50k", "--batch-sizes", "8", "--steps", "3", "--eval-every", "2",
        "--eval-examples", "16", "--seq-len", "16", "--max-users", "60",
        "--examples-per-user", "4", "--learning-rates", "0.01", "--delta", "1e-5"]


@pytest.fixture
def dpfl_main(monkeypatch):
  monkeypatch.setitem(cli.COMMANDS, "sweep", ("train a grid of DP language models", SWEEP[1]))
  return cli.main


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  """Two real runs (non-private and σ=2) through the command line, once per module."""
  path = tmp_path_factory.mktemp("sweep") / "runs.jsonl"
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(cli.COMMANDS, "sweep", SWEEP)
    status = cli.main(["sweep", "--results", str(path), "--noise-multipliers", "0,2",
                       "--json", *TINY])
  assert status == 0
  return path


def _config(**overrides):
  kwargs = dict(model="s50k", batch_size=8, noise_multiplier=2.0, steps=3, learning_rate=0.01,
                seq_len=16, delta=1e-5, eval_every=2, eval_examples=16, max_users=60,
                examples_per_user=4)
  kwargs.update(overrides)
  return sweep.RunConfig(**kwargs)


def test_tiny_sweep_writes_one_schema_line_per_run(tiny_sweep):
  rows = results.read_results(tiny_sweep)
  assert len(rows) == 2
  for row in rows:
    results.validate_row(row)
    assert set(results.REQUIRED_KEYS) <= set(row)
    assert row["model"] == "s50k" and row["params"] == models.params_count("s50k")
    assert row["steps"] == 3 and row["seq_len"] == 16 and row["batch_size"] == 8
    assert row["flops"] == 6 * row["params"] * 3 * 8 * 16
    assert row["tokens"] == 3 * 8 * 16
    assert row["sampling_prob"] == 8 / row["dataset_size"]
    assert [s for s, _ in row["eval_loss"]] == [0, 2, 3]
    assert [s for s, _ in row["train_loss"]] == [2, 3]
    assert row["final_eval_loss"] == row["eval_loss"][-1][1]
    assert all(math.isfinite(v) and 0 < v < 10 for _, v in row["eval_loss"])
    assert row["seconds"] > 0 and row["tokens_per_second"] > 0
  plain, private = sorted(rows, key=lambda r: r["noise_multiplier"])
  assert not plain["private"] and plain["epsilon"] is None and plain["noise_batch_ratio"] == 0
  assert private["private"] and private["noise_batch_ratio"] == 2 / 8
  # Without --seed each run draws its own seed from OS entropy (no two runs
  # share noise) and records it; test_recorded_seed_reproduces_the_run reruns one.
  assert plain["seed"] != private["seed"] and plain["seed"] != 0
  assert plain["eval_loss"][0] != private["eval_loss"][0]  # different inits
  # run_id is the documented hash of the configuration and corpus.
  fingerprint = sweep.corpus_for(_config()).fingerprint
  assert private["run_id"] == sweep.run_id(_config(), fingerprint)
  assert plain["run_id"] == sweep.run_id(_config(noise_multiplier=0.0), fingerprint)


def test_recorded_seed_reproduces_the_run(tiny_sweep, dpfl_main, capsys, tmp_path):
  private = next(r for r in results.read_results(tiny_sweep) if r["private"])
  # An entropy seed is not part of the run id: re-running the command resumes.
  path = tmp_path / "runs.jsonl"
  path.write_text(tiny_sweep.read_text())
  assert dpfl_main(["sweep", "--results", str(path), "--noise-multipliers", "0,2", "--json",
                    "--no-progress", *TINY]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["trained"] == 0 and out["skipped"] == 2
  # The recorded seed (64 bits, all of them used) gives the same run again; as
  # an explicit seed it is part of the run id.
  assert private["seed"] >= 0 and isinstance(private["seed"], int)
  again = sweep.train_run(_config(seed=private["seed"]), progress=False)
  assert again["seed"] == private["seed"]
  assert again["eval_loss"] == private["eval_loss"]
  assert again["train_loss"] == private["train_loss"]
  assert again["run_id"] != private["run_id"]
  assert "seed" not in _config().key() and _config(seed=0).key()["seed"] == 0


def test_epsilon_is_accountings_epsilon_of_the_same_mechanism(tiny_sweep):
  row = next(r for r in results.read_results(tiny_sweep) if r["private"])
  n, q = row["dataset_size"], row["sampling_prob"]
  # The mechanism make_private ran, built independently from the row's settings.
  expected = accounting.TruncatedPoissonDpSgd(
      noise_multiplier=2.0, sampling_prob=q, dataset_size=n,
      max_batch_size=default_max_batch_size(n, q), num_steps=3)
  assert accounting.from_dict(row["mechanism"]) == expected
  assert row["max_batch_size"] == expected.max_batch_size
  assert row["epsilon"] == accounting.epsilon(expected, delta=1e-5,
                                              discretization=sweep.EPSILON_DISCRETIZATION)
  # dp-accounting's default grid: the sweep's coarser grid is a (slightly) larger bound.
  fine = accounting.epsilon(expected, delta=1e-5)
  assert fine <= row["epsilon"] <= 1.01 * fine


def test_resume_skips_finished_runs(tiny_sweep, tmp_path, monkeypatch):
  path = tmp_path / "runs.jsonl"
  path.write_text(tiny_sweep.read_text())
  trained = []

  def fake_train_run(config, **kwargs):
    trained.append(config)
    row = dict(results.read_results(tiny_sweep)[0])
    row.update(run_id=sweep.run_id(config, sweep.corpus_for(config).fingerprint),
               noise_multiplier=config.noise_multiplier, private=config.private,
               noise_batch_ratio=config.noise_batch_ratio, epsilon=1.0 if config.private else None)
    return row

  monkeypatch.setattr(sweep, "train_run", fake_train_run)
  done = [_config(noise_multiplier=0.0), _config()]
  summary = sweep.run_sweep(done, str(path), progress=False)
  assert trained == [] and len(summary.skipped) == 2 and len(summary.rows) == 2

  new = _config(noise_multiplier=4.0)
  summary = sweep.run_sweep([*done, new], str(path), progress=False)
  assert trained == [new] and summary.trained == [summary.rows[2]["run_id"]]
  assert len(results.read_results(path)) == 3

  # A line cut short by a crash is skipped on read and its run trained again.
  newer = _config(noise_multiplier=8.0)
  with open(path, "a") as f:
    f.write('{"run_id": "truncated')
  with pytest.warns(UserWarning, match="truncated last line"):
    summary = sweep.run_sweep([*done, new, newer], str(path), progress=False)
  assert trained == [new, newer]
  lines = path.read_text().splitlines()  # the fragment was cut off before appending
  assert len(lines) == 4 and json.loads(lines[-1])["noise_multiplier"] == 8.0
  assert len(results.read_results(path)) == 4


def test_dry_run_lists_status(tiny_sweep, dpfl_main, capsys):
  assert dpfl_main(["sweep", "--results", str(tiny_sweep), "--noise-multipliers", "0,2,4",
                    "--dry-run", "--json", *TINY]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [r["status"] for r in out["rows"]] == ["done", "done", "pending"]
  assert len(results.read_results(tiny_sweep)) == 2


def test_noise_batch_ratios_set_sigma_from_batch():
  grid = sweep.make_grid(models=["s50k"], batch_sizes=[8, 32], steps=[3], learning_rates=[0.01],
                         noise_batch_ratios=[0, 0.25], seq_len=16)
  assert [(c.batch_size, c.noise_multiplier) for c in grid] == [(8, 0.0), (8, 2.0), (32, 0.0),
                                                                 (32, 8.0)]
  assert len({sweep.run_id(c, "x") for c in grid}) == 4
  assert sweep.run_id(grid[1], "x") == sweep.run_id(_config(seq_len=16, delta=1e-6,
                                                            eval_every=25, eval_examples=512,
                                                            max_users=None,
                                                            examples_per_user=32), "x")
  assert sweep.run_id(grid[1], "x") != sweep.run_id(grid[1], "y")
  assert sweep.run_id(_config(noise_multiplier=2), "x") == sweep.run_id(_config(), "x")


@pytest.mark.parametrize("flags, flag", [
    (["--models", "s3m"], "--models"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--batch-sizes", "8,x"], "--batch-sizes"),
    (["--batch-sizes", "100000"], "--batch-sizes"),
    (["--noise-multipliers", "-1"], "--noise-multipliers"),
    (["--noise-batch-ratios", "nan"], "--noise-batch-ratios"),
    (["--noise-multipliers", "1", "--noise-batch-ratios", "0.1"], "--noise-batch-ratios"),
    (["--steps", "0"], "--steps"),
    (["--learning-rates", "0"], "--learning-rates"),
    (["--delta", "1.5"], "--delta"),
    (["--seq-len", "1"], "--seq-len"),
    (["--seq-len", "1025"], "--seq-len"),
    (["--seq-len", "1024", "--max-users", "2", "--batch-sizes", "9999"], "--seq-len"),
    (["--eval-every", "0"], "--eval-every"),
    (["--max-users", "1"], "--max-users"),
    (["--models", ""], "--models"),
    (["--privacy-unit", "user", "--noise-multipliers", "0,1"], "--noise-multipliers"),
    (["--privacy-unit", "user", "--batch-sizes", "61"], "--batch-sizes"),
    (["--privacy-unit", "file"], "--privacy-unit"),
    (["--seed", "-1"], "--seed"),
    (["--devices", "0"], "--devices"),
    (["--devices", "x"], "--devices"),
    (["--devices", "4097"], "--devices"),
])
def test_bad_flags_exit_2_with_one_line(flags, flag, dpfl_main, capsys, tmp_path):
  argv = ["sweep", "--results", str(tmp_path / "r.jsonl"), "--max-users", "60",
          "--examples-per-user", "4", "--seq-len", "16", *flags]
  assert dpfl_main(argv) == 2
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and flag in err[0] and err[0].startswith("dpfl"), err
  assert not (tmp_path / "r.jsonl").exists()


def test_missing_results_flag(dpfl_main, capsys):
  assert dpfl_main(["sweep", "--models", "s50k"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--results" in err[0]


def test_results_file_rejects_bad_rows_and_reads_missing_file(tmp_path):
  assert results.read_results(tmp_path / "none.jsonl") == []
  with pytest.raises(ValueError, match="missing key 'run_id'"):
    results.append_result(tmp_path / "r.jsonl", {"schema_version": 1})
  (tmp_path / "bad.jsonl").write_text('not json\n{"run_id": "a"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1: not a JSON line"):
    results.read_results(tmp_path / "bad.jsonl")


def test_corpus_fingerprint_enters_run_id():
  config = _config()
  fingerprint = corpus_lib.load_corpus(seq_len=16, examples_per_user=4, max_users=60).fingerprint
  assert sweep.corpus_for(config).fingerprint == fingerprint


def test_user_level_run_is_uls_over_files(tmp_path, dpfl_main, capsys):
  path = tmp_path / "users.jsonl"
  tiny = [f for f in TINY]
  tiny[tiny.index("--steps") + 1] = "2"
  assert dpfl_main(["sweep", "--results", str(path), "--privacy-unit", "user",
                    "--noise-multipliers", "1", "--json", "--no-progress", *tiny]) == 0
  (row,) = results.read_results(path)
  assert row["privacy_unit"] == "user" and row["batch_size"] == 8
  corpus = corpus_lib.load_corpus(seq_len=16, examples_per_user=4, max_users=60)
  users = len(corpus.train_users)
  assert row["dataset_size"] == users and row["sampling_prob"] == pytest.approx(8 / users)
  mech = accounting.from_dict(row["mechanism"])
  assert isinstance(mech, accounting.UlsDpSgd) and mech.num_steps == 2
  assert row["epsilon"] == pytest.approx(
      accounting.epsilon(mech, delta=1e-5, discretization="auto"), rel=1e-9)
  per_user = corpus.num_train_examples / users
  assert row["tokens"] == round(2 * 8 * per_user * 16)
  # Example-level ids are unchanged by the new field; user-level ones differ.
  assert _config().key().get("privacy_unit") is None
  assert sweep.run_id(_config(privacy_unit="user"), "x") != sweep.run_id(_config(), "x")
  # A fit refuses to mix user-level and example-level private runs.
  from dpfl.scaling import fit
  example_row = dict(row, privacy_unit="example")
  with pytest.raises(ValueError, match="mix privacy units"):
    fit.fit_law([row, example_row])


# --- sharded sweeps (--shard I/N) ------------------------------------------------------

def _brute_force_lpt(costs, names, count):
  """Greedy longest-processing-time, written out independently: cost desc, then name."""
  loads, parts = [0.0] * count, [[] for _ in range(count)]
  for i in sorted(range(len(costs)), key=lambda i: (-costs[i], names[i])):
    best = 0
    for p in range(1, count):
      if loads[p] < loads[best]:
        best = p
    loads[best] += costs[i]
    parts[best].append(i)
  return [sorted(p) for p in parts]


def test_shards_partition_the_grid_balanced_by_cost():
  grid = sweep.make_grid(models=["s50k", "s100k", "s200k"], batch_sizes=[8, 64],
                         steps=[50, 200], learning_rates=[1e-3, 3e-3],
                         noise_batch_ratios=[0, 1e-3, 1e-2])
  costs = [6 * models.params_count(c.model) * c.steps * c.batch_size * c.seq_len
           * (2 if c.noise_multiplier > 0 else 1) for c in grid]
  for count in (1, 2, 3, 7, len(grid) + 2):
    parts = [shards.shard_configs(grid, i, count) for i in range(1, count + 1)]
    # Disjoint, covering, in grid order; as the greedy rule assigns them.
    assert sorted(grid.index(c) for p in parts for c in p) == list(range(len(grid)))
    names = [json.dumps(c.key(), sort_keys=True) for c in grid]
    assert [[grid.index(c) for c in p] for p in parts] == _brute_force_lpt(costs, names, count)
    loads = [sum(costs[grid.index(c)] for c in p) for p in parts]
    # LPT's bound: no part above 4/3 of the optimum, itself >= max(mean, largest run).
    assert max(loads) <= 4 / 3 * max(sum(costs) / count, max(costs)) * (1 + 1e-12)
    # A shard is a function of the set of runs (not of their order, nor of other shards).
    assert shards.shard_configs(list(reversed(grid)), count, count) == [
        c for c in reversed(grid) if c in parts[count - 1]]


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1/0", "2", "a/b", "1/2/3", "-1/2", ""])
def test_bad_shard_exits_2_naming_the_range(shard, dpfl_main, capsys, tmp_path):
  argv = ["sweep", "--results", str(tmp_path / "r.jsonl"), f"--shard={shard}", *TINY]
  assert dpfl_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--shard" in err[0] and "1 <= I <= N" in err[0], err
  assert not list(tmp_path.iterdir())


def test_shard_results_file_names():
  from dpfl.scaling import sweep_cli
  assert sweep_cli.shard_results_path("out/runs.jsonl", 2, 4) == "out/runs.shard-2-of-4.jsonl"
  assert sweep_cli.shard_results_path("runs", 1, 1) == "runs.shard-1-of-1"
  assert sweep_cli.shard_results_path("r/{shard}/x.jsonl", 3, 8) == "r/3-of-8/x.jsonl"


_TIMING = ("seconds", "tokens_per_second")


def _sharded_equals_unsharded(tmp_path, dpfl_main, capsys, flags):
  """Trains a grid unsharded and as shards 1/2, 2/2; returns (rows, merged) without timings."""
  base = ["--seed", "5", "--json", "--no-progress", *flags]
  whole = tmp_path / "whole.jsonl"
  assert dpfl_main(["sweep", "--results", str(whole), *base]) == 0
  shard_runs = []
  for i in (1, 2):
    assert dpfl_main(["sweep", "--results", str(tmp_path / "runs.jsonl"), "--shard",
                      f"{i}/2", *base]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["results"] == str(tmp_path / f"runs.shard-{i}-of-2.jsonl")
    shard_runs.append(out["runs"])
  strip = lambda rows: sorted(({k: v for k, v in r.items() if k not in _TIMING} for r in rows),
                              key=lambda r: r["run_id"])
  rows = strip(results.read_results(whole))
  merged = strip(results.read_inputs([tmp_path / "runs.shard-1-of-2.jsonl",
                                      tmp_path / "runs.shard-2-of-2.jsonl"]))
  assert shard_runs[0] >= 1 and shard_runs[1] >= 1 and sum(shard_runs) == len(rows)
  return rows, merged


def test_sharded_sweep_merges_to_the_unsharded_one(tiny_sweep, tmp_path, dpfl_main, capsys):
  # Non-private runs whose step tiny_sweep compiled already (model, batch, lr and
  # warm-up as there), long enough for 3 points after warm-up: well under a second.
  flags = [f for f in TINY]
  flags[flags.index("--steps") + 1] = "12,13"
  flags[flags.index("--eval-every") + 1] = "1"
  rows, merged = _sharded_equals_unsharded(
      tmp_path, dpfl_main, capsys, ["--noise-multipliers", "0", *flags])
  # Equal rows (same seeds, so the same losses): the same law. That a fit of
  # merged shard files is the fit of the whole file (rows in another order) is
  # test_results_inputs.py::test_shard_files_merge_to_the_whole.
  assert merged == rows and len(rows) == 2 and all(r["seed"] == 5 for r in rows)


@pytest.mark.slow
def test_sharded_private_sweep_merges_to_the_unsharded_one(tmp_path, dpfl_main, capsys):
  flags = [f for f in TINY]
  flags[flags.index("--steps") + 1] = "4"
  flags[flags.index("--eval-every") + 1] = "1"
  flags[flags.index("--learning-rates") + 1] = "0.01,0.003"
  rows, merged = _sharded_equals_unsharded(
      tmp_path, dpfl_main, capsys,
      ["--noise-multipliers", "0,2", "--warmup-steps", "0", *flags])
  assert merged == rows and len(rows) == 4 and all(r["seed"] == 5 for r in rows)
