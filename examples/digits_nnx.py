"""examples/digits.py with a Flax NNX model and an nnx.Optimizer loop (dpfl.nnx).

  python examples/digits_nnx.py --target-epsilon 3 --json
  python examples/digits_nnx.py --target-epsilon 3 --dropout 0.1 --json  # per-example dropout
  python examples/digits_nnx.py --non-private --json

The same data, split, flags, hyper-parameters and JSON line as
examples/digits.py (``epsilon``, ``delta``, ``accuracy``, ...), with the model
written in NNX and trained by ``nnx.Optimizer`` under ``nnx.jit``. The private
run is ``dpfl.nnx.make_private``: the plan, noise and accounting of
``dpfl.make_private``, and a clipped gradient that takes the model
(``private.clipped_grad(model, batch, mask)``, an ``nnx.State`` as
``nnx.grad`` returns). ``--dropout`` (the one flag examples/digits.py lacks)
adds a dropout layer; each example gets its own dropout key.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dpfl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import build_parser, load, private_options, report  # noqa: E402  same data, flags, JSON


class MLP(nnx.Module):
  """64-128-10, tanh: examples/digits.py's model (no BatchNorm: see dpfl.nnx)."""

  def __init__(self, *, hidden: int = 128, dropout: float = 0.0, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.tanh(self.hidden(x))))


def loss_fn(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def main(argv=None) -> dict:
  p = build_parser(__doc__.splitlines()[0])
  p.add_argument("--dropout", type=float, default=0.0, help="dropout rate after the hidden layer")
  args = p.parse_args(argv)
  train, test = load()
  n = len(train["y"])
  seed = args.seed or 0
  model = MLP(dropout=args.dropout, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

  start = time.perf_counter()
  if args.non_private:
    lr = args.learning_rate or 3e-3
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
      grads = nnx.grad(loss_fn)(model, batch)
      optimizer.update(model, grads)

    rng = np.random.default_rng(args.seed)
    steps = int(np.ceil(args.epochs * n / args.batch_size))
    for _ in range(steps):
      idx = rng.choice(n, args.batch_size, replace=False)
      step(model, optimizer, {k: v[idx] for k, v in train.items()})
    epsilon, sigma = None, 0.0
  else:
    tx, lr, ftrl = private_options(args, p)
    private = dpfl.nnx.make_private(
        loss_fn, tx, l2_clip_norm=args.l2_clip_norm, dataset_size=n,
        batch_size=args.batch_size, epochs=args.epochs, target_epsilon=args.target_epsilon,
        delta=args.delta, key=args.seed, seed=args.seed, **ftrl)
    optimizer = nnx.Optimizer(model, private.optimizer, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch, mask):
      grads, _ = private.clipped_grad(model, batch, mask)
      optimizer.update(model, grads)

    for batch, mask in private.batches(train):
      step(model, optimizer, batch, mask)
    epsilon, sigma, steps = private.epsilon(), private.noise_multiplier, private.num_steps

  model.eval()  # dropout off
  logits = model(jnp.asarray(test["x"]))
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test["y"]))
  return report(args, epsilon=epsilon, sigma=sigma, steps=steps, lr=lr, accuracy=accuracy,
                n=n, n_test=len(test["y"]), seconds=time.perf_counter() - start)


if __name__ == "__main__":
  main(sys.argv[1:])
