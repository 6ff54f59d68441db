"""A named family of small decoder-only transformers for scaling-law studies.

Sizes run from ~50K to ~20M parameters (``"s50k"`` ... ``"s20m"``); up to
``"s5m"`` a DP-SGD sweep over several of them fits on a laptop CPU, the two
largest are for one GPU. All
share one architecture, so the only thing that changes along the family is
width and depth, as in the scaling-law literature (Kaplan et al. 2020;
McKenna et al. 2025, arXiv 2501.18914):

* byte vocabulary: 256 byte values plus a beginning-of-sequence token
  (``dpfl.scaling.corpus.BOS``), ``VOCAB_SIZE = 257``;
* token embedding tied with the output projection (at these widths an untied
  257 x d output matrix would be a large share of the smallest models);
* sinusoidal positions (no parameters), so a model's parameter count does
  not depend on the sequence length it is trained with;
* pre-LayerNorm blocks: causal multi-head self-attention (fused q/k/v
  projection, no biases) and a GELU MLP of width ``4 d``; a final LayerNorm.

``params_count(name)`` is the exact number of trainable parameters (every
array, the embedding included): the ``N`` of the compute formula
``FLOPs = 6 N T B seq`` used throughout ``dpfl.scaling``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dpfl.scaling.corpus import VOCAB_SIZE

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of one member of the family.

  Attributes:
    name: the family name, e.g. ``"s200k"`` (nominal parameter count).
    d_model: residual width d.
    num_layers: number of transformer blocks.
    num_heads: attention heads (``d_model`` must be a multiple).
    mlp_ratio: MLP hidden width is ``mlp_ratio * d_model``.
    vocab_size: token vocabulary (bytes + BOS).
  """

  name: str
  d_model: int
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  vocab_size: int = VOCAB_SIZE

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} must be a multiple of "
                       f"num_heads={self.num_heads}")


# Widths and depths chosen so that the exact count (printed by
# ``params_count``) is within ~15% of the nominal size; depth grows with width
# roughly as in the Chinchilla/GPT families (aspect ratio d / L ~ 16-64).
MODELS: dict[str, ModelConfig] = {c.name: c for c in (
    ModelConfig("s50k", d_model=40, num_layers=2, num_heads=2),
    ModelConfig("s100k", d_model=60, num_layers=2, num_heads=4),
    ModelConfig("s200k", d_model=64, num_layers=4, num_heads=4),
    ModelConfig("s500k", d_model=112, num_layers=3, num_heads=4),
    ModelConfig("s1m", d_model=128, num_layers=5, num_heads=4),
    ModelConfig("s2m", d_model=200, num_layers=4, num_heads=8),
    ModelConfig("s5m", d_model=256, num_layers=6, num_heads=8),
    # One-GPU sizes (benchmarks/scaling_study.py --preset accelerator).
    ModelConfig("s10m", d_model=384, num_layers=6, num_heads=6),
    ModelConfig("s20m", d_model=512, num_layers=6, num_heads=8),
)}


# The longest sequence the family is trained on by a sweep. Positions are
# sinusoidal (no table to outgrow), but attention's per-example memory and
# compute grow as seq_len² (at 1024 tokens the logits of one example are
# heads × 4 MiB per layer in float32, times the batch under per-example
# clipping): 1024 is the length the sweep supports and tests.
MAX_SEQ_LEN = 1024


def model_names() -> tuple[str, ...]:
  """Family names, smallest model first."""
  return tuple(sorted(MODELS, key=params_count))


def get_config(name: str) -> ModelConfig:
  """The ``ModelConfig`` of a family name; ValueError listing the names otherwise."""
  try:
    return MODELS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown model {name!r}; choose from "
                     f"{', '.join(model_names())}") from None


def _sinusoidal_positions(seq_len: int, d_model: int) -> jax.Array:
  """Vaswani et al. 2017 position encodings, [seq_len, d_model]."""
  position = jnp.arange(seq_len, dtype=jnp.float32)[:, None]
  half = d_model // 2
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = position * freq[None, :]
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(enc, ((0, 0), (0, d_model - 2 * half)))


