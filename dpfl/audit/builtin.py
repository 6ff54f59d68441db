"""The small built-in model ``dpfl audit`` runs: softmax regression on synthetic data.

Small enough to audit in seconds on a CPU; the audit's figures for it are in
the README ("Privacy audit").
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

NUM_FEATURES = 20
NUM_CLASSES = 4


def dataset(size: int, *, seed: int = 0) -> dict:
  """``size`` Gaussian inputs labelled by a fixed random linear teacher."""
  rng = np.random.default_rng(seed)
  teacher = rng.standard_normal((NUM_FEATURES, NUM_CLASSES))
  x = rng.standard_normal((size, NUM_FEATURES)).astype(np.float32)
  y = np.argmax(x @ teacher, axis=1).astype(np.int32)
  return {"x": x, "y": y}


def canary_examples(num_canaries: int, *, seed: int = 1) -> dict:
  """Input-space canaries: large random inputs with random (mostly wrong) labels."""
  rng = np.random.default_rng(seed)
  x = 3.0 * rng.standard_normal((num_canaries, NUM_FEATURES)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, num_canaries).astype(np.int32)
  return {"x": x, "y": y}


def init_params() -> dict:
  return {"w": jnp.zeros((NUM_FEATURES, NUM_CLASSES), jnp.float32),
          "b": jnp.zeros((NUM_CLASSES,), jnp.float32)}


def loss_fn(params, batch):
  logits = batch["x"] @ params["w"] + params["b"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))


def make_run(*, delta: float, dataset_size: int, batch_size: int, num_steps: int,
             target_epsilon: float | None = None, noise_multiplier: float | None = None,
             l2_clip_norm: float = 1.0, learning_rate: float = 0.5, accountant: str = "pld",
             key=None, seed=None):
  """The built-in model's private run (``dpfl.make_private``, DP-SGD, Poisson sampling)."""
  from dpfl.privatize import make_private
  return make_private(loss_fn, optax.sgd(learning_rate), l2_clip_norm=l2_clip_norm,
                      batch_size=batch_size, dataset_size=dataset_size, num_steps=num_steps,
                      target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
                      delta=delta, accountant=accountant, key=key, seed=seed)

