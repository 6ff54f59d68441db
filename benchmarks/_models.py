"""Small Flax Linen models shared by the benchmarks.

Two workloads with opposite profiles for per-example clipping:

* ``MLP`` 784-512-512-10: one "token" per example, so a per-example gradient
  costs as much memory as the whole model while the plain step is a few
  matrix products -- the worst case for clipping that materialises
  per-example gradients.
* ``CausalTransformer``: 2 pre-LayerNorm blocks, d_model 256, sequence 64,
  byte vocabulary (256). Each example carries 64 tokens, so per-example
  gradients cost about as much compute as the plain backward pass.

Each ``make_*`` returns ``(params, batch, loss_fn)`` where
``loss_fn(params, batch)`` is the mean loss over the batch's leading axis,
which is the contract ``dpfl.clipping.clipped_grad`` expects.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any], jax.Array]


class MLP(nn.Module):
  """Fully connected ReLU network (default 784-512-512-10)."""

  hidden: tuple[int, ...] = (512, 512)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class _Block(nn.Module):
  d_model: int
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.d_model
    )(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.mlp_ratio * self.d_model)(h)
    h = nn.gelu(h)
    h = nn.Dense(self.d_model)(h)
    return x + h


class CausalTransformer(nn.Module):
  """Decoder-only next-token model over a small vocabulary."""

  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 64

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    seq_len = tokens.shape[-1]
    x = nn.Embed(self.vocab_size, self.d_model)(tokens)
    pos = self.param(
        "pos_embedding",
        nn.initializers.normal(0.02),
        (self.max_len, self.d_model),
    )
    x = x + pos[:seq_len]
    for _ in range(self.num_layers):
      x = _Block(self.d_model, self.num_heads)(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.vocab_size)(x)


def make_mlp(
    batch_size: int = 256, *, seed: int = 0
) -> tuple[Any, dict[str, jax.Array], LossFn]:
  """MLP 784-512-512-10 with random inputs and labels."""
  model = MLP()
  k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
  batch = {
      "x": jax.random.normal(k_x, (batch_size, 784), jnp.float32),
      "y": jax.random.randint(k_y, (batch_size,), 0, 10),
  }
  params = model.init(k_init, batch["x"][:1])

  def loss_fn(params, batch):
    logits = model.apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]
    ).mean()

  return params, batch, loss_fn


def make_transformer(
    batch_size: int = 64,
    *,
    seq_len: int = 64,
    d_model: int = 256,
    vocab_size: int = 256,
    seed: int = 0,
) -> tuple[Any, dict[str, jax.Array], LossFn]:
  """2-layer causal transformer; next-byte prediction on random tokens."""
  model = CausalTransformer(
      vocab_size=vocab_size, d_model=d_model, max_len=seq_len
  )
  k_init, k_tok = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(
      k_tok, (batch_size, seq_len + 1), 0, vocab_size
  )
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  params = model.init(k_init, batch["inputs"][:1])

  def loss_fn(params, batch):
    logits = model.apply(params, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["targets"]
    ).mean()

  return params, batch, loss_fn
