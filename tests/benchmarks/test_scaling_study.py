"""benchmarks/scaling_study.py: its grids and the criteria that decide its findings.

No training here (the study itself is the long run): the analysis helpers are
fed synthetic rows and optima whose verdict is known by construction.
"""

import importlib.util
import math
import pathlib
import sys

import pytest

from dpfl.scaling import models, sweep

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name, file):
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def study():
  return _load("scaling_study_benchmark", "scaling_study.py")


@pytest.fixture(scope="module")
def report():
  return _load("scaling_report_benchmark", "_scaling_report.py")


def test_grids_are_valid_and_distinct(study):
  for spec, expected in ((study.QUICK, 7), (study.FULL, 44)):
    configs = study.study_configs(spec)
    assert len(configs) == expected
    assert len({sweep.run_id(c, "corpus") for c in configs}) == expected
    assert any(not c.private for c in configs) and any(c.private for c in configs)
  full = study.study_configs(study.FULL)
  # every private cell of the full grid is run at both learning rates
  cells = {}
  for c in full:
    if c.private:
      cells.setdefault((c.model, c.batch_size, c.noise_batch_ratio), set()).add(c.learning_rate)
  assert all(lrs == {3e-3, 1e-2} for lrs in cells.values())


def _row(model, batch, ratio, loss, lr=3e-3, steps=100, curve=None):
  return {"model": model, "params": models.params_count(model), "batch_size": batch,
          "noise_batch_ratio": ratio, "noise_multiplier": ratio * batch, "private": ratio > 0,
          "learning_rate": lr, "steps": steps, "final_eval_loss": loss, "seq_len": 8,
          "eval_loss": curve or [[steps, loss]], "epsilon": 1.0 if ratio > 0 else None}


def test_ratio_criterion(report):
  ratios = (0.001, 0.01, 0.1)
  # Loss a function of σ/B alone (plus a little batch effect): holds.
  rows = [_row("s50k", b, r, 3 + 10 * r + 0.001 * (b == 64)) for b in (64, 256) for r in ratios]
  assert report.finding_ratio_drives_utility(rows)["holds"] is True
  # Loss driven by σ, not σ/B (σ = r·B): the same σ/B differs a lot across B.
  rows = [_row("s50k", b, r, 3 + 0.5 * r * b) for b in (64, 256) for r in ratios]
  assert report.finding_ratio_drives_utility(rows)["holds"] is False
  # Best over learning rates is taken per cell.
  rows = [_row("s50k", b, r, 3 + 10 * r) for b in (64, 256) for r in ratios]
  rows.append(_row("s50k", 64, 0.01, 9.0, lr=1e-2))
  assert report.finding_ratio_drives_utility(rows)["holds"] is True
  assert report.finding_ratio_drives_utility(rows[:1])["holds"] is None


def _optimum(model, batch, loss):
  return {"model": model, "params": models.params_count(model), "batch_size": batch,
          "steps": 100, "predicted_loss": loss}


def test_smaller_models_larger_batches_criterion(report):
  computes = [1e9, 1e10]
  frontier = [{"model": "s100k", "batch_size": 64, "steps": 100, "loss": 2.0}] * 2
  optima = {1.0: [_optimum("s50k", 256, 3.0)] * 2, math.inf: [_optimum("s100k", 64, 2.0)] * 2}
  found = report.finding_smaller_models_larger_batches(optima, frontier, computes)
  assert found["holds_model"] and found["holds_batch"] and found["holds"]
  optima = {1.0: [_optimum("s100k", 64, 3.0)] * 2}
  found = report.finding_smaller_models_larger_batches(optima, frontier, computes)
  assert not found["holds_model"] and not found["holds_batch"]
  assert found["not_larger_model_fraction"] == 1.0
  assert report.finding_smaller_models_larger_batches({1.0: [None] * 2}, frontier,
                                                      computes)["holds"] is None


def test_diminishing_epsilon_criterion(report):
  epsilons = [0.5, 1, 2, 4, 8, 16]
  concave = [3.0, 2.6, 2.3, 2.1, 2.0, 1.95]     # gains 0.4, 0.3, 0.2, 0.1, 0.05
  accelerating = [3.0, 2.95, 2.85, 2.6, 2.2, 1.6]
  for losses, expected in ((concave, True), (accelerating, False)):
    optima = {e: [_optimum("s50k", 64, v)] for e, v in zip(epsilons, losses)}
    found = report.finding_diminishing_epsilon(optima, [1e10])
    assert found["holds"] is expected and found["span"] == 2
  assert report.finding_diminishing_epsilon({}, [1e10])["holds"] is None


def test_measured_nonprivate_frontier_respects_compute(report):
  curve = [[10, 3.0], [50, 2.5], [100, 2.2]]
  rows = [_row("s50k", 64, 0.0, 2.2, curve=curve), _row("s50k", 64, 0.01, 1.0)]
  flops = lambda t: models.training_flops(params=models.params_count("s50k"), num_steps=t,
                                          batch_size=64, seq_len=8)
  got = report.nonprivate_frontier(rows, [flops(5), flops(60), flops(1000)], warmup_steps=10)
  assert got[0] is None  # nothing that cheap; private rows never count
  assert (got[1]["steps"], got[1]["loss"]) == (50, 2.5)  # step 10 is warm-up
  assert got[2]["steps"] == 100


def test_quick_study_end_to_end(study, tmp_path, capsys, monkeypatch):
  """`--quick` (the CI pipeline check): sweep, speed, fit, plan and a report with plots.

  Run on a trimmed copy of the quick grid (same 7 cells, smaller batches,
  12 steps): every stage still runs, in about a third of the time.
  """
  import json
  quick = study.QUICK
  tiny_runs = [(model, batch // 4, ratio, lr) for model, batch, ratio, lr in quick["runs"]]
  monkeypatch.setattr(study, "QUICK", dict(
      quick, runs=tiny_runs, steps=12,
      common=dict(quick["common"], eval_every=4, warmup_steps=2, eval_examples=64),
      speed=dict(quick["speed"], batch_size=32, repeats=3)))
  summary = study.main(["--quick", "--out", str(tmp_path), "--no-progress"])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(summary, default=float))
  assert summary["runs"] == 7 and summary["trained"] == 7
  assert set(summary["findings"]) == {
      "noise_batch_ratio_drives_utility", "private_optimum_smaller_model",
      "private_optimum_larger_batch", "diminishing_returns_in_epsilon"}
  (speed,) = summary["speed"]
  assert speed["dp_tokens_per_second"] > 0 and speed["plain_tokens_per_second"] > 0
  assert speed["dp_slowdown"] == pytest.approx(
      speed["plain_tokens_per_second"] / speed["dp_tokens_per_second"], rel=1e-9)
  report_text = (tmp_path / "REPORT.md").read_text()
  assert "Findings of McKenna et al. 2025" in report_text
  for png in ("measured_loss_vs_ratio.png", "law_loss_vs_ratio.png", "compute_optimal.png"):
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Resumable: a second run trains nothing new.
  again = study.main(["--quick", "--out", str(tmp_path), "--no-progress", "--skip-speed"])
  assert again["trained"] == 0 and again["runs"] == 7