class _CausalSelfAttention(nn.Module):
  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    *batch, seq_len, _ = x.shape
    head_dim = self.d_model // self.num_heads
    qkv = nn.Dense(3 * self.d_model, use_bias=False, name="qkv")(x)
    # [..., L, 3, H, D] -> [3, ..., H, L, D]: heads-major batched matmuls run
    # 2-3x faster on XLA:CPU than contracting the strided "...qhd" layout.
    qkv = jnp.moveaxis(qkv.reshape(*batch, seq_len, 3, self.num_heads, head_dim), -3, 0)
    q, k, v = jnp.swapaxes(qkv, -3, -2)
    logits = jnp.einsum("...hqd,...hkd->...hqk", q / math.sqrt(head_dim), k)
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.swapaxes(jnp.einsum("...hqk,...hkd->...hqd", weights, v), -3, -2)
    out = out.reshape(*batch, seq_len, self.d_model)
    return nn.Dense(self.d_model, use_bias=False, name="out")(out)


class _Block(nn.Module):
  d_model: int
  num_heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + _CausalSelfAttention(self.d_model, self.num_heads, name="attn")(
        nn.LayerNorm(name="ln_attn")(x))
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * self.d_model, name="mlp_in")(h))
    return x + nn.Dense(self.d_model, name="mlp_out")(h)


class Transformer(nn.Module):
  """Decoder-only causal transformer: ``tokens [..., L] -> logits [..., L, vocab]``."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed",
                     embedding_init=nn.initializers.normal(0.02))
    # Scaled by sqrt(d) so tokens and positions have comparable magnitude.
    x = embed(tokens) * math.sqrt(cfg.d_model)
    x = x + _sinusoidal_positions(tokens.shape[-1], cfg.d_model)
    for i in range(cfg.num_layers):
      x = _Block(cfg.d_model, cfg.num_heads, cfg.mlp_ratio, name=f"block_{i}")(x)
    x = nn.LayerNorm(name="ln_final")(x)
    return embed.attend(x)


def make_model(name: str) -> Transformer:
  """The Flax module of a family member."""
  return Transformer(get_config(name))


def init_params(name: str, key: jax.Array | int, *, seq_len: int = 64) -> PyTree:
  """Freshly initialised parameters of a family member.

  Args:
    name: family name, e.g. ``"s200k"``.
    key: a ``jax.random.key`` or an int seed.
    seq_len: sequence length used to trace the initialiser (parameters do
      not depend on it).

  Returns:
    The Linen variables dict ``{"params": ...}``.
  """
  if isinstance(key, int):
    key = jax.random.key(key)
  return _jitted_init(name, seq_len)(key)


@functools.lru_cache(maxsize=32)
def _jitted_init(name: str, seq_len: int):
  # Jitted: Flax's init run op by op dispatches hundreds of tiny computations
  # (seconds on CPU); compiled once it is one call.
  model = make_model(name)
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, seq_len), jnp.int32)))


@functools.cache
def params_count(name: str) -> int:
  """Exact number of trainable parameters N of a family member (no allocation)."""
  model = make_model(name)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))


def training_flops(*, params: int, num_steps: int, batch_size: int, seq_len: int) -> float:
  """Training compute ``6 N T B seq`` (Kaplan et al. 2020; McKenna et al. 2025).

  Forward (2 N per token) plus backward (4 N per token); attention's
  sequence-length term and DP's per-example overheads are not counted, as in
  the paper, so FLOPs compare across private and non-private runs.
  """
  return 6.0 * params * num_steps * batch_size * seq_len


def make_loss_fn(name: str) -> Callable[[PyTree, jax.Array], jax.Array]:
  """Mean next-token cross-entropy (nats per token) of a family member.

  The returned ``loss_fn(params, tokens)`` takes ``tokens`` int
  ``[batch, seq_len + 1]`` (``corpus`` rows: BOS then ``seq_len`` bytes),
  feeds ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``, and averages over
  every predicted token of every row: the contract of
  ``dpfl.clipped_grad`` (a mean loss over the leading example axis).
  """
  model = make_model(name)

  def loss_fn(params: PyTree, tokens: jax.Array) -> jax.Array:
    tokens = jnp.asarray(tokens, jnp.int32)
    logits = model.apply(params, tokens[..., :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[..., 1:]).mean()

  return loss_fn
