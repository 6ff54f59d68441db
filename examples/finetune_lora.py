"""User-level DP fine-tuning of a byte transformer with LoRA adapters (DP-FedAvg).

  python examples/finetune_lora.py --json                  # LoRA: only adapters trained
  python examples/finetune_lora.py --full-finetune --json  # every parameter trained
  python examples/finetune_lora.py --quick                 # small, ~2 minutes on 2 cores

The corpus and model are ``examples/user_level_lm.py``'s: every ``.py``
module of this interpreter's standard library is one user, its examples are
33-byte windows of its source, the model a small decoder-only transformer
over bytes. The modules, in sorted order, are split three ways:

* **public** (index ≡ 3 mod 8): all their windows pre-train the base model
  without privacy — the stand-in for a public pre-training corpus;
* **held out** (index ≡ 7 mod 8, the same users as ``user_level_lm.py``):
  evaluation only;
* **private** (the rest): the users of the fine-tuning, each capped at
  ``--examples-per-user`` windows, protected at user level.

Fine-tuning is ULS with local steps (DP-FedAvg) through
``dpfl.make_private(..., privacy_unit="user", local_steps=...)``: each round
Poisson-samples users, each sampled user runs ``--local-steps`` SGD steps
from the server's parameters, their pseudo-gradient θ − θ_u is clipped,
summed, noised and fed to server Adam. With LoRA (Hu et al. 2021, "LoRA:
Low-Rank Adaptation of Large Language Models") the trained parameters are
only the adapters: every kernel of the attention (query, key, value, out)
and MLP projections becomes ``W + (α/r)·A·B`` with the base ``W`` frozen,
``A`` [fan-in, r] Gaussian and ``B`` [r, fan-out] zero at the start (so
fine-tuning starts exactly at the base model). The frozen base enters the
loss by closure and only the adapter pytree goes to ``make_private``, so
only adapters are clipped and noised; ε is user-level either way.
``--full-finetune`` runs the same ULS fine-tuning with every parameter
trained, the comparison at equal ε.

Prints ε and the held-out loss (nats per byte) before and after
fine-tuning; with ``--json`` one JSON object is the last stdout line
(``method``, ``epsilon``, ``delta``, ``eval_loss``, ``base_eval_loss``,
``trainable_params``, ``total_params``, ``rounds``, ``seconds``, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import dpfl
from accounting import validate as check

# The corpus and the model are user_level_lm.py's (a sibling script, not a package).
_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
import user_level_lm as corpus  # noqa: E402

PUBLIC_RESIDUE = 3  # modules with sorted index ≡ 3 (mod 8) are the public corpus


# --- the three-way split ---------------------------------------------------------

def split_modules(max_users: int | None = None) -> dict[str, dict[str, np.ndarray]]:
  """{"public", "private", "held_out"}: {module name: windows}, disjoint, by sorted index."""
  split = {"public": {}, "private": {}, "held_out": {}}
  for i, (name, w) in enumerate(corpus.module_windows(max_users)):
    part = ("held_out" if corpus.is_held_out(i) else
            "public" if i % 8 == PUBLIC_RESIDUE else "private")
    split[part][name] = w
  return split


# --- LoRA adapters as a transform of the parameter pytree --------------------------

def _fan_in_axes(path: tuple[str, ...]) -> int:
  # DenseGeneral kernels: query/key/value are [d_model, heads, head_dim] (one
  # input axis); the attention output is [heads, head_dim, d_model] (two).
  return 2 if "out" in path else 1


def lora_targets(params) -> list[tuple[str, ...]]:
  """Paths of the kernels that get adapters: attention and MLP projections of every block."""
  return [path for path in traverse_util.flatten_dict(params)
          if path[-1] == "kernel" and any(p.startswith("_Block_") for p in path)]


def init_lora(key: jax.Array, params, *, rank: int) -> dict[str, dict[str, jax.Array]]:
  """Adapters ``{"/".join(path): {"a": [fan_in, r], "b": [r, fan_out]}}``.

  ``a`` ~ N(0, 1/fan_in) (Gaussian, as in Hu et al.), ``b`` = 0, so ``A·B`` = 0
  and the adapted model starts exactly at the base model.
  """
  rank = check.positive_int("rank", rank)
  flat = traverse_util.flatten_dict(params)
  targets = lora_targets(params)
  adapters = {}
  for path, k in zip(targets, jax.random.split(key, len(targets))):
    shape = flat[path].shape
    cut = _fan_in_axes(path)
    fan_in, fan_out = math.prod(shape[:cut]), math.prod(shape[cut:])
    adapters["/".join(path)] = {
        "a": jax.random.normal(k, (fan_in, rank), flat[path].dtype) / math.sqrt(fan_in),
        "b": jnp.zeros((rank, fan_out), flat[path].dtype)}
  return adapters


def merge_lora(base, adapters, *, scale: float):
  """The adapted parameters: each target kernel ``W + scale·A·B`` (scale = α / r)."""
  flat = dict(traverse_util.flatten_dict(base))
  for name, ab in adapters.items():
    path = tuple(name.split("/"))
    w = flat[path]
    flat[path] = w + scale * (ab["a"] @ ab["b"]).reshape(w.shape)
  return traverse_util.unflatten_dict(flat)


def lora_loss(loss_fn, base, *, scale: float):
  """``loss(adapters, batch)``: ``loss_fn`` of the base (frozen, closed over) plus adapters."""
  base = jax.tree.map(jnp.asarray, base)
  return lambda adapters, batch: loss_fn(merge_lora(base, adapters, scale=scale), batch)


def num_params(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# --- non-private pre-training on the public modules ------------------------------

def pretrain(loss_fn, params, public: dict[str, np.ndarray], *, steps: int, batch_size: int,
             learning_rate: float, seed: int):
  """``steps`` of Adam on random batches of all the public modules' windows (no privacy)."""
  if steps == 0:
    return params
  tokens = np.concatenate(list(public.values()))
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, {"tokens": batch})
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  opt_state = optimizer.init(params)
  for _ in range(steps):
    params, opt_state, _ = step(params, opt_state,
                                tokens[rng.integers(0, len(tokens), batch_size)])
  return params


