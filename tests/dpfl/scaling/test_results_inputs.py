"""What ``dpfl fit --results`` reads: CSV point tables (strict) and merged per-shard sweep files."""

import json

import pytest

from dpfl import cli
from dpfl.scaling import fit, results

from test_fit import synthetic_rows

HEADER = "model,params,learning_rate,steps,noise_batch_ratio,loss"


@pytest.fixture
def dpfl_main(monkeypatch):
  monkeypatch.setitem(cli.COMMANDS, "fit", ("fit a law", "dpfl.scaling.fit_cli"))
  return cli.main


def _write(tmp_path, text, name="points.csv", encoding="utf-8"):
  path = tmp_path / name
  path.write_bytes(text.encode(encoding))
  return path


def test_points_csv_reads_any_column_order(tmp_path):
  # Columns shuffled, spaces around cells, a BOM, blank lines, params as 4.5e6.
  text = ("\ufeff loss , model,steps,params,noise_batch_ratio,learning_rate\n"
          "3.25, m4.5M ,128,4.5e6,0,0.001\n"
          "\n"
          "2.5,m778M,131072,778000000,1.1920928955078125e-07,3e-4\n"
          "2.75,m4.5M,256,4500000,0.015625,1e-3\n\n")
  rows = results.read_points_csv(_write(tmp_path, text))
  assert rows == [
      {"model": "m4.5M", "params": 4_500_000, "learning_rate": 0.001, "steps": 128,
       "noise_batch_ratio": 0.0, "loss": 3.25},
      {"model": "m778M", "params": 778_000_000, "learning_rate": 3e-4, "steps": 131072,
       "noise_batch_ratio": 2.0**-23, "loss": 2.5},
      {"model": "m4.5M", "params": 4_500_000, "learning_rate": 1e-3, "steps": 256,
       "noise_batch_ratio": 2.0**-6, "loss": 2.75}]
  assert all(list(r) == list(results.POINT_COLUMNS) for r in rows)
  assert all(type(r["params"]) is int and type(r["steps"]) is int for r in rows)


GOOD = "m,1000,0.001,10,0.01,3.0"


@pytest.mark.parametrize("text, where", [
    ("", "empty file"),
    ("\n\n", "empty file"),
    (HEADER + "\n", "no rows"),
    ("model,params,learning_rate,steps,loss\nm,1000,0.001,10,3.0\n",
     ":1: missing column(s) noise_batch_ratio"),
    (HEADER + ",seed\n" + GOOD + ",1\n", ":1: column 7: unknown column 'seed'"),
    (HEADER.replace("learning_rate", "lr") + "\n" + GOOD + "\n", ":1: column 3: unknown column 'lr'"),
    (HEADER + ",loss\n" + GOOD + ",3\n", ":1: column 7: column 'loss' appears twice"),
    (HEADER + "\n" + GOOD + "\nm,1000,0.001,10,0.01\n", ":3: 5 fields, the header has 6"),
    (HEADER + "\n" + GOOD + "\nm,1000,0.001,10,0.01,abc\n", ":3: column 'loss': loss must be a number"),
    (HEADER + "\nm,1000,0.001,10,0.01,nan\n", ":2: column 'loss': loss must be a finite number > 0"),
    (HEADER + "\nm,1000,0.001,10,0.01,inf\n", ":2: column 'loss'"),
    (HEADER + "\nm,1000,0.001,10,0.01,0\n", ":2: column 'loss'"),
    (HEADER + "\nm,0,0.001,10,0.01,3\n", ":2: column 'params': params must be an integer >= 1"),
    (HEADER + "\nm,1000.5,0.001,10,0.01,3\n", ":2: column 'params'"),
    (HEADER + "\nm,1000,0.001,0,0.01,3\n", ":2: column 'steps': steps must be an integer >= 1"),
    (HEADER + "\nm,1000,0.001,2.5,0.01,3\n", ":2: column 'steps'"),
    (HEADER + "\nm,1000,0,10,0.01,3\n", ":2: column 'learning_rate': learning_rate must be"),
    (HEADER + "\nm,1000,-1e-3,10,0.01,3\n", ":2: column 'learning_rate'"),
    (HEADER + "\nm,1000,0.001,10,-0.01,3\n", ":2: column 'noise_batch_ratio': noise_batch_ratio "
     "must be a finite number >= 0"),
    (HEADER + "\nm,1000,0.001,10,,3\n", ":2: column 'noise_batch_ratio'"),
    (HEADER + "\n,1000,0.001,10,0.01,3\n", ":2: column 'model'"),
    (HEADER + "\n" + GOOD + "\nm,2000,0.001,20,0.01,2.9\n",
     ":3: column 'params': model 'm' has params 2000 here and 1000 on line 2"),
])
def test_points_csv_errors_name_file_line_and_column(tmp_path, text, where):
  path = _write(tmp_path, text)
  with pytest.raises(ValueError) as err:
    results.read_points_csv(path)
  message = str(err.value)
  assert message.startswith(str(path)) and where in message, message


