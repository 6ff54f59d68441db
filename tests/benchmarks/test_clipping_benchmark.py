"""benchmarks/clipping.py: per-method rows, temp memory, the GPT-2 batch choice, the JSON line."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
  spec = importlib.util.spec_from_file_location(
      "clipping_bench", ROOT / "benchmarks" / "clipping.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


bench = _load()
_models = sys.modules[bench.make_mlp.__module__]  # benchmarks/_models.py


def _tiny_mlp():
  return _models.make_mlp(8, in_features=6, hidden=(5,), num_classes=3)


@pytest.fixture(scope="module")
def mlp():
  return bench.bench_model(_tiny_mlp, rounds=1, baselines=False)


def test_every_method_but_auto_gets_a_row_with_time_and_memory(mlp):
  from dpfl.clip_methods import METHODS
  assert bench.clip_methods() == tuple(m for m in METHODS if m != "auto")
  res = mlp
  steps = {"plain", "dpfl", *bench.clip_methods()}
  assert set(res["median_ms"]) == steps
  assert set(res["ratio"]) == set(res["temp_ratio"]) == steps - {"plain"}
  assert set(res["temp_bytes"]) == steps
  assert res["auto_method"] in bench.clip_methods()
  assert res["batch_size"] == 8
  assert all(ms > 0 for ms in res["median_ms"].values())
  plain = max(res["temp_bytes"]["plain"], 1)
  for key, ratio in res["temp_ratio"].items():
    assert ratio == pytest.approx(res["temp_bytes"][key] / plain)


def test_gpt2_batch_is_the_largest_power_of_two_whose_every_step_fits(monkeypatch):
  # Footprint (temp + arguments + outputs) of each step by batch size; the
  # search must pick the largest size whose every entry is <= the budget.
  table = {"plain": {1: 10, 2: 20, 4: 40, 8: 80},
           "materialize": {1: 15, 2: 30, 4: 60, 8: 120}}
  monkeypatch.setattr(bench, "compile_steps", lambda steps, params, batch: {
      k: (k, len(batch["x"])) for k in steps})
  monkeypatch.setattr(bench, "memory_of", lambda c: {
      "temp": table[c[0]][c[1]] - 3, "arguments": 2, "outputs": 1})
  steps = dict.fromkeys(table)
  batch = {"x": np.arange(8)}
  for budget, want in ((120, 8), (119, 4), (60, 4), (59, 2), (15, 1), (14, None)):
    size, compiled, tried = bench.largest_fitting_batch(
        steps, None, batch, budget_bytes=budget, cap=8)
    assert size == want, budget
    assert sorted(tried, reverse=True) == [8, 4, 2, 1][:len(tried)]
    if want is not None:
      assert min(tried) == want and compiled == {k: (k, want) for k in table}
  size, _, tried = bench.largest_fitting_batch(
      steps, None, batch, budget_bytes=10**6, cap=6)  # cap rounds down
  assert size == 4 and list(tried) == [4]


def test_gpt2_memory_only_then_json_keeps_todays_keys(mlp):
  # The GPT-2 path on the tiny MLP (compiling GPT-2 takes minutes).
  gpt2 = bench.bench_gpt2(_tiny_mlp, rounds=0, cap=4, budget_bytes=2**40)
  assert gpt2["batch_size"] == 4
  assert "reweight" not in gpt2["temp_bytes"] and "plain" in gpt2["temp_bytes"]
  assert all(v is None for v in gpt2["ratio"].values())
  out = json.loads(json.dumps(bench.json_summary({"mlp": mlp, "gpt2": gpt2}, None)))
  assert out["mlp"]["dpfl"] == pytest.approx(mlp["ratio"]["dpfl"], rel=1e-3, abs=1e-4)
  assert out["mlp"]["jax_privacy"] is None
  assert set(out["mlp"]["methods"]) == set(bench.clip_methods())
  assert out["mlp"]["auto_method"] == mlp["auto_method"]
  assert out["gpt2"]["batch_size"] == 4 and out["gpt2"]["rounds"] == 0
  assert out["memory"]["gpt2"] == gpt2["temp_bytes"]
  assert out["memory"]["mlp"]["plain"] == mlp["temp_bytes"]["plain"]
  assert "dpfl" in out["memory_ratio"]["mlp"]
  lines = bench.format_table({"mlp": mlp, "gpt2": gpt2})
  assert len(lines) == 2 + len(mlp["median_ms"]) + len(gpt2["median_ms"])


def test_gpt2_has_gpt2_smalls_parameters_with_tied_embeddings():
  import jax
  import jax.numpy as jnp
  vocab, seq, d, layers = 50257, 256, 768, 12
  shapes = jax.eval_shape(_models.GPT2().init, jax.random.key(0),
                          jnp.zeros((1, seq), jnp.int32))
  count = sum(x.size for x in jax.tree.leaves(shapes))
  block = (4 * (d * d + d)          # query, key, value, out projections
           + 2 * 2 * d              # two LayerNorms
           + d * 4 * d + 4 * d      # MLP up
           + 4 * d * d + d)         # MLP down
  # Token table (also the output projection: no separate kernel), position
  # table, blocks, final LayerNorm.
  assert count == vocab * d + seq * d + layers * block + 2 * d