# --- the run ---------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  p.add_argument("--target-epsilon", type=float, default=8.0, help="user-level ε")
  p.add_argument("--delta", type=float, default=1e-5)
  p.add_argument("--full-finetune", action="store_true",
                 help="train every parameter (default: LoRA adapters only)")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
  p.add_argument("--alpha", type=float, default=16.0, help="LoRA α (adapters scaled by α/r)")
  p.add_argument("--rounds", type=int, default=100, help="server rounds (DP steps)")
  p.add_argument("--users-per-round", type=int, default=32, help="expected sampled users")
  p.add_argument("--local-steps", type=int, default=4)
  p.add_argument("--local-learning-rate", type=float, default=0.1)
  p.add_argument("--l2-clip-norm", type=float, default=1.0,
                 help="C; the pseudo-gradient is clipped at C * local-learning-rate * "
                      "local-steps (the size of that many clipped gradient steps)")
  p.add_argument("--learning-rate", type=float, default=3e-3, help="server Adam")
  p.add_argument("--examples-per-user", type=int, default=8, help="cap k (windows per module)")
  p.add_argument("--pretrain-steps", type=int, default=1000,
                 help="non-private Adam steps on the public modules")
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--num-layers", type=int, default=2)
  p.add_argument("--max-users", type=int, default=None,
                 help="use this many modules, all splits together (default: all, ~560)")
  p.add_argument("--quick", action="store_true", help="a smaller run (≤ 3 minutes)")
  p.add_argument("--seed", type=int, default=None,
                 help="seeds init and pre-training (default 0), sampling and noise "
                      "(default: OS entropy)")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  try:  # the example's own sizes; make_private checks the privacy arguments
    for name in ("rank", "rounds", "users_per_round", "local_steps", "examples_per_user",
                 "d_model", "num_layers"):
      check.positive_int(name, getattr(args, name))
    check.integer("pretrain_steps", args.pretrain_steps, low=0)
    check.positive("alpha", args.alpha)
  except ValueError as error:
    p.error(str(error))
  if args.quick:
    args.rounds = min(args.rounds, 30)
    args.users_per_round = min(args.users_per_round, 16)
    args.pretrain_steps = min(args.pretrain_steps, 300)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  split = split_modules(args.max_users)
  train = corpus.user_datasets(split["private"], args.examples_per_user, seed=0)
  held_out = corpus.user_datasets(split["held_out"], args.examples_per_user, seed=1)
  model = corpus.ByteTransformer(d_model=args.d_model, num_layers=args.num_layers)
  loss_fn = corpus.make_loss(model)
  init_key, lora_key = jax.random.split(jax.random.key(args.seed or 0))
  base = model.init(init_key, jnp.zeros((1, corpus.SEQ_LEN), jnp.int32))
  base = pretrain(loss_fn, base, split["public"], steps=args.pretrain_steps, batch_size=64,
                  learning_rate=3e-3, seed=args.seed or 0)
  base = jax.device_get(base)
  base_eval = corpus.eval_loss(loss_fn, base, held_out)
  pretrained = time.perf_counter() - start
  print(f"users: {len(split['public'])} public modules "
        f"({sum(len(w) for w in split['public'].values())} windows, pre-training), "
        f"{train.num_users} private / {held_out.num_users} held out "
        f"(k={train.examples_per_user}); base model {num_params(base)} parameters, "
        f"held-out loss {base_eval:.4f} nats/byte after {args.pretrain_steps} "
        f"public steps ({pretrained:.0f} s)")

  if args.full_finetune:
    method, params, train_loss = "full", base, loss_fn
  else:
    method = "lora"
    params = init_lora(lora_key, base, rank=args.rank)
    train_loss = lora_loss(loss_fn, base, scale=args.alpha / args.rank)
  trainable = num_params(params)
  total = num_params(base) + (0 if args.full_finetune else trainable)
  # θ − θ_u after τ SGD steps of size η is about τ·η gradients long: clip at τ·η·C.
  private = dpfl.make_private(
      train_loss, optax.adam(args.learning_rate), privacy_unit="user", sampling_unit="user",
      batch_size=args.users_per_round, num_steps=args.rounds, dataset=train,
      target_epsilon=args.target_epsilon, delta=args.delta,
      local_steps=args.local_steps, local_learning_rate=args.local_learning_rate,
      l2_clip_norm=args.l2_clip_norm * args.local_learning_rate * args.local_steps,
      key=args.seed, seed=args.seed)
  print(f"{method}: {trainable} trainable of {total} parameters; C={private.l2_clip_norm:g}, "
        f"σ={private.noise_multiplier:.3f} for user-level ε={args.target_epsilon} at "
        f"δ={args.delta}, q={private.sampler.sampling_prob:.4f}, {args.rounds} rounds of "
        f"{args.local_steps} local steps")
  state = private.init(params)
  step = private.make_step(donate=True)
  for i, (batch, mask) in enumerate(private.batches(train, state)):
    state, aux = step(state, batch, mask)
    if (i + 1) % max(1, args.rounds // 5) == 0:
      print(f"  round {i + 1:4d}  sampled users' loss (not private) "
            f"{float(jnp.sum(aux.values) / jnp.maximum(aux.num_units, 1)):.3f}")
  final = corpus.eval_loss(train_loss, state.params, held_out)
  epsilon = private.epsilon()
  seconds = time.perf_counter() - start
  print(f"held-out eval loss: {final:.4f} nats/byte (base {base_eval:.4f})  "
        f"user-level ε={epsilon:.3f} (δ={args.delta})  {seconds:.0f} s")
  result = {"method": method, "epsilon": epsilon, "delta": args.delta, "eval_loss": final,
            "base_eval_loss": base_eval, "trainable_params": trainable,
            "total_params": total, "rounds": args.rounds, "rank": None if args.full_finetune
            else args.rank, "local_steps": args.local_steps,
            "users_per_round": args.users_per_round,
            "noise_multiplier": private.noise_multiplier,
            "num_public_modules": len(split["public"]), "num_train_users": train.num_users,
            "num_eval_users": held_out.num_users, "pretrain_seconds": pretrained,
            "seconds": seconds}
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
