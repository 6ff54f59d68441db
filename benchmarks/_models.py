"""Small Flax Linen models shared by the benchmarks.

Two workloads with opposite profiles for per-example clipping:

* ``MLP`` 784-512-512-10: one "token" per example, so a per-example gradient
  costs as much memory as the whole model while the plain step is a few
  matrix products -- the worst case for clipping that materialises
  per-example gradients.
* ``CausalTransformer``: 2 pre-LayerNorm blocks, d_model 256, sequence 64,
  byte vocabulary (256). Each example carries 64 tokens, so per-example
  gradients cost about as much compute as the plain backward pass.
* ``GPT2``: GPT-2-small-shaped (Radford et al. 2019): 12 pre-LayerNorm
  blocks, d_model 768, 12 heads, GELU MLP 4x, sequence 256, vocabulary
  50257, learned position embeddings, and the output projection tied to the
  token embedding (``logits = embedding.attend(h)``, so one parameter is
  used twice: a gather and a matrix product). ~124M parameters, random
  weights. The realistic scale where per-example gradients (one model's
  worth of memory per example) hurt most.

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


class _GPT2Block(nn.Module):
  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
    h = nn.LayerNorm(epsilon=1e-5)(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.d_model, kernel_init=init
    )(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm(epsilon=1e-5)(x)
    h = nn.Dense(4 * self.d_model, kernel_init=init)(h)
    h = nn.gelu(h)
    h = nn.Dense(self.d_model, kernel_init=init)(h)
    return x + h


class GPT2(nn.Module):
  """GPT-2-small-shaped decoder with tied input/output embeddings."""

  vocab_size: int = 50257
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  max_len: int = 256

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    wte = nn.Embed(self.vocab_size, self.d_model, embedding_init=init)
    wpe = nn.Embed(self.max_len, self.d_model, embedding_init=init)
    x = wte(tokens) + wpe(jnp.arange(tokens.shape[-1]))
    for _ in range(self.num_layers):
      x = _GPT2Block(self.d_model, self.num_heads)(x)
    x = nn.LayerNorm(epsilon=1e-5)(x)
    return wte.attend(x)


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
    batch_size: int = 256,
    *,
    in_features: int = 784,
    hidden: tuple[int, ...] = (512, 512),
    num_classes: int = 10,
    seed: int = 0,
) -> tuple[Any, dict[str, jax.Array], LossFn]:
  """MLP (default 784-512-512-10) with random inputs and labels."""
  model = MLP(hidden=hidden, num_classes=num_classes)
  k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
  batch = {
      "x": jax.random.normal(k_x, (batch_size, in_features), jnp.float32),
      "y": jax.random.randint(k_y, (batch_size,), 0, num_classes),
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
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> tuple[Any, dict[str, jax.Array], LossFn]:
  """2-layer causal transformer; next-byte prediction on random tokens."""
  model = CausalTransformer(
      vocab_size=vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      num_heads=num_heads,
      max_len=seq_len,
  )
  return _next_token_task(model, batch_size, seq_len, vocab_size, seed)


def make_gpt2(
    batch_size: int = 1,
    *,
    seq_len: int = 256,
    d_model: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    vocab_size: int = 50257,
    seed: int = 0,
) -> tuple[Any, dict[str, jax.Array], LossFn]:
  """GPT-2-small-shaped model (defaults); next-token loss on random tokens.

  The float32 parameters take ~0.5 GB; smaller shapes (for tests) via the
  keyword arguments.
  """
  model = GPT2(
      vocab_size=vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      num_heads=num_heads,
      max_len=seq_len,
  )
  # One compiled init instead of hundreds of eagerly dispatched ops.
  return _next_token_task(
      model, batch_size, seq_len, vocab_size, seed, jit_init=True
  )


def _next_token_task(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
    *,
    jit_init: bool = False,
) -> tuple[Any, dict[str, jax.Array], LossFn]:
  k_init, k_tok = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(
      k_tok, (batch_size, seq_len + 1), 0, vocab_size
  )
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  # Eager and jitted init round differently in the last bits; the
  # transformer keeps eager init so its weights match earlier figures.
  init = jax.jit(model.init) if jit_init else model.init
  params = init(k_init, batch["inputs"][:1])

  def loss_fn(params, batch):
    logits = model.apply(params, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["targets"]
    ).mean()

  return params, batch, loss_fn