def test_fit_refuses_a_bad_table_in_one_line(tmp_path, dpfl_main, capsys):
  path = _write(tmp_path, HEADER + ",extra\n" + GOOD + ",1\n")
  assert dpfl_main(["fit", "--results", str(path), "--out", str(tmp_path / "law.json")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--results" in err[0] and "points.csv:1: column 7" in err[0], err
  assert not (tmp_path / "law.json").exists()


def test_fit_passes_point_rows_and_support_flags(tmp_path, dpfl_main, capsys, monkeypatch):
  a = _write(tmp_path, HEADER + "\n" + GOOD + "\n", name="a.csv")
  b = _write(tmp_path, HEADER + "\nm,1000,0.001,20,0.01,2.9\n", name="b.CSV")
  seen = {}

  def fake_fit_law(rows, *, curve="eval_loss", min_points=3, seq_len=None, max_epochs=None,
                   max_sampling_prob=None, description="", source=None, min_steps=1,
                   tail_factor=64.0):
    seen.update(rows=rows, seq_len=seq_len, max_epochs=max_epochs,
                max_sampling_prob=max_sampling_prob, source=source, min_steps=min_steps,
                tail_factor=tail_factor)
    return {"models": [{"model": "m", "params": 1000}], "seq_len": seq_len}

  monkeypatch.setattr(fit, "fit_law", fake_fit_law)
  monkeypatch.setattr(fit, "save_law", lambda law, path: open(path, "w").write("{}"))
  monkeypatch.setattr(fit, "support", lambda law: {"seq_len": law["seq_len"]})
  # Two files after one --results (a shell glob), then a repeated --results.
  argv = ["fit", "--results", str(a), "--out", str(tmp_path / "law.json"), "--seq-len", "1024",
          "--max-epochs", "4", "--max-sampling-prob", "0.01", "--json"]
  assert dpfl_main(argv) == 0
  assert seen["rows"] == results.read_points_csv(a) and seen["seq_len"] == 1024
  assert seen["max_epochs"] == 4.0 and seen["max_sampling_prob"] == 0.01
  assert seen["min_steps"] == 1 and seen["tail_factor"] == 64.0
  assert dpfl_main(argv + ["--min-steps", "100", "--tail-factor", "8"]) == 0
  assert seen["min_steps"] == 100 and seen["tail_factor"] == 8.0
  assert dpfl_main(["fit", "--results", str(a), str(b), "--results", str(a),
                    "--out", str(tmp_path / "law.json"), "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # a.csv given twice: its points are kept once (a fit must not weigh a point twice).
  assert out["points"] == 2 and out["runs"] == 0 and out["files"] == 3
  assert [r["steps"] for r in seen["rows"]] == [10, 20] and seen["seq_len"] is None
  assert seen["source"] == "a.csv, b.CSV, a.csv"


@pytest.mark.parametrize("flags, flag", [
    (["--max-sampling-prob", "1.5"], "--max-sampling-prob"),
    (["--max-sampling-prob", "0"], "--max-sampling-prob"),
    (["--max-epochs", "0"], "--max-epochs"),
    (["--max-epochs", "inf"], "--max-epochs"),
    (["--seq-len", "0"], "--seq-len"),
    (["--tail-factor", "0.5"], "--tail-factor"),
    (["--min-steps", "0"], "--min-steps"),
])
def test_support_flags_are_validated(tmp_path, dpfl_main, capsys, flags, flag):
  path = _write(tmp_path, HEADER + "\n" + GOOD + "\n")
  assert dpfl_main(["fit", "--results", str(path), "--out", str(tmp_path / "law.json"),
                    *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and flag in err[0], err


def _shard_files(tmp_path):
  """The synthetic sweep as rows with run ids, split over three files (one run repeated)."""
  rows = [dict(r, run_id=f"{i:016x}") for i, r in enumerate(synthetic_rows())]
  files = [tmp_path / f"runs.shard-{i + 1}-of-3.jsonl" for i in range(3)]
  for i, path in enumerate(files):
    part = rows[i::3] + ([rows[0]] if i == 2 else [])  # run 0 also in shard 3, identical
    path.write_text("".join(json.dumps(r) + "\n" for r in part))
  whole = tmp_path / "runs.jsonl"
  whole.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return rows, files, whole


def test_shard_files_merge_to_the_whole(tmp_path, dpfl_main, capsys):
  rows, files, whole = _shard_files(tmp_path)
  merged = results.read_inputs(files)
  assert sorted(merged, key=lambda r: r["run_id"]) == rows
  laws = []
  for paths in ([str(whole)], [str(p) for p in files]):
    out = tmp_path / "law.json"
    assert dpfl_main(["fit", "--results", *paths, "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"] == len(rows)
    law = fit.load_law(out)
    law.pop("source")
    laws.append(law)
  assert laws[0] == laws[1]


def test_a_run_with_two_different_results_is_refused(tmp_path, dpfl_main, capsys):
  rows, files, _ = _shard_files(tmp_path)
  changed = dict(rows[1], final_eval_loss=rows[1]["final_eval_loss"] + 0.5)
  with open(files[2], "a") as f:
    f.write(json.dumps(changed) + "\n")
  with pytest.raises(ValueError, match=f"run {rows[1]['run_id']} is in .*shard-2-of-3.jsonl "
                     "and in .*shard-3-of-3.jsonl with different results"):
    results.read_inputs(files)
  assert dpfl_main(["fit", "--results", *map(str, files), "--out",
                    str(tmp_path / "law.json")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--results" in err[0] and "different results" in err[0], err


def test_support_flags_refused_for_sweep_rows(tmp_path, dpfl_main, capsys):
  _, _, whole = _shard_files(tmp_path)
  assert dpfl_main(["fit", "--results", str(whole), "--out", str(tmp_path / "law.json"),
                    "--seq-len", "64"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--seq-len" in err[0] and ".csv" in err[0], err


def test_csv_tables_fit_the_law_of_their_points(tmp_path, dpfl_main, capsys):
  """A table of a known law at the paper's scale, written as two CSV files (columns in
  another order), fits through the CLI to the law fit_law makes of the same points."""
  import csv

  import synthetic_law as known
  models = {k: known.MODELS[k] for k in ("BertTiny", "BertBase", "BertMega")}
  points = known.point_rows(models=models, steps=known.STEPS[::2], ratios=known.RATIOS[::3],
                            learning_rates={3e-4: 0.0, 1e-3: 0.1})
  columns = ["loss", "steps", "model", "noise_batch_ratio", "params", "learning_rate"]
  paths = [tmp_path / "part1.csv", tmp_path / "part2.csv"]
  half = len(points) // 2
  for path, part in zip(paths, (points[:half], points[half:])):
    with open(path, "w", newline="") as f:
      writer = csv.DictWriter(f, columns)
      writer.writeheader()
      writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()}
                       for r in part)
  assert results.read_inputs(paths) == points  # repr round-trips every float
  out = tmp_path / "law.json"
  assert dpfl_main(["fit", "--results", *map(str, paths), "--out", str(out), "--seq-len",
                    "1024", "--max-epochs", "8", "--max-sampling-prob", "0.001", "--json"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["points"] == len(points) and summary["runs"] == 0
  law = fit.load_law(out)
  want = fit.fit_law(points, seq_len=1024, max_epochs=8, max_sampling_prob=0.001,
                     source=law["source"])
  assert law == json.loads(json.dumps(want))
  support = fit.support(law)
  assert support["seq_len"] == 1024 and support["max_epochs"] == 8
  assert support["max_sampling_prob"] == 0.001
  assert support["params"] == [4_500_000, 778_000_000]


def test_the_shipped_law_is_rebuilt_by_the_cli(tmp_path, dpfl_main, capsys):
  """`dpfl fit --tail-factor 1` on the study's results file is the shipped law (no tail, no E).

  The default (a tail trusted to 64x) refuses that sweep: its 200-step
  non-private curves never flatten, so E sits at its bound of 0.
  """
  import pathlib
  study = pathlib.Path(__file__).resolve().parents[3] / "docs" / "scaling_study" / "results.jsonl"
  out = tmp_path / "law.json"
  assert dpfl_main(["fit", "--results", str(study), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "degenerate" in err[0] and "--tail-factor 1" in err[0], err
  assert dpfl_main(["fit", "--results", str(study), "--out", str(out), "--tail-factor", "1"]) == 0
  assert "support: params [4.948e+04, 2.155e+05], steps [20, 200]" in capsys.readouterr().out
  got, shipped = fit.load_law(out), fit.load_law()
  assert got["models"] == shipped["models"] and fit.support(got) == fit.support(shipped)


def test_a_point_is_one_row_and_one_loss(tmp_path, dpfl_main, capsys):
  """A repeated point in one table, or a contradicting one in another, is refused; the
  same table given twice counts each point once (a fit must not weigh a point twice)."""
  good = HEADER + "\n" + GOOD + "\n"
  twice = _write(tmp_path, good + GOOD + "\n", name="twice.csv")
  with pytest.raises(ValueError, match=r"twice\.csv:3: the point .* is also on line 2"):
    results.read_points_csv(twice)
  a = _write(tmp_path, good, name="a.csv")
  model, params, lr, steps, ratio, loss = GOOD.split(",")
  other = _write(tmp_path, HEADER + "\n" + ",".join([model, params, lr, steps, ratio,
                                                     str(float(loss) + 1)]) + "\n",
                 name="b.csv")
  with pytest.raises(ValueError, match=r"a\.csv and .*b\.csv give the point .* different"):
    results.read_inputs([a, other])
  assert results.read_inputs([a, a]) == results.read_points_csv(a)
  assert dpfl_main(["fit", "--results", str(twice), "--out", str(tmp_path / "law.json")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "twice.csv:3" in err[0], err
