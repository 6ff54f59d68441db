"""The scaling model family: sizes, exact parameter counts, causality, initial loss."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpfl.scaling import corpus, models


def _nominal(name: str) -> float:
  number, unit = re.fullmatch(r"s(\d+)([km])", name).groups()
  return int(number) * {"k": 1e3, "m": 1e6}[unit]


def _closed_form_count(cfg: models.ModelConfig) -> int:
  # Tied embedding V·d; per block: 2 LayerNorms (2·2d), q/k/v and output
  # projections without bias (4d²), MLP d->4d->d with biases (8d² + 5d);
  # final LayerNorm 2d. Positions are sinusoidal (no parameters).
  d = cfg.d_model
  hidden = cfg.mlp_ratio * d
  block = 4 * d + 4 * d * d + (d * hidden + hidden) + (hidden * d + d)
  return cfg.vocab_size * d + cfg.num_layers * block + 2 * d


def test_family_spans_50k_to_20m_and_counts_increase():
  names = list(models.MODELS)
  assert names[0] == "s50k" and names[-1] == "s20m" and len(names) >= 5
  counts = [models.params_count(n) for n in names]
  assert counts == sorted(counts) and len(set(counts)) == len(counts)
  assert models.model_names() == tuple(names)
  for name, count in zip(names, counts):
    assert 0.85 <= count / _nominal(name) <= 1.15, (name, count)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_params_count_is_exact(name):
  assert models.params_count(name) == _closed_form_count(models.get_config(name))


def test_params_count_matches_initialised_arrays_and_ignores_seq_len():
  params = models.init_params("s50k", 0, seq_len=8)
  assert sum(x.size for x in jax.tree.leaves(params)) == models.params_count("s50k")
  long = jax.eval_shape(lambda: models.make_model("s50k").init(
      jax.random.key(0), jnp.zeros((1, 512), jnp.int32)))
  assert jax.tree.map(lambda x: x.shape, long) == jax.tree.map(lambda x: x.shape, params)


def test_causal_and_shapes():
  params = models.init_params("s50k", 0, seq_len=8)
  model = models.make_model("s50k")
  tokens = np.random.default_rng(0).integers(0, corpus.VOCAB_SIZE, (2, 16))
  apply = jax.jit(model.apply)
  logits = apply(params, tokens)
  assert logits.shape == (2, 16, corpus.VOCAB_SIZE)
  changed = tokens.copy()
  changed[:, 10:] = (changed[:, 10:] + 1) % corpus.VOCAB_SIZE
  other = apply(params, changed)
  # Causal: later tokens cannot move earlier logits (masked attention weights
  # are exactly 0); tolerance 1e-5 of the logits' scale, ~84 float32 ulps.
  np.testing.assert_allclose(logits[:, :10], other[:, :10], rtol=1e-5,
                             atol=1e-5 * float(np.abs(logits).max()))
  assert not np.allclose(logits[:, 10:], other[:, 10:])


def test_initial_loss_is_near_uniform_and_differentiable():
  loss_fn = models.make_loss_fn("s50k")
  params = models.init_params("s50k", 0, seq_len=8)
  tokens = np.random.default_rng(1).integers(0, 256, (2, 17))
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, tokens)
  assert abs(float(loss) - math.log(corpus.VOCAB_SIZE)) < 0.5
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_unknown_model_and_flops():
  with pytest.raises(ValueError, match="unknown model 's3m'.*s50k"):
    models.get_config("s3m")
  flops = models.training_flops(params=10, num_steps=3, batch_size=4, seq_len=5)
  assert flops == 6 * 10 * 3 * 4 * 5
