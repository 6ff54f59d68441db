"""User-level DP next-byte language model; users = the Python standard library's modules.

  python examples/user_level_lm.py --method uls --json
  python examples/user_level_lm.py --method els --json
  python examples/user_level_lm.py --method uls --local-steps 4 --local-learning-rate 0.5
  python examples/user_level_lm.py --method uls --strategy blt   # federated DP-FTRL

A real, offline group structure: every ``.py`` module of this interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``; tests, ``site-packages``
and the GUI/demo packages left out; sorted by path) is one *user*, and its
examples are non-overlapping 33-byte windows of its source. Each user is
capped at ``--examples-per-user`` windows (a seeded random subset), so a
user-level guarantee protects a whole module. Every 8th module in sorted
order is held out for evaluation; the rest train a tiny causal transformer
(byte vocabulary) with user-level DP through ``dpfl.make_private(...,
privacy_unit="user")``:

* ``--method uls``: users Poisson-sampled, one clipped contribution per user
  (the gradient of the user's mean loss; with ``--local-steps N``, the
  pseudo-gradient θ − θ_u after N local SGD steps, i.e. DP-FedAvg, clipped at
  ``C·η·N``), Adam on the server.
* ``--method uls --strategy blt`` (or any ``dpfl.mf`` strategy name):
  federated DP-FTRL. Users are taken in one fixed order, repeated every pass
  (no sampling), and the noise is correlated across rounds by that matrix
  factorization, optimized for the run's passes; the server optimizer is
  SGD with momentum 0.9 (``--learning-rate`` is then its rate, default 0.1)
  and the strategy is optimized for that momentum.
* ``--method els``: windows Poisson-sampled from the capped data, each
  clipped; the same expected number of windows per step as ULS; the ledger
  accounts the mixture of Gaussians that makes ε user-level.

σ is calibrated so both reach the same user-level ``--target-epsilon``.
Prints ε, the eval loss (nats per byte) on held-out users, and with
``--json`` one JSON object as the last stdout line (``method``, ``epsilon``,
``delta``, ``eval_loss``, ...).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sysconfig
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpfl
from dpfl.data import UserDataset

SEQ_LEN = 32
_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}


def stdlib_modules() -> list[pathlib.Path]:
  """The stdlib's ``.py`` files, tests and GUI/demo packages excluded, sorted."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return sorted(p for p in root.rglob("*.py")
                if not _SKIP.intersection(p.relative_to(root).parts))


def windows(path: pathlib.Path) -> np.ndarray:
  """Non-overlapping ``SEQ_LEN + 1``-byte windows of a file, ``[n, SEQ_LEN + 1]`` uint8."""
  data = np.frombuffer(path.read_bytes(), np.uint8)
  n = len(data) // (SEQ_LEN + 1)
  return data[:n * (SEQ_LEN + 1)].reshape(n, SEQ_LEN + 1)


def module_windows(max_users: int | None = None) -> list[tuple[str, np.ndarray]]:
  """``(name, windows)`` of every stdlib module, sorted by path.

  ``max_users``: a deterministic, evenly spread subset of that many modules.
  """
  paths = stdlib_modules()
  if max_users is not None:
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_users).astype(int)]
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return [(str(path.relative_to(root)), windows(path)) for path in paths]


def is_held_out(index: int) -> bool:
  """Every 8th module in sorted order (index 7, 15, ...) is a held-out user."""
  return index % 8 == 7


def user_datasets(split: dict[str, dict[str, np.ndarray]], examples_per_user: int,
                  seed: int) -> UserDataset:
  """A ``UserDataset`` of {module name: windows}, each capped at a seeded random subset."""
  # Modules shorter than one window have zero examples: dropped and counted.
  return UserDataset.from_dict({name: {"tokens": w} for name, w in split.items()},
                               examples_per_user=examples_per_user, selection="random",
                               seed=seed)


def load_users(max_users: int | None, examples_per_user: int):
  """(train, eval) ``UserDataset``s: one user per module, every 8th held out."""
  split = {"train": {}, "eval": {}}
  for i, (name, w) in enumerate(module_windows(max_users)):
    split["eval" if is_held_out(i) else "train"][name] = w
  return (user_datasets(split["train"], examples_per_user, seed=0),
          user_datasets(split["eval"], examples_per_user, seed=1))


class _Block(nn.Module):
  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                            qkv_features=self.d_model)(h, h, mask=mask)
    h = nn.Dense(4 * self.d_model)(nn.LayerNorm()(x))
    return x + nn.Dense(self.d_model)(nn.gelu(h))


class ByteTransformer(nn.Module):
  """A tiny decoder-only model over bytes."""

  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, self.d_model)(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ_LEN, self.d_model))
    for _ in range(self.num_layers):
      x = _Block(self.d_model, self.num_heads)(x)
    return nn.Dense(256)(nn.LayerNorm()(x))


