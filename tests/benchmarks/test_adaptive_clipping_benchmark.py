"""benchmarks/adaptive_clipping.py: the grid / best / bad selection and the --json line."""

import contextlib
import importlib.util
import io
import json
import math
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
  spec = importlib.util.spec_from_file_location(
      "adaptive_clipping_benchmark", ROOT / "benchmarks" / "adaptive_clipping.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fake_task(bench, *, higher_is_better, best_clip):
  """A task whose metric is a closed form of C (no training): peaks at ``best_clip``."""

  class Fake(bench.Task):
    metric = "fake"
    centre = 1.0

    def __init__(self):
      self.higher_is_better = higher_is_better

    def make(self, clip, sigma, seed):
      plan = types.SimpleNamespace(noise_multiplier=sigma or 1.5, accounted_noise_multiplier=1.0)
      return types.SimpleNamespace(noise_multiplier=sigma or 1.0, plan=plan,
                                   sampler=types.SimpleNamespace(expected_batch_size=100.0),
                                   epsilon=lambda: 3.0)

    def run(self, clip, sigma, seed):
      c = clip.initial if isinstance(clip, bench.dpfl.adaptive_clip(initial=1.0).__class__) \
          else clip
      score = (math.log10(c) - math.log10(best_clip)) ** 2 + 0.01 * seed
      value = -score if higher_is_better else score
      return value, self.make(clip, sigma, seed)

  return Fake


def test_selection_and_json_line():
  bench = _load()
  bench.TASKS = {"digits": _fake_task(bench, higher_is_better=True, best_clip=0.3),
                 "lm": _fake_task(bench, higher_is_better=False, best_clip=3.0)}
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    result = bench.main(["--json", "--seeds", "1,2"])
  line = json.loads(out.getvalue().strip().splitlines()[-1])
  assert set(line) == {"digits", "lm"}
  for name in line:
    assert set(line[name]) == {"adaptive", "best_fixed", "bad_fixed"}
  digits, lm = result["details"]["digits"], result["details"]["lm"]
  assert digits["best_clip"] == pytest.approx(0.316228) and lm["best_clip"] == pytest.approx(3.16228)
  # the worse of 10x and 1/10x the best (each one decade off: equal scores here)
  assert line["digits"]["bad_fixed"] == pytest.approx(-(1 + math.log10(0.316228 / 0.3)) ** 2
                                                      - 0.015, abs=0.2)
  assert line["digits"]["bad_fixed"] < line["digits"]["best_fixed"]
  assert line["lm"]["bad_fixed"] > line["lm"]["best_fixed"]
  assert len(digits["grid"]) == 7  # 5 grid points + 0.0316 and 3.16 (10x is on the grid)


@pytest.mark.slow  # 16 short trainings and 4 calibrations: minutes on 2 shared cores
def test_quick_run_prints_the_json_line():
  bench = _load()
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    bench.main(["--quick", "--json"])
  line = json.loads(out.getvalue().strip().splitlines()[-1])
  assert 0 <= line["digits"]["adaptive"] <= 1 and line["lm"]["adaptive"] > 0
