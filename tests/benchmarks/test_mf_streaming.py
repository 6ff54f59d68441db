"""benchmarks/_mf_streaming.py: the streaming-noise benchmark runs and reports consistent figures."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_step_and_consistent_ratios():
  spec = importlib.util.spec_from_file_location("_mf_streaming_bench",
                                                ROOT / "benchmarks" / "_mf_streaming.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.bench_streaming(quick=True, repeats=5, jax_privacy=False)
  assert out["params"] == 1_000_000 and out["buffers"] == 4 and out["repeats"] == 5
  for name in ("iid", "blt", "fused_iid", "jax_random_iid", "blt_no_donation"):
    assert out[f"{name}_seconds"] > 0
  assert out["ratio"] == pytest.approx(out["blt_seconds"] / out["iid_seconds"])
  assert out["ratio_vs_jax_random_iid"] == pytest.approx(
      out["blt_seconds"] / out["jax_random_iid_seconds"])
  assert out["jax_privacy"] is None


def test_num_params_override_is_checked():
  spec = importlib.util.spec_from_file_location("_mf_streaming_bench_size",
                                                ROOT / "benchmarks" / "_mf_streaming.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  for bad in (12_345, 50_000):
    with pytest.raises(ValueError, match=f"num_params must be a multiple of 10000 and >= 100000, "
                                         f"got {bad}"):
      bench.bench_streaming(quick=True, num_params=bad, jax_privacy=False)
