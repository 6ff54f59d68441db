"""examples/finetune_lora.py: LoRA adapters, the three-way split, and the run end to end."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpfl

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "finetune_lora.py"


def _load():
  spec = importlib.util.spec_from_file_location("finetune_lora_example", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def example():
  return _load()


@pytest.fixture(scope="module")
def tiny(example):
  """A 1-block, 16-wide transformer and its parameters."""
  model = example.corpus.ByteTransformer(d_model=16, num_layers=1, num_heads=2)
  params = model.init(jax.random.key(0), jnp.zeros((1, example.corpus.SEQ_LEN), jnp.int32))
  tokens = jax.random.randint(jax.random.key(1), (6, example.corpus.SEQ_LEN + 1), 0, 256)
  return model, example.corpus.make_loss(model), params, {"tokens": tokens}


def test_split_is_disjoint_and_keeps_user_level_lm_held_out_users(example):
  split = example.split_modules(64)
  names = [set(part) for part in split.values()]
  assert all(names) and sum(map(len, names)) == len(set().union(*names)) == 64
  _, held_out = example.corpus.load_users(64, 4)
  kept = set(split["held_out"]) - {n for n, w in split["held_out"].items() if len(w) == 0}
  assert set(held_out.user_ids.tolist()) == kept
  assert len(split["public"]) == 8 and len(split["private"]) == 48


def test_adapters_sit_on_every_projection_and_nothing_else(example, tiny):
  _, _, params, _ = tiny
  adapters = example.init_lora(jax.random.key(2), params, rank=3)
  leaves = {name.split("/")[-2] for name in adapters}
  assert leaves == {"query", "key", "value", "out", "Dense_0", "Dense_1"}
  out = next(v for k, v in adapters.items() if "/out/" in k)
  assert out["a"].shape == (16, 3) and out["b"].shape == (3, 16)  # fan-in heads * head_dim
  mlp = next(v for k, v in adapters.items() if "Dense_0" in k)
  assert mlp["a"].shape == (16, 3) and mlp["b"].shape == (3, 64)
  assert not np.any(np.asarray(mlp["b"])) and np.std(np.asarray(mlp["a"])) > 0.05
  with pytest.raises(ValueError, match="rank"):
    example.init_lora(jax.random.key(2), params, rank=0)


def test_b_zero_is_the_base_model_and_merge_is_w_plus_scaled_ab(example, tiny):
  model, loss_fn, params, batch = tiny
  adapters = example.init_lora(jax.random.key(2), params, rank=3)
  merged = example.merge_lora(params, adapters, scale=2.0)
  jax.tree.map(np.testing.assert_array_equal, merged, params)  # exactly: W + 0
  rng = np.random.default_rng(0)
  nonzero = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), adapters)
  merged = example.merge_lora(params, nonzero, scale=2.0)
  name = next(k for k in nonzero if "Dense_1" in k)
  w = params["params"]["_Block_0"]["Dense_1"]["kernel"]
  expected = np.asarray(w) + 2.0 * nonzero[name]["a"] @ nonzero[name]["b"]
  np.testing.assert_allclose(merged["params"]["_Block_0"]["Dense_1"]["kernel"], expected,
                             rtol=1e-5, atol=1e-5)
  unadapted = merged["params"]["Dense_0"]["kernel"]  # the output head has no adapter
  np.testing.assert_array_equal(unadapted, params["params"]["Dense_0"]["kernel"])
  loss = example.lora_loss(loss_fn, params, scale=2.0)
  assert float(loss(adapters, batch)) == pytest.approx(float(loss_fn(params, batch)), abs=0)


def test_gradient_reaches_only_the_adapters(example, tiny):
  _, loss_fn, params, batch = tiny
  adapters = example.init_lora(jax.random.key(2), params, rank=3)
  grads = jax.grad(example.lora_loss(loss_fn, params, scale=2.0))(adapters, batch)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  # d(A·B)/dA = (·)Bᵀ = 0 at B = 0 (Hu et al.: only B moves on the first step).
  for g in grads.values():
    assert not np.any(np.asarray(g["a"])) and np.any(np.asarray(g["b"]))


def test_clipped_user_contribution_is_over_the_adapters_only(example, tiny):
  _, loss_fn, params, batch = tiny
  adapters = example.init_lora(jax.random.key(2), params, rank=3)
  users = dpfl.UserDataset.from_dict(
      {u: {"tokens": np.asarray(batch["tokens"][2 * u:2 * u + 2])} for u in range(3)},
      examples_per_user=2)
  clip = 1e-3  # far below the pseudo-gradient's norm: every user is clipped
  private = dpfl.make_private(
      example.lora_loss(loss_fn, params, scale=2.0), optax.adam(1e-3), privacy_unit="user",
      l2_clip_norm=clip, batch_size=1, num_steps=1, noise_multiplier=1.0, delta=1e-5,
      dataset=users, local_steps=2, local_learning_rate=1.0, key=0, seed=0)
  one_user = jax.tree.map(lambda x: x[:1], users.data)
  total, aux = private.clipped_grad(adapters, one_user, mask=users.mask[:1])
  assert jax.tree.structure(total) == jax.tree.structure(adapters)
  norm = float(optax.tree.norm(total))
  assert float(aux.grad_norms[0]) > 10 * clip
  assert norm == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize("flag,value", [("--rank", "0"), ("--alpha", "-1"),
                                        ("--pretrain-steps", "-1"), ("--local-steps", "0")])
def test_bad_sizes_exit_2_naming_the_argument(example, flag, value, capsys):
  with pytest.raises(SystemExit) as exit_:
    example.parse_args([flag, value])
  assert exit_.value.code == 2
  assert flag[2:].replace("-", "_") in capsys.readouterr().err


# ~25 s of CPU (three compiles: pre-training, evaluation, the ULS step): slow.
@pytest.mark.slow
def test_json_keys_at_a_tiny_size(example, capsys):
  result = example.main(["--max-users", "24", "--rounds", "2", "--users-per-round", "4",
                         "--examples-per-user", "2", "--pretrain-steps", "2", "--d-model",
                         "16", "--num-layers", "1", "--local-steps", "1", "--rank", "2",
                         "--target-epsilon", "4", "--seed", "0", "--json"])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == pytest.approx(result)
  assert {"method", "epsilon", "delta", "eval_loss", "base_eval_loss", "trainable_params",
          "total_params", "rounds", "seconds"} <= set(printed)
  assert printed["method"] == "lora" and printed["rounds"] == 2
  assert 0 < printed["epsilon"] <= 4.0 and printed["delta"] == 1e-5
  # 6 adapted kernels of one block, rank 2: q, k, v, out (16 -> 16), MLP 16 -> 64 -> 16.
  assert printed["trainable_params"] == 2 * (4 * (16 + 16) + 2 * (16 + 64))
  assert printed["total_params"] > printed["trainable_params"] > 0
  assert np.isfinite(printed["eval_loss"]) and np.isfinite(printed["base_eval_loss"])


# ~2 minutes on an idle 2-core CPU (pre-training, then 30 DP rounds).
@pytest.mark.slow
def test_quick_run_improves_on_the_base_within_the_budget():
  done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--seed", "0", "--json"],
                        capture_output=True, text=True, timeout=900, check=True,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["method"] == "lora"
  assert 7.0 < result["epsilon"] <= 8.0
  assert result["trainable_params"] < result["total_params"] / 5
  assert result["eval_loss"] < result["base_eval_loss"]
