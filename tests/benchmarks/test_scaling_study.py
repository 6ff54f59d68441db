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


@pytest.mark.slow  # ~50 s: sweep, fit and plan are each covered by tests/dpfl/scaling
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


def _closed_form_params(d_model: int, num_layers: int, vocab: int = 257) -> int:
  # Tied embedding, per block 2 LayerNorms, q/k/v/out without bias, MLP d->4d->d
  # with biases; final LayerNorm.
  d = d_model
  return vocab * d + num_layers * (4 * d + 4 * d * d + 8 * d * d + 5 * d) + 2 * d


def test_accelerator_preset_is_within_its_bounds_and_8_minutes_on_an_h100(study):
  spec = study.PRESETS["accelerator"]
  assert spec is study.ACCELERATOR and study.preset_spec("accelerator", False) is spec
  configs = study.study_configs(spec)
  limits = study.ACCELERATOR_LIMITS
  assert len({sweep.run_id(c, "corpus") for c in configs}) == len(configs) == 18
  assert max(models.params_count(c.model) for c in configs) <= limits["max_params"] == 20e6
  assert max(c.steps for c in configs) <= limits["max_steps"] == 2000
  assert limits["max_seconds"] == 8 * 60
  sizes = sorted({models.params_count(c.model) for c in configs})
  assert len(sizes) >= 3 and sizes[-1] >= 15e6  # up to ~20M, several sizes
  private = [c for c in configs if c.private]
  public = [c for c in configs if not c.private]
  # Finding (b) needs private runs at batches above the non-private ones,
  # several noise levels, and every model on both sides.
  assert max(c.batch_size for c in private) > max(c.batch_size for c in public)
  assert len({c.noise_batch_ratio for c in private}) >= 2
  assert {c.model for c in private} == {c.model for c in public}
  estimate = study.estimate_seconds(spec)
  assert estimate["total"] <= limits["max_seconds"]
  assert len(estimate["runs"]) == len(configs)
  # Independently: the training FLOPs alone (6 N T B seq, DP at 2x), at the
  # stated throughput, with N from the closed form of each model's shape,
  # are a lower bound of the estimate, and the stated throughput is the
  # docstring's 100 TFLOP/s.
  assert study.H100_FLOPS_PER_SECOND == 100e12 and study.DP_FLOPS_FACTOR == 2.0
  shapes = {"s1m": (128, 5), "s5m": (256, 6), "s20m": (512, 6)}
  flops = sum(6 * _closed_form_params(*shapes[c.model]) * c.steps * c.batch_size * c.seq_len
              * (2 if c.private else 1) for c in configs)
  assert flops / 100e12 < estimate["sweep"]
  assert estimate["sweep"] + estimate["speed"] + estimate["analysis"] == pytest.approx(
      estimate["total"])
  assert estimate["speed"] > 0 and estimate["analysis"] > 0


def test_accelerator_quick_is_a_small_copy_of_the_same_grid(study):
  spec, quick = study.ACCELERATOR, study.preset_spec("accelerator", True)
  assert study.preset_spec("full", True) is study.QUICK
  assert len(quick["runs"]) == len(spec["runs"])
  configs = study.study_configs(quick)
  assert len({sweep.run_id(c, "corpus") for c in configs}) == len(configs)
  assert max(models.params_count(c.model) for c in configs) <= 250_000
  assert max(c.steps for c in configs) <= 40
  # Same structure: privacy, σ/B and the batch order of each run are kept.
  for big, small in zip(spec["runs"], quick["runs"]):
    assert big[2] == small[2] and (big[2] > 0) == (small[2] > 0)
  for a, b in zip(spec["runs"], quick["runs"]):
    for c, d in zip(spec["runs"], quick["runs"]):
      assert (a[1] < c[1]) == (b[1] < d[1])  # batch order
      assert (study.run_steps(spec, a) < study.run_steps(spec, c)) == (
          study.run_steps(quick, b) < study.run_steps(quick, d))  # steps order
  with pytest.raises(ValueError, match="preset must be one of full, accelerator, got 'gpu'"):
    study.preset_spec("gpu", False)


def test_accelerator_report_notes_state_the_estimate_and_the_device(study):
  import jax
  spec = study.preset_spec("accelerator", True)
  assert study.steps_text(study.QUICK) == "30 steps each"
  assert study.steps_text(study.ACCELERATOR) == "125-2000 steps"
  estimate = study.estimate_seconds(study.ACCELERATOR)["total"]
  notes = study.accelerator_notes(spec, quick=True)
  assert f"estimated {estimate / 60:.1f} min on one H100" in notes[0]
  assert "100 TFLOP/s" in notes[0] and notes[0].endswith(jax.devices()[0].device_kind)
  assert "pipeline, not the paper" in notes[1]
  assert len(study.accelerator_notes(study.ACCELERATOR, quick=False)) == 1


@pytest.mark.slow
def test_accelerator_quick_end_to_end(study, tmp_path, capsys):
  """`--preset accelerator --quick`: the preset's 18-run grid shrunk to CPU size, every stage."""
  import json
  summary = study.main(["--preset", "accelerator", "--quick", "--out", str(tmp_path),
                        "--no-progress"])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["preset"] == "accelerator" and last["quick"] is True
  assert summary["runs"] == summary["trained"] == 18
  assert set(summary["findings"]) >= {"private_optimum_smaller_model",
                                      "private_optimum_larger_batch"}
  report_text = (tmp_path / "REPORT.md").read_text()
  assert "(accelerator preset)" in report_text and "estimated" in report_text
  assert "### (b) Compute-optimal private models are smaller" in report_text


def test_accelerator_grid_can_decide_finding_b(study, report):
  """Fed losses of a law-shaped synthetic (no training), the preset's runs, batches and
  computes give in-support private optima and measured non-private ones at matched
  compute, so finding (b) gets a verdict rather than "not testable"."""
  spec = study.ACCELERATOR

  def loss(params, steps, batch, ratio):  # data, model and noise terms, all decreasing in T
    return (1.0 + 40 * params ** -0.28 + 400 * (steps * batch * 64) ** -0.28
            + 0.5 * (ratio * math.sqrt(params)) ** 0.8 / (1 + steps / 100) ** 0.3)

  rows = []
  for c in study.study_configs(spec):
    n = models.params_count(c.model)
    points = [0, *range(c.eval_every, c.steps, c.eval_every), c.steps]
    curve = [[t, loss(n, max(t, 1), c.batch_size, c.noise_batch_ratio)] for t in points]
    rows.append({**_row(c.model, c.batch_size, c.noise_batch_ratio, curve[-1][1],
                        lr=c.learning_rate, steps=c.steps, curve=curve),
                 "seq_len": c.seq_len, "warmup_steps": c.warmup_steps})
  law, _ = study.fit_study_law(rows)
  computes = [float(x) for x in spec["computes"]]
  optima = report.supported_optima(law, computes=computes, epsilons=spec["epsilons"],
                                   batch_sizes=sorted({r[1] for r in spec["runs"]}),
                                   delta=spec["common"]["delta"], users=446_896, seq_len=64)
  frontier = report.nonprivate_frontier(rows, computes, spec["common"]["warmup_steps"])
  found = report.finding_smaller_models_larger_batches(optima, frontier, computes)
  assert found["holds"] is not None and len(found["comparisons"]) >= len(computes)