def make_loss(model: nn.Module):
  def loss_fn(params, batch):
    tokens = batch["tokens"].astype(jnp.int32)
    logits = model.apply(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return loss_fn


def eval_loss(loss_fn, params, dataset: UserDataset, chunk: int = 256) -> float:
  """Mean next-byte cross-entropy (nats) over all kept windows of ``dataset``."""
  flat, _ = dataset.examples()
  tokens = flat["tokens"]
  fn = jax.jit(loss_fn)
  total = 0.0
  for start in range(0, len(tokens), chunk):
    part = tokens[start:start + chunk]
    total += float(fn(params, {"tokens": part})) * len(part)
  return total / len(tokens)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  p.add_argument("--method", choices=("uls", "els"), default="uls")
  p.add_argument("--target-epsilon", type=float, default=8.0, help="user-level ε")
  p.add_argument("--delta", type=float, default=1e-5)
  p.add_argument("--examples-per-user", type=int, default=8, help="cap k (windows per module)")
  p.add_argument("--users-per-step", type=int, default=24,
                 help="expected sampled users (ULS); ELS samples this many users' worth "
                      "of windows (users-per-step * k * kept/capacity)")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--l2-clip-norm", type=float, default=1.0)
  p.add_argument("--learning-rate", type=float, default=None,
                 help="server Adam (default 3e-3); with --strategy, SGD-momentum (default 0.1)")
  p.add_argument("--local-steps", type=int, default=None,
                 help="ULS only: DP-FedAvg with this many local SGD steps per user")
  p.add_argument("--local-learning-rate", type=float, default=0.1,
                 help="local SGD step; the pseudo-gradient is clipped at "
                      "l2-clip-norm * local-learning-rate * local-steps (the size of that "
                      "many clipped gradient steps)")
  p.add_argument("--strategy", default=None,
                 choices=("identity", "tree", "sqrt", "banded", "blt", "dense"),
                 help="ULS only: federated DP-FTRL with this matrix factorization")
  p.add_argument("--max-users", type=int, default=None,
                 help="use this many modules (default: all, ~560)")
  p.add_argument("--quick", action="store_true", help="a smaller run (~1 minute)")
  p.add_argument("--seed", type=int, default=None,
                 help="seeds init, sampling and noise (default: OS entropy for the latter two)")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.max_users = args.max_users or 240
    args.steps = min(args.steps, 60)
    args.users_per_step = min(args.users_per_step, 16)
  if args.method == "els" and args.local_steps is not None:
    p.error("--local-steps applies to --method uls only")
  if args.method == "els" and args.strategy is not None:
    p.error("--strategy (DP-FTRL) applies to --method uls only")

  start = time.perf_counter()
  train, held_out = load_users(args.max_users, args.examples_per_user)
  model = ByteTransformer()
  loss_fn = make_loss(model)
  params = model.init(jax.random.key(args.seed or 0),
                      jnp.zeros((1, SEQ_LEN), jnp.int32))
  common = dict(privacy_unit="user", l2_clip_norm=args.l2_clip_norm, dataset=train,
                num_steps=args.steps, target_epsilon=args.target_epsilon, delta=args.delta,
                key=args.seed, seed=args.seed)
  if args.strategy is None:
    optimizer = optax.adam(args.learning_rate or 3e-3)
  else:
    optimizer = optax.sgd(args.learning_rate or 0.1, momentum=0.9)
  if args.method == "uls":
    local = {}
    if args.strategy is not None:
      local = dict(strategy=args.strategy, strategy_options={"momentum": 0.9})
    if args.local_steps is not None:
      # θ − θ_u after τ SGD steps of size η is about τ·η gradients long: clip
      # at τ·η·C (exactly η·C, the gradient path's C, for τ = 1).
      local.update(local_steps=args.local_steps, local_learning_rate=args.local_learning_rate,
                   l2_clip_norm=args.l2_clip_norm * args.local_learning_rate * args.local_steps)
    private = dpfl.make_private(loss_fn, optimizer, sampling_unit="user",
                                batch_size=args.users_per_step, **{**common, **local})
  else:  # the same expected number of windows per step as ULS
    windows_per_step = round(args.users_per_step * train.num_examples / train.num_users)
    private = dpfl.make_private(loss_fn, optimizer, sampling_unit="example",
                                batch_size=windows_per_step, **common)
  print(f"users: {train.num_users} train / {held_out.num_users} held out (modules; "
        f"{train.num_dropped_users + held_out.num_dropped_users} too short, dropped), "
        f"k={train.examples_per_user}, {train.num_examples} train windows")
  sampling_prob = getattr(private.sampler, "sampling_prob", None)
  how = (f"q={sampling_prob:.4f}" if private.ftrl is None else
         f"DP-FTRL {args.strategy}, {private.ftrl.participation[0]} passes of "
         f"{private.ftrl.participation[1]} rounds")
  print(f"{args.method.upper()}: C={private.l2_clip_norm:g}, σ={private.noise_multiplier:.3f} "
        f"for user-level ε={args.target_epsilon} at δ={args.delta}, {how}, {args.steps} steps")
  initial = eval_loss(loss_fn, params, held_out)
  state = private.init(params)
  step = private.make_step(donate=True)
  for i, (batch, mask) in enumerate(private.batches(train, state)):
    state, aux = step(state, batch, mask)
    if (i + 1) % max(1, args.steps // 5) == 0:
      print(f"  step {i + 1:4d}  train loss (clipped units, not private) "
            f"{float(jnp.sum(aux.values) / jnp.maximum(aux.num_units, 1)):.3f}")
  final = eval_loss(loss_fn, state.params, held_out)
  epsilon = private.epsilon()
  seconds = time.perf_counter() - start
  print(f"held-out eval loss: {final:.4f} nats/byte (initial {initial:.4f}; uniform "
        f"{np.log(256):.4f})  user-level ε={epsilon:.3f} (δ={args.delta})  {seconds:.0f} s")
  result = {"method": args.method, "epsilon": epsilon, "delta": args.delta,
            "eval_loss": final, "initial_eval_loss": initial,
            "noise_multiplier": private.noise_multiplier, "steps": args.steps,
            "sampling_prob": sampling_prob, "strategy": args.strategy,
            "num_train_users": train.num_users, "num_eval_users": held_out.num_users,
            "examples_per_user": train.examples_per_user, "local_steps": args.local_steps,
            "seconds": seconds}
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
