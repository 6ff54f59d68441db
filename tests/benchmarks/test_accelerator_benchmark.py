"""benchmarks/accelerator.py: the JSON line, the per-section time guard, ``--quick`` on a CPU."""

import importlib.util
import json
import math
import pathlib
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
  name = "accelerator_bench"
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "accelerator.py")
  bench = importlib.util.module_from_spec(spec)
  sys.modules[name] = bench
  spec.loader.exec_module(bench)
  return bench


bench = _load()
TOP_KEYS = {"benchmark", "quick", "device_kind", "platform", "device_count", "jax_version",
            "budget_s", "wall_s", "sections"}
SECTION_KEYS = {"wall_s", "budget_s", "complete", "skipped", "peak_bytes_in_use"}


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_shares_cover_the_budget_once_in_section_order():
  assert list(bench.SHARES) == list(bench.SECTIONS)
  assert sum(bench.SHARES.values()) == pytest.approx(1.0)
  # With its default budget, the whole stays under 8 minutes with room for
  # start-up and an item that overruns its section.
  assert bench.DEFAULT_BUDGET_S <= 8 * 60 - 45


def test_a_section_past_its_deadline_records_what_it_skipped():
  section = bench.Section("clipping", deadline=time.perf_counter() + 60)
  assert section.room_for("mlp", 1.0)
  assert not section.room_for("gpt2", 120.0)  # would end past the deadline
  out = section.close({"models": {}})
  assert out["complete"] is False and out["skipped"] == ["gpt2"]
  assert SECTION_KEYS <= set(out) and out["models"] == {}
  assert 59 <= out["budget_s"] <= 60
  # Every section, given no time, skips its work and still reports.
  result = bench.run(quick=True, budget_s=1e-3)
  assert TOP_KEYS <= set(result) and list(result["sections"]) == list(bench.SECTIONS)
  for name, section in result["sections"].items():
    assert SECTION_KEYS <= set(section), name
    assert section["complete"] is False and section["skipped"], name
  assert result["wall_s"] < 30


def test_a_failing_section_is_reported_and_the_others_still_run(monkeypatch):
  def fail(section, sizes):
    raise RuntimeError("out of memory")
  for name in ("clipping", "uls", "tokens"):
    monkeypatch.setitem(bench.SECTIONS, name, fail)
  monkeypatch.setitem(bench.SECTIONS, "noise", lambda section, sizes: {"ratio": 1.5, "params": 10})
  result = bench.run(quick=True, budget_s=600)
  for name in ("clipping", "uls", "tokens"):
    failed = result["sections"][name]
    assert failed["complete"] is False
    assert failed["skipped"] == ["error: RuntimeError: out of memory"]
  noise = result["sections"]["noise"]
  assert noise["complete"] is True and noise["ratio"] == 1.5


def test_quick_noise_section_smoke():
  result = bench.run(quick=True, budget_s=600, only=("noise",))
  assert TOP_KEYS <= set(result) and set(result["sections"]) == {"noise"}
  import jax
  assert result["device_kind"] == jax.devices()[0].device_kind
  assert result["jax_version"] == jax.__version__
  noise = result["sections"]["noise"]
  assert noise["complete"] and noise["params"] == 100_000 and noise["buffers"] == 4
  assert _positive(noise["ratio"]) and _positive(noise["iid_seconds"])
  assert noise["ratio"] == pytest.approx(noise["blt_seconds"] / noise["iid_seconds"], rel=1e-3)
  json.dumps(result)  # the JSON line


def test_budget_must_be_positive(capsys):
  for bad in ("0", "-5", "nan"):
    with pytest.raises(SystemExit) as err:
      bench.main(["--quick", "--budget-s", bad])
    assert err.value.code == 2
    assert "--budget-s must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_prints_one_json_line_with_every_section(capsys):
  """The whole ``--quick`` run (1.5-4 min on the shared 2-core CPU)."""
  result = bench.main(["--quick"])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last == json.loads(json.dumps(result, default=float))
  assert TOP_KEYS <= set(last) and last["quick"] is True
  assert last["budget_s"] == bench.QUICK_BUDGET_S
  sections = last["sections"]
  assert list(sections) == list(bench.SECTIONS)
  for name, section in sections.items():
    assert section["complete"], (name, section["skipped"])
    assert _positive(section["wall_s"])
  from dpfl.clip_methods import METHODS
  clip = sections["clipping"]["models"]
  assert set(clip) == {"mlp", "transformer", "gpt2"}
  for name in ("mlp", "transformer"):
    assert set(clip[name]["ratio"]) == {"dpfl", *(m for m in METHODS if m != "auto")}
  assert {"materialize", "ghost"} <= set(clip["gpt2"]["ratio"])
  for row in clip.values():
    assert row["auto_method"] in METHODS
    assert all(_positive(r) for r in row["ratio"].values())
    assert all(_positive(r) for r in row["temp_ratio"].values())
  assert _positive(sections["uls"]["uls_ratio"])
  assert _positive(sections["noise"]["ratio"])
  tokens = sections["tokens"]["models"]
  assert tokens and all(_positive(r["dp_tokens_per_second"])
                        and _positive(r["plain_tokens_per_second"]) for r in tokens.values())
