"""benchmarks/noise_path.py: old vs new gaussian_noise runs, agrees bit for bit, reports ratios."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_small_run_reports_same_bits_and_a_consistent_ratio():
  spec = importlib.util.spec_from_file_location("noise_path_bench",
                                                ROOT / "benchmarks" / "noise_path.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.bench_noise_path(20_000, repeats=5)
  assert out["params"] == 20_000 and out["repeats"] == 5
  assert out["same_bits"]  # the jitted old and new steps release the same noise
  assert out["old_seconds"] > 0 and out["new_seconds"] > 0
  assert out["ratio"] == pytest.approx(out["new_seconds"] / out["old_seconds"])
