"""DP-SGD on scikit-learn's bundled digits (8x8 images, offline), with Flax + optax.

  python examples/digits.py --target-epsilon 3 --json
  python examples/digits.py --target-epsilon 3 --strategy blt --json   # DP-FTRL
  python examples/digits.py --non-private --json

Trains a small Flax MLP with example-level DP-SGD through ``dpfl.make_private``
(Poisson sampling, per-example clipping, Gaussian noise, σ calibrated for the
target ε) and prints held-out accuracy. With ``--strategy`` it trains with
DP-FTRL instead, through the same call: correlated noise from that matrix
factorization (optimized for the run's epochs and, with ``--momentum``, for
SGD with heavy-ball momentum), batches in one fixed order repeated every epoch
(or cyclic Poisson for ``--strategy banded --sampling poisson``). With
``--json`` the last stdout line is one JSON object with ``epsilon``,
``delta`` and ``accuracy``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import dpfl


class MLP(nn.Module):
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def load(test_fraction: float = 0.2):
  """Digits scaled to [0, 1], split by a fixed (public, data-independent) permutation."""
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = order[:n_test], order[n_test:]
  return {"x": x[train], "y": y[train].astype(np.int32)}, {"x": x[test], "y": y[test]}


def build_parser(description: str) -> argparse.ArgumentParser:
  """The flags of this example (examples/digits_nnx.py takes the same)."""
  p = argparse.ArgumentParser(description=description, allow_abbrev=False)
  p.add_argument("--target-epsilon", type=float, default=3.0)
  p.add_argument("--delta", type=float, default=1e-5)
  p.add_argument("--non-private", action="store_true", help="plain jax.grad baseline")
  p.add_argument("--epochs", type=float, default=40)
  p.add_argument("--batch-size", type=int, default=256, help="expected batch size")
  p.add_argument("--l2-clip-norm", type=float, default=1.0)
  p.add_argument("--learning-rate", type=float, default=None,
                 help="default: 0.01 private (Adam), 0.003 non-private")
  p.add_argument("--strategy", default=None,
                 choices=["identity", "tree", "sqrt", "banded", "blt", "dense"],
                 help="DP-FTRL with this matrix factorization (default: DP-SGD)")
  p.add_argument("--optimizer", default=None, choices=["adam", "sgd"],
                 help="default: adam for DP-SGD, sgd with --momentum for DP-FTRL")
  p.add_argument("--momentum", type=float, default=0.9,
                 help="SGD heavy-ball momentum (the DP-FTRL strategy is optimized for it)")
  p.add_argument("--buffers", type=int, default=None, help="BLT buffers (DP-FTRL)")
  p.add_argument("--bands", type=int, default=None, help="banded strategy bands (DP-FTRL)")
  p.add_argument("--sampling", default=None, choices=["poisson", "cyclic"],
                 help="default: poisson for DP-SGD, cyclic for DP-FTRL")
  p.add_argument("--seed", type=int, default=None,
                 help="seeds init, sampling and noise (default: OS entropy for the latter two)")
  p.add_argument("--json", action="store_true")
  return p


def private_options(args, p: argparse.ArgumentParser) -> tuple[optax.GradientTransformation,
                                                                float, dict]:
  """(optimizer, learning rate, make_private's DP-FTRL keywords) of a private run."""
  name = args.optimizer or ("adam" if args.strategy is None else "sgd")
  if name == "adam":
    lr = args.learning_rate or 1e-2
    optimizer = optax.adam(lr)
  else:
    lr = args.learning_rate or 0.5
    optimizer = optax.sgd(lr, momentum=args.momentum or None)
  ftrl = {}
  if args.strategy is not None:
    options = {"momentum": args.momentum if name == "sgd" else 0.0}
    if args.buffers is not None:
      options["buffers"] = args.buffers
    if args.bands is not None:
      options["bands"] = args.bands
    ftrl = dict(strategy=args.strategy, strategy_options=options,
                sampling_scheme=args.sampling)
  elif args.sampling == "cyclic":
    p.error("--sampling cyclic needs --strategy (DP-FTRL)")
  return optimizer, lr, ftrl


def report(args, *, epsilon, sigma, steps, lr, accuracy, n, n_test, seconds) -> dict:
  """The JSON result (last stdout line with --json), or one line of text."""
  result = {"epsilon": epsilon, "delta": None if args.non_private else args.delta,
            "accuracy": accuracy, "non_private": args.non_private, "noise_multiplier": sigma,
            "steps": steps, "batch_size": args.batch_size, "epochs": args.epochs,
            "l2_clip_norm": args.l2_clip_norm, "learning_rate": lr,
            "train_examples": n, "test_examples": n_test,
            "mechanism": "non-private" if args.non_private else (
                "dp-sgd" if args.strategy is None else f"dp-ftrl-{args.strategy}"),
            "seconds": seconds}
  if args.json:
    print(json.dumps(result))
  else:
    eps = "inf (non-private)" if epsilon is None else f"{epsilon:.3f}"
    print(f"digits: accuracy {accuracy:.4f} at epsilon {eps}, delta {args.delta:g} "
          f"(sigma {sigma:.3f}, {steps} steps of expected batch {args.batch_size})")
  return result


def main(argv=None) -> dict:
  p = build_parser(__doc__.splitlines()[0])
  args = p.parse_args(argv)
  train, test = load()
  n = len(train["y"])
  model = MLP()
  params = model.init(jax.random.key(args.seed or 0), train["x"][:1])

  def loss_fn(params, batch):
    logits = model.apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  start = time.perf_counter()
  if args.non_private:
    lr = args.learning_rate or 3e-3
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
      grads = jax.grad(loss_fn)(params, batch)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(args.seed)
    steps = int(np.ceil(args.epochs * n / args.batch_size))
    for _ in range(steps):
      idx = rng.choice(n, args.batch_size, replace=False)
      params, opt_state = step(params, opt_state, {k: v[idx] for k, v in train.items()})
    epsilon, sigma = None, 0.0
  else:
    optimizer, lr, ftrl = private_options(args, p)
    private = dpfl.make_private(
        loss_fn, optimizer, l2_clip_norm=args.l2_clip_norm, dataset_size=n,
        batch_size=args.batch_size, epochs=args.epochs, target_epsilon=args.target_epsilon,
        delta=args.delta, key=args.seed, seed=args.seed, **ftrl)
    state = private.init(params)
    step = private.make_step(donate=True)
    for batch, mask in private.batches(train, state):
      state, _ = step(state, batch, mask)
    params = state.params
    epsilon, sigma, steps = private.epsilon(), private.noise_multiplier, private.num_steps

  logits = model.apply(params, test["x"])
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test["y"]))
  return report(args, epsilon=epsilon, sigma=sigma, steps=steps, lr=lr, accuracy=accuracy,
                n=n, n_test=len(test["y"]), seconds=time.perf_counter() - start)


if __name__ == "__main__":
  main(sys.argv[1:])
